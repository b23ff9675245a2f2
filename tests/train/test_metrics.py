"""Exact masked sums of classification metrics, against numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from noah_jax.train import metrics


def test_sums_over_masked_batches_equal_numpy_over_the_real_examples():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((3, 16, 12)).astype(np.float32)   # 3 batches of 16
    labels = rng.integers(0, 12, (3, 16))
    mask = np.ones((3, 16), np.float32)
    mask[2, 9:] = 0  # the padded tail of the last batch
    labels[2, 9:] = 0
    total = None
    for b in range(3):
        total = metrics.add(total, metrics.classification_sums(
            jnp.asarray(logits[b]), jnp.asarray(labels[b]), jnp.asarray(mask[b])))
    out = metrics.finalize(total)

    real = mask.reshape(-1) > 0
    lg, lb = logits.reshape(-1, 12)[real].astype(np.float64), labels.reshape(-1)[real]
    log_probs = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
    order = np.argsort(-lg, axis=-1, kind="stable")
    assert out["count"] == 41
    np.testing.assert_allclose(out["loss"], -log_probs[np.arange(41), lb].mean(), rtol=1e-5)
    np.testing.assert_allclose(out["top1"], np.mean(order[:, 0] == lb))
    np.testing.assert_allclose(out["top5"], np.mean((order[:, :5] == lb[:, None]).any(-1)))


def test_constant_logits_score_chance_not_perfect():
    logits = jnp.zeros((10, 10))
    sums = metrics.classification_sums(logits, jnp.arange(10), jnp.ones(10))
    assert float(sums["top1"]) == 1.0   # only class 0 wins the tie
    assert float(sums["top5"]) == 5.0


def test_sums_are_jittable():
    f = jax.jit(metrics.classification_sums)
    out = f(jnp.eye(4) * 3, jnp.array([0, 1, 2, 0]), jnp.array([1.0, 1.0, 1.0, 0.0]))
    assert float(out["top1"]) == 3.0 and float(out["count"]) == 3.0
