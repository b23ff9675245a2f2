"""MobileNetV3: the reference's torch names, its activations, SE and block against numpy,
and where each head's last conv runs (the baseline pools before it, NOAH after)."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from noah_jax import convert
from noah_jax.models.heads import NOAHHead
from noah_jax.models import create_model
from noah_jax.models import mobilenetv3 as mbv3


def random_variables(module, input_shape, seed=0):
    """Variables of `module` with distinct random values (eval_shape, no init compute)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def moderate_variables(module, input_shape, seed=0, **call_kwargs):
    """Random variables under which activations stay of order 1 through a deep net:
    kernels ~ N(0, 1/fan_in), BatchNorm scale ~ U(0.5, 1.5), biases and running means
    ~ N(0, 0.1^2), running variances ~ U(0.5, 1.5)."""
    shapes = jax.eval_shape(functools.partial(module.init, **call_kwargs), jax.random.key(0),
                            jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = path[-1].key
        if name == "kernel":
            fan_in = math.prod(s.shape[:-1])  # depthwise [k, k, 1, C]: k * k
            value = rng.standard_normal(s.shape) / np.sqrt(fan_in)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, s.shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(s.shape)
        return value.astype(np.float32)
    return jax.tree_util.tree_map_with_path(draw, shapes)


def np_hard_sigmoid(x):
    return np.clip(x + 3.0, 0.0, 6.0) / 6.0


def np_hard_swish(x):
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def np_se(x, w1, w2):
    """SE on [B, H, W, C] with Linear weights in Flax layout [in, out]."""
    s = x.mean(axis=(1, 2))
    return x * np_hard_sigmoid(np.maximum(s @ w1, 0.0) @ w2)[:, None, None, :]


def np_batch_norm(x, v):
    return (x - v["mean"]) / np.sqrt(v["var"] + 1e-5) * v["scale"] + v["bias"]


def np_depthwise(x, kernel, stride):
    """Depthwise conv, PyTorch padding (k-1)//2; kernel [k, k, 1, C]."""
    k = kernel.shape[0]
    p = (k - 1) // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    h = (x.shape[1] + 2 * p - k) // stride + 1
    w = (x.shape[2] + 2 * p - k) // stride + 1
    out = np.zeros((x.shape[0], h, w, x.shape[3]))
    for i in range(h):
        for j in range(w):
            patch = xp[:, i * stride:i * stride + k, j * stride:j * stride + k, :]
            out[:, i, j, :] = (patch * kernel[:, :, 0, :]).sum(axis=(1, 2))
    return out


# ---------------------------------------------------------------------------------------
# Torch names: mobilenetv3_large (no fixture), both heads, derived by hand from the
# reference's modules. 15 blocks of 15 entries (conv, BN x4, dw conv, BN x4, project
# conv, BN x4), 8 of them with SE (+2 linears), stem and last 1x1 conv (5 each), the
# final conv with bias (2), the head (NOAH 4, linear 2).
# ---------------------------------------------------------------------------------------

LARGE_BACKBONE = {
    "features.0.0.weight": (16, 3, 3, 3),
    "features.0.1.running_var": (16,),
    "features.1.conv.0.weight": (16, 16, 1, 1),       # no SE in block 1
    "features.1.conv.3.weight": (16, 1, 3, 3),        # depthwise
    "features.2.conv.0.weight": (64, 16, 1, 1),
    "features.4.conv.3.weight": (72, 1, 5, 5),
    "features.4.conv.5.fc.0.weight": (18, 72),        # SE: 72 // 4
    "features.4.conv.5.fc.2.weight": (72, 18),
    "features.4.conv.7.weight": (40, 72, 1, 1),
    "features.4.conv.8.running_mean": (40,),
    "features.11.conv.5.fc.0.weight": (120, 480),
    "features.15.conv.0.weight": (960, 160, 1, 1),
    "features.15.conv.7.weight": (160, 960, 1, 1),
    "features.16.0.weight": (960, 160, 1, 1),          # last conv_1x1_bn
    "features.16.1.bias": (960,),
}


@pytest.mark.parametrize("head,num_entries,shapes,absent", [
    ("noah", 257, {
        "features.17.weight": (1280, 960, 1, 1),       # the last conv, on the 7x7 map
        "features.17.bias": (1280,),
        "classifier.query.weight": (80, 40, 1, 1),     # N=8, K=10; Ck=320 -> 40 per head
        "classifier.query.bias": (80,),
        "classifier.value.weight": (80, 120, 1, 1),    # Cv=960 -> 120 per head
        "classifier.value.bias": (80,),
    }, ("features.18.weight", "classifier.1.weight")),
    ("linear", 255, {
        "features.18.weight": (1280, 960, 1, 1),       # features.17 is the pooling
        "features.18.bias": (1280,),
        "classifier.1.weight": (10, 1280),             # Sequential(Flatten, Linear)
        "classifier.1.bias": (10,),
    }, ("features.17.weight", "features.17.bias", "classifier.query.weight")),
])
def test_large_uses_the_reference_names_and_round_trips(head, num_entries, shapes, absent):
    model = create_model("mobilenetv3_large", num_classes=10, head=head)
    variables = random_variables(model, (1, 224, 224, 3))
    state_dict = convert.flax_to_torch(variables, "mobilenetv3_large")
    assert len(state_dict) == num_entries
    for key, shape in {**LARGE_BACKBONE, **shapes}.items():
        assert state_dict[key].shape == shape, key
    for key in absent:
        assert key not in state_dict
    # SE in blocks 4-6 and 11-15 only.
    with_se = sorted(int(k.split(".")[1]) for k in state_dict if k.endswith("fc.0.weight"))
    assert with_se == [4, 5, 6, 11, 12, 13, 14, 15]

    again = convert.torch_to_flax(state_dict, "mobilenetv3_large", head=head)
    flat, flat_again = flatten_dict(variables, sep="/"), flatten_dict(again, sep="/")
    assert flat.keys() == flat_again.keys()
    for key in flat:
        np.testing.assert_array_equal(np.asarray(flat_again[key]), flat[key], key)


def test_small_has_the_reference_block_table():
    model = create_model("mobilenetv3_small", num_classes=10, head="noah")
    state_dict = convert.flax_to_torch(random_variables(model, (1, 224, 224, 3)),
                                       "mobilenetv3_small")
    expanded = [state_dict[f"features.{i}.conv.0.weight"].shape[0] for i in range(1, 12)]
    kernels = [state_dict[f"features.{i}.conv.3.weight"].shape[-1] for i in range(1, 12)]
    outputs = [state_dict[f"features.{i}.conv.7.weight"].shape[0] for i in range(1, 12)]
    assert expanded == [16, 72, 88, 96, 240, 240, 120, 144, 288, 576, 576]
    assert kernels == [3, 3, 3, 5, 5, 5, 5, 5, 5, 5, 5]
    assert outputs == [16, 24, 24, 40, 40, 40, 48, 48, 96, 96, 96]
    assert "features.2.conv.5.fc.0.weight" not in state_dict
    assert "features.3.conv.5.fc.0.weight" not in state_dict
    assert state_dict["features.12.0.weight"].shape == (576, 96, 1, 1)
    assert state_dict["features.13.weight"].shape == (1280, 576, 1, 1)


# ---------------------------------------------------------------------------------------
# Layers against numpy.
# ---------------------------------------------------------------------------------------


def test_hard_activations_match_their_definitions():
    x = np.linspace(-5.0, 5.0, 41, dtype=np.float32)  # includes -3, 0, 3
    np.testing.assert_allclose(mbv3.hard_sigmoid(x), np_hard_sigmoid(x), rtol=0, atol=1e-7)
    np.testing.assert_allclose(mbv3.hard_swish(x), np_hard_swish(x), rtol=0, atol=1e-6)
    # The corners: zero up to -3, identity (swish) / one (sigmoid) from 3 on.
    np.testing.assert_array_equal(mbv3.hard_swish(np.float32([-4.0, -3.0, 3.0, 4.0])),
                                  [0.0, 0.0, 3.0, 4.0])
    np.testing.assert_array_equal(mbv3.hard_sigmoid(np.float32([-3.0, 0.0, 3.0])),
                                  [0.0, 0.5, 1.0])


def test_squeeze_excitation_matches_numpy():
    x = np.random.default_rng(0).standard_normal((2, 3, 3, 16)).astype(np.float32)
    se = mbv3.SqueezeExcitation()
    variables = random_variables(se, x.shape, seed=1)
    params = variables["params"]
    assert set(params) == {"fc_0", "fc_2"}                  # no biases
    assert params["fc_0"]["kernel"].shape == (16, 4)
    ours = se.apply(variables, x)
    expected = np_se(x, params["fc_0"]["kernel"], params["fc_2"]["kernel"])
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride,features", [(1, 8), (2, 8), (1, 12)])
def test_bottleneck_matches_numpy(stride, features):
    """expand + BN + act, depthwise + BN, SE *before* the act, project + BN, residual
    only for stride 1 and unchanged width."""
    x = np.random.default_rng(0).standard_normal((2, 5, 5, 8)).astype(np.float32)
    block = mbv3.Bottleneck(kernel=3, expanded=16, features=features, squeeze_excite=True,
                            activation="HS", stride=stride)
    variables = moderate_variables(block, x.shape, seed=2, train=False)
    ours = block.apply(variables, x, train=False)

    p, s = variables["params"], variables["batch_stats"]

    def bn(y, name):
        return np_batch_norm(y, {**p[name], **s[name]})
    y = np_hard_swish(bn(x @ p["conv_0"]["kernel"][0, 0], "conv_1"))
    y = bn(np_depthwise(y, p["conv_3"]["kernel"], stride), "conv_4")
    y = np_hard_swish(np_se(y, p["conv_5"]["fc_0"]["kernel"], p["conv_5"]["fc_2"]["kernel"]))
    y = bn(y @ p["conv_7"]["kernel"][0, 0], "conv_8")
    if stride == 1 and features == 8:
        y = y + x
    assert ours.shape == y.shape
    np.testing.assert_allclose(ours, y, rtol=1e-4, atol=1e-4)


def test_widths_round_up_to_multiples_of_eight():
    assert [mbv3.round_up(v) for v in (8, 9, 16, 17, 60, 72 * 0.75)] == [8, 16, 16, 24, 64, 56]


# ---------------------------------------------------------------------------------------
# Where the last conv runs.
# ---------------------------------------------------------------------------------------


def tail_inputs(head, size=64):
    """(model, variables, intermediates, logits, the last BN's output [B, h, w, 576]) of
    a Small without head dropout, run in training mode: BatchNorm then normalises with
    the batch's statistics, so the map keeps its spatial variation through the depth
    (with random running statistics the positions end up all but equal)."""
    model = create_model("mobilenetv3_small", num_classes=10, head=head, dropout=0.0)
    images = np.random.default_rng(3).standard_normal((2, size, size, 3)).astype(np.float32)
    variables = moderate_variables(model, images.shape, seed=4)
    logits, state = model.apply(variables, images, train=True, capture_intermediates=True,
                                mutable=["intermediates", "batch_stats"])
    last_bn = np.asarray(state["intermediates"]["features_12_1"]["__call__"][0], np.float64)
    return model, variables, state["intermediates"], np.asarray(logits, np.float64), last_bn


def test_baseline_pools_before_the_last_conv():
    _, variables, inter, logits, last_bn = tail_inputs("linear")
    assert last_bn.shape == (2, 2, 2, 576)                  # 64 px / 32
    assert inter["features_14"]["__call__"][0].shape == (2, 1, 1, 1280)
    assert "features_13" not in inter                       # the pooling's index
    p = variables["params"]

    def conv(y):  # the 1x1 conv with bias, on [..., 576]
        return y @ p["features_14"]["kernel"][0, 0] + p["features_14"]["bias"]

    def head(y):
        return y @ p["head"]["kernel"] + p["head"]["bias"]

    pooled_first = head(np_hard_swish(conv(np_hard_swish(last_bn).mean(axis=(1, 2)))))
    np.testing.assert_allclose(logits, pooled_first, rtol=1e-4, atol=1e-4)
    # The other order (conv on the map, then pool) gives other logits: the test sees it.
    conv_first = head(np_hard_swish(conv(np_hard_swish(last_bn))).mean(axis=(1, 2)))
    assert np.abs(conv_first - logits).max() > 1e-2


def test_noah_runs_the_last_conv_on_the_map():
    model, variables, inter, logits, last_bn = tail_inputs("noah")
    head_input = np.asarray(inter["features_13"]["__call__"][0], np.float64)
    assert head_input.shape == (2, 2, 2, 1280)              # every position, not pooled
    p = variables["params"]["features_13"]
    expected = np.einsum("bhwc,co->bhwo", np_hard_swish(last_bn), p["kernel"][0, 0]) + p["bias"]
    np.testing.assert_allclose(head_input, expected, rtol=1e-4, atol=1e-4)
    # The head attends over the 4 positions, so it is not a function of their mean:
    # the positions' order does not matter, but replacing each by the mean does.
    noah = NOAHHead(10, num_heads=model.head_setting("num_heads"),
                    key_ratio=model.head_setting("key_ratio"))

    def head(features):
        return np.asarray(noah.apply({"params": variables["params"]["head"]}, features))
    features = np_hard_swish(head_input).astype(np.float32)
    np.testing.assert_allclose(head(features), logits, rtol=1e-5, atol=1e-5)
    shuffled = features[:, ::-1, ::-1, :]
    np.testing.assert_allclose(head(shuffled), logits, rtol=1e-5, atol=1e-5)
    averaged = np.broadcast_to(features.mean(axis=(1, 2), keepdims=True), features.shape)
    assert np.abs(head(averaged) - logits).max() > 1e-3


def test_unknown_mode_is_refused():
    model = create_model("mobilenetv3_small", num_classes=10, mode="medium")
    with pytest.raises(ValueError, match="mode must be one of"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


# ---------------------------------------------------------------------------------------
# The recipe.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("arg,name,head", [
    ("", "mobilenetv3_small", "noah"),
    ("variant=large,head=linear", "mobilenetv3_large", "linear"),
    ("demo", "mobilenetv3_small", "noah"),
])
def test_recipe_builds_its_model_with_every_override_declared(arg, name, head):
    from configs import mobilenetv3_noah
    from noah_jax import cli
    from noah_jax.models import model_override_types

    c = cli.declare_model_overrides(mobilenetv3_noah.get_config(arg or None))  # as main.py
    assert (c.model.name, c.model.head) == (name, head)
    assert set(c.model.overrides) == set(model_override_types(name)) - {"dtype"}
    model = create_model(name, num_classes=c.dataset.num_classes, head=head,
                         **c.model.overrides)
    if arg == "demo":
        # No img_size (a CNN takes any size); 64 px leaves the head a 2x2 map.
        assert c.dataset.name == "digits" and c.dataset.image_size == 64
        size = c.dataset.image_size
        shapes = jax.eval_shape(
            lambda x: model.apply(model.init(jax.random.key(0), x), x,
                                  capture_intermediates=True, mutable=["intermediates"]),
            jnp.zeros((1, size, size, 3)))
        assert shapes[1]["intermediates"]["features_13"]["__call__"][0].shape == (1, 2, 2, 1280)
    else:
        assert (c.num_epochs, c.optimizer.name, c.optimizer.weight_decay) == (150.0, "sgd", 4e-5)
        assert c.optimizer.decay_rule == "nowd_bn"             # no decay on BN and biases
        assert c.model.overrides.bn_group_size == 32           # one GPU's share of 256
        assert (c.schedule.name, c.schedule.base_lr, c.schedule.base_batch_size) == (
            "cosine", 0.05, 256)
        assert (c.batch_size, c.dataset.image_size) == (256, 224)
        # The reference's NOAH settings (a linear head has none: read them off the NOAH
        # model the same config builds).
        noah = create_model(name, num_classes=c.dataset.num_classes, head="noah",
                            **c.model.overrides)
        assert (noah.head_setting("num_heads"), noah.head_setting("key_ratio"),
                noah.head_setting("dropout")) == (8, 0.25, 0.2)
