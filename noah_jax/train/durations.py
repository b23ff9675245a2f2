"""Durations in any unit, converted to steps in this one place.

A config gives a duration named PREFIX in one of several units, each its own field:
`PREFIX_steps`, `PREFIX_epochs`, `PREFIX_examples` or `PREFIX_percent` (of the whole
run), whichever of them the config declares. At most one of them may be set; a field
counts as unset when it is 0, None or an empty tuple, so a recipe's
`warmup_epochs=5.0` is switched to steps from the command line with
`--config.schedule.warmup_epochs=0 --config.schedule.warmup_steps=500`. A tuple value
(the step schedule's boundaries) converts element by element.

The run's length is the one duration that must be set: `total_steps` or `num_epochs`.
"""

from __future__ import annotations

import ml_collections

from noah_jax.errors import ConfigError
UNITS = ("steps", "epochs", "examples", "percent")


def _is_set(value) -> bool:
    if value is None:
        return False
    if isinstance(value, (tuple, list)):
        return len(value) > 0
    return value != 0


def _fields(node: ml_collections.ConfigDict, prefix: str) -> dict[str, str]:
    """{unit: field name} of the units `node` declares for `prefix`."""
    return {unit: f"{prefix}_{unit}" for unit in UNITS if f"{prefix}_{unit}" in node}


def steps(node: ml_collections.ConfigDict, prefix: str, *, steps_per_epoch: int,
          batch_size: int, total_steps: int | None = None, where: str = "config"):
    """The duration `prefix` of `node` in steps: an int, or a tuple of ints when the
    field holds a tuple; 0 (or ()) when no unit of it is set. `where` names `node` in
    error messages (e.g. 'config.schedule')."""
    fields = _fields(node, prefix)
    if not fields:
        raise KeyError(f"{where} declares no {prefix}_{{{','.join(UNITS)}}} field")
    chosen = [(unit, name) for unit, name in fields.items() if _is_set(node[name])]
    if len(chosen) > 1:
        given = ", ".join(f"{where}.{name}={node[name]}" for _, name in chosen)
        keep = chosen[-1][1]
        raise ConfigError(f"{given}: set only one unit of {prefix!r} (e.g. "
                          f"{where}.{chosen[0][1]}=0 to use {where}.{keep})")
    if not chosen:
        empty = next(iter(fields.values()))
        return () if isinstance(node[empty], (tuple, list)) else 0
    unit, name = chosen[0]
    value = node[name]

    def convert(v) -> int:
        if unit == "steps":
            return int(v)
        if unit == "epochs":
            return int(round(v * steps_per_epoch))
        if unit == "examples":
            return int(round(v / batch_size))
        if total_steps is None:
            raise ConfigError(f"{where}.{name}: a percentage needs the run's length, which "
                              "cannot itself be given in percent")
        return int(round(v / 100 * total_steps))

    return tuple(convert(v) for v in value) if isinstance(value, (tuple, list)) else convert(
        value)


def total_and_epoch_steps(config: ml_collections.ConfigDict, num_train_examples: int
                          ) -> tuple[int, int]:
    """(total_steps, steps_per_epoch) of the run: `total_steps` or `num_epochs`, exactly
    one of them set (> 0)."""
    steps_per_epoch = max(num_train_examples // config.batch_size, 1)
    given = [name for name in ("total_steps", "num_epochs") if _is_set(config[name])]
    if len(given) != 1:
        raise ConfigError("set exactly one of config.total_steps and config.num_epochs (> 0); "
                          f"got total_steps={config.total_steps}, num_epochs={config.num_epochs}")
    if config.total_steps:
        return int(config.total_steps), steps_per_epoch
    return int(round(config.num_epochs * steps_per_epoch)), steps_per_epoch
