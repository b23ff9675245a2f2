"""noah_jax/train/sharding.py on the 8 fake CPU devices of conftest.py: meshes, specs, placement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from noah_jax.train import sharding


def abstract(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


@pytest.mark.parametrize("data,model,num_devices,shape", [
    (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, 4, 8, (2, 4)), (8, 1, 8, (8, 1)),
    (-1, 1, 2, (2, 1)), (1, 1, 1, (1, 1)),
])
def test_create_mesh_shapes(data, model, num_devices, shape):
    devices = jax.devices()[:num_devices]
    mesh = sharding.create_mesh(data, model, devices=None if num_devices == 8 else devices)
    assert mesh.axis_names == ("data", "model")
    assert dict(mesh.shape) == {"data": shape[0], "model": shape[1]}
    assert mesh.devices.shape == shape
    assert sorted(d.id for d in mesh.devices.flat) == [d.id for d in devices]
    # Auto axes: shardings are constraints XLA propagates, not explicit types.
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 2


@pytest.mark.parametrize("data,model,message", [
    (3, 1, "mesh data=3 x model=1 does not cover the 8 devices"),
    (-1, 3, "mesh data=2 x model=3 does not cover the 8 devices"),
    (4, 4, "mesh data=4 x model=4 does not cover the 8 devices"),
])
def test_create_mesh_refuses_shapes_that_do_not_cover_the_devices(data, model, message):
    with pytest.raises(ValueError, match=message):
        sharding.create_mesh(data, model)


def test_batch_sharding_splits_rows_over_data_and_repeats_them_over_model():
    mesh = sharding.create_mesh(4, 2)
    batch_sharding = sharding.batch_sharding(mesh)
    assert batch_sharding == NamedSharding(mesh, P("data"))
    assert sharding.replicated(mesh) == NamedSharding(mesh, P())
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    placed = jax.device_put(rows, batch_sharding)
    position = {device.id: index for index, device in np.ndenumerate(mesh.devices)}
    assert len(placed.addressable_shards) == 8
    for shard in placed.addressable_shards:
        data_index, _ = position[shard.device.id]  # both model columns: the same rows
        np.testing.assert_array_equal(shard.data, rows[4 * data_index:4 * (data_index + 1)])


@pytest.mark.parametrize("shape,data_size,min_size,spec", [
    ((96, 384), 8, 1024, P(None, "data")),    # the largest axis divisible by 8
    ((384, 96), 8, 1024, P("data", None)),
    ((100, 96), 8, 1, P(None, "data")),       # the largest axis (100) is not divisible
    ((64, 64), 8, 1, P("data", None)),        # a tie: the first axis
    ((3, 3, 16, 8), 4, 1, P(None, None, "data", None)),
    ((1024,), 8, 1024, P("data")),            # exactly min_size is sharded
    ((384,), 8, 1024, P()),                   # smaller than min_size
    ((7, 9), 8, 1, P()),                      # no axis divisible
    ((), 8, 1, P()),                          # a scalar (step counters)
    ((96, 384), 1, 1, P()),                   # a data axis of 1 has nothing to shard
])
def test_fsdp_spec(shape, data_size, min_size, spec):
    assert sharding.fsdp_spec(shape, data_size, min_size) == spec


STATE = {
    "step": abstract((), jnp.int32),
    "params": {"dense": {"kernel": abstract((96, 384)), "bias": abstract((384,))},
               "odd": abstract((7, 9)), "conv": abstract((3, 3, 12, 20))},
    "opt_state": ({"trace": {"kernel": abstract((96, 384))}},),
}


@pytest.mark.parametrize("data,model,fsdp,min_size,specs", [
    (8, 1, False, 1, {"kernel": P(), "bias": P(), "odd": P(), "conv": P(), "step": P()}),
    (8, 1, True, 1024, {"kernel": P(None, "data"), "bias": P(), "odd": P(),
                        "conv": P(), "step": P()}),
    (8, 1, True, 1, {"kernel": P(None, "data"), "bias": P("data"), "odd": P(),
                     "conv": P(), "step": P()}),
    # With a data axis of 4 the conv's 12 and 20 channels divide: the larger one is split.
    (4, 2, True, 1, {"kernel": P(None, "data"), "bias": P("data"), "odd": P(),
                     "conv": P(None, None, None, "data"), "step": P()}),
])
def test_state_shardings(data, model, fsdp, min_size, specs):
    mesh = sharding.create_mesh(data, model)
    shardings = sharding.state_shardings(STATE, mesh, fsdp=fsdp, fsdp_min_size=min_size)
    expected = {
        "step": NamedSharding(mesh, specs["step"]),
        "params": {"dense": {"kernel": NamedSharding(mesh, specs["kernel"]),
                             "bias": NamedSharding(mesh, specs["bias"])},
                   "odd": NamedSharding(mesh, specs["odd"]),
                   "conv": NamedSharding(mesh, specs["conv"])},
        "opt_state": ({"trace": {"kernel": NamedSharding(mesh, specs["kernel"])}},),
    }
    assert shardings == expected


def test_fsdp_placement_gives_each_device_its_slice():
    mesh = sharding.create_mesh()
    shardings = sharding.state_shardings(STATE, mesh, fsdp=True, fsdp_min_size=1024)
    kernel = np.arange(96 * 384, dtype=np.float32).reshape(96, 384)
    placed = jax.device_put(kernel, shardings["params"]["dense"]["kernel"])
    slices = {shard.device.id: shard.data for shard in placed.addressable_shards}
    for i, device in enumerate(mesh.devices.flat):
        np.testing.assert_array_equal(slices[device.id], kernel[:, 48 * i:48 * (i + 1)])


@pytest.mark.parametrize("data,model", [(8, 1), (4, 2)])
def test_global_batch_from_this_process_data(data, model):
    mesh = sharding.create_mesh(data, model)
    rng = np.random.default_rng(0)
    local = {"image": rng.standard_normal((16, 4, 4, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32),
             "mask": np.ones(16, np.float32)}
    batch = sharding.global_batch(local, sharding.batch_sharding(mesh))
    assert set(batch) == set(local)
    rows_per_device = 16 // data
    position = {device.id: index for index, device in np.ndenumerate(mesh.devices)}
    for key, array in batch.items():
        assert isinstance(array, jax.Array)
        assert array.shape == local[key].shape and array.dtype == local[key].dtype
        assert array.sharding == NamedSharding(mesh, P("data"))
        np.testing.assert_array_equal(np.asarray(array), local[key])  # one process: all of it
        for shard in array.addressable_shards:
            first = rows_per_device * position[shard.device.id][0]
            np.testing.assert_array_equal(shard.data, local[key][first:first + rows_per_device])


def test_with_shardings_attaches_one_sharding_per_leaf():
    mesh = sharding.create_mesh()
    shardings = sharding.state_shardings(STATE, mesh, fsdp=True, fsdp_min_size=1)
    targets = sharding.with_shardings(STATE, shardings)
    assert jax.tree.structure(targets) == jax.tree.structure(STATE)
    for target, leaf, leaf_sharding in zip(jax.tree.leaves(targets), jax.tree.leaves(STATE),
                                           jax.tree.leaves(shardings)):
        assert isinstance(target, jax.ShapeDtypeStruct)
        assert (target.shape, target.dtype) == (leaf.shape, leaf.dtype)
        assert target.sharding == leaf_sharding
    # Such targets are what jit and restores place arrays by.
    zeros = jax.jit(lambda: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), STATE),
                    out_shardings=jax.tree.map(lambda t: t.sharding, targets))()
    assert zeros["params"]["dense"]["bias"].sharding == NamedSharding(mesh, P("data"))
