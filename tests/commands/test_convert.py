"""torch <-> Flax conversion: parity with the reference's fixtures, names, errors, files, CLI."""

import argparse
import json
import os
import pathlib
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from noah_jax.train import checkpoint
from noah_jax import convert
from noah_jax.data import catalog
from noah_jax.models.heads import NOAHHead
from noah_jax.models import create_model

PARITY = pathlib.Path(__file__).resolve().parents[3] / "shared" / "parity"
# The paper's zoo in PARITY, the rest of the reference zoo (NOAH_SPEC 2b) in PARITY/extra.
FIXTURES = (sorted(PARITY.glob("*.npz")) + sorted(PARITY.glob("extra/*.npz"))
            if PARITY.is_dir() else [])
NO_PARITY = (f"{PARITY} is absent (a clone without ../shared); the reference-parity tests "
             "need its fixtures")


def load_fixture(path):
    """(state_dict as float32, NHWC input, reference logits, meta) of a parity fixture."""
    with np.load(path) as npz:
        state_dict = {k: npz[k].astype(np.float32) for k in npz.files if not k.startswith("__")}
        images = np.transpose(npz["__input__"], (0, 2, 3, 1))  # NCHW -> NHWC
        return state_dict, images, npz["__logits__"], json.loads(str(npz["__meta__"]))


def fixture_target(meta):
    """(conversion name, torch_to_flax kwargs, the module to run) for a fixture's meta."""
    if meta["family"] == "head":
        h = meta["head"]
        settings = dict(num_heads=h["N"], key_ratio=h["r"], head_split=h["head_split"],
                        kv_split=h["kv_split"])
        return convert.HEAD_ONLY, settings, NOAHHead(num_classes=h["K"], **settings)
    name = meta["model"].removeprefix("noah_")
    head = "noah" if meta["use_noah"] else "linear"
    return name, dict(head=head), create_model(name, num_classes=meta["num_classes"], head=head)


def evaluate(module, variables, inputs):
    return np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, inputs),
                      np.float64)


def assert_parity(ours, reference):
    error = np.abs(ours - reference).max()
    bound = 1e-4 * max(1.0, np.abs(reference).max())
    assert error <= bound, f"max |ours - reference| = {error:.3g} > {bound:.3g}"


def assert_variables_equal(a, b):
    flat_a, flat_b = flatten_dict(a, sep="/"), flatten_dict(b, sep="/")
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


