"""Evaluators: exact metrics over padded, sharded batches; config.evals chooses them, and
a new evaluator is one registered class named there, with no change to the trainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

import extensions
from configs import common
from helpers import demo_config
from noah_jax.train import checkpoint, evaluators, run_log, sharding, trainer
from noah_jax.data import digits, synthetic
from noah_jax.errors import ConfigError
from noah_jax.models import create_model


class Linear(nn.Module):
    """A stand-in model: flattened images -> K logits."""
    num_classes: int

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def padded_batches(images, labels, batch_size):
    """Batches of `batch_size` with the remainder padded by zeros and mask 0."""
    n = len(images)
    padded = -(-n // batch_size) * batch_size
    pad = lambda x: np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), x.dtype)])
    mask = (np.arange(padded) < n).astype(np.float32)
    images, labels = pad(images), pad(labels)
    return [{"image": images[i:i + batch_size], "label": labels[i:i + batch_size],
             "mask": mask[i:i + batch_size]} for i in range(0, padded, batch_size)]


def setup(num_classes, n=37, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(n, 4, 4, 3)).astype(np.float32)
    model = Linear(num_classes)
    params = model.init(jax.random.key(seed), images[:1])["params"]
    logits = np.asarray(model.apply({"params": params}, images), np.float64)
    mesh = sharding.create_mesh(-1, 1)
    return rng, images, model, params, logits, mesh


def test_single_label_evaluator_is_exact_over_padded_batches():
    rng, images, model, params, logits, mesh = setup(7)
    labels = rng.integers(0, 7, len(images)).astype(np.int32)
    scores = evaluators.get("single")(model, mesh).evaluate(
        params, {}, padded_batches(images, labels, 16), sharding.batch_sharding(mesh))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    top5 = np.argsort(-logits, axis=-1, kind="stable")[:, :5]
    assert scores["count"] == 37
    assert scores["top1"] == pytest.approx(np.mean(top5[:, 0] == labels), abs=1e-12)
    assert scores["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)),
                                           abs=1e-12)
    assert scores["loss"] == pytest.approx(-log_probs[np.arange(37), labels].mean(), rel=1e-5)


def test_multilabel_evaluator_gives_scikit_learns_map():
    rng, images, model, params, logits, mesh = setup(5, n=45, seed=1)
    labels = (rng.random((45, 5)) < 0.4).astype(np.float32)
    labels[0] = 1.0  # every class has a positive
    scores = evaluators.get("multilabel")(model, mesh).evaluate(
        params, {}, padded_batches(images, labels, 16), sharding.batch_sharding(mesh))
    expected = np.mean([average_precision_score(labels[:, k], logits[:, k]) for k in range(5)])
    assert scores["count"] == 45
    assert scores["mAP"] == pytest.approx(expected, abs=1e-6)


def test_an_unknown_kind_names_the_registered_ones():
    with pytest.raises(ValueError, match="multilabel, real, single"):
        evaluators.get("top10")


@evaluators.register("test_confidence")
class MeanConfidence(evaluators.Evaluator):
    """A new kind of evaluation: the mean probability of the predicted class."""

    def batch_metrics(self, logits, batch):
        confidence = jax.nn.softmax(logits.astype(jnp.float32)).max(-1)
        return {"confidence": jnp.sum(confidence * batch["mask"]),
                "count": jnp.sum(batch["mask"])}


def test_a_registered_evaluator_runs_in_the_trainer_unchanged(tmp_path):
    c = common.base_config()
    c.model.name = "deit_tiny_patch16_224"
    c.model.overrides.update(img_size=16, patch_size=8, depth=1, embed_dim=48, attn_heads=3)
    c.dataset.update(name="synthetic", image_size=16, num_classes=4, num_train_examples=64,
                     num_eval_examples=44)
    c.update(batch_size=16, eval_batch_size=16, num_epochs=0.0, total_steps=2,
             log_every_steps=1, checkpoint_every_steps=2)
    c.optimizer.name = "adamw"
    c.schedule.name = "constant"
    c.schedule.base_lr = 1e-3
    c.evals.val.type = "test_confidence"
    source = synthetic.SyntheticSource(seed=0, image_size=16, num_classes=4,
                                       num_train_examples=64, num_eval_examples=44)
    results = trainer.train_and_evaluate(c, str(tmp_path))
    assert set(results) == {"eval/confidence", "eval/count"}

    # The same number computed directly from the checkpoint the run wrote.
    variables, _ = checkpoint.restore_model(tmp_path / "checkpoints")
    model = create_model(c.model.name, num_classes=4, **c.model.overrides)
    batch = source.eval_examples(np.arange(44))
    probs = jax.nn.softmax(model.apply(variables, batch["image"], train=False))
    assert results["eval/count"] == 44
    assert results["eval/confidence"] == pytest.approx(float(probs.max(-1).mean()), rel=1e-5)


def test_an_evaluator_from_outside_is_named_in_config_evals(tmp_path):
    """tests/extensions.py's TopK, built with k=2 from its config entry, on its own
    schedule beside the demo's own evaluation."""
    c = demo_config(total_steps=2, log_every_steps=1, eval_every_steps=1,
                    checkpoint_every_steps=2)
    c.evals.top2 = common.evaluation("topk", prefix="top2", every_steps=2, k=2)
    results = trainer.train_and_evaluate(c, str(tmp_path))
    history = run_log.read_metrics(str(tmp_path))
    assert [step for step, _ in history["eval/top1"]] == [1, 2]
    assert [step for step, _ in history["eval/top2/top2"]] == [2]
    assert results["eval/top2/count"] == 360

    variables, _ = checkpoint.restore_model(tmp_path / "checkpoints")
    model = create_model(c.model.name, num_classes=10, head=c.model.head,
                         **c.model.overrides.to_dict())
    batch = digits.DigitsSource(seed=c.seed, image_size=c.dataset.image_size).eval_examples(
        np.arange(360))
    logits = np.asarray(model.apply(variables, batch["image"], train=False))
    top2 = np.argsort(-logits, axis=-1)[:, :2]
    expected = np.mean((top2 == batch["label"][:, None]).any(-1))
    assert results["eval/top2/top2"] == pytest.approx(expected, abs=1e-9)
    assert results["eval/top2/top2"] >= results["eval/top1"]


