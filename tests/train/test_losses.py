"""noah_jax/train/losses.py: per-example losses against float64 numpy formulas and optax."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import bce_float64
from noah_jax.train import losses


def asl_float64(x, y, gamma_neg, gamma_pos, clip):
    """The asymmetric loss as the paper writes it (p_m = max(p - clip, 0)), in float64."""
    x, y = np.float64(x), np.float64(y)
    p = 1 / (1 + np.exp(-x))
    p_m = np.maximum(p - clip, 0)
    pos = -((1 - p) ** gamma_pos) * np.log(p)
    neg = -(p_m ** gamma_neg) * np.log(1 - p_m)
    return (y * pos + (1 - y) * neg).sum(-1)


def random_logits_and_labels(seed=5, batch=6, classes=9, scale=4.0):
    """float32 logits [batch, classes] of spread `scale` and int32 multi-hot labels."""
    rng = np.random.default_rng(seed)
    return ((scale * rng.standard_normal((batch, classes))).astype(np.float32),
            rng.integers(0, 2, (batch, classes)).astype(np.int32))


def test_bce_against_float64_and_optax():
    x, y = random_logits_and_labels()
    got = losses.sigmoid_binary_cross_entropy(x, y)
    chex.assert_shape(got, (6,))
    chex.assert_type(got, jnp.float32)
    np.testing.assert_allclose(got, bce_float64(x, y), rtol=1e-6)
    np.testing.assert_allclose(got, optax.sigmoid_binary_cross_entropy(x, y).sum(-1), rtol=1e-6)
    # bfloat16 logits are computed in float32.
    chex.assert_type(losses.sigmoid_binary_cross_entropy(jnp.asarray(x, jnp.bfloat16), y),
                     jnp.float32)


def test_asl_reduces_to_bce_without_focusing_or_clipping():
    x, y = random_logits_and_labels(scale=30.0)  # includes |x| > 18, where an eps clamp bites
    np.testing.assert_allclose(
        losses.asymmetric_loss(x, y, gamma_neg=0, gamma_pos=0, clip=0),
        losses.sigmoid_binary_cross_entropy(x, y), rtol=1e-6)


@pytest.mark.parametrize("gamma_neg,gamma_pos,clip", [(4, 0, 0.05), (2, 1, 0.0), (0, 2, 0.1)])
def test_asl_against_float64_formula(gamma_neg, gamma_pos, clip):
    x, y = random_logits_and_labels()
    got = losses.asymmetric_loss(x, y, gamma_neg=gamma_neg, gamma_pos=gamma_pos, clip=clip)
    chex.assert_shape(got, (6,))
    chex.assert_type(got, jnp.float32)
    assert (got >= 0).all()
    np.testing.assert_allclose(got, asl_float64(x, y, gamma_neg, gamma_pos, clip),
                               rtol=1e-5, atol=1e-7)


def test_asl_clip_gives_easy_negatives_exactly_zero_loss_and_gradient():
    # Four one-class examples, all negatives. With clip = 0.05, those with
    # sigmoid(x) <= 0.05 (x <= -2.944) are discarded entirely.
    x = jnp.array([[-3.0], [-8.0], [-2.0], [1.0]])
    y = jnp.zeros((4, 1), jnp.int32)
    per_example = losses.asymmetric_loss(x, y)
    np.testing.assert_array_equal(per_example[:2], [0.0, 0.0])
    np.testing.assert_allclose(per_example[2:], asl_float64(x[2:], y[2:], 4.0, 0.0, 0.05),
                               rtol=1e-5)
    grad = jax.grad(lambda x: losses.asymmetric_loss(x, y).sum())(x)
    np.testing.assert_array_equal(grad[:2, 0], [0.0, 0.0])
    assert (grad[2:, 0] > 0).all()  # a hard negative is pushed down


def test_softmax_cross_entropy_ids_soft_targets_and_smoothing():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, 5)
    log_p = x.astype(np.float64) - np.log(np.exp(x.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(losses.softmax_cross_entropy(x, ids),
                               -log_p[np.arange(5), ids], rtol=1e-6)
    soft = rng.dirichlet(np.ones(7), 5).astype(np.float32)
    np.testing.assert_allclose(losses.softmax_cross_entropy(x, soft),
                               -(soft * log_p).sum(-1), rtol=1e-6)
    smoothed = 0.9 * np.eye(7)[ids] + 0.1 / 7
    np.testing.assert_allclose(losses.softmax_cross_entropy(x, ids, label_smoothing=0.1),
                               -(smoothed * log_p).sum(-1), rtol=1e-6)


def test_gradients_equal_the_closed_forms():
    # d/dx BCE = sigmoid(x) - y; d/dx softmax CE = softmax(x) - (smoothed) targets.
    x, y = random_logits_and_labels(seed=8)
    x64 = x.astype(np.float64)
    grad = jax.grad(lambda x: losses.sigmoid_binary_cross_entropy(x, y).sum())(x)
    np.testing.assert_allclose(grad, 1 / (1 + np.exp(-x64)) - y, rtol=1e-5, atol=1e-7)
    ids = np.arange(6) % 9
    grad = jax.grad(lambda x: losses.softmax_cross_entropy(x, ids, 0.2).sum())(x)
    softmax = np.exp(x64 - x64.max(-1, keepdims=True))
    softmax /= softmax.sum(-1, keepdims=True)
    np.testing.assert_allclose(grad, softmax - (0.8 * np.eye(9)[ids] + 0.2 / 9),
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_fn,clipped", [
    (losses.sigmoid_binary_cross_entropy, False),
    (losses.asymmetric_loss, True),
    (lambda x, y: losses.asymmetric_loss(x, y, gamma_neg=0, gamma_pos=0, clip=0), False),
    (lambda x, y: losses.asymmetric_loss(x, y, gamma_neg=2, gamma_pos=1, clip=0), False),
], ids=["bce", "asl", "asl-as-bce", "asl-noclip"])
def test_losses_and_gradients_finite_for_large_logits(loss_fn, clipped):
    x = jnp.array([[100.0, -100.0, 100.0, -100.0, 0.0]])
    y = jnp.array([[1, 1, 0, 0, 1]])   # right, wrong, wrong, right, undecided
    value, grad = jax.jit(jax.value_and_grad(lambda x: loss_fn(x, y).sum()))(x)
    assert np.isfinite(value) and np.isfinite(grad).all()
    # A confidently wrong positive still pushes back (log_sigmoid, no eps clamp).
    assert grad[0, 1] < 0 and grad[0, 4] < 0
    if clipped:
        # ASL bounds a negative's loss by -log(clip); it saturates like sigmoid(x).
        assert grad[0, 2] == 0 and value < 100 - 4 * np.log(0.05)
    else:
        assert grad[0, 2] > 0 and value > 200
