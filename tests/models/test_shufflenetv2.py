"""ShuffleNetV2: torch's NCHW channel order in NHWC, the reference's state_dict names, the
torchvision alias, what the head sees and PyTorch's default init. Full-size values are
checked by the parity fixture (tests/commands/test_convert.py), parameter counts by test_models."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax.traverse_util import flatten_dict

from noah_jax import convert
from noah_jax.models import create_model
from noah_jax.models.shufflenetv2 import ShuffleUnit, channel_shuffle


def random_variables(module, input_shape, seed=0):
    """Variables of `module` with distinct random values (eval_shape: no init compute)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def assert_variables_equal(a, b):
    flat_a, flat_b = flatten_dict(a, sep="/"), flatten_dict(b, sep="/")
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


def nchw_channel_shuffle(x, groups):
    """torch's channel_shuffle on an NCHW numpy array: view, transpose(1, 2), flatten."""
    b, c, h, w = x.shape
    return x.reshape(b, groups, c // groups, h, w).transpose(0, 2, 1, 3, 4).reshape(b, c, h, w)


@pytest.mark.parametrize("groups", [2, 3])
def test_channel_shuffle_is_torchs_in_nchw_order(groups):
    x = np.random.default_rng(0).standard_normal((2, 4 * groups, 3, 5)).astype(np.float32)
    expected = nchw_channel_shuffle(x, groups)
    ours = np.asarray(channel_shuffle(jnp.asarray(x.transpose(0, 2, 3, 1)), groups))
    np.testing.assert_array_equal(ours.transpose(0, 3, 1, 2), expected)
    # Channel i of the result is channel i // groups of group i % groups.
    c = x.shape[1] // groups
    for i in range(x.shape[1]):
        np.testing.assert_array_equal(expected[:, i], x[:, (i % groups) * c + i // groups])


def test_stride_1_unit_passes_the_first_half_through_to_the_even_channels():
    # torch's x.chunk(2, dim=1): the first half is passed on unchanged, the second half
    # goes through branch2; after the shuffle the passed half is channels 0, 2, 4, ...
    unit = ShuffleUnit(features=8, stride=1)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 8))
    variables = unit.init(jax.random.key(1), x, train=False)
    y = unit.apply(variables, x, train=False)
    assert y.shape == (2, 5, 5, 8)
    np.testing.assert_array_equal(y[..., 0::2], x[..., :4])
    # The odd channels come from branch2, which reads the second half only.
    changed = x.at[..., :4].set(0.0)
    np.testing.assert_array_equal(unit.apply(variables, changed, train=False)[..., 1::2],
                                  y[..., 1::2])
    assert sorted(variables["params"]) == ["branch2_0", "branch2_1", "branch2_3", "branch2_4",
                                           "branch2_5", "branch2_6"]


def test_convs_start_from_pytorchs_default_init():
    # The reference keeps PyTorch's Conv2d init: U(+-1/sqrt(fan_in)), fan_in = I/G * kh * kw.
    unit = ShuffleUnit(features=64, stride=2)
    variables = unit.init(jax.random.key(0), jnp.zeros((1, 8, 8, 96)), train=False)
    params = variables["params"]
    for name, fan_in in (("branch1_0", 9), ("branch1_2", 96), ("branch2_0", 96),
                         ("branch2_3", 9), ("branch2_5", 32)):
        kernel = np.asarray(params[name]["kernel"])
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(kernel).max() <= bound, name
        assert np.abs(kernel).max() > 0.9 * bound, name  # uniform: it reaches its bound
    np.testing.assert_array_equal(params["branch1_1"]["scale"], np.ones(96))
    np.testing.assert_array_equal(params["branch1_1"]["bias"], np.zeros(96))


# (name, head, entries, some entries with their shapes); K=10. 280 backbone entries:
# stem and conv5 5 each, a stride-2 unit 25 (branch1 2 convs + 2 BNs, branch2 3 + 3),
# a stride-1 unit 15 (branch2 only); 3 stride-2 and 13 stride-1 units.
NAME_CASES = [
    ("shufflenetv2_050", "noah", 284, {
        "conv1.0.weight": (24, 3, 3, 3),
        "conv1.1.running_mean": (24,),
        "stage2.0.branch1.0.weight": (24, 1, 3, 3),          # depthwise, strided
        "stage2.0.branch1.2.weight": (24, 24, 1, 1),
        "stage2.0.branch1.3.weight": (24,),
        "stage2.0.branch2.0.weight": (24, 24, 1, 1),
        "stage2.1.branch2.0.weight": (24, 24, 1, 1),          # reads half of 48
        "stage3.0.branch1.2.weight": (48, 48, 1, 1),
        "stage3.7.branch2.3.weight": (48, 1, 3, 3),
        "stage4.3.branch2.6.running_var": (96,),
        "conv5.0.weight": (1024, 192, 1, 1),
        "conv5.1.bias": (1024,),
        "head.query.weight": (80, 32, 1, 1),                  # N=8, Ck=256 -> 32 per head
        "head.value.weight": (80, 96, 1, 1),                  # Cv=768 -> 96 per head
        "head.query.bias": (80,),
    }),
    ("shufflenetv2_050", "linear", 282, {
        "conv5.0.weight": (1024, 192, 1, 1),
        "head.2.weight": (10, 1024),
        "head.2.bias": (10,),
    }),
    ("shufflenetv2_200", "noah", 284, {
        "stage2.0.branch1.2.weight": (122, 24, 1, 1),
        "stage4.0.branch2.0.weight": (488, 488, 1, 1),
        "conv5.0.weight": (2048, 976, 1, 1),
        "head.query.weight": (80, 64, 1, 1),                  # Ck=512
        "head.value.weight": (80, 192, 1, 1),                 # Cv=1536
    }),
]


@pytest.mark.parametrize("name,head,num_entries,shapes", NAME_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in NAME_CASES])
def test_reference_state_dict_names_and_round_trip(name, head, num_entries, shapes):
    model = create_model(name, num_classes=10, head=head)
    variables = random_variables(model, (1, 32, 32, 3))
    state_dict = convert.flax_to_torch(variables, name)
    assert len(state_dict) == num_entries
    for key, shape in shapes.items():
        assert state_dict[key].shape == shape, key
    # Stride-1 units have an empty branch1; branch2's ReLUs (2, 7) hold nothing.
    assert not any(".1.branch1." in k or ".branch2.2." in k or ".branch2.7." in k
                   for k in state_dict)
    assert_variables_equal(convert.torch_to_flax(state_dict, name, head=head), variables)


