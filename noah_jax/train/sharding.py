"""Mesh, shardings and global arrays: the only place that knows about devices.

One `Mesh` with axes ('data', 'model'). The batch is split along 'data'. Parameters
and optimiser state are replicated, or with `fsdp` sharded over 'data' on their
largest divisible axis (ZeRO-3 style; XLA inserts the all-gathers). Per-process
batches become one global array with `jax.make_array_from_process_local_data`, so
the same code runs on one CPU, eight fake CPU devices and a multi-host pod.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from noah_jax.errors import ConfigError

def create_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
    """A (data, model) mesh over `devices` (all by default); -1 takes what the other leaves."""
    count = len(devices) if devices is not None else jax.device_count()
    if data == -1:
        data = count // model
    if data * model != count:
        raise ConfigError(f"mesh data={data} x model={model} does not cover the {count} devices; "
                          "set config.mesh.data / config.mesh.model so that their product "
                          "equals the device count (-1 = the rest)")
    # Auto axes: shardings are constraints that XLA propagates (GSPMD), as big_vision and
    # the Flax examples use them; jax.make_mesh's default became Explicit axes.
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(auto, auto),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], data_size: int, min_size: int) -> P:
    """Shards the largest axis divisible by the data axis; small arrays stay replicated."""
    if data_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % data_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "data"
            return P(*spec)
    return P()


def state_shardings(abstract_state: Any, mesh: Mesh, *, fsdp: bool = False,
                    fsdp_min_size: int = 2**18) -> Any:
    """NamedShardings for a train state (a pytree of ShapeDtypeStructs)."""
    data_size = mesh.shape["data"]

    def sharding(leaf):
        if not fsdp:
            return replicated(mesh)
        return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), data_size, fsdp_min_size))

    return jax.tree.map(sharding, abstract_state)


def with_shardings(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying shardings: the target of a sharded restore."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


def global_batch(local_batch: Mapping[str, np.ndarray], sharding: NamedSharding) -> dict:
    """This process's part of the batch -> global arrays sharded along 'data'."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}
