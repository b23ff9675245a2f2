"""Multi-label metrics: mAP, CF1/OF1 and masked loss sums (the losses: test_losses.py).

scikit-learn is the reference for average precision here and only here.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from helpers import bce_float64
from noah_jax.train import metrics


def _sklearn_map(scores, labels):
    aps = [average_precision_score(labels[:, c], scores[:, c])
           for c in range(labels.shape[1]) if labels[:, c].any()]
    return float(np.mean(aps))


def _random_multilabel(seed, n=300, c=12, decimals=None):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, c)) < rng.uniform(0.05, 0.5, c)).astype(np.int32)
    # Informative but noisy scores, so AP is neither 0 nor 1.
    scores = 1 / (1 + np.exp(-(2.0 * labels + rng.standard_normal((n, c)))))
    if decimals is not None:
        scores = np.round(scores, decimals)
    return scores.astype(np.float32), labels


# ---------------------------------------------------------------------------- mAP


@pytest.mark.parametrize("decimals", [None, 1], ids=["distinct", "ties"])
def test_map_equals_sklearn(decimals):
    scores, labels = _random_multilabel(0, decimals=decimals)
    if decimals is not None:
        assert len(np.unique(scores)) <= 11  # really many ties
    got = metrics.mean_average_precision(scores, labels)
    np.testing.assert_allclose(got, _sklearn_map(scores, labels), rtol=0, atol=1e-6)
    per_class = metrics.average_precision_per_class(scores, labels)
    want = [average_precision_score(labels[:, c], scores[:, c]) for c in range(12)]
    np.testing.assert_allclose(per_class, want, rtol=0, atol=1e-6)


def test_map_leaves_out_classes_without_positives():
    scores, labels = _random_multilabel(1)
    labels[:, [2, 7]] = 0
    ap = metrics.average_precision_per_class(scores, labels)
    assert np.isnan(ap[[2, 7]]).all() and not np.isnan(np.delete(ap, [2, 7])).any()
    got = metrics.mean_average_precision(scores, labels)
    np.testing.assert_allclose(got, _sklearn_map(scores, labels), rtol=0, atol=1e-6)
    assert np.isnan(metrics.mean_average_precision(scores, np.zeros_like(labels)))


def test_map_ignores_padded_rows_whatever_they_hold():
    scores, labels = _random_multilabel(2, decimals=1)
    rng = np.random.default_rng(3)
    pad_scores = rng.random((37, 12)).astype(np.float32)
    pad_labels = rng.integers(0, 2, (37, 12))
    pad_labels[:, 5] = 1      # a padded positive for a class ...
    labels[:, 5] = 0          # ... that has none among the real rows
    want = _sklearn_map(scores, labels)
    # Interleave padding with real rows, and give the padding junk labels too.
    all_scores = np.concatenate([pad_scores[:20], scores, pad_scores[20:]])
    all_labels = np.concatenate([pad_labels[:20] * 7, labels, pad_labels[20:]])
    mask = np.r_[np.zeros(20), np.ones(len(scores)), np.zeros(17)].astype(np.float32)
    got = metrics.mean_average_precision(jnp.asarray(all_scores), jnp.asarray(all_labels),
                                         jnp.asarray(mask))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.isnan(metrics.average_precision_per_class(all_scores, all_labels, mask)[5])


def test_map_by_hand():
    # Class 0, distinct scores: positives at ranks 1 and 3 -> (1/1 + 2/3) / 2 = 5/6.
    # Class 1, tie at 0.5 between a positive and a negative: thresholds 0.9 (P=0, R=0),
    # 0.5 (P=1/3, R=1/2), 0.1 (P=2/4, R=1) -> 1/2 * 1/3 + 1/2 * 1/2 = 5/12.
    # Class 2: no positive, left out of the mean.
    scores = np.array([[0.9, 0.9, 0.3], [0.8, 0.5, 0.2], [0.7, 0.5, 0.1], [0.6, 0.1, 0.0]])
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0], [0, 1, 0]])
    np.testing.assert_allclose(metrics.average_precision_per_class(scores, labels)[:2],
                               [5 / 6, 5 / 12], rtol=0, atol=1e-12)
    np.testing.assert_allclose(metrics.mean_average_precision(scores, labels),
                               (5 / 6 + 5 / 12) / 2, rtol=0, atol=1e-12)


def test_map_rejects_non_binary_labels_on_real_rows():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.mean_average_precision(np.zeros((2, 2)), np.array([[0, 2], [1, 0]]))


# ----------------------------------------------------------------------------- F1


def _f1_by_definition(scores, labels, threshold):
    pred = scores >= threshold
    cps, crs = [], []
    for c in range(labels.shape[1]):
        if labels[:, c].sum() == 0:
            continue
        npred = pred[:, c].sum()
        tp = (pred[:, c] & (labels[:, c] == 1)).sum()
        cps.append(tp / npred if npred else 0.0)
        crs.append(tp / labels[:, c].sum())
    cp, cr = np.mean(cps), np.mean(crs)
    tp = (pred & (labels == 1)).sum()
    op, o_r = tp / pred.sum(), tp / labels.sum()
    return {"CP": cp, "CR": cr, "CF1": 2 * cp * cr / (cp + cr),
            "OP": op, "OR": o_r, "OF1": 2 * op * o_r / (op + o_r)}


@pytest.mark.parametrize("threshold", [0.5, 0.8])
def test_f1_equals_definition(threshold):
    scores, labels = _random_multilabel(4, decimals=1)
    labels[:, 3] = 0                  # a class without positives: left out of CP/CR
    scores[:, 4] = 0.0                # a class never predicted: precision 0
    mask = np.ones(len(scores))
    mask[-25:] = 0
    got = metrics.multilabel_f1(scores, labels, mask, threshold)
    want = _f1_by_definition(scores[:-25], labels[:-25], threshold)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12, err_msg=k)


def test_f1_by_hand():
    scores = np.array([[0.9, 0.6, 0.1], [0.4, 0.7, 0.2], [0.8, 0.2, 0.3], [0.5, 0.1, 0.0]])
    labels = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [1, 0, 0]])
    # Predicted (>= 0.5): class 0 rows {0, 2, 3}, class 1 rows {0, 1}, class 2 none.
    # class 0: tp 2 / pred 3 / true 3; class 1: tp 1 / 2 / 1; class 2: tp 0 / 0 / 1.
    cp, cr = (2 / 3 + 1 / 2 + 0) / 3, (2 / 3 + 1 + 0) / 3
    op, o_r = 3 / 5, 3 / 5
    got = metrics.multilabel_f1(scores, labels)
    np.testing.assert_allclose(
        [got[k] for k in ("CP", "CR", "CF1", "OP", "OR", "OF1")],
        [cp, cr, 2 * cp * cr / (cp + cr), op, o_r, 0.6], rtol=1e-12)


# ------------------------------------------------------------- masked loss sums


def test_multilabel_sums_are_exact_over_masked_batches():
    rng = np.random.default_rng(7)
    logits = rng.standard_normal((3, 8, 5)).astype(np.float32)
    labels = rng.integers(0, 2, (3, 8, 5))
    mask = np.ones((3, 8), np.float32)
    mask[2, 3:] = 0
    logits[2, 3:] = np.inf            # padding may hold anything
    sums_fn = jax.jit(metrics.multilabel_sums)
    total = None
    for b in range(3):
        total = metrics.add(total, sums_fn(logits[b], labels[b], mask[b]))
    out = metrics.finalize(total)
    real = mask.reshape(-1) > 0
    assert out["count"] == 19
    np.testing.assert_allclose(
        out["loss"], bce_float64(logits.reshape(-1, 5)[real], labels.reshape(-1, 5)[real]).mean(),
        rtol=1e-6)
