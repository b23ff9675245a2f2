"""Per-example training losses, float32 inside, numerically stable for large logits.

Every function returns one loss per example, shape [B]; the caller reduces (a mean
for training, a masked sum for evaluation, see `metrics.multilabel_sums`).
Multi-label losses sum over classes, as in the usual multi-label COCO/VOC recipes.
Hyper-parameters (smoothing, gammas, clip) are static Python numbers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array,
                          label_smoothing: float = 0.0) -> jax.Array:
    """Single-label cross-entropy, [B]. `labels`: class ids [B] or (soft) targets [B, K].

    Smoothing mixes the targets with the uniform distribution:
    (1 - label_smoothing) * targets + label_smoothing / K (optax.smooth_labels).
    """
    logits = logits.astype(jnp.float32)
    if labels.ndim == logits.ndim - 1:
        labels = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    labels = labels.astype(jnp.float32)
    if label_smoothing > 0:
        labels = optax.smooth_labels(labels, label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Multi-label BCE summed over classes, [B]; labels [B, C] in {0, 1} (or in [0, 1])."""
    logits = logits.astype(jnp.float32)
    labels = labels.astype(jnp.float32)
    # optax works from log_sigmoid, so |logits| = 100 gives loss 100 and gradient +-1.
    return optax.sigmoid_binary_cross_entropy(logits, labels).sum(axis=-1)


def asymmetric_loss(logits: jax.Array, labels: jax.Array, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05,
                    eps: float = 1e-8) -> jax.Array:
    """Asymmetric loss (Ridnik et al., ICCV 2021, "ASL"), summed over classes, [B], >= 0.

    With p = sigmoid(x) and the shifted negative probability p_m = max(p - clip, 0):
        positives:  -(1 - p)^gamma_pos * log(p)
        negatives:  -p_m^gamma_neg * log(1 - p_m)
    gamma_neg = gamma_pos = clip = 0 gives `sigmoid_binary_cross_entropy` exactly.

    Unlike the reference PyTorch code, which clamps p and 1 - p_m at `eps` before the
    log, log(p) and (for clip = 0) log(1 - p) come from log_sigmoid, so a confidently
    wrong positive keeps its true loss and a non-zero gradient; `eps` only floors
    1 - p_m when 0 < clip < eps. The two agree wherever p > eps. The focusing weights
    are differentiated through (the reference default, no stop-gradient).
    """
    x = logits.astype(jnp.float32)
    y = labels.astype(jnp.float32)
    log_p = jax.nn.log_sigmoid(x)
    log_1mp = jax.nn.log_sigmoid(-x)  # log(1 - p)

    # (1 - p)^gamma as exp(gamma * log(1 - p)): finite value and gradient everywhere.
    loss_pos = -jnp.exp(gamma_pos * log_1mp) * log_p

    if clip > 0:
        # 1 - p_m = min(1 - p + clip, 1) >= clip: the log is safe.
        log_1mpm = jnp.log(jnp.clip(jax.nn.sigmoid(-x) + clip, eps, 1.0))
        p_m = jnp.maximum(jax.nn.sigmoid(x) - clip, 0.0)
        if gamma_neg == 0:
            w_neg = jnp.ones_like(p_m)
        else:
            # p_m is exactly 0 for easy negatives: keep pow's gradient away from 0^(g-1).
            positive = p_m > 0
            w_neg = jnp.where(positive, jnp.where(positive, p_m, 1.0) ** gamma_neg, 0.0)
    else:
        log_1mpm = log_1mp
        w_neg = jnp.exp(gamma_neg * log_p)
    loss_neg = -w_neg * log_1mpm
    return (y * loss_pos + (1.0 - y) * loss_neg).sum(axis=-1)
