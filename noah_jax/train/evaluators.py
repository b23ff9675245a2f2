"""Evaluators, chosen by the config: `config.evals` names each evaluation, its
evaluator, its data and when it runs, and the trainer runs those that are due.

    config.evals.val = {type: 'single', dataset: '', split: '', prefix: '',
                        every_steps: 0, final_only: False, skip_if_missing: False}

  type             a registered evaluator (below, or one registered from outside with
                   `@register("name")`); fields of its own (keyword arguments of its
                   __init__ after model and mesh) sit beside these
  dataset, split   its data: '' = the training dataset / that dataset's evaluation
                   split; another dataset is any TFDS one (`data.get_eval_set`)
  prefix           its metrics are eval/<prefix>/<metric> (eval/<metric> for ''), and
                   eval_ema/... for the EMA weights
  every_steps      runs every that many steps, 0 = once per epoch, and at the end
  final_only       runs only at the end of training (and with eval_only)
  skip_if_missing  a dataset not prepared in data_dir, or whose classes are not the
                   model's (an ImageNet recipe trained on other data), is skipped with
                   a log line, rather than stopping the run

Each evaluator owns its jitted step, what it accumulates over the batches and its
final metrics, and says which label types (noah_jax/data/base.py) it scores:

  single      top-1, top-5 and loss on class ids, exact over the masked batches
  real        ImageNet-ReaL top-1 on real labels (a prediction is right when it is one
              of the image's real labels)
  multilabel  loss, exact mAP and CP/CR/CF1/OP/OR/OF1 at 0.5 over the whole set, on
              multi-hot labels

Every evaluator sums per batch on the devices and divides once at the end; batches
are padded with mask 0 so that every process runs the same number of steps.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from noah_jax import data
from noah_jax.train import metrics, sharding
from noah_jax.errors import ConfigError

_REGISTRY: dict[str, type["Evaluator"]] = {}

# The fields every entry of config.evals has, with their values where an entry leaves
# them out (configs/common.py's `evaluation` writes them all into the config).
FIELDS = {"type": "", "dataset": "", "split": "", "prefix": "", "every_steps": 0,
          "final_only": False, "skip_if_missing": False}


def register(name: str) -> Callable[[type["Evaluator"]], type["Evaluator"]]:
    """Class decorator: the evaluator type `name` of config.evals is this class."""
    def add(cls):
        _REGISTRY[name] = cls
        return cls
    return add


def get(name: str) -> type["Evaluator"]:
    if name not in _REGISTRY:
        raise ConfigError(f"no evaluator {name!r}; registered: {', '.join(kinds())}")
    return _REGISTRY[name]


def kinds() -> list[str]:
    """The registered evaluator types."""
    return sorted(_REGISTRY)


class Evaluator:
    """Scores a model on batches {'image', 'label', 'mask'}.

    Subclasses define `batch_metrics` (on device: sums over the masked batch, and
    optionally rows to keep) and may override `accumulate` and `result`. `label_types`
    are the label types it scores (() = any); options of its own are keyword-only
    arguments of its __init__, set by fields of the same name in its config entry.
    """

    label_types: tuple[str, ...] = ()

    def __init__(self, model, mesh):
        self.model, self.mesh = model, mesh
        self._step = jax.jit(self._eval_step, out_shardings=self.out_shardings())

    @property
    def step(self) -> Callable:
        """The jitted (params, batch_stats, global batch) -> batch metrics that `evaluate`
        runs on every batch (noah_jax.benchmark times it)."""
        return self._step

    @classmethod
    def options(cls) -> list[str]:
        """The names of its own config fields: its __init__'s arguments after model, mesh."""
        return list(inspect.signature(cls.__init__).parameters)[3:]

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
    label_types = (data.CLASS_IDS,)

    def batch_metrics(self, logits, batch):
        return metrics.classification_sums(logits, batch["label"], batch["mask"])


@register("real")
class RealLabels(Evaluator):
    label_types = (data.REAL_LABELS,)

    def batch_metrics(self, logits, batch):
        return metrics.real_accuracy_sums(logits, batch["label"], batch["mask"])


@register("multilabel")
class MultiLabel(Evaluator):
    """The loss is summed on device; mAP and F1 need every score of the set, so each
    step also returns its float32 logits, labels and mask, replicated over the mesh
    so that every process holds the whole set."""

    label_types = (data.MULTI_HOT,)

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