def random_variables(module, input_shape, seed=0):
    """Variables of `module` with distinct random values (no init compute needed)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(input_shape))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


# ---------------------------------------------------------------------------------------
# Parity with the reference implementation.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", FIXTURES or [None], ids=lambda p: p.stem if p else "absent")
def test_fixture_converts_and_matches_the_reference_logits(path):
    if path is None:
        pytest.skip(NO_PARITY)
    state_dict, inputs, reference, meta = load_fixture(path)
    name, kwargs, module = fixture_target(meta)

    variables = convert.torch_to_flax(state_dict, name, **kwargs)
    assert sum(x.size for x in jax.tree.leaves(variables["params"])) == meta["param_count"]
    assert_parity(evaluate(module, variables, inputs), reference)

    # Round trip: our variables back to the reference's keys and values, exactly.
    back = convert.flax_to_torch(variables, name)
    assert back.keys() == state_dict.keys()
    for key, value in state_dict.items():
        np.testing.assert_array_equal(back[key], value, key)


def test_parity_folder_has_every_kind_of_fixture():
    if not FIXTURES:
        pytest.skip(NO_PARITY)
    families = {load_fixture(p)[3]["family"] for p in FIXTURES}
    assert {"head", "cnn", "deit", "mlp"} <= families, families
    models = {load_fixture(p)[3]["model"] for p in FIXTURES if p.parent.name == "extra"}
    assert {"mobilenetv3_small", "shufflenetv2_100", "noah_pvt_tiny_050",
            "pvt_tiny_050"} <= models, models


# ---------------------------------------------------------------------------------------
# Models and settings without a fixture: the same rules, checked against names and shapes
# derived by hand from the reference's modules.
# ---------------------------------------------------------------------------------------

# (name, head, overrides, number of state_dict entries, some entries with their shapes)
NO_FIXTURE_CASES = [
    # torchvision layout at width 0.5: stages 16, 8, 16, 16, 32, 48, 80, 160; last conv 1280.
    ("mobilenetv2_050", "noah", {}, 264, {
        "features.0.0.weight": (16, 3, 3, 3),
        "features.1.conv.0.0.weight": (16, 1, 3, 3),      # depthwise
        "features.1.conv.1.weight": (8, 16, 1, 1),
        "features.17.conv.1.0.weight": (480, 1, 3, 3),
        "features.17.conv.2.weight": (160, 480, 1, 1),
        "features.17.conv.3.running_var": (160,),
        "features.18.0.weight": (1280, 160, 1, 1),
        "features.18.1.running_mean": (1280,),
        "head.query.weight": (80, 40, 1, 1),               # N=8, K=10, Ck=320 -> 40 per head
        "head.value.weight": (80, 120, 1, 1),              # Cv=960 -> 120 per head
        "head.value.bias": (80,),
    }),
    # 8 blocks of 12 entries, stem, norm, head.
    ("mixer_s16_075_224", "linear", {}, 2 + 8 * 12 + 2 + 2, {
        "stem.proj.weight": (384, 3, 16, 16),
        "blocks.7.mlp_tokens.fc1.weight": (192, 196),
        "blocks.7.mlp_tokens.fc2.weight": (196, 192),
        "blocks.0.mlp_channels.fc1.weight": (1536, 384),
        "blocks.0.norm2.weight": (384,),
        "head.weight": (10, 384),
        "head.bias": (10,),
    }),
    ("gmlp_ti16_075_224", "noah", {}, 2 + 30 * 10 + 2 + 4, {
        "blocks.0.mlp_channels.fc1.weight": (576, 96),
        "blocks.0.mlp_channels.gate.norm.weight": (288,),
        "blocks.29.mlp_channels.gate.proj.weight": (196, 196),
        "blocks.0.mlp_channels.fc2.weight": (96, 288),
        "head.query.weight": (40, 12, 1, 1),
        "head.query.bias": (40,),
    }),
    # The baseline DeiT-Tiny x0.5: class token, pos_embed of L+1, pre_logits to 192.
    ("deit_tiny_050_patch16_224", "linear", {}, 1 + 1 + 2 + 12 * 12 + 2 + 2 + 2, {
        "cls_token": (1, 1, 96),
        "pos_embed": (1, 197, 96),
        "patch_embed.proj.weight": (96, 3, 16, 16),
        "blocks.11.attn.qkv.weight": (288, 96),
        "blocks.11.attn.proj.weight": (96, 96),
        "pre_logits.fc.weight": (192, 96),
        "head.weight": (10, 192),
    }),
    ("deit_tiny_075_patch16_224", "noah", {}, 1 + 2 + 12 * 12 + 2 + 2 + 4, {
        "pos_embed": (1, 196, 144),
        "pre_logits.fc.bias": (192,),
        "head.query.weight": (40, 24, 1, 1),               # the head reads 192 channels
    }),
    # torchvision's ResNet-50 entries (without num_batches_tracked), reference head name.
    ("resnet50", "linear", {}, 267, {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.running_mean": (256,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "head.2.weight": (10, 2048),
    }),
    # Other head settings: N=8, r=1/4, one dense projection (groups=1).
    ("resnet18", "noah", dict(num_heads=8, key_ratio=0.25, head_split=False), 104, {
        "head.query.weight": (80, 128, 1, 1),
        "head.value.weight": (80, 384, 1, 1),
    }),
    ("resnet34", "noah", dict(kv_split=False), 1 + 4 + 16 * 2 * (1 + 4) + 3 * (1 + 4) + 4, {
        "layer3.5.bn2.running_var": (256,),
        "head.query.weight": (40, 128, 1, 1),              # keys and values read all 512
        "head.value.weight": (40, 128, 1, 1),
    }),
]


@pytest.mark.parametrize("name,head,overrides,num_entries,shapes", NO_FIXTURE_CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in NO_FIXTURE_CASES])
def test_models_without_fixture_use_the_reference_names_and_round_trip(
        name, head, overrides, num_entries, shapes):
    model = create_model(name, num_classes=10, head=head, **overrides)
    size = getattr(model, "img_size", 224)
    variables = random_variables(model, (1, size, size, 3))

    state_dict = convert.flax_to_torch(variables, name)
    assert len(state_dict) == num_entries
    for key, shape in shapes.items():
        assert state_dict[key].shape == shape, key
    assert all(v.dtype == np.float32 for v in state_dict.values())

    again = convert.torch_to_flax(state_dict, name, head=head, **overrides)
    assert_variables_equal(again, variables)


def test_layout_rules_element_by_element():
    model = create_model("mobilenetv2_035", num_classes=3)
    variables = random_variables(model, (1, 224, 224, 3))
    sd = convert.flax_to_torch(variables, "mobilenetv2_035")
    params = variables["params"]
    # Conv OIHW <- HWIO, depthwise [C, 1, kh, kw] <- [kh, kw, 1, C].
    conv = params["features_0_0"]["kernel"]
    assert sd["features.0.0.weight"][5, 2, 0, 1] == conv[0, 1, 2, 5]
    depthwise = params["features_2"]["conv_1_0"]["kernel"]
    assert sd["features.2.conv.1.0.weight"][7, 0, 2, 1] == depthwise[2, 1, 0, 7]
    # BatchNorm: weight <- scale, running statistics <- batch_stats.
    np.testing.assert_array_equal(sd["features.0.1.weight"], params["features_0_1"]["scale"])
    np.testing.assert_array_equal(sd["features.0.1.running_var"],
                                  variables["batch_stats"]["features_0_1"]["var"])
    # NOAH: output channel h*K + k of the grouped conv is head h, class k.
    query = params["head"]["query"]["kernel"]  # [G, Cin/G, K]
    assert sd["head.query.weight"][2 * 3 + 1, 4, 0, 0] == query[2, 4, 1]

    linear = create_model("gmlp_ti16_050_224", num_classes=3, head="linear")
    variables = random_variables(linear, (1, 224, 224, 3))
    sd = convert.flax_to_torch(variables, "gmlp_ti16_050_224")
    head = variables["params"]["head"]["kernel"]  # [C, K]
    assert sd["head.weight"][2, 9] == head[9, 2]


@pytest.mark.parametrize("name,head", [("deit_tiny_050_patch16_224", "noah"),
                                       ("deit_tiny_050_patch16_224", "linear"),
                                       ("gmlp_ti16_050_224", "noah"),
                                       ("mixer_s16_050_224", "linear")])
def test_image_size_is_inferred_from_the_number_of_tokens(name, head):
    overrides = {"num_blocks": 2} if name.startswith(("gmlp", "mixer")) else {"depth": 2}
    model = create_model(name, num_classes=5, head=head, img_size=48, **overrides)
    variables = random_variables(model, (1, 48, 48, 3))
    state_dict = convert.flax_to_torch(variables, name)
    num_classes, found = convert.infer_model_settings(state_dict, name, head=head, **overrides)
    assert (num_classes, found) == (5, {"img_size": 48, **overrides})
    assert_variables_equal(convert.torch_to_flax(state_dict, name, head=head, **overrides),
                           variables)


# ---------------------------------------------------------------------------------------
# Aliases, class counts, dropped heads, errors.
# ---------------------------------------------------------------------------------------


def test_torchvision_names_are_read_and_num_batches_tracked_dropped():
    model = create_model("resnet18", num_classes=10, head="linear")
    variables = random_variables(model, (1, 64, 64, 3))
    ours = convert.flax_to_torch(variables, "resnet18", num_batches_tracked=True)
    assert ours["layer1.0.bn1.num_batches_tracked"].dtype == np.int64
    assert sum(k.endswith("num_batches_tracked") for k in ours) == 20  # every BatchNorm
    torchvision = {("fc" + k[len("head.2"):] if k.startswith("head.2.") else k): v
                   for k, v in ours.items()}
    assert "fc.weight" in torchvision and torchvision["fc.weight"].shape == (10, 512)
    assert_variables_equal(convert.torch_to_flax(torchvision, "resnet18", head="linear"),
                           variables)

    mobilenet = create_model("mobilenetv2_035", num_classes=4, head="linear")
    variables = random_variables(mobilenet, (1, 224, 224, 3))
    sd = convert.flax_to_torch(variables, "mobilenetv2_035")
    sd = {("classifier.1" + k[len("head.2"):] if k.startswith("head.2.") else k): v
          for k, v in sd.items()}
    assert_variables_equal(convert.torch_to_flax(sd, "mobilenetv2_035", head="linear"),
                           variables)


def test_class_count_comes_from_the_head_weights():
    model = create_model("resnet18", num_classes=7)
    sd = convert.flax_to_torch(random_variables(model, (1, 64, 64, 3)), "resnet18")
    assert sd["head.query.weight"].shape[0] == 4 * 7
    variables = convert.torch_to_flax(sd, "resnet18")
    assert variables["params"]["head"]["query"]["kernel"].shape == (4, 64, 7)
    with pytest.raises(convert.ConversionError, match="num_classes=8 .* 7-class head"):
        convert.torch_to_flax(sd, "resnet18", num_classes=8)
    with pytest.raises(convert.ConversionError, match="28 rows, not a multiple of num_heads=3"):
        convert.torch_to_flax(sd, "resnet18", num_heads=3)
    no_head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    with pytest.raises(convert.ConversionError, match="cannot tell the class count"):
        convert.torch_to_flax(no_head, "resnet18")
    with pytest.raises(convert.ConversionError, match="missing: head.query.weight"):
        convert.torch_to_flax(no_head, "resnet18", num_classes=7)


def test_drop_head_converts_the_backbone_only():
    model = create_model("resnet18", num_classes=7)
    variables = random_variables(model, (1, 64, 64, 3))
    sd = convert.flax_to_torch(variables, "resnet18")
    expected = {col: {k: v for k, v in tree.items() if k != "head"}
                for col, tree in variables.items()}
    for head in ("noah", "linear"):  # a backbone for either new head
        assert_variables_equal(convert.torch_to_flax(sd, "resnet18", head=head, drop_head=True),
                               expected)
    backbone_only = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert_variables_equal(convert.torch_to_flax(backbone_only, "resnet18", drop_head=True),
                           expected)
    assert convert.infer_model_settings(sd, "resnet18", num_classes=3, drop_head=True)[0] == 3
    # The old head's settings do not matter: 28 rows do not split into 8 heads.
    assert_variables_equal(convert.torch_to_flax(sd, "resnet18", num_heads=8, drop_head=True),
                           expected)


def test_every_mismatch_is_listed_by_name_in_one_error():
    model = create_model("resnet18", num_classes=10)
    sd = convert.flax_to_torch(random_variables(model, (1, 64, 64, 3)), "resnet18")
    del sd["layer2.0.bn1.running_var"]
    del sd["layer4.1.conv2.weight"]
    sd["layer9.0.conv1.weight"] = np.zeros((64, 64, 3, 3), np.float32)
    sd["conv1.num_batches_tracked"] = np.zeros((), np.int64)  # conv1 is no BatchNorm
    sd["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    sd["bn1.num_batches_tracked"] = np.zeros((), np.int64)  # fine: bn1 is a BatchNorm
    with pytest.raises(convert.ConversionError) as info:
        convert.torch_to_flax(sd, "resnet18")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "5 problem(s)" in message
    assert "missing: layer2.0.bn1.running_var [128] (-> batch_stats/layer2_0/bn1/var)" in message
    assert "missing: layer4.1.conv2.weight [512, 512, 3, 3]" in message
    assert "unexpected: layer9.0.conv1.weight [64, 64, 3, 3]" in message
    assert "unexpected: conv1.num_batches_tracked []" in message
    assert ("shape mismatch: layer1.0.conv1.weight: model expects [64, 64, 3, 3], "
            "state_dict has [64, 64, 1, 1]") in message


def test_the_command_counts_what_does_not_fit_and_names_the_model_that_does(tmp_path, capsys):
    """A ResNet-18 file converted as a ResNet-50: one line with counts and three examples
    of each kind of problem (not ~190 lines), and the zoo model whose layout it has."""
    resnet18 = convert.flax_to_torch(
        random_variables(create_model("resnet18", num_classes=10), (1, 64, 64, 3)), "resnet18")
    resnet50 = convert.flax_to_torch(
        random_variables(create_model("resnet50", num_classes=10), (1, 64, 64, 3)), "resnet50")
    missing = [k for k in resnet50 if k not in resnet18]
    reshaped = [k for k in resnet50 if k in resnet18 and resnet50[k].shape != resnet18[k].shape]
    assert len(missing) > 100 and reshaped and set(resnet18) <= set(resnet50)
    np.savez(tmp_path / "r18.npz", **resnet18)

    def refused(*flags):
        with pytest.raises(SystemExit) as info:
            convert.main(["--input", str(tmp_path / "r18.npz"), "--output",
                          str(tmp_path / "out"), *flags])
        err = capsys.readouterr().err
        assert info.value.code == 1 and err.count("\n") == 1, err
        return err

    err = refused("--model", "resnet50")
    assert err.startswith(f"python -m noah_jax.convert: error: {tmp_path / 'r18.npz'} does not "
                          f"fit resnet50 (head=noah, num_classes=10): {len(missing)} keys "
                          f"missing (e.g. {missing[0]} {list(resnet50[missing[0]].shape)}; ")
    assert f", {len(reshaped)} of another shape (e.g. " in err and "unexpected" not in err
    assert err.count("; ") == 2 + 2 + 1  # three examples of each kind, then the fit
    assert err.endswith("; its layout fits --model resnet18 --head noah\n")
    # The wrong head of the right model: the head it looked for, and the one it has.
    err = refused("--model", "resnet18", "--head", "linear")
    assert "cannot tell the class count of resnet18 (head=linear)" in err
    assert err.endswith("; its layout fits --model resnet18 --head noah\n")
    assert not (tmp_path / "out").exists()


def test_unknown_model_and_override_fail_clearly():
    with pytest.raises(ValueError, match="Known models"):
        convert.torch_to_flax({}, "resnet19")
    with pytest.raises(TypeError, match="unknown override"):
        convert.torch_to_flax({}, "resnet18", num_head=4)
    with pytest.raises(TypeError, match="unknown setting"):
        convert.torch_to_flax({}, convert.HEAD_ONLY, heads=4)


# ---------------------------------------------------------------------------------------
# The head alone.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("head_split,kv_split", [(True, True), (False, True), (True, False),
                                                 (False, False)])
def test_head_only_round_trip_and_numbers(head_split, kv_split):
    settings = dict(num_heads=3, key_ratio=1 / 3, head_split=head_split, kv_split=kv_split)
    head = NOAHHead(num_classes=5, **settings)
    x = np.random.default_rng(0).standard_normal((2, 4, 4, 36)).astype(np.float32)
    variables = random_variables(head, x.shape)
    sd = convert.flax_to_torch(variables, convert.HEAD_ONLY)
    groups = 3 if head_split else 1
    ck, cv = (12, 24) if kv_split else (36, 36)
    assert sd["query.weight"].shape == (15, ck // groups, 1, 1)
    assert sd["value.weight"].shape == (15, cv // groups, 1, 1)
    again = convert.torch_to_flax(sd, convert.HEAD_ONLY, **settings)
    assert_variables_equal(again, variables)

    # The same numbers as the torch-layout formula: q[h*K+k] = sum_c x[c] W[h*K+k, c] + b.
    q = np.einsum("blc,oc->blo", x.reshape(2, 16, 36)[..., :ck][..., :ck // groups],
                  sd["query.weight"][:, :, 0, 0]) + sd["query.bias"]
    _, state = head.apply(again, x, mutable=["intermediates"])
    attention = np.asarray(state["intermediates"]["attention"][0])  # [B, N, K, L]
    expected = np.exp(q - q.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(attention[:, 0], expected[..., :5].transpose(0, 2, 1), rtol=1e-5)


def test_head_only_wrong_settings_are_reported():
    head = NOAHHead(num_classes=5, num_heads=4, key_ratio=0.5)
    sd = convert.flax_to_torch(random_variables(head, (1, 3, 3, 32)), convert.HEAD_ONLY)
    with pytest.raises(convert.ConversionError, match="shape mismatch: query.weight"):
        convert.torch_to_flax(sd, convert.HEAD_ONLY, num_heads=4, key_ratio=0.25)
    with pytest.raises(convert.ConversionError, match=r"needs \['value.weight'\]"):
        convert.torch_to_flax({"query.weight": sd["query.weight"]}, convert.HEAD_ONLY)


# ---------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------


def test_wrapped_and_data_parallel_state_dicts_are_unwrapped():
    weights = {"conv1.weight": np.ones((2, 3)), "fc.bias": np.zeros(2)}
    dp = {f"module.{k}": v for k, v in weights.items()}
    for wrapped in (weights, dp, {"state_dict": dp, "epoch": 3, "arch": "resnet18"},
                    {"model": weights, "optimizer": {"state": {}}},
                    {"model": {"state_dict": dp}}):
        assert convert.unwrap_state_dict(wrapped).keys() == weights.keys()
    # Only a prefix shared by every key is DataParallel's.
    mixed = {"module.a": 1, "b": 2}
    assert convert.unwrap_state_dict(mixed).keys() == mixed.keys()
    with pytest.raises(ValueError, match="expected a state_dict"):
        convert.unwrap_state_dict([1, 2])


def test_npz_metadata_entries_are_not_weights(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, **{"a.weight": np.ones((2, 2), np.float16), "__meta__": np.str_("{}"),
                      "__input__": np.zeros(3)})
    sd = convert.load_state_dict(path)
    assert list(sd) == ["a.weight"] and sd["a.weight"].dtype == np.float16


def write_safetensors(path, tensors):
    """The format by hand: u64 little-endian header size, JSON header, raw bytes."""
    names = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
             np.dtype(jnp.bfloat16): "BF16", np.dtype(np.int64): "I64"}
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for key, value in tensors.items():
        data = np.ascontiguousarray(value).tobytes()
        header[key] = {"dtype": names[value.dtype], "shape": list(value.shape),
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the spec pads the header to 8 bytes
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def test_safetensors_files_are_read_without_the_package(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
               "b.bias": rng.standard_normal(5).astype(np.float16),
               "c.weight": rng.standard_normal((2, 2)).astype(jnp.bfloat16),
               "bn.num_batches_tracked": np.array(7, np.int64)}
    write_safetensors(tmp_path / "w.safetensors", tensors)
    sd = convert.load_state_dict(tmp_path / "w.safetensors")
    assert sd.keys() == tensors.keys()
    for key, value in tensors.items():
        assert sd[key].dtype == value.dtype and sd[key].shape == value.shape
        np.testing.assert_array_equal(sd[key], value)


def test_safetensors_written_by_the_package_are_read(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = {"x.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "y": np.arange(3, dtype=np.float16)}
    safetensors_numpy.save_file(tensors, str(tmp_path / "w.safetensors"))
    sd = convert.load_state_dict(tmp_path / "w.safetensors")
    for key, value in tensors.items():
        np.testing.assert_array_equal(sd[key], value)


def test_unknown_extension_and_missing_torch_fail_clearly(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match=r"unknown extension; supported: \.pth, \.pt, "
                                         r"\.pth\.tar, \.safetensors, \.npz"):
        convert.load_state_dict(tmp_path / "weights.h5")
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    (tmp_path / "ckpt.pth.tar").write_bytes(b"PK\x03\x04 a torch zip would start so")
    # The CPU build: plain `pip install torch` pulls gigabytes of CUDA libraries.
    with pytest.raises(ImportError, match=r"needs PyTorch.*: pip install torch --index-url "
                                          r"https://download\.pytorch\.org/whl/cpu \("):
        convert.load_state_dict(tmp_path / "ckpt.pth.tar")


def test_pth_files_are_read_with_weights_only(tmp_path):
    torch = pytest.importorskip("torch")
    weights = {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(2).bfloat16()}
    torch.save({"state_dict": {f"module.{k}": v for k, v in weights.items()}, "epoch": 9},
               tmp_path / "ckpt.pth.tar")
    sd = convert.load_state_dict(tmp_path / "ckpt.pth.tar")
    assert sd.keys() == weights.keys()
    np.testing.assert_array_equal(sd["conv1.weight"], weights["conv1.weight"].numpy())
    np.testing.assert_array_equal(sd["fc.bias"], weights["fc.bias"].float().numpy())
    # Pickled objects other than tensors are refused, never executed.
    torch.save({"model": {"w": torch.ones(1)}, "args": argparse.Namespace(lr=0.1)},
               tmp_path / "full.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.load_state_dict(tmp_path / "full.pth")
    # A file cut short (an interrupted copy) fails in torch's zip reader.
    whole = (tmp_path / "ckpt.pth.tar").read_bytes()
    (tmp_path / "cut.pth").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(convert.WeightsFileError, match=r"cut\.pth is not a valid PyTorch file: "
                       "torch.load failed with RuntimeError: PytorchStreamReader failed"):
        convert.load_state_dict(tmp_path / "cut.pth")


# ---------------------------------------------------------------------------------------
# Files that are not what their extension says.
# ---------------------------------------------------------------------------------------


def safetensors_bytes(header, body=b""):
    """A safetensors file around `header` (JSON-encoded unless already bytes)."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + body


