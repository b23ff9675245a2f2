"""noah_jax/train/checkpoint.py: round trips, step lookup, loading checks and position embeddings.

A tiny Flax model stands in for the zoo: it has every kind of variable a checkpoint
holds (convolution, BatchNorm statistics, a 'head', optionally a ViT-style 'pos_embed')
and costs no compilation worth mentioning.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from noah_jax.models import layers
from noah_jax.models.vit import VisionTransformer
from noah_jax.train import checkpoint, sharding

FEATURES = 8  # divisible by the 8 fake devices, so FSDP shards the kernels
META = {"model": "tiny", "head": "linear", "num_classes": 10, "overrides": {"depth": 1},
        "dataset": "digits"}
# DeiT's loading quirk (its pos_embed resized to another image size) on TinyNet's pos_embed.
VIT = VisionTransformer()


class TinyNet(nn.Module):
    num_classes: int = 10
    extra_layer: bool = False   # a layer the saved model lacks
    pos_tokens: int = 0         # > 0: a 'pos_embed' [1, pos_tokens, FEATURES] parameter

    @nn.compact
    def __call__(self, images, train=False):
        x = nn.Conv(FEATURES, (3, 3), name="conv")(images)
        x = nn.BatchNorm(use_running_average=not train, name="norm")(x)
        if self.extra_layer:
            x = nn.Dense(FEATURES, name="extra")(x)
        x = x.mean((1, 2))
        if self.pos_tokens:
            pos_embed = self.param("pos_embed", nn.initializers.normal(1.0),
                                   (1, self.pos_tokens, FEATURES))
            x = x + pos_embed.mean(1)
        return nn.Dense(self.num_classes, name="head")(x)


def random_variables(model, seed=0):
    """The model's variables with every leaf random, so that no value (BatchNorm's
    zero means and unit variances included) survives a round trip by accident."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    leaves, treedef = jax.tree.flatten(shapes)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [jnp.asarray(rng.standard_normal(leaf.shape),
                                                    leaf.dtype) for leaf in leaves])


def fsdp_target(variables):
    """ShapeDtypeStructs of `variables` sharded FSDP-style over the 8 fake devices."""
    abstract = jax.eval_shape(lambda: variables)
    shardings = sharding.state_shardings(abstract, sharding.create_mesh(), fsdp=True,
                                         fsdp_min_size=1)
    return sharding.with_shardings(abstract, shardings)


def assert_shardings_equal(arrays, target):
    """Every restored array has the sharding its target ShapeDtypeStruct asked for."""
    chex.assert_trees_all_equal_structs(arrays, target)
    assert ([array.sharding for array in jax.tree.leaves(arrays)]
            == [want.sharding for want in jax.tree.leaves(target)])


# ----------------------------------------------------------------------------------
# Model checkpoints: save_model / restore_model / latest_step.
# ----------------------------------------------------------------------------------
def test_model_round_trip_as_stored_gives_numpy_arrays_and_the_meta(tmp_path):
    variables = random_variables(TinyNet())
    checkpoint.save_model(tmp_path, variables, META, step=7)
    assert checkpoint.latest_step(tmp_path) == 7
    restored, meta = checkpoint.restore_model(tmp_path)
    assert meta == META
    assert all(type(leaf) is np.ndarray for leaf in jax.tree.leaves(restored))
    chex.assert_trees_all_equal(restored, jax.device_get(variables), strict=True)


