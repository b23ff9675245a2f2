"""The model zoo: exact parameter counts against the reference, and every model training."""

import json
import math
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from noah_jax.errors import ConfigError
from noah_jax.models import create_model, list_models, model_overrides

# The official models' parameter counts, kept in the repository (numbers only); the
# measurements they come from, when a checkout has them, live in ../shared/parity.
PARAM_COUNTS = pathlib.Path(__file__).resolve().parents[1] / "param_counts.json"
SHARED_PARAM_COUNTS = (pathlib.Path(__file__).resolve().parents[3] / "shared" / "parity"
                       / "param_counts.json")

EXPECTED_MODELS = [
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "mobilenetv2_035", "mobilenetv2_050", "mobilenetv2_075", "mobilenetv2_100",
    "deit_tiny_050_patch16_224", "deit_tiny_075_patch16_224", "deit_tiny_patch16_224",
    "deit_small_patch16_224", "deit_base_patch16_224", "vit_large_patch16_224",
    "mixer_s16_224", "mixer_s16_075_224", "mixer_s16_050_224", "mixer_b16_224",
    "gmlp_ti16_224", "gmlp_ti16_075_224", "gmlp_ti16_050_224", "gmlp_s16_224", "gmlp_b16_224",
]
# The rest of the reference zoo (NOAH_SPEC section 2b).
EXTRA_MODELS = [
    "mobilenetv3_small", "mobilenetv3_large",
    "shufflenetv2_050", "shufflenetv2_100", "shufflenetv2_150", "shufflenetv2_200",
    "pvt_tiny_050", "pvt_tiny_075", "pvt_tiny", "pvt_small", "pvt_medium", "pvt_large",
]
ALL_MODELS = (EXPECTED_MODELS[:14] + ["deit_base_patch16_384"] + EXPECTED_MODELS[14:]
              + EXTRA_MODELS)


def count_params(model, image_size=224):
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, image_size, image_size, 3)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))


def reference_counts(section="models"):
    """(model name, head, parameter count) of the reference models of a section of
    param_counts.json, both heads each."""
    models = json.loads(PARAM_COUNTS.read_text())[section]
    return [(name, head, counts[key]) for name, counts in models.items()
            for head, key in (("linear", "baseline"), ("noah", "noah"))]


def count_mismatches(counts):
    mismatches = []
    for name, head, expected in counts:
        try:
            model = create_model(name, num_classes=1000, head=head)
        except ConfigError as e:  # a model not in the zoo: listed with the others
            mismatches.append(f"{name} head={head}: {e}"[:120])
            continue
        ours = count_params(model, getattr(model, "img_size", 224))
        if ours != expected:
            mismatches.append(f"{name} head={head}: ours {ours}, reference {expected}")
    return mismatches


def test_registry_lists_every_model_of_the_reference_zoo():
    assert list_models() == ALL_MODELS


def test_parameter_counts_equal_the_reference_for_all_44_models():
    counts = reference_counts()
    assert len(counts) == 44
    # vit_large_patch16_224 and gmlp_b16_224 have no official NOAH model to count.
    assert {name for name, _, _ in counts} == set(EXPECTED_MODELS) - {
        "vit_large_patch16_224", "gmlp_b16_224"}
    mismatches = count_mismatches(counts)
    assert not mismatches, "\n".join(mismatches)


def test_parameter_counts_equal_the_reference_for_the_26_extra_models():
    counts = reference_counts("extra_models")
    assert len(counts) == 26
    assert {name for name, _, _ in counts} == set(EXTRA_MODELS) | {"deit_base_patch16_384"}
    mismatches = count_mismatches(counts)
    assert not mismatches, "\n".join(mismatches)


def test_parameter_counts_in_the_repository_agree_with_the_shared_measurements():
    if not SHARED_PARAM_COUNTS.exists():
        pytest.skip(f"{SHARED_PARAM_COUNTS} is absent (a clone without ../shared)")
    shared_file = json.loads(SHARED_PARAM_COUNTS.read_text())
    ours_file = json.loads(PARAM_COUNTS.read_text())
    for section, size in (("models", 22), ("extra_models", 13)):
        shared = {m["name"]: {"baseline": m["baseline_params"], "noah": m["noah_params"]}
                  for m in shared_file[section]}
        ours = ours_file[section]
        assert ours == {name: counts for name, counts in shared.items()
                        if name in ALL_MODELS}, section
        assert len(ours) == size, section


def test_vit_large_parameter_count():
    # timm's vit_large_patch16_224 (class token, 1000 classes): 304,326,632 parameters.
    # The NOAH variant drops the class token and its position embedding (-2 * 1024) and
    # swaps the linear head (1024*1000 + 1000) for NOAH's (1024*1000 + 2*4*1000): +7000.
    linear = count_params(create_model("vit_large_patch16_224", num_classes=1000, head="linear"))
    noah = count_params(create_model("vit_large_patch16_224", num_classes=1000))
    assert linear == 304_326_632
    assert noah == linear - 2 * 1024 + 7000


# Reduced sizes for CPU: (overrides, image size). Each model keeps its own widths, block
# types and head; the deep ones run two blocks per stage at most (a first block and one
# after it), which keeps compile time, most of this test's cost, small. Full-depth
# shapes and counts are checked above with eval_shape, full-depth values by the parity
# fixtures.
def reduced(name):
    if name.startswith("resnet"):
        return ({"stage_sizes": (1, 2, 1, 1)} if name != "resnet18" else {}), 64
    if name.startswith("mobilenetv2"):
        return {}, 64
    if name.startswith(("deit", "vit")):
        return {"img_size": 32, "depth": 2}, 32
    if name.startswith(("mobilenetv3", "shufflenetv2")):
        return {}, 64
    if name.startswith("pvt"):
        # Every stage keeps its spatial reduction at 64 px (stage maps 16, 8, 4, 2).
        return {"img_size": 64, "depths": (1, 1, 2, 1)}, 64
    return {"img_size": 32, "num_blocks": 2}, 32


