"""Classification metrics as exact sums over masked batches, divided once at the end.

Evaluation never averages per-batch averages: each batch contributes sums and a
count of its real (mask = 1) examples; `finalize` divides the totals.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np


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


def add(total: dict | None, sums: Mapping[str, jax.Array]) -> dict:
    return dict(sums) if total is None else {k: total[k] + sums[k] for k in total}


def finalize(total: Mapping[str, jax.Array]) -> dict:
    """Totals -> means over the counted examples (float64 on the host)."""
    total = {k: np.float64(v) for k, v in jax.device_get(dict(total)).items()}
    count = total.pop("count")
    out = {k: v / max(count, 1.0) for k, v in total.items()}
    out["count"] = count
    return out