# ----------------------------------------------------------------------------------
# config.evals: each entry checked, then built with its data and schedule.
# ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Evaluation:
    """One entry of config.evals, ready to run: its evaluator, data and schedule."""

    name: str
    evaluator: Evaluator
    batches: Callable[..., Iterable[dict]]   # a source's eval_batches signature
    prefix: str
    every_steps: int                         # > 0
    final_only: bool

    def due(self, step: int, final: bool) -> bool:
        return final or (not self.final_only and step % self.every_steps == 0)

    def run(self, params, batch_stats, *, local_batch_size: int, data_sharding
            ) -> dict[str, float]:
        batches = self.batches(local_batch_size=local_batch_size,
                               process_index=jax.process_index(),
                               process_count=jax.process_count())
        return self.evaluator.evaluate(params, batch_stats, batches, data_sharding)

    def describe(self) -> str:
        when = ("at the end" if self.final_only
                else f"every {self.every_steps} steps and at the end")
        return f"{self.name} ({type(self.evaluator).__name__}) {when}"


def _entry(name: str, entry: ml_collections.ConfigDict) -> tuple[type[Evaluator], dict]:
    """(the evaluator class, the entry's fields with FIELDS' values where it has none),
    or a one-line ConfigError naming what is valid."""
    where = f"config.evals.{name}"
    if not isinstance(entry, (dict, ml_collections.ConfigDict)) or "type" not in entry:
        raise ConfigError(f"{where} must be a ConfigDict with a 'type' (one of "
                          f"{', '.join(kinds())}) and the fields {', '.join(FIELDS)}")
    if entry["type"] not in _REGISTRY:
        raise ConfigError(f"{where}.type={entry['type']!r} is not an evaluator; registered: "
                          f"{', '.join(kinds())}")
    cls = _REGISTRY[entry["type"]]
    unknown = sorted(set(entry) - set(FIELDS) - set(cls.options()))
    if unknown:
        raise ConfigError(f"{where} has no field {unknown[0]!r}; valid for type "
                          f"{entry['type']!r}: {', '.join([*FIELDS, *cls.options()])}")
    fields = {**FIELDS, **dict(entry.items())}
    if not isinstance(fields["every_steps"], int) or fields["every_steps"] < 0:
        raise ConfigError(f"{where}.every_steps must be an int >= 0 (0 = once per epoch), "
                          f"got {fields['every_steps']!r}")
    return cls, fields


def check_config(evals: ml_collections.ConfigDict) -> None:
    """Refuses an entry of config.evals with an unknown type or field (before any data
    is opened)."""
    for name, entry in evals.items():
        _entry(name, entry)


def from_config(config: ml_collections.ConfigDict, source: data.Source, model, mesh, *,
                steps_per_epoch: int) -> list[Evaluation]:
    """The evaluations of config.evals (those that run during training first, then by
    name, so the log reads the same every run), each with its data opened: the
    training source's own evaluation split, or another dataset's split. A dataset that
    is not prepared stops the run with how to prepare it, or, with skip_if_missing, is
    left out with a log line. An evaluator given labels it does not score is refused."""
    evaluations = []
    for name, entry in sorted(config.evals.items(),
                              key=lambda item: (bool(item[1].get("final_only")), item[0])):
        cls, fields = _entry(name, entry)
        dataset = fields["dataset"] or config.dataset.name
        if dataset == config.dataset.name and not fields["split"]:
            label_type, batches = source.eval_label_type, source.eval_batches
        else:
            from noah_jax.data import tfds_source  # only for TFDS data

            try:
                eval_set = data.get_eval_set(config.dataset, dataset, fields["split"],
                                             augment=config.augment)
            except (tfds_source.DatasetNotPreparedError, tfds_source.LabelSpaceError) as e:
                # (An ImageNet recipe's extra sets, when it trains on other data, do not
                # apply: skipped as the data source once left them out.)
                if not fields["skip_if_missing"]:
                    raise
                logging.warning("skipping the evaluation config.evals.%s: %s", name, e)
                continue
            label_type, batches = eval_set.label_type, eval_set.batches
        if cls.label_types and label_type not in cls.label_types:
            fitting = [k for k in kinds()
                       if not _REGISTRY[k].label_types or label_type in _REGISTRY[k].label_types]
            raise ConfigError(
                f"config.evals.{name}.type={fields['type']!r} scores "
                f"{' or '.join(cls.label_types)} labels, but {dataset!r} "
                f"{fields['split'] or 'evaluation split'} has {label_type} labels; use one "
                f"of {', '.join(fitting)}")
        evaluator = cls(model, mesh, **{k: fields[k] for k in cls.options() if k in fields})
        evaluations.append(Evaluation(
            name, evaluator, batches, fields["prefix"],
            fields["every_steps"] or steps_per_epoch, fields["final_only"]))
    return evaluations
