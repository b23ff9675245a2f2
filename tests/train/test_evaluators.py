"""Evaluators: exact metrics over padded, sharded batches, and a new evaluation kind
added by registering one class, with no change to the trainer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from configs import common
from noah_jax.train import checkpoint, evaluators, sharding, trainer
from noah_jax import data
from noah_jax.data import synthetic
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


class ConfidenceScoredSource(synthetic.SyntheticSource):
    eval_kind = "test_confidence"


def test_a_registered_evaluator_runs_in_the_trainer_unchanged(tmp_path, monkeypatch):
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
    source = ConfidenceScoredSource(seed=0, image_size=16, num_classes=4,
                                    num_train_examples=64, num_eval_examples=44)
    monkeypatch.setattr(data, "get_source", lambda *args, **kwargs: source)
    results = trainer.train_and_evaluate(c, str(tmp_path))
    assert set(results) == {"eval/confidence", "eval/count"}

    # The same number computed directly from the checkpoint the run wrote.
    variables, _ = checkpoint.restore_model(tmp_path / "checkpoints")
    model = create_model(c.model.name, num_classes=4, **c.model.overrides)
    batch = source.eval_examples(np.arange(44))
    probs = jax.nn.softmax(model.apply(variables, batch["image"], train=False))
    assert results["eval/count"] == 44
    assert results["eval/confidence"] == pytest.approx(float(probs.max(-1).mean()), rel=1e-5)