# Every model with NOAH in float32, its depthwise convolutions (MobileNets, ShuffleNet)
# in the grouped form: XLA compiles it 1.5-2.5 times faster on CPU than the shifted form
# the CPU runs by default, and test_layers shows the two equal, values and gradients.
# The baseline head in bfloat16 on the smallest model of each family (and of each ResNet
# block type), with the backend's own depthwise form. Widths are all that tell a family's
# models apart; their full-size shapes are counted above.
SMALLEST = ["resnet18", "resnet50", "mobilenetv2_035", "deit_tiny_050_patch16_224",
            "mixer_s16_050_224", "gmlp_ti16_050_224", "mobilenetv3_small",
            "shufflenetv2_050", "pvt_tiny_050"]
FORWARD_BACKWARD = ([(name, "noah", jnp.float32, "grouped") for name in ALL_MODELS]
                    + [(name, "linear", jnp.bfloat16, "auto") for name in SMALLEST])


@pytest.mark.parametrize("name,head,dtype,depthwise", FORWARD_BACKWARD)
def test_forward_and_backward(name, head, dtype, depthwise):
    overrides, size = reduced(name)
    if "depthwise" in model_overrides(name):  # the families with depthwise convolutions
        overrides = dict(overrides, depthwise=depthwise)
    model = create_model(name, num_classes=10, head=head, dtype=dtype, **overrides)
    images = jax.random.normal(jax.random.key(0), (2, size, size, 3))
    labels = jnp.array([3, 7])
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x))(images)
    chex.assert_trees_all_equal_dtypes(
        variables, jax.tree.map(lambda x: x.astype(jnp.float32), variables))
    params = variables["params"]
    state = {k: v for k, v in variables.items() if k != "params"}

    @jax.jit
    def train_step(params, images):
        def loss_fn(params):
            logits, new_state = model.apply({"params": params, **state}, images, train=True,
                                            rngs={"dropout": jax.random.key(2)},
                                            mutable=["batch_stats"])
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), labels])
            return loss, (logits, new_state)
        return jax.grad(loss_fn, has_aux=True)(params)

    grads, (logits, new_state) = train_step(params, images)
    chex.assert_shape(logits, (2, 10))
    chex.assert_type(logits, jnp.float32)
    chex.assert_tree_all_finite((logits, grads))
    chex.assert_trees_all_equal_structs(grads, params)
    if "batch_stats" in state:
        # Every BatchNorm's running variance moves in training. (Some running means stay
        # at 0: a linear layer after a freshly initialised BatchNorm has zero batch mean.)
        stale = [k for k, v in flatten_dict(new_state["batch_stats"], sep="/").items()
                 if k.endswith("var") and np.allclose(
                     v, flatten_dict(state["batch_stats"], sep="/")[k])]
        assert not stale, f"running variances not updated: {stale}"
    if dtype == jnp.float32:
        # Every parameter gets a gradient, except the NOAH query bias, which is a constant
        # shift under the softmax over positions.
        silent = [k for k, g in flatten_dict(grads, sep="/").items()
                  if not np.any(np.asarray(g)) and k != "head/query/bias"]
        assert not silent, f"parameters without gradient: {silent}"

    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    out1, out2 = evaluate(variables, images), evaluate(variables, images)
    np.testing.assert_array_equal(out1, out2)
    chex.assert_shape(out1, (2, 10))


def test_bfloat16_model_tracks_float32_model():
    f32 = create_model("resnet18", num_classes=10)
    bf16 = create_model("resnet18", num_classes=10, dtype=jnp.bfloat16)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = f32.init(jax.random.key(1), images)
    ref, out = f32.apply(variables, images), bf16.apply(variables, images)
    chex.assert_shape([ref, out], (2, 10))
    chex.assert_type([ref, out], jnp.float32)  # bfloat16 compute, float32 logits
    assert float(jnp.max(jnp.abs(out - ref))) < 0.05 * float(jnp.max(jnp.abs(ref))) + 0.05


def test_overrides_reach_the_head():
    model = create_model("resnet18", num_classes=7, num_heads=8, key_ratio=0.25,
                         head_split=False)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    head = shapes["params"]["head"]
    chex.assert_shape(head["query"]["kernel"], (1, 128, 56))   # one group, Ck = 512 / 4
    chex.assert_shape(head["value"]["kernel"], (1, 384, 56))
    logits = jax.eval_shape(lambda v: model.apply(v, jnp.zeros((3, 64, 64, 3))), shapes)
    chex.assert_shape(logits, (3, 7))
    chex.assert_type(logits, jnp.float32)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="Known models: resnet18"):
        create_model("resnet19", num_classes=10)
    with pytest.raises(ValueError, match="is 'deit_tiny_patch16_224' here, with head='noah'"):
        create_model("noah_deit_tiny_patch16_224", num_classes=10)


def test_unknown_override_names_the_valid_ones():
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['num_head'\].*num_heads"):
        create_model("resnet18", num_classes=10, num_head=4)
    assert "drop_path_rate" in model_overrides("deit_small_patch16_224")
    assert {"num_heads", "key_ratio", "dropout", "head_split", "kv_split", "dtype"} <= set(
        model_overrides("mobilenetv2_100"))
    with pytest.raises(ValueError, match="head must be one of"):
        create_model("resnet18", num_classes=10, head="mlp")
