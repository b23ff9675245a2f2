"""The shared CNN layers: the depthwise convolution's two formulations agree with each
other and with nn.Conv, parameters included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noah_jax.models import layers


@pytest.fixture
def formulation(monkeypatch):
    def use(name):
        monkeypatch.setattr(layers, "DEPTHWISE_FORMULATION", name)
    return use


def reference_conv(channels, kernel, stride, use_bias, dtype=jnp.float32):
    pad = (kernel - 1) // 2
    return nn.Conv(channels, (kernel, kernel), (stride, stride), ((pad, pad), (pad, pad)),
                   feature_group_count=channels, use_bias=use_bias, dtype=dtype,
                   kernel_init=layers.conv_init, bias_init=nn.initializers.normal(1.0))


@pytest.mark.parametrize("kernel,stride,size,use_bias", [
    (3, 1, 9, False), (3, 2, 9, False), (3, 2, 8, True), (5, 1, 7, True), (5, 2, 10, False)])
@pytest.mark.parametrize("name", ["shifted", "grouped"])
def test_depthwise_conv_equals_flax_grouped_conv(formulation, name, kernel, stride, size,
                                                 use_bias):
    formulation(name)
    x = jax.random.normal(jax.random.key(0), (2, size, size, 6))
    ours = layers.DepthwiseConv(6, kernel, stride, use_bias=use_bias,
                                bias_init=nn.initializers.normal(1.0))
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


def test_bfloat16_shifted_form_accumulates_in_float32(formulation):
    formulation("shifted")
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    module = layers.DepthwiseConv(4, 3, 1, dtype=jnp.bfloat16)
    params = module.init(jax.random.key(1), x)
    out = module.apply(params, x)
    assert out.dtype == jnp.bfloat16
    exact = reference_conv(4, 3, 1, False).apply(
        jax.tree.map(lambda p: p.astype(jnp.bfloat16).astype(jnp.float32), params),
        x.astype(jnp.bfloat16).astype(jnp.float32))
    # One rounding to bfloat16 at the end: within half a bfloat16 ulp of the exact sum.
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2**-8, atol=1e-6)


def test_auto_picks_the_shifted_form_on_cpu_and_rejects_unknown_names(formulation):
    assert jax.default_backend() == "cpu"
    assert layers.depthwise_formulation() == "shifted"
    formulation("winograd")
    with pytest.raises(ValueError, match="'auto', 'shifted' or 'grouped'"):
        layers.depthwise_formulation()


def test_conv_builds_a_depthwise_conv_only_for_one_filter_per_channel():
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c", groups=8), layers.DepthwiseConv)
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c", groups=2), nn.Conv)
    assert isinstance(layers.conv(8, 3, 1, jnp.float32, "c"), nn.Conv)
