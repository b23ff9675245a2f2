"""The zoo's linen models from Flax NNX through `flax.nnx.bridge.ToNNX`: README.md's "From
Flax NNX" block runs, and a bridged module computes what linen's `apply` computes from
the same variables: logits, BatchNorm statistics in training, dropout with keys from the
module's nnx.Rngs, and loss gradients under nnx.jit."""

import pathlib
import re

import chex
import jax
import numpy as np
import optax
import pytest
from flax import nnx

from noah_jax.models.heads import NOAHHead

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def readme():
    """The names README.md's "From Flax NNX" block defines, after running it here."""
    text = (ROOT / "README.md").read_text()
    (block,) = re.findall(r"\n### From Flax NNX\n.*?```python\n(.*?)```", text, re.S)
    names = {}
    exec(compile(block, "README.md, From Flax NNX", "exec"), names)
    return names


def images_like(readme, seed=0):
    """Random images of the README block's shape (its own are all ones)."""
    return jax.random.normal(jax.random.key(seed), readme["images"].shape)


def next_dropout_keys(model, count):
    """The next `count` dropout keys the bridged `model` will hand to linen, drawn from a
    copy of its nnx.Rngs (ToNNX keeps them in `to_nnx__rngs`)."""
    rngs = nnx.clone(model.to_nnx__rngs)
    return [rngs.dropout() for _ in range(count)]


def changed_leaves(before, after) -> int:
    return sum(not np.array_equal(b, a)
               for b, a in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_readme_block_gives_linen_variables_and_logits(readme):
    linen_model, model, variables = readme["linen_model"], readme["model"], readme["variables"]
    assert readme["logits"].shape == (4, 10) and readme["logits"].dtype == np.float32
    # Training: the batch's statistics and dropout instead of the running ones.
    assert not np.allclose(readme["train_logits"], readme["logits"])
    # The module's state is linen's variables: the same collections, names, shapes, dtypes.
    chex.assert_trees_all_equal_shapes_and_dtypes(
        variables, jax.eval_shape(linen_model.init, jax.random.key(0), readme["images"]))

    x = images_like(readme)
    chex.assert_trees_all_close(model(x, train=False),
                                linen_model.apply(variables, x, train=False), **TOLERANCE)

    # Other linen variables (here: the same ones scaled) loaded into a copy of the module.
    other = jax.tree.map(lambda v: 1.5 * np.asarray(v) + 0.25, variables)
    loaded = nnx.clone(model)
    readme["load_linen_variables"](loaded, other)
    chex.assert_trees_all_close(readme["linen_variables"](loaded), other, **TOLERANCE)
    expected = linen_model.apply(other, x, train=False)
    chex.assert_trees_all_close(loaded(x, train=False), expected, **TOLERANCE)
    assert not np.allclose(expected, model(x, train=False))
    chex.assert_trees_all_close(readme["linen_variables"](model), variables, **TOLERANCE)


def test_loading_names_missing_and_unexpected_variables(readme):
    variables = readme["variables"]
    missing = {**variables, "params": {k: v for k, v in variables["params"].items()
                                       if k != "conv1"}}
    with pytest.raises(KeyError, match=r"params: missing \[\('conv1', 'kernel'\)\]"):
        readme["load_linen_variables"](nnx.clone(readme["model"]), missing)
    unexpected = {**variables, "batch_stats": {**variables["batch_stats"],
                                               "extra": {"mean": np.zeros(3)}}}
    with pytest.raises(KeyError, match=r"unexpected \[\('extra', 'mean'\)\]"):
        readme["load_linen_variables"](nnx.clone(readme["model"]), unexpected)


def test_training_updates_batch_stats_and_draws_dropout_from_rngs(readme):
    """Two training calls of the bridged ResNet: each equals linen's mutable apply with
    the dropout key the module's Rngs gave, and leaves linen's updated statistics."""
    linen_model, model = readme["linen_model"], nnx.clone(readme["model"])
    assert linen_model.head_setting("dropout") > 0  # the NOAH head's dropout on the values
    variables = readme["linen_variables"](model)
    x = images_like(readme, seed=1)
    outputs = []
    for key in next_dropout_keys(model, 2):
        logits = model(x, train=True, mutable=["batch_stats"])
        expected, updates = linen_model.apply(variables, x, train=True, rngs={"dropout": key},
                                              mutable=["batch_stats"])
        chex.assert_trees_all_close(logits, expected, **TOLERANCE)
        after = readme["linen_variables"](model)
        chex.assert_trees_all_close(after["batch_stats"], updates["batch_stats"], **TOLERANCE)
        assert changed_leaves(variables["batch_stats"], after["batch_stats"]) == len(
            jax.tree.leaves(after["batch_stats"]))  # every mean and variance moved
        chex.assert_trees_all_equal(after["params"], variables["params"])
        variables = after
        outputs.append(logits)
    # The same images and parameters: only the dropout masks differ between the calls.
    assert not np.allclose(outputs[0], outputs[1])


def test_bare_noah_head_matches_linen_in_eval_and_with_dropout(readme):
    """A NOAHHead on its own: the README ResNet's head on [B, 2, 2, 512] features like its
    backbone's (the same shapes, so the eager operations are compiled already)."""
    head = NOAHHead(num_classes=10, num_heads=4, key_ratio=0.5, dropout=0.1)
    features = jax.random.normal(jax.random.key(2), (4, 2, 2, 512))
    model = nnx.bridge.lazy_init(
        nnx.bridge.ToNNX(head, rngs=nnx.Rngs(params=0, dropout=1)), features)
    variables = readme["linen_variables"](model)
    assert variables["batch_stats"] == {} and set(variables["params"]) == {
        "query", "value"}

    evaluated = model(features, train=False)
    chex.assert_trees_all_close(evaluated, head.apply(variables, features, train=False),
                                **TOLERANCE)
    (key,) = next_dropout_keys(model, 1)
    trained = model(features, train=True)
    chex.assert_trees_all_close(
        trained, head.apply(variables, features, train=True, rngs={"dropout": key}),
        **TOLERANCE)
    assert not np.allclose(trained, evaluated)


def test_jitted_gradient_step_matches_linen(readme):
    """nnx.value_and_grad under nnx.jit through the bridged ResNet in training mode: the
    loss, the gradients and the statistics are linen's (jax.value_and_grad of apply)."""
    linen_model, model = readme["linen_model"], nnx.clone(readme["model"])
    variables = readme["linen_variables"](model)
    x = images_like(readme, seed=3)
    labels = np.arange(len(x)) % linen_model.num_classes

    def nnx_loss(model, x, labels):
        logits = model(x, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    @nnx.jit
    def nnx_step(model, x, labels):
        return nnx.value_and_grad(nnx_loss)(model, x, labels)

    def linen_loss(params, x, labels, key):
        logits, updates = linen_model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
            rngs={"dropout": key}, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

    (key,) = next_dropout_keys(model, 1)
    loss, grads = nnx_step(model, x, labels)
    (expected_loss, updates), expected_grads = jax.jit(
        jax.value_and_grad(linen_loss, has_aux=True))(variables["params"], x, labels, key)

    chex.assert_trees_all_close(loss, expected_loss, **TOLERANCE)
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), expected_grads, **TOLERANCE)
    assert all(np.abs(g).max() > 0 for g in jax.tree.leaves(expected_grads))
    chex.assert_trees_all_close(readme["linen_variables"](model)["batch_stats"],
                                updates["batch_stats"], **TOLERANCE)