def test_restore_into_a_sharded_target_gives_its_shardings(tmp_path):
    variables = random_variables(TinyNet())
    checkpoint.save_model(tmp_path, variables, META)
    target = fsdp_target(variables)
    restored, _ = checkpoint.restore_model(tmp_path, target)
    chex.assert_trees_all_equal(restored, variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(restored, target)
    assert_shardings_equal(restored, target)
    # The target asked for real sharding: the conv kernel is split over its output axis.
    kernel = restored["params"]["conv"]["kernel"]
    assert {shard.data.shape for shard in kernel.addressable_shards} == {(3, 3, 3, 1)}


def test_a_model_without_batch_norm_statistics_round_trips(tmp_path):
    variables = {"params": random_variables(TinyNet())["params"]}
    checkpoint.save_model(tmp_path, variables, META)
    target = jax.eval_shape(lambda: variables)  # no 'batch_stats', as a ViT's init
    restored, _ = checkpoint.restore_model(tmp_path, target)
    assert restored["batch_stats"] == {}
    chex.assert_trees_all_equal(restored["params"], variables["params"])


def test_latest_step_and_restoring_an_older_step(tmp_path):
    assert checkpoint.latest_step(tmp_path / "absent") is None
    assert checkpoint.latest_step(tmp_path) is None  # exists, holds no step
    older, newer = random_variables(TinyNet(), seed=1), random_variables(TinyNet(), seed=2)
    checkpoint.save_model(tmp_path, older, META, step=2)
    checkpoint.save_model(tmp_path, newer, dict(META, dataset="other"), step=5)
    assert checkpoint.latest_step(tmp_path) == 5
    restored, meta = checkpoint.restore_model(tmp_path)
    chex.assert_trees_all_equal(restored, newer)
    assert meta["dataset"] == "other"
    restored, meta = checkpoint.restore_model(tmp_path, step=2)
    chex.assert_trees_all_equal(restored, older)
    assert meta == META


def test_latest_step_lists_again_when_a_running_save_deletes_a_step(tmp_path, monkeypatch):
    """A trainer deletes its oldest step after each save (max_to_keep); if that happens
    while Orbax lists the steps, the listing fails on the vanished folder and is taken
    again, up to five times."""
    checkpoint.save_model(tmp_path, random_variables(TinyNet(), seed=1), META, step=3)
    real, calls = checkpoint.manager, []

    def vanishing(fails):
        def manager(*args, **kwargs):
            calls.append(1)
            if len(calls) <= fails:
                raise FileNotFoundError(f"{tmp_path}/1")  # as Orbax's stat of a deleted step
            return real(*args, **kwargs)
        return manager

    monkeypatch.setattr(checkpoint, "manager", vanishing(fails=4))
    assert checkpoint.latest_step(tmp_path) == 3 and len(calls) == 5
    calls.clear()
    monkeypatch.setattr(checkpoint, "manager", vanishing(fails=5))
    with pytest.raises(FileNotFoundError):
        checkpoint.latest_step(tmp_path)
    assert len(calls) == 5


def test_restoring_from_a_directory_without_checkpoints_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no checkpoint in {tmp_path / 'nothing'}"):
        checkpoint.restore_model(tmp_path / "nothing")


def test_drop_head_restores_the_backbone_and_keeps_the_targets_head(tmp_path):
    saved = random_variables(TinyNet(num_classes=10), seed=1)
    checkpoint.save_model(tmp_path, saved, META)
    target = random_variables(TinyNet(num_classes=3), seed=2)
    restored, _ = checkpoint.restore_model(tmp_path, target, drop_head=True)
    chex.assert_trees_all_equal(restored["params"]["head"], target["params"]["head"])
    without_head = {k: v for k, v in restored["params"].items() if k != "head"}
    chex.assert_trees_all_equal(without_head, {k: v for k, v in saved["params"].items()
                                               if k != "head"})
    chex.assert_trees_all_equal(restored["batch_stats"], saved["batch_stats"])
    # Without drop_head the 10-class head does not fit the 3-class model.
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.restore_model(tmp_path, target)
    assert mismatch_lines(error.value) == [
        "shape mismatch: params/head/bias: model (3,), checkpoint (10,)",
        f"shape mismatch: params/head/kernel: model ({FEATURES}, 3), checkpoint ({FEATURES}, 10)",
    ]


def mismatch_lines(error):
    """Every difference a CheckpointMismatchError lists, a line each (its message counts
    them, naming a few)."""
    assert "\n" not in str(error)
    return error.problems


def leaf_keys(tree):
    """'/'-joined key paths of a tree's leaves, by jax.tree_util's own names."""
    return {jax.tree_util.keystr(path, simple=True, separator="/")
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_mismatch_error_lists_every_missing_unexpected_and_misshaped_key(tmp_path):
    checkpoint.save_model(tmp_path, random_variables(TinyNet(pos_tokens=5)), META, step=3)
    target = jax.eval_shape(TinyNet(num_classes=4, extra_layer=True).init,
                            jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.restore_model(tmp_path, target)
    assert str(error.value) == (
        f"checkpoint {tmp_path} (step 3: tiny head=linear num_classes=10 depth=1) does not "
        "fit the model: 2 keys missing (params/extra/bias; params/extra/kernel), 1 unexpected "
        "key (params/pos_embed), 2 of another shape (params/head/bias: model (4,), checkpoint "
        f"(10,); params/head/kernel: model ({FEATURES}, 4), checkpoint ({FEATURES}, 10))")
    assert mismatch_lines(error.value) == [
        f"missing in checkpoint: params/extra/bias ({FEATURES},)",
        f"missing in checkpoint: params/extra/kernel ({FEATURES}, {FEATURES})",
        f"unexpected in checkpoint: params/pos_embed (1, 5, {FEATURES})",
        "shape mismatch: params/head/bias: model (4,), checkpoint (10,)",
        f"shape mismatch: params/head/kernel: model ({FEATURES}, 4), checkpoint ({FEATURES}, 10)",
    ]


def test_an_init_from_that_does_not_fit_names_the_settings_that_differ_and_what_to_do(
        tmp_path):
    """check_model_fits (the trainer's check of config.init_from) in one line: the
    settings in which the checkpoint's model differs from the run's, what to change,
    then the counts; a checkpoint that differs only in its head is pointed at drop_head."""
    checkpoint.save_model(tmp_path, random_variables(TinyNet()), META)
    three_classes = jax.eval_shape(TinyNet(num_classes=3).init, jax.random.key(0),
                                   jnp.zeros((1, 8, 8, 3)))
    run = checkpoint.model_settings("tiny", "linear", 3, {"depth": 1})
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.check_model_fits(tmp_path, three_classes, run=run)
    assert str(error.value) == (
        f"checkpoint {tmp_path} (step 0: tiny head=linear num_classes=10; this run: "
        "num_classes=3) does not fit the model: give config.init_from.path a checkpoint of "
        "this run's model, or set config.model to the checkpoint's, or keep all but its head "
        "(config.init_from.drop_head=True) to train a new one; 2 of another shape "
        "(params/head/bias: model (3,), checkpoint (10,); params/head/kernel: model "
        f"({FEATURES}, 3), checkpoint ({FEATURES}, 10))")
    checkpoint.check_model_fits(tmp_path, three_classes, drop_head=True, run=run)  # fits

    deeper = jax.eval_shape(TinyNet(extra_layer=True).init, jax.random.key(0),
                            jnp.zeros((1, 8, 8, 3)))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.check_model_fits(tmp_path, deeper, drop_head=True, run=checkpoint.
                                    model_settings("tiny", "linear", 10, {"depth": 2}))
    assert str(error.value) == (
        f"checkpoint {tmp_path} (step 0: tiny head=linear depth=1; this run: depth=2) does "
        "not fit the model: give config.init_from.path a checkpoint of this run's model, or "
        "set config.model to the checkpoint's; 2 keys missing (params/extra/bias; "
        "params/extra/kernel)")
    assert error.value.problems == [f"missing in checkpoint: params/extra/bias ({FEATURES},)",
                                    "missing in checkpoint: params/extra/kernel "
                                    f"({FEATURES}, {FEATURES})"]


def test_the_model_a_checkpoint_holds_in_a_few_words():
    # Another model than the run's (or no run): the checkpoint's settings, six at most.
    many = {"model": "resnet18", "head": "noah", "num_classes": 1000,
            "overrides": {f"o{i}": i for i in range(7)}}
    assert checkpoint.held_model(many) == ("resnet18 head=noah num_classes=1000 o0=0 o1=1 "
                                           "o2=2 o3=3 ...")
    assert checkpoint.held_model(many, checkpoint.model_settings("tiny")) == (
        checkpoint.held_model(many))
    # The same model: only the settings that differ, on both sides (a head that is the
    # same is named too).
    held = {"model": "resnet18", "head": "noah", "num_classes": 1000,
            "overrides": {"o0": 0, "o1": 1}}
    run = checkpoint.model_settings("resnet18", "linear", 1000, {"o0": 0, "o2": 2})
    assert checkpoint.held_model(held, run) == ("resnet18 head=noah o1=1 o2=unset; this run: "
                                                "head=linear o1=unset o2=2")
    run = checkpoint.model_settings("resnet18", "noah", 10, {"o0": 0, "o1": 1})
    assert checkpoint.held_model(held, run) == ("resnet18 head=noah num_classes=1000; this "
                                                "run: num_classes=10")
    assert checkpoint.held_model({"model": "x"}) == "x"
    assert checkpoint.held_model({}) == "" and checkpoint.held_model({"head": "noah"}) == ""


# ----------------------------------------------------------------------------------
# Position embeddings of another image size.
# ----------------------------------------------------------------------------------
def keys_cubic(t, a=-0.5):
    """The Keys cubic convolution kernel (a = -0.5), which 'bicubic' resizing uses."""
    t = np.abs(t)
    return np.where(t <= 1, (a + 2) * t**3 - (a + 3) * t**2 + 1,
                    np.where(t < 2, a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a, 0.0))


def bicubic_upsample(grid, size):
    """[g, g, D] -> [size, size, D] in float64: half-pixel centres, and at the borders
    the kernel weights of the samples that exist, renormalised to sum to one."""
    g = grid.shape[0]
    centres = (np.arange(size) + 0.5) * g / size - 0.5
    weights = keys_cubic(centres[:, None] - np.arange(g)[None, :])
    weights /= weights.sum(1, keepdims=True)
    return np.einsum("oi,pj,ijd->opd", weights, weights, grid.astype(np.float64))


def test_resize_position_embedding_keeps_the_class_token_and_resizes_the_grid():
    rng = np.random.default_rng(0)
    grid = rng.normal(size=(3, 3, 4)).astype(np.float32)
    cls = rng.normal(size=(1, 4)).astype(np.float32)
    stored = np.concatenate([cls, grid.reshape(9, 4)])[None]
    out = layers.resize_position_embedding(stored, 1 + 36)
    chex.assert_shape(out, (1, 37, 4))
    chex.assert_type(out, np.float32)
    np.testing.assert_array_equal(out[0, 0], cls[0])
    np.testing.assert_allclose(out[0, 1:].reshape(6, 6, 4), bicubic_upsample(grid, 6),
                               rtol=1e-5, atol=1e-5)
    # A constant grid stays constant; a same-size resize is the identity.
    const = np.ones((1, 1 + 16, 2), np.float32)
    np.testing.assert_allclose(layers.resize_position_embedding(const, 1 + 49), 1.0,
                               rtol=1e-6)
    np.testing.assert_allclose(layers.resize_position_embedding(stored, 10), stored,
                               atol=1e-6)
    with pytest.raises(ValueError, match="cannot resize"):
        layers.resize_position_embedding(stored, 1 + 30)


def test_resize_position_embedding_without_a_class_token_keeps_the_dtype():
    # The NOAH ViTs have no class token: 16 tokens are a 4 x 4 grid, all of it resized.
    grid = np.random.default_rng(1).normal(size=(4, 4, 3)).astype(np.float16)
    out = layers.resize_position_embedding(grid.reshape(1, 16, 3), 49)
    chex.assert_shape(out, (1, 49, 3))
    chex.assert_type(out, np.float16)
    np.testing.assert_allclose(out[0].reshape(7, 7, 3), bicubic_upsample(grid, 7),
                               rtol=2e-3, atol=2e-3)


def test_restore_model_resizes_a_stored_position_embedding_on_request(tmp_path):
    saved = random_variables(TinyNet(pos_tokens=1 + 4), seed=3)  # class token + 2 x 2
    checkpoint.save_model(tmp_path, saved, META)
    target = fsdp_target(random_variables(TinyNet(pos_tokens=1 + 16)))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.restore_model(tmp_path, target)
    assert mismatch_lines(error.value) == [
        f"shape mismatch: params/pos_embed: model (1, 17, {FEATURES}), "
        f"checkpoint (1, 5, {FEATURES})"]

    restored, _ = checkpoint.restore_model(tmp_path, target, adapt=VIT.adapt_checkpoint)
    stored_pos_embed = np.asarray(saved["params"]["pos_embed"])
    np.testing.assert_array_equal(restored["params"]["pos_embed"][0, 0], stored_pos_embed[0, 0])
    np.testing.assert_allclose(
        restored["params"]["pos_embed"][0, 1:].reshape(4, 4, FEATURES),
        bicubic_upsample(stored_pos_embed[0, 1:].reshape(2, 2, FEATURES), 4),
        rtol=1e-5, atol=1e-5)
    others = {k: v for k, v in restored["params"].items() if k != "pos_embed"}
    chex.assert_trees_all_equal(others, {k: v for k, v in saved["params"].items()
                                         if k != "pos_embed"})
    chex.assert_trees_all_equal(restored["batch_stats"], saved["batch_stats"])
    assert_shardings_equal(restored, target)


# ----------------------------------------------------------------------------------
# Training state: save_state / restore_state.
# ----------------------------------------------------------------------------------
def train_state(tx, seed=0):
    """A train state as the trainer keeps it, after one update (so the optimiser's
    buffers are not zeros)."""
    variables = random_variables(TinyNet(), seed)
    params = variables["params"]
    grads = jax.tree.map(jnp.ones_like, params)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    return {"step": jnp.array(1, jnp.int32), "params": optax.apply_updates(params, updates),
            "batch_stats": variables["batch_stats"], "opt_state": opt_state,
            "ema_params": params}


def test_train_state_round_trip_into_sharded_targets(tmp_path):
    state = train_state(optax.sgd(0.1, momentum=0.9))
    with checkpoint.manager(tmp_path, async_save=False) as mngr:
        checkpoint.save_state(mngr, 4, state, META)
        mngr.wait_until_finished()
        target = fsdp_target(state)
        restored = checkpoint.restore_state(mngr, 4, target)
    chex.assert_trees_all_equal(restored, state, strict=True)
    chex.assert_trees_all_equal_structs(restored, state)
    assert_shardings_equal(restored, target)
    # The 'model' item of a training checkpoint is what evaluation and init_from read.
    variables, meta = checkpoint.restore_model(tmp_path)
    chex.assert_trees_all_equal(variables, {"params": state["params"],
                                            "batch_stats": state["batch_stats"]})
    assert meta == META


def test_restore_state_refuses_a_model_only_checkpoint_and_another_optimiser(tmp_path):
    sgd_state = train_state(optax.sgd(0.1, momentum=0.9))
    checkpoint.save_model(tmp_path / "model_only", sgd_state, META)
    with checkpoint.manager(tmp_path / "model_only", read_only=True) as mngr:
        with pytest.raises(checkpoint.CheckpointMismatchError, match="has no training state"):
            checkpoint.restore_state(mngr, 0, jax.eval_shape(lambda: sgd_state))

    with checkpoint.manager(tmp_path / "sgd", async_save=False) as mngr:
        checkpoint.save_state(mngr, 1, sgd_state, META)
        mngr.wait_until_finished()
        adamw_state = jax.eval_shape(lambda: train_state(optax.adamw(0.1)))
        with pytest.raises(checkpoint.CheckpointMismatchError,
                           match="does not fit this run's model or optimiser") as error:
            checkpoint.restore_state(mngr, 1, adamw_state)
    # One line: the model the checkpoint holds, what to do, then the optimiser's keys
    # counted, three of each kind named (the parameters fit, so they are not counted).
    missing = sorted(leaf_keys(adamw_state) - leaf_keys(sgd_state))
    unexpected = sorted(leaf_keys(sgd_state) - leaf_keys(adamw_state))
    assert len(missing) > 3 and len(unexpected) > 3
    assert str(error.value) == (
        f"the checkpoint at {tmp_path / 'sgd'} step 1 (tiny head=linear num_classes=10 "
        "depth=1) does not fit this run's model or optimiser: use another --workdir, or "
        f"resume with the config that wrote it; {len(missing)} keys missing (e.g. "
        f"{'; '.join(missing[:3])}), {len(unexpected)} unexpected keys (e.g. "
        f"{'; '.join(unexpected[:3])})")
    assert len(str(error.value)) - len(str(tmp_path)) < 400
    # Every difference is kept, key by key: Adam's moments are missing, SGD's trace is
    # unexpected, and the parameters (which fit) are not listed.
    assert len(error.value.problems) == len(missing) + len(unexpected)
    lines = mismatch_lines(error.value)
    assert "missing in checkpoint: opt_state/0/mu/conv/kernel (3, 3, 3, 8)" in lines
    assert "missing in checkpoint: opt_state/0/count ()" in lines
    assert "unexpected in checkpoint: opt_state/0/trace/head/bias (10,)" in lines
    assert not [line for line in lines if "params" in line]
