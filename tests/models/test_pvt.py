"""PVT v1: spatial-reduction attention against a float64 numpy recomputation, the
baseline's class token in stage 4 only, the reference's state_dict names, the image size
a converted checkpoint gets, and the model's settings (norm eps, drop path)."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from scipy.special import erf

from noah_jax import convert
from noah_jax.models import explain
from noah_jax.models import create_model
from noah_jax.models.pvt import Block

# Reduced models: 64 px keeps every stage's spatial reduction (maps 16, 8, 4, 2; keys and
# values on 2x2 maps), one block per stage.
SMALL = dict(img_size=64, depths=(1, 1, 1, 1))


def random_like(shapes, seed=0):
    """Distinct random float32 values for a tree of shapes (biases and norms included)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def random_variables(model, size, seed=0):
    return random_like(jax.eval_shape(model.init, jax.random.key(0),
                                      jnp.zeros((1, size, size, 3))), seed)


def assert_variables_equal(a, b):
    flat_a, flat_b = flatten_dict(a, sep="/"), flatten_dict(b, sep="/")
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), key)


# ---------------------------------------------------------------------------------------
# One block against numpy, float64.
# ---------------------------------------------------------------------------------------


def np_layer_norm(x, p, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_dense(x, p):
    return x @ p["kernel"] + p["bias"]


def np_block(x, p, grid, attn_heads, sr_ratio):
    """The reference's Block in float64: pre-norm spatial-reduction attention (conv with
    kernel = stride = sr_ratio on the row-major token map, LayerNorm eps 1e-5), then a
    pre-norm exact-GELU MLP; block norms eps 1e-6. k and v come from one Linear whose
    outputs are [k | v], each [attn_heads, head_dim] (torch's reshape(B, M, 2, h, d))."""
    batch, length, dim = x.shape
    d = dim // attn_heads
    a = p["attn"]
    y = np_layer_norm(x, p["norm1"], 1e-6)
    q = np_dense(y, a["q"]).reshape(batch, length, attn_heads, d)
    if sr_ratio > 1:
        h, w = grid
        r = sr_ratio
        patches = y.reshape(batch, h // r, r, w // r, r, dim)
        reduced = np.einsum("biujvc,uvco->bijo", patches, a["sr"]["kernel"]) + a["sr"]["bias"]
        y = np_layer_norm(reduced.reshape(batch, -1, dim), a["norm"], 1e-5)
    kv = np_dense(y, a["kv"])
    k = kv[..., :dim].reshape(batch, -1, attn_heads, d)
    v = kv[..., dim:].reshape(batch, -1, attn_heads, d)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(d)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", probs, v).reshape(batch, length, dim)
    x = x + np_dense(out, a["proj"])
    y = np_dense(np_layer_norm(x, p["norm2"], 1e-6), p["mlp"]["fc1"])
    y = 0.5 * y * (1 + erf(y / math.sqrt(2)))  # exact GELU
    return x + np_dense(y, p["mlp"]["fc2"])


@pytest.mark.parametrize("sr_ratio", [2, 1])
def test_block_with_spatial_reduction_matches_numpy(sr_ratio):
    grid, dim, heads = (4, 6), 10, 2     # a non-square map: rows and columns not swapped
    block = Block(attn_heads=heads, mlp_hidden=16, sr_ratio=sr_ratio)
    x = np.random.default_rng(1).standard_normal((2, grid[0] * grid[1], dim)).astype(np.float32)
    shapes = jax.eval_shape(lambda x: block.init(jax.random.key(0), x, grid, False), x)
    params = random_like(shapes)["params"]
    if sr_ratio > 1:
        chex.assert_shape(params["attn"]["sr"]["kernel"], (2, 2, dim, dim))
    else:
        assert "sr" not in params["attn"] and "norm" not in params["attn"]

    ours = block.apply({"params": params}, x, grid, False)
    as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    expected = np_block(x.astype(np.float64), as64, grid, heads, sr_ratio)
    # float32 against float64, with unit-variance weights (outputs up to ~30).
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


# ---------------------------------------------------------------------------------------
# The two heads: where the class token is, what the head reads.
# ---------------------------------------------------------------------------------------


def record_block_inputs(model, variables, images):
    """{block name: its input tokens} of one inference pass."""
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, Block) and context.method_name == "__call__":
            seen[context.module.name] = np.asarray(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images, train=False)
    return seen


@pytest.mark.parametrize("head", ["linear", "noah"])
def test_the_baseline_prepends_a_class_token_in_stage_4_only(head):
    model = create_model("pvt_tiny_050", num_classes=6, head=head, **SMALL)
    images = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
    variables = random_variables(model, 64)
    params = variables["params"]
    baseline = head == "linear"

    chex.assert_shape([params["pos_embed1"], params["pos_embed2"], params["pos_embed3"]],
                      [(1, 256, 32), (1, 64, 64), (1, 16, 160)])
    chex.assert_shape(params["pos_embed4"], (1, 5 if baseline else 4, 256))
    assert ("cls_token" in params) == baseline

    inputs = record_block_inputs(model, variables, images)
    assert {name: x.shape[1] for name, x in inputs.items()} == {
        "block1_0": 256, "block2_0": 64, "block3_0": 16, "block4_0": 5 if baseline else 4}
    if baseline:
        # Token 0 of stage 4 is the class token plus its own (first) pos_embed4 entry.
        np.testing.assert_allclose(inputs["block4_0"][:, 0],
                                   np.broadcast_to(params["cls_token"][0, 0]
                                                   + params["pos_embed4"][0, 0], (2, 256)),
                                   rtol=1e-6)

    # What the head reads: the class token's final-normed output, or all 4 tokens.
    head_module, head_variables, features = explain.split_at_head(model, variables, images)
    chex.assert_shape(features, (2, 256) if baseline else (2, 4, 256))
    np.testing.assert_allclose(head_module.apply(head_variables, features),
                               model.apply(variables, images), rtol=1e-6, atol=1e-6)
    if not baseline:
        chex.assert_shape(explain.feature_map(model, variables, images), (2, 2, 2, 256))


# ---------------------------------------------------------------------------------------
# The reference's names, and the image size of a converted checkpoint.
# ---------------------------------------------------------------------------------------

# pvt_small: depths 3/4/6/3. A block has 14 entries (norm1, q, kv, proj, norm2, fc1, fc2;
# weight and bias each), 18 with a spatial reduction (sr conv + its norm: stages 1-3).
PVT_SMALL_ENTRIES = (3 + 4 + 6) * 18 + 3 * 14 + 4 * 4 + 4 + 2   # blocks, patch embeds
PVT_SMALL_SHAPES = {                                            # pos_embeds, final norm
    "pos_embed1": (1, 3136, 64),
    "pos_embed2": (1, 784, 128),
    "pos_embed3": (1, 196, 320),
    "patch_embed1.proj.weight": (64, 3, 4, 4),
    "patch_embed1.norm.weight": (64,),
    "patch_embed4.proj.weight": (512, 320, 2, 2),
    "block1.2.attn.q.weight": (64, 64),
    "block1.2.attn.kv.weight": (128, 64),
    "block1.2.attn.sr.weight": (64, 64, 8, 8),
    "block1.2.attn.norm.bias": (64,),
    "block2.3.attn.sr.weight": (128, 128, 4, 4),
    "block2.3.mlp.fc1.weight": (1024, 128),
    "block3.5.attn.sr.weight": (320, 320, 2, 2),
    "block3.5.attn.kv.bias": (640,),
    "block3.5.mlp.fc2.weight": (320, 1280),
    "block4.2.attn.proj.weight": (512, 512),
    "block4.2.mlp.fc2.weight": (512, 2048),
    "norm.weight": (512,),
}


@pytest.mark.parametrize("head,extra", [
    ("linear", {"pos_embed4": (1, 50, 512), "cls_token": (1, 1, 512),
                "head.weight": (10, 512), "head.bias": (10,)}),
    # N=4, K=10: 40 output channels; Ck = Cv = 256, 64 per head.
    ("noah", {"pos_embed4": (1, 49, 512), "head.query.weight": (40, 64, 1, 1),
              "head.query.bias": (40,), "head.value.weight": (40, 64, 1, 1),
              "head.value.bias": (40,)}),
])
def test_pvt_small_uses_the_reference_names_and_round_trips(head, extra):
    model = create_model("pvt_small", num_classes=10, head=head)
    variables = random_variables(model, 224)
    state_dict = convert.flax_to_torch(variables, "pvt_small")

    head_entries = 3 if head == "linear" else 4  # the baseline's cls_token counted here
    assert len(state_dict) == PVT_SMALL_ENTRIES + head_entries
    for key, shape in {**PVT_SMALL_SHAPES, **extra}.items():
        assert state_dict[key].shape == shape, key
    # No spatial reduction in stage 4.
    assert not any(k.startswith("block4.") and ".attn.sr." in k for k in state_dict)
    # kv: torch's output rows are [k | v], then attention heads: a plain transpose.
    kernel = variables["params"]["block3_5"]["attn"]["kv"]["kernel"]  # [320, 640]
    assert state_dict["block3.5.attn.kv.weight"][320 + 70, 11] == kernel[11, 320 + 70]

    again = convert.torch_to_flax(state_dict, "pvt_small", head=head)
    assert_variables_equal(again, variables)


@pytest.mark.parametrize("head", ["noah", "linear"])
def test_image_size_is_inferred_from_pos_embed1(head):
    depths = dict(depths=(1, 1, 1, 1))
    model = create_model("pvt_tiny_050", num_classes=5, head=head, img_size=448, **depths)
    variables = random_variables(model, 448)
    state_dict = convert.flax_to_torch(variables, "pvt_tiny_050")
    assert state_dict["pos_embed1"].shape == (1, 112 * 112, 32)
    assert state_dict["pos_embed4"].shape == (1, 14 * 14 + (head == "linear"), 256)

    num_classes, found = convert.infer_model_settings(state_dict, "pvt_tiny_050", head=head,
                                                      **depths)
    assert (num_classes, found) == (5, {"img_size": 448, **depths})
    assert_variables_equal(convert.torch_to_flax(state_dict, "pvt_tiny_050", head=head,
                                                 **depths), variables)


# ---------------------------------------------------------------------------------------
# Settings and errors.
# ---------------------------------------------------------------------------------------


def test_norm_eps_and_drop_path_follow_the_reference():
    model = create_model("pvt_tiny_050", num_classes=3, head="linear", img_size=64,
                         depths=(1, 1, 2, 1), drop_path_rate=0.4)
    eps, drop_path = {}, {}

    def record(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.LayerNorm):
            eps["/".join(module.path)] = module.epsilon
        if isinstance(module, Block):
            drop_path[module.name] = module.drop_path_rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
    # PyTorch's default 1e-5 in the patch embeddings and spatial reductions, 1e-6 elsewhere.
    assert {k: v for k, v in eps.items() if v == 1e-5} == {
        **{f"patch_embed{i}/norm": 1e-5 for i in range(1, 5)},
        **{f"block{b}/attn/norm": 1e-5 for b in ("1_0", "2_0", "3_0", "3_1")}}
    assert set(eps.values()) == {1e-5, 1e-6} and len(eps) == 4 + 4 + 5 * 2 + 1
    # Linear from 0 over all five blocks of all stages.
    assert drop_path == pytest.approx({"block1_0": 0.0, "block2_0": 0.1, "block3_0": 0.2,
                                       "block3_1": 0.3, "block4_0": 0.4})


def test_mismatching_inputs_and_impossible_settings_fail_clearly():
    model = create_model("pvt_tiny_050", num_classes=3, **SMALL)
    with pytest.raises(ValueError, match="img_size=64"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 96, 3)))
    # 16 px with patch 4: stage 1's map is 4x4, smaller than its 8x8 spatial reduction.
    tiny = create_model("pvt_tiny_050", num_classes=3, img_size=16)
    with pytest.raises(ValueError, match="too small"):
        jax.eval_shape(tiny.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    no_room = create_model("pvt_tiny_050", num_classes=3, head="linear",
                           sr_ratios=(8, 4, 2, 2), **SMALL)
    with pytest.raises(ValueError, match="class token"):
        jax.eval_shape(no_room.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


# ---------------------------------------------------------------------------------------
# Loading a checkpoint trained at another image size (the family's adapt_checkpoint).
# ---------------------------------------------------------------------------------------

def torch_bilinear(grid, side):
    """[g, g, D] -> [side, side, D] as torch's F.interpolate(mode='bilinear',
    align_corners=False) computes it (source index clamped at 0, no antialiasing)."""
    g = grid.shape[0]
    src = np.maximum((np.arange(side) + 0.5) * g / side - 0.5, 0.0)
    low = np.floor(src).astype(int)
    high = np.minimum(low + 1, g - 1)
    weights = np.zeros((side, g))
    np.add.at(weights, (np.arange(side), low), 1 - (src - low))
    np.add.at(weights, (np.arange(side), high), src - low)
    return np.einsum("oi,pj,ijd->opd", weights, weights, grid.astype(np.float64))


@pytest.mark.parametrize("head", ["linear", "noah"])
@pytest.mark.parametrize("stored_size,size", [(64, 96), (64, 32)])
def test_a_checkpoint_of_another_size_loads_with_its_pos_embeds_resized(tmp_path, head,
                                                                         stored_size, size):
    from noah_jax.train import checkpoint
    stored_model = create_model("pvt_tiny_050", num_classes=6, head=head,
                                **dict(SMALL, img_size=stored_size))
    model = create_model("pvt_tiny_050", num_classes=6, head=head, **dict(SMALL, img_size=size))
    stored = random_variables(stored_model, stored_size)
    checkpoint.save_model(tmp_path, stored, checkpoint.model_settings("pvt_tiny_050", head, 6))
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    with pytest.raises(checkpoint.CheckpointMismatchError, match="4 of another shape"):
        checkpoint.restore_model(tmp_path, target)
    restored, _ = checkpoint.restore_model(tmp_path, target, adapt=model.adapt_checkpoint)

    prefix = {"pos_embed4": int(head == "linear")}
    for i, side in enumerate(model.stage_grids()):
        name, g = f"pos_embed{i + 1}", stored_model.stage_grids()[i]
        p = prefix.get(name, 0)
        old, new = stored["params"][name], np.asarray(restored["params"][name])
        chex.assert_shape(new, (1, p + side * side, old.shape[-1]))
        np.testing.assert_array_equal(new[0, :p], old[0, :p])  # the class token's entry
        np.testing.assert_allclose(new[0, p:].reshape(side, side, -1),
                                   torch_bilinear(old[0, p:].reshape(g, g, -1), side),
                                   rtol=1e-5, atol=1e-5)
    others = {k: v for k, v in flatten_dict(restored, sep="/").items() if "pos_embed" not in k}
    assert_variables_equal(others, {k: v for k, v in flatten_dict(stored, sep="/").items()
                                    if "pos_embed" not in k})
