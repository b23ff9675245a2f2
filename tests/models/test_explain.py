"""noah_jax.models.explain: attention maps, per-head contributions and Grad-CAM++, checked against
float64 numpy recomputations from the head's input and weights (spec section 1)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY_MODELS, tiny_model

from noah_jax.models import explain
from noah_jax.models.heads import merge_blocks

FAMILIES = list(TINY_MODELS)  # resnet18, deit_tiny_patch16_224, mixer_s16_224


@pytest.fixture(scope="module", params=FAMILIES)
def noah_case(request):
    model, variables, images = tiny_model(request.param)
    return model, variables, images, explain.explain(model, variables, images)


def softmax_over_positions(q):
    """q [B, L, K] -> softmax over L, float64."""
    e = np.exp(q - q.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def numpy_head(features, params, num_heads, key_ratio):
    """Spec section 1 in float64 on a feature grid [B, h, w, C] (head_split and kv_split):
    attention and values [B, N, K, h, w]."""
    x = np.asarray(features, np.float64)
    batch, h, w, channels = x.shape
    ck = int(channels * key_ratio)
    groups = {"query": (x[..., :ck], ck // num_heads), "value": (x[..., ck:],
                                                               (channels - ck) // num_heads)}
    out = {}
    for name, (part, width) in groups.items():
        kernel = np.asarray(params[name]["kernel"], np.float64)        # [N, width, K]
        bias = np.asarray(params[name]["bias"], np.float64).reshape(num_heads, -1)
        per_head = [part[..., n * width:(n + 1) * width] @ kernel[n] + bias[n]
                    for n in range(num_heads)]                         # N x [B, h, w, K]
        out[name] = np.stack(per_head, axis=1).reshape(batch, num_heads, h * w, -1)
    attention = np.stack([softmax_over_positions(out["query"][:, n])
                          for n in range(num_heads)], axis=1)          # [B, N, L, K]
    to_grid = lambda m: m.transpose(0, 1, 3, 2).reshape(batch, num_heads, -1, h, w)
    return to_grid(attention), to_grid(out["value"])


def test_maps_are_softmaxes_over_positions_and_sum_with_the_values_to_the_logits(noah_case):
    model, variables, images, e = noah_case
    n, k = model.head_setting("num_heads"), model.num_classes
    chex.assert_shape(e.logits, (2, k))
    chex.assert_shape([e.attention, e.values], (2, n, k, 3, 3))
    chex.assert_shape(e.contributions, (2, n, k))
    chex.assert_type([e.logits, e.attention, e.values, e.contributions], jnp.float32)
    assert e.merge == "sum"
    # The model's own output, run end to end.
    np.testing.assert_allclose(e.logits, model.apply(variables, images), rtol=1e-6, atol=1e-6)

    attention = np.asarray(e.attention, np.float64)
    assert attention.min() >= 0
    np.testing.assert_allclose(attention.sum(axis=(-2, -1)), 1.0, atol=1e-6)
    # Not uniform: the maps carry information about where each class looks.
    assert attention.max() > 1.5 / 9

    # Attention and values on the grid, from the head's input and weights.
    expected_attention, expected_values = numpy_head(e.features, variables["params"]["head"],
                                                     n, model.head_setting("key_ratio"))
    np.testing.assert_allclose(attention, expected_attention, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(e.values, expected_values, rtol=1e-5, atol=1e-5)

    # Head n's contribution is sum over positions of a * v; their sum is the logit.
    contributions = (expected_attention * expected_values).sum(axis=(-2, -1))
    np.testing.assert_allclose(e.contributions, contributions, rtol=1e-5, atol=1e-5)
    scale = np.abs(np.asarray(e.contributions)).max()  # float32 rounding of the terms
    np.testing.assert_allclose(np.asarray(e.contributions, np.float64).sum(axis=1), e.logits,
                               rtol=0, atol=4e-6 * scale)
    assert np.abs(np.asarray(e.contributions)).max() > 1e-3  # not a vacuous sum of zeros

    logits, maps = explain.attention_maps(model, variables, images)
    np.testing.assert_array_equal(maps, e.attention)
    np.testing.assert_array_equal(logits, e.logits)
    logits, contributions = explain.head_contributions(model, variables, images)
    np.testing.assert_array_equal(contributions, e.contributions)


@pytest.mark.parametrize("merge", ["mean", "max"])
def test_contributions_merge_as_the_head_does(merge):
    model, variables, images = tiny_model("mixer_s16_224", merge=merge)
    e = explain.explain(model, variables, images)
    assert e.merge == merge
    np.testing.assert_allclose(merge_blocks(e.contributions, merge), e.logits,
                               rtol=1e-6, atol=1e-6)
    expected = {"mean": e.contributions.mean(1), "max": e.contributions.max(1)}[merge]
    np.testing.assert_allclose(e.logits, expected, rtol=1e-6, atol=1e-6)
    # An Explanation is a pytree: the whole computation jits.
    jitted = jax.jit(lambda v, x: explain.explain(model, v, x))(variables, images)
    assert jitted.merge == merge
    chex.assert_trees_all_close(jitted, e, rtol=1e-5, atol=1e-6)


def test_a_cnn_map_keeps_a_non_square_feature_grid():
    model, variables, _ = tiny_model("resnet18")
    images = jax.random.normal(jax.random.key(3), (1, 96, 64, 3))  # 3 x 2 last stage map
    e = explain.explain(model, variables, images)
    chex.assert_shape(e.attention, (1, 4, 6, 3, 2))
    chex.assert_shape(e.features, (1, 3, 2, 512))
    expected_attention, _ = numpy_head(e.features, variables["params"]["head"], 4, 0.5)
    np.testing.assert_allclose(e.attention, expected_attention, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,overrides", [("deit_tiny_patch16_224", {"depth": 0}),
                                            ("mixer_s16_224", {"num_blocks": 0})])
def test_tokens_land_on_their_patch(name, overrides):
    # With no blocks, token (i, j) depends on patch (i, j) alone, so changing the patch at
    # row 0, column 2 changes the attention logits there only: log a shifts by the same
    # constant (the softmax's normaliser) at every other position of every map.
    model, variables, images = tiny_model(name, **overrides)
    changed = images.at[:, 0:16, 32:48].add(3.0)
    before = np.log(np.asarray(explain.explain(model, variables, images).attention, np.float64))
    after = np.log(np.asarray(explain.explain(model, variables, changed).attention, np.float64))
    shift = (after - before).reshape(*after.shape[:3], 9)   # positions in row-major order
    others = np.delete(shift, 2, axis=-1)
    np.testing.assert_allclose(others, others[..., :1].repeat(8, -1), atol=1e-4)
    assert np.abs(shift[..., 2] - others[..., 0]).min() > 1e-3


def test_token_grid_follows_the_image_aspect_ratio():
    assert explain.token_grid(196, (224, 224)) == (14, 14)
    assert explain.token_grid(35, (224, 160)) == (7, 5)
    assert explain.token_grid(35, (160, 224)) == (5, 7)
    assert explain.token_grid(49, (224, 224)) == (7, 7)
    assert explain.token_grid(6, (32, 48)) == (2, 3)


def gap_linear_grad_cam_plus_plus(features, kernel, classes):
    """Grad-CAM++ of S_k = mean_l A_l . w_k + b_k, in closed form. Here g = w_ck / L at
    every position, so alpha_c = (w^2/L^2) / (2 w^2/L^2 + (sum_l A_lc) (w/L)^3)
    = 1 / (2 + w_ck Abar_c) and the channel weight is alpha_c * relu(w_ck): the map is
    relu(sum_c relu(w_ck) / (2 + w_ck Abar_c) * A_c). Not ReLU(CAM_k) up to a factor
    (Grad-CAM's result): negative w_ck are dropped and alpha varies with the channel."""
    a = np.asarray(features, np.float64)                     # [B, h, w, C]
    mean = a.mean(axis=(1, 2))                               # [B, C]
    w = np.asarray(kernel, np.float64)[:, classes][None]     # [1, C, n]
    weights = np.maximum(w, 0) / (2 + w * mean[:, :, None])  # [B, C, n]
    return np.maximum(np.einsum("bhwc,bcn->bnhw", a, weights), 0)


@pytest.mark.parametrize("name", ["resnet18", "mixer_s16_224"])
def test_grad_cam_plus_plus_of_a_pooled_linear_head_has_its_closed_form(name):
    model, variables, images = tiny_model(name, head="linear")
    # Weights large enough that alpha differs between channels (the inits are ~0.01 or 0).
    head = variables["params"]["head"]
    kernel = 0.3 * jax.random.normal(jax.random.key(7), head["kernel"].shape)
    variables = {**variables, "params": {**variables["params"],
                                         "head": {**head, "kernel": kernel}}}
    classes = [4, 0, 2]
    cams = explain.grad_cam_plus_plus(model, variables, images, classes)
    chex.assert_shape(cams, (2, 3, 3, 3))
    features = explain.feature_map(model, variables, images)
    chex.assert_shape(features, (2, 3, 3, kernel.shape[0]))
    expected = gap_linear_grad_cam_plus_plus(features, kernel, classes)
    assert expected.max() > 0
    np.testing.assert_allclose(cams, expected, rtol=1e-4, atol=1e-5 * expected.max())


def numpy_noah_gradient(e, params, k):
    """dS_k/dA [B, h, w, C] of a NOAH head (sum merge), by hand: with s_n = sum_l a_l v_l,
    ds_n/dq_l = a_l (v_l - s_n) and ds_n/dv_l = a_l, so a key channel c of head n gets
    a_l (v_l - s_n) Wq[n, c, k] and a value channel a_l Wv[n, c, k]."""
    a = np.asarray(e.attention, np.float64)[:, :, k]            # [B, N, h, w]
    v = np.asarray(e.values, np.float64)[:, :, k]
    s = (a * v).sum(axis=(-2, -1), keepdims=True)
    wq = np.asarray(params["query"]["kernel"], np.float64)[..., k]  # [N, Ck/N]
    wv = np.asarray(params["value"]["kernel"], np.float64)[..., k]  # [N, Cv/N]
    key_part = np.einsum("bnhw,nc->bhwnc", a * (v - s), wq)
    value_part = np.einsum("bnhw,nc->bhwnc", a, wv)
    batch, _, h, w = a.shape
    return np.concatenate([key_part.reshape(batch, h, w, -1),
                           value_part.reshape(batch, h, w, -1)], axis=-1)


def numpy_grad_cam_plus_plus(features, grads):
    """Equation 19 of the Grad-CAM++ paper: alpha = g^2 / (2 g^2 + (sum_ab A_ab) g^3)."""
    a = np.asarray(features, np.float64)                       # [B, h, w, C]
    total = a.sum(axis=(1, 2), keepdims=True)
    denominator = 2 * grads**2 + total * grads**3
    alpha = np.where(grads != 0, grads**2 / np.where(denominator != 0, denominator, 1), 0)
    weights = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))   # [B, C]
    return np.maximum(np.einsum("bhwc,bc->bhw", a, weights), 0)


