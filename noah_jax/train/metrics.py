"""Classification metrics as exact sums over masked batches, divided once at the end.

Evaluation never averages per-batch averages: each batch contributes sums and a
count of its real (mask = 1) examples; `finalize` divides the totals.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from noah_jax.train import losses


def classification_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sums of loss, top-1 and top-5 hits, and the count, over examples with mask 1."""
    logits = logits.astype(jnp.float32)
    mask = mask.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    # Ties go to the lower class index (argmax / top_k order), so a constant output
    # scores 1/K, not 100%.
    k5 = min(5, logits.shape[-1])
    top5 = jax.lax.top_k(logits, k5)[1]
    return {
        "loss": jnp.sum(loss * mask),
        "top1": jnp.sum((top5[:, 0] == labels) * mask),
        "top5": jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask),
        "count": jnp.sum(mask),
    }


def real_accuracy_sums(logits: jax.Array, real_labels: jax.Array, mask: jax.Array) -> dict:
    """ImageNet-ReaL top-1 (Beyer et al. 2020): a prediction is right when it is one of
    the image's real labels (multi-hot [B, K]); images without real labels are not
    counted. Sums and count, as `classification_sums`."""
    counted = mask.astype(jnp.float32) * (jnp.max(real_labels, axis=-1) > 0)
    top1 = jnp.argmax(logits.astype(jnp.float32), axis=-1)
    hit = jnp.take_along_axis(real_labels, top1[:, None], axis=-1)[:, 0] > 0
    return {"top1": jnp.sum(hit * counted), "count": jnp.sum(counted)}


def add(total: dict | None, sums: Mapping[str, jax.Array]) -> dict:
    return dict(sums) if total is None else {k: total[k] + sums[k] for k in total}


def finalize(total: Mapping[str, jax.Array]) -> dict:
    """Totals -> means over the counted examples (float64 on the host)."""
    total = {k: np.float64(v) for k, v in jax.device_get(dict(total)).items()}
    count = total.pop("count")
    out = {k: v / max(count, 1.0) for k, v in total.items()}
    out["count"] = count
    return out


# ----------------------------------------------------------------------------------
# Multi-label (COCO / VOC): loss sums per batch on device; mAP and F1 on the host.
# ----------------------------------------------------------------------------------
# mAP ranks every example of a class against all others, so it cannot be a sum of
# per-batch terms: the evaluator gathers the real rows' scores [N, C] and labels
# (or all rows plus the mask) and calls `mean_average_precision` / `multilabel_f1`
# once. The loss, which is a per-example sum, goes through `multilabel_sums`.
# Both host metrics return fractions in [0, 1] (papers print them x 100).


def multilabel_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Sum over mask-1 examples of the class-summed sigmoid BCE, and the count (jittable).

    Feed the result to `add` / `finalize` like `classification_sums`: 'loss' becomes
    the mean per-example loss over the real examples.
    """
    mask = mask.astype(jnp.float32)
    loss = losses.sigmoid_binary_cross_entropy(logits, labels)
    # where, not a product: padded rows may hold anything, Inf/NaN included.
    return {"loss": jnp.sum(jnp.where(mask > 0, loss, 0.0)), "count": jnp.sum(mask)}


def _real_multilabel_rows(scores, labels, mask) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores and bool labels of the mask-1 rows; fails loudly on bad input."""
    scores = np.asarray(scores, np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must be the "
                         "same [N, C] shape")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.shape != scores.shape[:1]:
            raise ValueError(f"mask {mask.shape} must be [N] = {scores.shape[:1]}")
        scores, labels = scores[mask > 0], labels[mask > 0]
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("multi-label labels must be 0 or 1 on the real (mask-1) rows")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite on the real (mask-1) rows")
    return scores, labels.astype(bool)


def average_precision_per_class(scores, labels, mask=None) -> np.ndarray:
    """AP of each class [C], NaN for a class without positives among the real rows.

    AP = sum over distinct score thresholds t_n (descending) of (R_n - R_{n-1}) * P_n,
    the non-interpolated step-wise definition of scikit-learn's
    `average_precision_score`; tied scores form one threshold. Equivalently, the mean
    over positives of the precision at the end of the positive's tie group.
    """
    scores, labels = _real_multilabel_rows(scores, labels, mask)
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, axis=0)
    y = np.take_along_axis(labels, order, axis=0)
    tp = np.cumsum(y, axis=0)
    # Row i's threshold is the last row of its tie group: the next row j >= i at which
    # the (descending) score changes, found by a reversed running minimum.
    is_end = np.concatenate([s[1:] != s[:-1], np.ones((1, s.shape[1]), bool)], axis=0)
    end = np.where(is_end, np.arange(n)[:, None], n)
    end = np.minimum.accumulate(end[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(tp, end, axis=0) / (end + 1.0)
    num_pos = y.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (y * precision_at_end).sum(axis=0) / num_pos
    return np.where(num_pos > 0, ap, np.nan)


def mean_average_precision(scores, labels, mask=None) -> float:
    """mAP: AP averaged over the classes with >= 1 positive among the real rows.

    scores [N, C] (any monotone score: logits or probabilities give the same AP),
    labels [N, C] in {0, 1}, mask [N] (1 = real, 0 = padding; None = all real).
    Classes without positives are left out of the mean (their AP is undefined);
    NaN if no class has a positive.
    """
    ap = average_precision_per_class(scores, labels, mask)
    return float(np.mean(ap[~np.isnan(ap)])) if (~np.isnan(ap)).any() else float("nan")


def multilabel_f1(scores, labels, mask=None, threshold: float = 0.5) -> dict:
    """CP, CR, CF1 (per-class, then averaged) and OP, OR, OF1 (overall) at a threshold.

    `scores` are probabilities (sigmoid outputs); a class is predicted when
    score >= threshold. Conventions:
      * CP and CR are averaged over the classes with >= 1 positive among the real
        rows (the same classes as `mean_average_precision`; on COCO / VOC val that is
        every class, i.e. the usual ML-GCN definition). A class that is never
        predicted has precision 0.
      * CF1 = 2 CP CR / (CP + CR), the F1 of the averages (not the mean per-class F1).
      * OP, OR count true/predicted/actual positives over all (row, class) decisions,
        false positives on classes without positives included; a 0/0 ratio is 0.
    """
    scores, labels = _real_multilabel_rows(scores, labels, mask)
    pred = scores >= threshold
    tp = (pred & labels).sum(axis=0).astype(np.float64)
    n_pred = pred.sum(axis=0).astype(np.float64)
    n_true = labels.sum(axis=0).astype(np.float64)

    def ratio(a, b):
        return np.divide(a, b, out=np.zeros_like(a, np.float64), where=b > 0)

    def f1(p, r):
        return float(2 * p * r / (p + r)) if p + r > 0 else 0.0

    has_pos = n_true > 0
    cp = float(ratio(tp, n_pred)[has_pos].mean()) if has_pos.any() else 0.0
    cr = float(ratio(tp, n_true)[has_pos].mean()) if has_pos.any() else 0.0
    op = float(ratio(tp.sum(), n_pred.sum()))
    o_r = float(ratio(tp.sum(), n_true.sum()))
    return {"CP": cp, "CR": cr, "CF1": f1(cp, cr), "OP": op, "OR": o_r, "OF1": f1(op, o_r)}
