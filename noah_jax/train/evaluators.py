"""Evaluators: one small class per kind of evaluation set, chosen by the set's `kind`.

The trainer only asks "evaluate this set with the evaluator of its kind"; each
evaluator owns its jitted step, what it accumulates over the batches and its final
metrics. A data source names the kind of each of its evaluation sets (`eval_kind` for
its own, `.kind` for its extra ones), so a new kind of evaluation is one new class
registered here (or from outside, with `@register("name")`), with no change to the
trainer:

  single      top-1, top-5 and loss, exact over the masked batches
  real        ImageNet-ReaL top-1 (a prediction is right when it is one of the
              image's real labels)
  multilabel  loss, exact mAP and CP/CR/CF1/OP/OR/OF1 at 0.5 over the whole set

Every evaluator sums per batch on the devices and divides once at the end; batches
are padded with mask 0 so that every process runs the same number of steps.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from noah_jax.train import metrics, sharding
from noah_jax.errors import ConfigError

_REGISTRY: dict[str, type["Evaluator"]] = {}


def register(kind: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
    """Class decorator: evaluation sets of this `kind` are scored by the class."""
    def add(cls):
        _REGISTRY[kind] = cls
        return cls
    return add


def get(kind: str) -> type["Evaluator"]:
    if kind not in _REGISTRY:
        raise ConfigError(f"no evaluator for evaluation sets of kind {kind!r}; registered: "
                          f"{', '.join(kinds())}")
    return _REGISTRY[kind]


def kinds() -> list[str]:
    return sorted(_REGISTRY)


class Evaluator:
    """Scores a model on batches {'image', 'label', 'mask'}.

    Subclasses define `batch_metrics` (on device: sums over the masked batch, and
    optionally rows to keep) and may override `accumulate` and `result`.
    """

    def __init__(self, model, mesh):
        self.model, self.mesh = model, mesh
        self._step = jax.jit(self._eval_step, out_shardings=self.out_shardings())

    @property
    def step(self) -> Callable:
        """The jitted (params, batch_stats, global batch) -> batch metrics that `evaluate`
        runs on every batch (noah_jax.benchmark times it)."""
        return self._step

    def out_shardings(self) -> Any:
        return None  # sums come back replicated by jit's default

    def batch_metrics(self, logits: jax.Array, batch: dict) -> Any:
        raise NotImplementedError

    def _eval_step(self, params, batch_stats, batch):
        logits = self.model.apply({"params": params, "batch_stats": batch_stats},
                                  batch["image"], train=False)
        return self.batch_metrics(logits, batch)

    def accumulate(self, total: Any, out: Any) -> Any:
        return metrics.add(total, out)

    def result(self, total: Any) -> dict[str, float]:
        return metrics.finalize(total)

    def evaluate(self, params, batch_stats, batches: Iterable[dict], data_sharding
                 ) -> dict[str, float]:
        """Runs every batch of this process (global arrays over the mesh) and returns the
        set's metrics, identical on every process."""
        total = None
        for batch in batches:
            out = self._step(params, batch_stats, sharding.global_batch(batch, data_sharding))
            total = self.accumulate(total, out)
        return self.result(total)


@register("single")
class SingleLabel(Evaluator):
    def batch_metrics(self, logits, batch):
        return metrics.classification_sums(logits, batch["label"], batch["mask"])


@register("real")
class RealLabels(Evaluator):
    def batch_metrics(self, logits, batch):
        return metrics.real_accuracy_sums(logits, batch["label"], batch["mask"])


@register("multilabel")
class MultiLabel(Evaluator):
    """The loss is summed on device; mAP and F1 need every score of the set, so each
    step also returns its float32 logits, labels and mask, replicated over the mesh
    so that every process holds the whole set."""

    def out_shardings(self):
        return (None, sharding.replicated(self.mesh))

    def batch_metrics(self, logits, batch):
        sums = metrics.multilabel_sums(logits, batch["label"], batch["mask"])
        return sums, (logits.astype(jnp.float32), batch["label"], batch["mask"])

    def accumulate(self, total, out):
        sums, row = out
        total = total or (None, [])
        return metrics.add(total[0], sums), [*total[1], jax.device_get(row)]

    def result(self, total):
        sums, rows = total
        logits, labels, mask = (np.concatenate([np.asarray(r[i]) for r in rows])
                                for i in range(3))
        results = metrics.finalize(sums)
        scores = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
        results["mAP"] = metrics.mean_average_precision(logits, labels, mask)
        results.update(metrics.multilabel_f1(scores, labels, mask))
        return results