def test_grad_cam_plus_plus_of_noah_heads_follows_the_paper(noah_case):
    model, variables, images, e = noah_case
    classes = [1, 3]
    cams = np.asarray(explain.grad_cam_plus_plus(model, variables, images, classes))
    assert cams.shape == (2, 2, 3, 3)
    assert np.isfinite(cams).all() and cams.min() >= 0
    assert (cams.max(axis=(-2, -1)) > 0).all()              # every (image, class) lights up
    assert np.abs(cams[:, 0] - cams[:, 1]).max() > 1e-6     # and the classes differ
    for i, k in enumerate(classes):
        grads = numpy_noah_gradient(e, variables["params"]["head"], k)
        expected = numpy_grad_cam_plus_plus(e.features, grads)
        np.testing.assert_allclose(cams[:, i], expected, rtol=1e-4, atol=1e-5 * expected.max())


def test_a_class_token_head_has_no_map():
    model, variables, images = tiny_model("deit_tiny_patch16_224", head="linear")
    with pytest.raises(ValueError, match="no positions"):
        explain.grad_cam_plus_plus(model, variables, images, [0])
    with pytest.raises(ValueError, match="NOAH head"):
        explain.explain(model, variables, images)


def test_upsample_is_bilinear_with_half_pixel_centres():
    up = explain.upsample(jnp.array([[[0.0, 1.0]]]), (1, 4))
    np.testing.assert_allclose(up, [[[0.0, 0.25, 0.75, 1.0]]], atol=1e-6)
    maps = jax.random.uniform(jax.random.key(0), (2, 4, 6, 3, 3))
    up = explain.upsample(maps, (48, 32))
    chex.assert_shape(up, (2, 4, 6, 48, 32))
    # Corners keep the corner values (edge pixels are clamped to the outer samples).
    np.testing.assert_allclose(up[..., 0, 0], maps[..., 0, 0], rtol=1e-6)
    np.testing.assert_allclose(up[..., -1, -1], maps[..., -1, -1], rtol=1e-6)
