"""The shared CNN layers: the depthwise convolution's two formulations agree with each
other and with nn.Conv, parameters included; the stems' max pool is nn.max_pool's."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noah_jax.models import layers


def reference_conv(channels, kernel, stride, use_bias, dtype=jnp.float32):
    pad = (kernel - 1) // 2
    return nn.Conv(channels, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                   feature_group_count=channels, use_bias=use_bias, dtype=dtype,
                   kernel_init=layers.conv_init, bias_init=nn.initializers.normal(1.0))


@pytest.mark.parametrize("kernel,stride,size,use_bias", [
    (3, 1, 9, False), (3, 2, 9, False), (3, 2, 8, True), (5, 1, 7, True), (5, 2, 10, False)])
@pytest.mark.parametrize("name", ["shifted", "grouped"])
def test_depthwise_conv_equals_flax_grouped_conv(name, kernel, stride, size, use_bias):
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    ours = layers.DepthwiseConv(6, kernel, stride, use_bias=use_bias,
                                bias_init=nn.initializers.normal(1.0), formulation=name)
    reference = reference_conv(6, kernel, stride, use_bias)
    params = reference.init(jax.random.key(1), x)
    # The same parameters from the same key: a checkpoint cannot tell them apart.
    jax.tree.map(np.testing.assert_array_equal, ours.init(jax.random.key(1), x), params)

    def loss(module):
        return lambda p, x: (module.apply(p, x) ** 2 * jnp.arange(6)).sum()

    out, ref_out = ours.apply(params, x), reference.apply(params, x)
    side = (size + 2 * ((kernel - 1) // 2) - kernel) // stride + 1
    assert out.shape == ref_out.shape == (2, side, side, 6)
    np.testing.assert_allclose(out, ref_out, rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    ref_grads = jax.grad(loss(reference), argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
                 grads, ref_grads)


def test_bfloat16_shifted_form_accumulates_in_float32():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    module = layers.DepthwiseConv(4, 3, 1, dtype=jnp.bfloat16, formulation="shifted")
    params = module.init(jax.random.key(1), x)
    out = module.apply(params, x)
    assert out.dtype == jnp.bfloat16
    exact = reference_conv(4, 3, 1, False).apply(
        jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params),
        x.astype(jnp.bfloat16).astype(jnp.float32))
    # One rounding to bfloat16 at the end: within half a bfloat16 ulp of the exact sum.
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2**-8, atol=1e-6)


def test_auto_picks_the_shifted_form_on_cpu_and_rejects_unknown_names():
    assert jax.default_backend() == "cpu"
    assert layers.depthwise_formulation() == "shifted"
    assert layers.depthwise_formulation("auto") == "shifted"
    with pytest.raises(ValueError, match="'auto', 'shifted' or 'grouped'"):
        layers.depthwise_formulation("winograd")
    # A model's setting reaches its depthwise convolutions when it is traced.
    x = jnp.ones((1, 8, 8, 4))
    module = layers.DepthwiseConv(4, 3, 1, formulation="winograd")
    with pytest.raises(ValueError, match="'auto', 'shifted' or 'grouped'"):
        module.init(jax.random.key(0), x)


def test_conv_builds_a_depthwise_conv_only_for_one_filter_per_channel():
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c", groups=8), layers.DepthwiseConv)
    assert layers.conv(8, 3, 1, jnp.float32, "c", groups=8,
                       depthwise="grouped").formulation == "grouped"
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c", groups=2), nn.Conv)
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c"), nn.Conv)


# ---------------------------------------------------------------------------------------
# BatchNorm: PyTorch's, over groups of the reference's per-GPU batch.
# ---------------------------------------------------------------------------------------
def torch_batch_norm_groups(x, scale, bias, mean, var, group, momentum=0.1, eps=1e-5):
    """float64 numpy: each group of `group` examples normalised by its own statistics
    (torch.nn.BatchNorm2d in train mode on one GPU's share), and the running statistics
    moved by the groups' mean of each group's mean and unbiased variance."""
    x = np.asarray(x, np.float64)
    out, means, variances = [], [], []
    for g in range(0, len(x), group):
        part = x[g:g + group]
        m = part.mean(axis=(0, 1, 2))
        v = part.var(axis=(0, 1, 2))
        n = part[..., 0].size
        out.append((part - m) / np.sqrt(v + eps) * scale + bias)
        means.append(m)
        variances.append(v * n / (n - 1))
    new_mean = (1 - momentum) * mean + momentum * np.mean(means, 0)
    new_var = (1 - momentum) * var + momentum * np.mean(variances, 0)
    return np.concatenate(out), new_mean, new_var


@pytest.mark.parametrize("batch,group", [(8, 4), (8, 0), (8, 32), (6, 2)])
def test_batch_norm_groups_and_unbiased_running_variance(batch, group):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, (batch, 3, 5, 4)).astype(np.float32)
    bn = layers.batch_norm(True, jnp.float32, "bn", group_size=group)
    variables = bn.init(jax.random.key(0), x)
    scale = rng.normal(1.0, 0.2, 4).astype(np.float32)
    bias = rng.normal(0.0, 0.5, 4).astype(np.float32)
    mean = rng.normal(0.0, 1.0, 4).astype(np.float32)
    var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    variables = {"params": {"scale": scale, "bias": bias},
                 "batch_stats": {"mean": mean, "var": var}}
    y, updated = bn.apply(variables, x, mutable=["batch_stats"])
    size = group if 0 < group < batch else batch
    expected, new_mean, new_var = torch_batch_norm_groups(x, scale, bias, mean, var, size)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["mean"], new_mean, rtol=1e-5)
    np.testing.assert_allclose(updated["batch_stats"]["var"], new_var, rtol=1e-5)
    # Evaluation uses the running statistics, as nn.BatchNorm does (same names, so
    # checkpoints and conversion are unchanged).
    evaluated = layers.batch_norm(False, jnp.float32, "bn").apply(variables, x)
    reference = nn.BatchNorm(use_running_average=True, epsilon=1e-5).apply(variables, x)
    np.testing.assert_array_equal(evaluated, reference)


def test_batch_norm_groups_must_divide_the_batch():
    bn = layers.batch_norm(True, jnp.float32, "bn", group_size=4)
    x = jnp.ones((6, 2, 2, 3))
    with pytest.raises(ValueError, match="groups of 4 examples do not divide the batch of 6"):
        bn.init_with_output(jax.random.key(0), x)


def test_batch_norm_groups_are_the_same_on_eight_devices():
    """Sharded over 8 fake devices (2 examples each), groups of 4 span two devices; the
    result equals one device's."""
    from jax.sharding import NamedSharding, PartitionSpec

    from noah_jax.train import sharding

    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3, 3, 5)).astype(np.float32)
    bn = layers.batch_norm(True, jnp.float32, "bn", group_size=4)
    variables = bn.init(jax.random.key(0), x)
    apply = lambda v, x: bn.apply(v, x, mutable=["batch_stats"])  # noqa: E731
    single = jax.jit(apply)(variables, x)
    mesh = sharding.create_mesh(8, 1)
    spread = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    assert len(spread.sharding.device_set) == 8
    sharded = jax.jit(apply)(variables, spread)
    for ours, expected in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(ours, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stem_max_pool_equals_flax_max_pool(size, dtype):
    """The stems' pooling (written out for the ONNX converter) is nn.max_pool with
    PyTorch's padding, values and gradients bit for bit; the inputs are all negative, so
    a pad of 0 instead of -inf would show at every border."""
    x = -1.0 - jnp.abs(jax.random.normal(jax.random.key(0), (2, size, size, 3))).astype(dtype)

    def flax_pool(x):
        return nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))

    ours = layers.max_pool_3x3_s2(x)
    assert ours.shape == (2, (size + 1) // 2, (size + 1) // 2, 3) and ours.dtype == dtype
    np.testing.assert_array_equal(np.asarray(ours, np.float32),
                                  np.asarray(flax_pool(x), np.float32))
    weights = jax.random.normal(jax.random.key(1), ours.shape).astype(dtype)
    grad = jax.jit(jax.grad(lambda f, x: jnp.sum((f(x) * weights).astype(jnp.float32)),
                            argnums=1), static_argnums=0)
    np.testing.assert_array_equal(np.asarray(grad(layers.max_pool_3x3_s2, x), np.float32),
                                  np.asarray(grad(flax_pool, x), np.float32))