def conv1_entry(**fields):
    """A header entry of 'conv1.weight' (2 float32 values) with `fields` changed; a field
    given as None is left out."""
    entry = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], **fields}
    return {"conv1.weight": {k: v for k, v in entry.items() if v is not None}}


def zip_with_pickled_entry(path):
    np.savez(path, **{"conv1.weight": np.array([{"a": 1}], dtype=object)})


def torch_that_raises(error):
    """A stand-in for the torch module whose `load` fails with `error`, as torch's does
    on a file cut short (torch itself is optional, and absent from some test setups)."""
    def load(*args, **kwargs):
        raise error

    torch = types.ModuleType("torch")
    torch.load = load
    return torch


# (file name, how to make it: bytes or a function of the path, the exception
# load_state_dict raises, what the one line says)
MALFORMED_FILES = {
    "safetensors entry without dtype": (
        "w.safetensors", safetensors_bytes(conv1_entry(dtype=None), bytes(8)),
        convert.WeightsFileError,
        "is not a valid safetensors file: tensor 'conv1.weight' has no 'dtype' in its header"),
    "safetensors header is a list": (
        "w.safetensors", safetensors_bytes([{"dtype": "F32"}]), convert.WeightsFileError,
        "is not a valid safetensors file: its header is a JSON list, not an object"),
    "safetensors header is not JSON": (
        "w.safetensors", safetensors_bytes(b'{"conv1.weight": {"dtype": "F32",'),
        convert.WeightsFileError, "its header is not JSON (Expecting property name"),
    "safetensors header is not UTF-8": (
        "w.safetensors", safetensors_bytes(b'{"\xff": {}}'), convert.WeightsFileError,
        "its header is not UTF-8 text"),
    "safetensors shape is a string": (
        "w.safetensors", safetensors_bytes(conv1_entry(shape="2"), bytes(8)),
        convert.WeightsFileError,
        "tensor 'conv1.weight' has shape '2', not a list of non-negative integers"),
    "safetensors shape holds a bool": (
        "w.safetensors", safetensors_bytes(conv1_entry(shape=[True, 2]), bytes(8)),
        convert.WeightsFileError, "has shape [True, 2], not a list"),
    "safetensors data_offsets is a number": (
        "w.safetensors", safetensors_bytes(conv1_entry(data_offsets=8), bytes(8)),
        convert.WeightsFileError,
        "tensor 'conv1.weight' has data_offsets 8, not a [start, end] pair"),
    "safetensors dtype is a list": (
        "w.safetensors", safetensors_bytes(conv1_entry(dtype=["F32"]), bytes(8)),
        convert.WeightsFileError, "tensor 'conv1.weight' has dtype ['F32']; readable dtypes: F64"),
    "safetensors entry is not an object": (
        "w.safetensors", safetensors_bytes({"conv1.weight": [0, 8]}), convert.WeightsFileError,
        "tensor 'conv1.weight' is described by a JSON list, not an object"),
    "safetensors data cut short": (
        "w.safetensors", safetensors_bytes(conv1_entry(), bytes(4)), convert.WeightsFileError,
        "tensor 'conv1.weight' (F32 [2]) does not fit its data_offsets [0, 8] in 4 bytes"),
    "safetensors header size beyond the file": (
        "w.safetensors", struct.pack("<Q", 1000) + b"{}", convert.WeightsFileError,
        "its header size 1000 reaches beyond the file's 10 bytes"),
    "safetensors shorter than its header size": (
        "w.safetensors", b"\x02\x00", convert.WeightsFileError,
        "it has 2 bytes, fewer than the 8 of its header size"),
    "empty npz": ("w.npz", b"", convert.WeightsFileError, "w.npz is empty (0 bytes)"),
    "npz that is no zip": (
        "w.npz", b"\x93NUMPY a .npy renamed", convert.WeightsFileError,
        "is not a valid .npz file: it is not a zip archive"),
    "npz with a pickled entry": (
        "w.npz", zip_with_pickled_entry, convert.WeightsFileError,
        "is not a valid .npz file: Object arrays cannot be loaded when allow_pickle=False"),
    "empty pth": ("w.pth", b"", convert.WeightsFileError, "w.pth is empty (0 bytes)"),
    "pth without torch installed": (
        "w.pth", b"PK\x03\x04", ImportError, "needs PyTorch, an optional dependency"),
    "pth that torch cannot finish": (
        "w.pth", b"\x80\x02", convert.WeightsFileError,
        "is not a valid PyTorch file: torch.load failed with EOFError: Ran out of input"),
    "missing file": ("w.npz", None, FileNotFoundError, "w.npz does not exist"),
    "folder": ("w.npz", "folder", IsADirectoryError, "w.npz is a folder, not a weights file"),
}