@pytest.mark.parametrize("entry, message", [
    (dict(type="top10"), r"config.evals.val.type='top10' is not an evaluator; registered: "
                         r"multilabel, real, single"),
    (dict(type="single", evry_steps=5), r"config.evals.val has no field 'evry_steps'; valid "
                                        r"for type 'single': type, dataset, split, prefix"),
    (dict(type="topk", kk=3), r"no field 'kk'; valid .*skip_if_missing, k$"),
    (dict(type="single", every_steps=-1), r"every_steps must be an int >= 0"),
])
def test_a_wrong_evaluator_type_or_field_is_one_line_naming_the_valid_ones(entry, message):
    c = common.base_config()
    c.evals.val = common.evaluation(**entry) if "evry_steps" not in entry and "kk" not in entry \
        else entry
    with pytest.raises(ConfigError, match=message) as e:
        trainer.check_config(c, "/tmp/unused-workdir")
    assert "\n" not in str(e.value)


def test_an_evaluator_refuses_labels_it_does_not_score():
    c = demo_config()
    c.dataset.name, c.dataset.image_size = "digits_multilabel", 64  # multi-hot labels
    source = data_source(c)
    with pytest.raises(ConfigError, match=r"config.evals.val.type='single' scores class_ids "
                                          r"labels, but 'digits_multilabel' evaluation split "
                                          r"has multi_hot labels; use one of multilabel"):
        evaluators.from_config(c, source, Linear(10), sharding.create_mesh(-1, 1),
                               steps_per_epoch=1)


def data_source(c):
    from noah_jax import data
    return data.get_source(c.dataset, seed=c.seed, augment=c.augment)