def test_torchvision_baseline_state_dict_converts_through_the_fc_alias():
    model = create_model("shufflenetv2_100", num_classes=10, head="linear")
    variables = random_variables(model, (1, 32, 32, 3))
    ours = convert.flax_to_torch(variables, "shufflenetv2_100", num_batches_tracked=True)
    torchvision = {("fc" + k[len("head.2"):] if k.startswith("head.2.") else k): v
                   for k, v in ours.items()}
    assert torchvision["fc.weight"].shape == (10, 1024) and torchvision["fc.bias"].shape == (10,)
    assert torchvision["conv1.0.weight"].shape == (24, 3, 3, 3)
    assert torchvision["conv5.0.weight"].shape == (1024, 464, 1, 1)
    # One counter per BatchNorm: stem, conv5, 5 per stride-2 unit, 3 per stride-1 unit.
    counters = [k for k in torchvision if k.endswith("num_batches_tracked")]
    assert len(counters) == 2 + 3 * 5 + 13 * 3
    assert "stage3.0.branch1.1.num_batches_tracked" in counters
    assert not any(k.startswith("head.") for k in torchvision)
    assert_variables_equal(convert.torch_to_flax(torchvision, "shufflenetv2_100", head="linear"),
                           variables)


def test_noah_head_reads_conv5s_7x7_map():
    model = create_model("shufflenetv2_150", num_classes=10)
    images = jnp.zeros((1, 224, 224, 3))
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    _, state = jax.eval_shape(
        lambda v: model.apply(v, images, mutable=["intermediates"]), shapes)
    attention = state["intermediates"]["head"]["attention"][0]
    assert attention.shape == (1, 8, 10, 49)  # [B, N, K, 7 * 7 positions]
    assert shapes["params"]["head"]["query"]["kernel"].shape == (8, 32, 10)  # from 1024