@pytest.mark.parametrize("case", MALFORMED_FILES)
def test_malformed_files_end_in_one_line_naming_the_file(case, tmp_path, monkeypatch, capsys):
    name, content, error, message = MALFORMED_FILES[case]
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "folder":
        path.mkdir()
    elif content is not None:
        content(path)
    if case == "pth without torch installed":
        monkeypatch.setitem(sys.modules, "torch", None)
    elif case == "pth that torch cannot finish":
        monkeypatch.setitem(sys.modules, "torch", torch_that_raises(EOFError("Ran out of input")))

    with pytest.raises(error) as raised:  # what Python callers get
        convert.load_state_dict(path)
    assert str(path) in str(raised.value) and message in str(raised.value)

    with pytest.raises(SystemExit) as info:
        convert.main(["--model", "resnet18", "--input", str(path),
                      "--output", str(tmp_path / "out")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err == f"python -m noah_jax.convert: error: {raised.value}\n"
    assert not (tmp_path / "out").exists()


def test_an_unreadable_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys):
    path = tmp_path / "w.npz"
    np.savez(path, **{"conv1.weight": np.zeros(2, np.float32)})

    def refuse(name):  # what opening a file without read permission raises (the tests
        # may run as root, whom chmod does not stop)
        raise PermissionError(13, "Permission denied", name)

    monkeypatch.setattr(convert, "_load_npz", refuse)
    with pytest.raises(SystemExit) as info:
        convert.main(["--model", "resnet18", "--input", str(path),
                      "--output", str(tmp_path / "out")])
    assert info.value.code == 1
    assert capsys.readouterr().err == (f"python -m noah_jax.convert: error: cannot read {path}: "
                                       "Permission denied\n")


def test_the_command_prints_no_traceback_for_a_malformed_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(conv1_entry(dtype=None), bytes(8)))
    root = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-m", "noah_jax.convert", "--model", "resnet18",
                           "--input", str(path), "--output", str(tmp_path / "out")],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr == (f"python -m noah_jax.convert: error: {path} is not a valid "
                           "safetensors file: tensor 'conv1.weight' has no 'dtype' in its "
                           "header\n")
    assert proc.stdout == ""


# ---------------------------------------------------------------------------------------
# The command line: a checkpoint that training and evaluation read.
# ---------------------------------------------------------------------------------------


def abstract_variables(model, size):
    """The restore target as the trainer builds it: both collections, even if one is empty."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    return {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})}


def test_command_line_writes_a_checkpoint_that_scores_like_the_reference(tmp_path, capsys):
    path = PARITY / "resnet18_noah.npz"
    if not path.exists():
        pytest.skip(NO_PARITY)
    _, images, reference, meta = load_fixture(path)
    out = tmp_path / "converted"
    assert convert.main(["--model", "resnet18", "--head", "noah", "--input", str(path),
                         "--output", str(out), "--num-classes", "1000"]) == 0
    assert "11,696,512 parameters" in capsys.readouterr().out

    model = create_model("resnet18", num_classes=1000)
    variables, stored_meta = checkpoint.restore_model(out, abstract_variables(model, 224))
    # The source path as given; compare resolved (../shared may be a symbolic link).
    assert os.path.realpath(stored_meta.pop("source")) == str(path.resolve())
    assert stored_meta.pop("class_names") == catalog.imagenet_class_names()
    # The reference's evaluation input of a CNN: torchvision's ImageNet preprocessing.
    assert stored_meta == {"model": "resnet18", "head": "noah", "num_classes": 1000,
                           "overrides": {}, "dropped_head": False, "image_size": 224,
                           "eval_crop": "center", "eval_crop_ratio": 0.875,
                           "eval_interpolation": "bilinear", "mean": [0.485, 0.456, 0.406],
                           "std": [0.229, 0.224, 0.225]}
    assert_parity(evaluate(model, variables, images), reference)

    with pytest.raises(SystemExit):  # never over an existing checkpoint
        convert.main(["--model", "resnet18", "--input", str(path), "--output", str(out)])


def test_command_line_errors_are_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        convert.main(["--model", "resnet18", "--input", str(tmp_path / "w.h5"),
                      "--output", str(tmp_path / "out")])
    assert info.value.code == 1
    assert "error: cannot read" in capsys.readouterr().err
    np.savez(tmp_path / "w.npz", **{"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
    with pytest.raises(SystemExit):
        convert.main(["--model", "resnet18", "--input", str(tmp_path / "w.npz"),
                      "--output", str(tmp_path / "out")])
    assert "cannot tell the class count" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or checkpoint.latest_step(tmp_path / "out") is None
    with pytest.raises(SystemExit) as info:  # argparse's own mistakes: one line, no usage
        convert.main(["--input", str(tmp_path / "w.npz"), "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("python -m noah_jax.convert: error: the following "
                                       "arguments are required: --model (see --help)\n")


def test_command_line_drop_head_for_fine_tuning(tmp_path):
    # Any source (here our own random weights saved as .npz): a 1000-class baseline
    # checkpoint becomes the backbone of a 10-class NOAH model.
    source = create_model("resnet18", num_classes=1000, head="linear")
    source_vars = random_variables(source, (1, 64, 64, 3))
    np.savez(tmp_path / "ckpt.npz", **convert.flax_to_torch(source_vars, "resnet18"))
    out = tmp_path / "backbone"
    convert.main(["--model", "resnet18", "--head", "linear", "--input",
                  str(tmp_path / "ckpt.npz"), "--output", str(out), "--drop-head",
                  "--num-classes", "10"])

    model = create_model("resnet18", num_classes=10)  # a new NOAH head
    target = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 64, 64, 3)))
    restored, meta = checkpoint.restore_model(out, target, drop_head=True)
    assert meta["dropped_head"] and meta["num_classes"] == 10
    assert_variables_equal(restored["params"]["head"], target["params"]["head"])
    without_head = lambda v: {c: {k: t for k, t in tree.items() if k != "head"}  # noqa: E731
                              for c, tree in v.items()}
    assert_variables_equal(without_head(restored), without_head(source_vars))


def test_command_line_overrides_reach_the_model(tmp_path):
    source = create_model("deit_tiny_050_patch16_224", num_classes=6, key_ratio=0.25,
                          img_size=32, depth=1)
    source_vars = random_variables(source, (1, 32, 32, 3))
    write_safetensors(tmp_path / "w.safetensors",
                      convert.flax_to_torch(source_vars, "deit_tiny_050_patch16_224"))
    out = tmp_path / "converted"
    convert.main(["--model", "deit_tiny_050_patch16_224", "--input",
                  str(tmp_path / "w.safetensors"), "--output", str(out),
                  "--override", "key_ratio=0.25", "--override", "depth=1"])
    restored, meta = checkpoint.restore_model(out, abstract_variables(source, 32))
    assert meta["overrides"] == {"key_ratio": 0.25, "depth": 1, "img_size": 32}
    assert meta["num_classes"] == 6
    assert_variables_equal(restored, source_vars)


# ---------------------------------------------------------------------------------------
# Class names in the checkpoint's meta.
# ---------------------------------------------------------------------------------------

TINY_DEIT = dict(img_size=32, depth=1)


def write_tiny_deit(path, num_classes):
    """A 1-block DeiT-Tiny x0.5 at 32 px with `num_classes` classes, as reference weights."""
    model = create_model("deit_tiny_050_patch16_224", num_classes=num_classes, **TINY_DEIT)
    np.savez(path, **convert.flax_to_torch(random_variables(model, (1, 32, 32, 3)),
                                           "deit_tiny_050_patch16_224"))


def convert_tiny_deit(tmp_path, *flags, out="converted"):
    """Runs the command on tmp_path/w.npz; returns (exit code, output directory)."""
    out = tmp_path / out
    code = convert.main(["--model", "deit_tiny_050_patch16_224", "--input",
                         str(tmp_path / "w.npz"), "--output", str(out), "--override", "depth=1",
                         *flags])
    return code, out


def test_imagenet_class_names_are_the_sorted_synsets_tfds_ships():
    names = catalog.imagenet_class_names()
    assert len(names) == len(set(names)) == 1000
    assert names == sorted(names)  # the folder-per-class order the reference trained with
    assert names[:2] == ["n01440764", "n01443537"] and names[-1] == "n15075141"


def test_a_1000_class_checkpoint_records_imagenet_names_unless_a_file_gives_them(tmp_path):
    write_tiny_deit(tmp_path / "w.npz", 1000)
    code, out = convert_tiny_deit(tmp_path)
    _, meta = checkpoint.restore_model(out)
    assert code == 0 and meta["class_names"] == catalog.imagenet_class_names()

    names = [f"thing {k}, kind {k % 7}" for k in range(1000)]  # commas and spaces kept
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n\n")  # trailing blank lines
    code, out = convert_tiny_deit(tmp_path, "--class-names", str(tmp_path / "names.txt"),
                                  out="named")
    _, meta = checkpoint.restore_model(out)
    assert code == 0 and meta["class_names"] == names


def test_class_names_file_is_checked_against_the_head(tmp_path, capsys):
    write_tiny_deit(tmp_path / "w.npz", 3)
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    with pytest.raises(SystemExit) as info:
        convert_tiny_deit(tmp_path, "--class-names", str(tmp_path / "names.txt"))
    assert info.value.code == 1
    assert capsys.readouterr().err == (
        f"python -m noah_jax.convert: error: {tmp_path / 'names.txt'} has 2 class names (one "
        "per line), but the model has 3 classes\n")
    assert checkpoint.latest_step(tmp_path / "converted") is None  # nothing written

    (tmp_path / "names.txt").write_text("cat\n\ndog\nfox\n")
    with pytest.raises(SystemExit):
        convert_tiny_deit(tmp_path, "--class-names", str(tmp_path / "names.txt"))
    assert capsys.readouterr().err.endswith("names.txt: line 2 is empty; the file needs one "
                                            "class name per line, in label order\n")

    (tmp_path / "names.txt").write_text(" cat \ndog\nfox")  # spaces around names dropped
    code, out = convert_tiny_deit(tmp_path, "--class-names", str(tmp_path / "names.txt"))
    _, meta = checkpoint.restore_model(out)
    assert code == 0 and meta["class_names"] == ["cat", "dog", "fox"]
    # Other class counts record no names unless given (the loader then numbers them).
    code, plain = convert_tiny_deit(tmp_path, out="plain")
    assert code == 0 and "class_names" not in checkpoint.restore_model(plain)[1]
