"""NOAHHead, its POCA blocks and LinearHead against independent numpy references written from
the spec."""

from functools import partial

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from flax.traverse_util import flatten_dict

from noah_jax.models.heads import POCA, LinearHead, NOAHHead, noah_lecun_kernel_init
from noah_jax.models.noah_cpu import attention_pool, dropout_attention_pool, hashed_bits, keep_mask


def torch_layout_params(rng, channels, num_classes, num_heads, key_ratio, head_split, kv_split):
    """Random head weights in the reference's layout: W [N*K, Cin/G], b [N*K]."""
    ck = int(channels * key_ratio) if kv_split else channels
    cv = channels - ck if kv_split else channels
    groups = num_heads if head_split else 1
    out = num_heads * num_classes
    return {
        "wq": rng.standard_normal((out, ck // groups)),
        "bq": rng.standard_normal(out),
        "wv": rng.standard_normal((out, cv // groups)),
        "bv": rng.standard_normal(out),
    }


def to_flax(p, groups):
    """Reference grouped-conv layout -> ours: [N*K, Cin/G] -> [G, Cin/G, N*K/G]."""
    def kernel(w):
        out, cin = w.shape
        return jnp.asarray(w.reshape(groups, out // groups, cin).transpose(0, 2, 1), jnp.float32)
    return {"params": {
        "query": {"kernel": kernel(p["wq"]), "bias": jnp.asarray(p["bq"], jnp.float32)},
        "value": {"kernel": kernel(p["wv"]), "bias": jnp.asarray(p["bv"], jnp.float32)},
    }}


def numpy_noah(x, p, num_classes, num_heads, key_ratio, head_split, kv_split, merge="sum"):
    """Spec section 1, one head and one class at a time, in float64: the logits [B, K] and
    the attention maps [B, N, K, L]."""
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1, x.shape[-1])  # [B, L, C]
    channels = x.shape[-1]
    ck = int(channels * key_ratio)
    xk, xv = (x[..., :ck], x[..., ck:]) if kv_split else (x, x)
    per_head = np.zeros((x.shape[0], num_heads, num_classes))
    attention = np.zeros((x.shape[0], num_heads, num_classes, x.shape[1]))
    for h in range(num_heads):
        rows = slice(h * num_classes, (h + 1) * num_classes)
        if head_split:  # head h reads its contiguous channel group only
            gk, gv = xk.shape[-1] // num_heads, xv.shape[-1] // num_heads
            keys, values = xk[..., h * gk:(h + 1) * gk], xv[..., h * gv:(h + 1) * gv]
        else:
            keys, values = xk, xv
        q = keys @ p["wq"][rows].T + p["bq"][rows]  # [B, L, K]
        v = values @ p["wv"][rows].T + p["bv"][rows]
        a = np.exp(q - q.max(axis=1, keepdims=True))
        a /= a.sum(axis=1, keepdims=True)  # softmax over positions
        per_head[:, h] = (a * v).sum(axis=1)
        attention[:, h] = a.transpose(0, 2, 1)
    logits = {"sum": per_head.sum(1), "mean": per_head.mean(1), "max": per_head.max(1)}[merge]
    return logits, attention


# (C, N, r, K, input spatial shape, head_split, kv_split, merge)
CASES = [
    (8, 2, 0.5, 3, (4, 4), True, True, "sum"),
    (24, 4, 1 / 3, 5, (3, 5), True, True, "sum"),   # Ck=8, Cv=16, non-square map
    (16, 4, 0.25, 7, (2, 3), True, True, "sum"),    # Ck=4, Cv=12
    (40, 8, 0.2, 6, (7,), True, True, "sum"),       # tokens [B, L, C]
    (12, 3, 0.5, 4, (3, 5), False, True, "sum"),    # head_split=False
    (12, 3, 0.5, 4, (5, 3), True, False, "sum"),    # kv_split=False
    (12, 3, 0.5, 4, (2, 2), False, False, "sum"),
    (16, 4, 0.5, 5, (3, 3), True, True, "mean"),
    (16, 4, 0.5, 5, (3, 3), True, True, "max"),
]


@pytest.mark.parametrize("channels,heads,ratio,classes,spatial,head_split,kv_split,merge", CASES)
def test_head_matches_numpy_reference(channels, heads, ratio, classes, spatial, head_split,
                                      kv_split, merge):
    rng = np.random.default_rng(channels * 100 + heads)
    x = rng.standard_normal((2, *spatial, channels)).astype(np.float32)
    p = torch_layout_params(rng, channels, classes, heads, ratio, head_split, kv_split)
    head = NOAHHead(classes, heads, ratio, dropout=0.3, head_split=head_split,
                    kv_split=kv_split, merge=merge)
    variables = to_flax(p, heads if head_split else 1)
    chex.assert_trees_all_equal_shapes(
        variables, head.init(jax.random.key(0), jnp.asarray(x)))
    logits, state = head.apply(variables, jnp.asarray(x), train=False, mutable=["intermediates"])
    chex.assert_shape(logits, (2, classes))
    chex.assert_type(logits, jnp.float32)
    expected, expected_attention = numpy_noah(x, p, classes, heads, ratio, head_split, kv_split,
                                              merge)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=1e-5,
                               atol=1e-5 * np.abs(expected).max())
    (attention,) = state["intermediates"]["attention"]
    chex.assert_shape(attention, (2, heads, classes, int(np.prod(spatial))))
    np.testing.assert_allclose(attention, expected_attention, rtol=1e-5, atol=1e-7)


def test_parameter_count_is_ck_plus_2nk():
    # C*K + 2*N*K, against param_counts.json's head table.
    head = NOAHHead(1000, num_heads=8, key_ratio=0.25)
    variables = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 7, 7, 1280)))
    count = sum(x.size for x in jax.tree.leaves(variables))
    assert count == 1280 * 1000 + 2 * 8 * 1000 == 1_296_000


def test_default_init_is_kaiming_normal_fan_out_with_zero_bias():
    classes, heads = 500, 4
    variables = NOAHHead(classes, heads).init(jax.random.key(1), jnp.zeros((1, 4, 4, 256)))
    for name in ("query", "value"):
        kernel = np.asarray(variables["params"][name]["kernel"])
        assert kernel.shape == (heads, 32, heads * classes // heads)
        np.testing.assert_allclose(kernel.std(), np.sqrt(2.0 / (heads * classes)), rtol=0.02)
        assert abs(kernel.mean()) < 5 * kernel.std() / np.sqrt(kernel.size)
        np.testing.assert_array_equal(variables["params"][name]["bias"], 0.0)


def test_eval_is_deterministic_and_train_dropout_is_not():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 16))
    head = NOAHHead(10, num_heads=2, dropout=0.5)
    variables = head.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda t: t + 0.1, variables)  # non-zero biases
    eval1 = head.apply(variables, x, train=False)
    eval2 = head.apply(variables, x, train=False)
    np.testing.assert_array_equal(eval1, eval2)
    train1 = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    train2 = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(3)})
    train1_again = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(train1, train2)
    assert not np.allclose(train1, eval1)
    np.testing.assert_array_equal(train1, train1_again)
    # Dropout off in training equals eval.
    no_drop = NOAHHead(10, num_heads=2, dropout=0.0)
    np.testing.assert_allclose(
        no_drop.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)}), eval1,
        rtol=1e-6)


def test_dropout_acts_on_values_with_inverted_scaling():
    # With all-equal query logits the attention is uniform, so the logit is the mean over
    # positions of (dropped) values: every kept value is scaled by 1/(1-p).
    channels, length, rate = 8, 4000, 0.25
    head = NOAHHead(1, num_heads=1, key_ratio=0.5, dropout=rate)
    variables = {"params": {
        "query": {"kernel": jnp.zeros((1, 4, 1)), "bias": jnp.zeros((1,))},
        "value": {"kernel": jnp.zeros((1, 4, 1)), "bias": jnp.ones((1,))},
    }}
    x = jnp.ones((1, length, channels))
    out = head.apply(variables, x, train=True, rngs={"dropout": jax.random.key(0)})
    # Mean of Bernoulli(1-p)/(1-p) over 4000 draws: 1 within a few standard errors.
    np.testing.assert_allclose(float(out[0, 0]), 1.0, atol=4 * np.sqrt(rate / (1 - rate) / length))
    assert float(out[0, 0]) != 1.0


def test_output_is_invariant_to_permuting_positions():
    x = jax.random.normal(jax.random.key(0), (2, 20, 12))
    head = NOAHHead(6, num_heads=3)
    variables = head.init(jax.random.key(1), x)
    permuted = x[:, jax.random.permutation(jax.random.key(2), 20)]
    np.testing.assert_allclose(head.apply(variables, x), head.apply(variables, permuted),
                               rtol=1e-5, atol=1e-6)
    # A feature map and its flattened tokens give the same logits.
    grid = x.reshape(2, 4, 5, 12)
    np.testing.assert_allclose(head.apply(variables, grid), head.apply(variables, x), rtol=1e-6)


def test_gradients_reach_every_parameter_but_the_query_bias_is_shift_invariant():
    x = jax.random.normal(jax.random.key(0), (3, 5, 5, 16))
    head = NOAHHead(7, num_heads=4, dropout=0.1)
    variables = head.init(jax.random.key(1), x)
    variables = jax.tree.map(lambda t: t + 0.05, variables)

    def loss(params):
        logits = head.apply({"params": params}, x, train=True, rngs={"dropout": jax.random.key(4)})
        return jnp.sum(jnp.sin(logits))

    grads = flatten_dict(jax.grad(loss)(variables["params"]), sep="/")
    for name, g in grads.items():
        if name == "query/bias":
            # A per-(head, class) constant under the softmax over positions: no effect.
            np.testing.assert_allclose(g, 0.0, atol=1e-5)
        else:
            assert np.all(np.isfinite(g)) and np.abs(g).max() > 1e-3, name


def test_attention_maps_are_sown_as_b_n_k_l_and_normalised_over_positions():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4, 16))
    head = NOAHHead(5, num_heads=4)
    variables = head.init(jax.random.key(1), x)
    logits, state = head.apply(variables, x, mutable=["intermediates"])
    (attention,) = state["intermediates"]["attention"]
    chex.assert_shape(attention, (2, 4, 5, 12))
    np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-5)
    chex.assert_trees_all_close(logits, head.apply(variables, x))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))
    f32 = NOAHHead(10, num_heads=4)
    bf16 = NOAHHead(10, num_heads=4, dtype=jnp.bfloat16)
    variables = f32.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_dtypes(variables, bf16.init(jax.random.key(1), x))
    out = bf16.apply(variables, x)
    chex.assert_type(out, jnp.float32)
    np.testing.assert_allclose(out, f32.apply(variables, x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,channels,message", [
    (dict(num_heads=4, key_ratio=0.5), 12, "Ck=6"),          # 6 % 4 != 0
    (dict(num_heads=4, key_ratio=0.25), 24, "Ck=6"),
    (dict(num_heads=2, key_ratio=0.05), 16, "Ck=0"),
    (dict(num_heads=4, key_ratio=1.0), 16, "key_ratio"),
    (dict(num_heads=4, key_ratio=0.0), 16, "key_ratio"),
    (dict(num_heads=3, kv_split=False), 16, "C=16"),
    (dict(num_heads=0), 16, "num_heads"),
    (dict(merge="prod"), 16, "merge"),
])
def test_invalid_settings_raise_value_errors_naming_the_numbers(kwargs, channels, message):
    head = NOAHHead(3, **kwargs)
    x = jnp.zeros((1, 2, channels))
    with pytest.raises(ValueError, match=message):
        head.init(jax.random.key(0), x)


def test_head_rejects_inputs_of_the_wrong_rank():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        NOAHHead(3, num_heads=1).init(jax.random.key(0), jnp.zeros((2, 16)))


# ---------------------------------------------------------------------------------------
# The head as N POCA blocks.
# ---------------------------------------------------------------------------------------


def numpy_poca(keys, values, wq, bq, wv, bv):
    """One POCA block in float64, with einsums: kernels [Cin, K], biases [K]. Returns the
    logits [B, K] and the attention map [B, K, L]."""
    keys, values = np.asarray(keys, np.float64), np.asarray(values, np.float64)
    q = np.einsum("blc,ck->blk", keys, wq) + bq
    v = np.einsum("blc,ck->blk", values, wv) + bv
    a = np.exp(q - q.max(axis=1, keepdims=True))
    a /= a.sum(axis=1, keepdims=True)  # over positions
    return np.einsum("blk,blk->bk", a, v), a.transpose(0, 2, 1)


def block_inputs(x, head, num_heads, key_ratio, head_split, kv_split):
    """Head h's key and value channels of tokens x [B, L, C], sliced by hand."""
    ck = int(x.shape[-1] * key_ratio)
    keys, values = (x[..., :ck], x[..., ck:]) if kv_split else (x, x)
    if not head_split:
        return keys, values
    gk, gv = keys.shape[-1] // num_heads, values.shape[-1] // num_heads
    return keys[..., head * gk:(head + 1) * gk], values[..., head * gv:(head + 1) * gv]


def block_params(params, head, num_classes, head_split):
    """Head h's POCA parameters, sliced by hand from the head's stored ones."""
    columns = slice(head * num_classes, (head + 1) * num_classes)

    def kernel(k):  # [G, Cin/G, N*K/G] -> [1, Cin of the block, K]
        return k[head][None] if head_split else k[:, :, columns]
    return {name: {"kernel": kernel(p["kernel"]), "bias": p["bias"][columns]}
            for name, p in params.items()}


def random_params(variables, seed):
    """The variables' params replaced by standard normal draws (non-zero biases)."""
    leaves, treedef = jax.tree.flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(key, leaf.shape)
                                        for key, leaf in zip(keys, leaves)])


class POCACompositionTest(chex.TestCase):
    """POCA on its own, and NOAHHead as the merge of its POCA blocks, jitted and not."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_poca_matches_an_einsum_reference(self):
        rng = np.random.default_rng(0)
        keys = rng.standard_normal((2, 6, 5)).astype(np.float32)
        values = rng.standard_normal((2, 6, 7)).astype(np.float32)
        wq, wv = rng.standard_normal((5, 4)), rng.standard_normal((7, 4))
        bq, bv = rng.standard_normal(4), rng.standard_normal(4)
        params = {"query": {"kernel": wq[None], "bias": bq},
                  "value": {"kernel": wv[None], "bias": bv}}
        params = jax.tree.map(lambda t: jnp.asarray(t, jnp.float32), params)
        poca = POCA(4, dropout=0.5)  # dropout is off outside training
        chex.assert_trees_all_equal_shapes(
            {"params": params}, poca.init(jax.random.key(0), keys, values))

        @self.variant
        def forward(params, keys, values):
            return poca.apply({"params": params}, keys, values, mutable=["intermediates"])

        logits, state = forward(params, keys, values)
        (attention,) = state["intermediates"]["attention"]
        chex.assert_shape(logits, (2, 4))
        chex.assert_type(logits, jnp.float32)
        chex.assert_shape(attention, (2, 4, 6))
        chex.assert_type(attention, jnp.float32)
        expected, expected_attention = numpy_poca(keys, values, wq, bq, wv, bv)
        np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(attention, expected_attention, rtol=1e-5, atol=1e-7)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("sum", "sum", True, True),
        ("mean", "mean", True, True),
        ("max", "max", True, True),
        ("sum_no_head_split", "sum", False, True),
        ("max_no_kv_split", "max", True, False),
        ("mean_no_splits", "mean", False, False),
    )
    def test_head_is_the_merge_of_its_poca_blocks(self, merge, head_split, kv_split):
        classes, heads, ratio = 5, 3, 1 / 3
        x = jax.random.normal(jax.random.key(0), (2, 7, 18))  # Ck = 6, Cv = 12
        head = NOAHHead(classes, heads, ratio, dropout=0.2, head_split=head_split,
                        kv_split=kv_split, merge=merge)
        params = random_params(head.init(jax.random.key(1), x), seed=2)
        poca = POCA(classes, dropout=0.2)

        @self.variant
        def head_forward(params, x):
            return head.apply({"params": params}, x, mutable=["intermediates"])

        @self.variant
        def block_forward(params, keys, values):
            return poca.apply({"params": params}, keys, values, mutable=["intermediates"])

        logits, state = head_forward(params, x)
        (attention,) = state["intermediates"]["attention"]
        chex.assert_shape(logits, (2, classes))
        chex.assert_type(logits, jnp.float32)
        chex.assert_shape(attention, (2, heads, classes, 7))
        blocks = [block_forward(block_params(params, h, classes, head_split),
                                *block_inputs(x, h, heads, ratio, head_split, kv_split))
                  for h in range(heads)]
        per_head = jnp.stack([logits for logits, _ in blocks], axis=1)  # [B, N, K]
        merged = {"sum": per_head.sum(1), "mean": per_head.mean(1), "max": per_head.max(1)}
        chex.assert_trees_all_close(logits, merged[merge], rtol=1e-5, atol=1e-5)
        block_attention = jnp.stack(
            [state["intermediates"]["attention"][0] for _, state in blocks], axis=1)
        chex.assert_trees_all_close(attention, block_attention, rtol=1e-6, atol=1e-7)


# (C, N, r, head_split, kv_split) -> stored shapes of query/kernel, value/kernel; K = 1000.
PARAMETER_TREES = [
    ((2048, 4, 1 / 8, True, True), (4, 64, 1000), (4, 448, 1000)),      # ResNet-50
    ((192, 4, 1 / 2, True, True), (4, 24, 1000), (4, 24, 1000)),        # DeiT-Tiny
    ((1280, 8, 1 / 4, True, True), (8, 40, 1000), (8, 120, 1000)),      # MobileNetV2
    ((2048, 4, 1 / 8, False, True), (1, 256, 4000), (1, 1792, 4000)),
    ((2048, 4, 1 / 8, True, False), (4, 512, 1000), (4, 512, 1000)),
    ((512, 4, 1 / 2, False, False), (1, 512, 4000), (1, 512, 4000)),
]


@pytest.mark.parametrize("settings,query_kernel,value_kernel", PARAMETER_TREES)
def test_parameter_tree_is_the_grouped_layout(settings, query_kernel, value_kernel):
    # The names and shapes checkpoints, the converter and the parity fixtures rely on:
    # kernel [G, Cin/G, N*K/G], bias [N*K], float32, and nothing else.
    channels, heads, ratio, head_split, kv_split = settings
    head = NOAHHead(1000, heads, ratio, head_split=head_split, kv_split=kv_split)
    shapes = jax.eval_shape(head.init, jax.random.key(0), jnp.zeros((1, 7, 7, channels)))
    expected = {
        "params/query/kernel": query_kernel, "params/query/bias": (heads * 1000,),
        "params/value/kernel": value_kernel, "params/value/bias": (heads * 1000,),
    }
    flat = flatten_dict(shapes, sep="/")
    assert {name: leaf.shape for name, leaf in flat.items()} == expected
    assert all(leaf.dtype == jnp.float32 for leaf in flat.values())


@pytest.mark.parametrize("head_split", [True, False])
def test_head_view_slices_the_stored_layout_per_block_and_inverts(head_split):
    x = jnp.zeros((1, 4, 24))
    head = NOAHHead(5, num_heads=3, key_ratio=0.25, head_split=head_split)
    params = random_params(head.init(jax.random.key(0), x), seed=1)
    views = jax.tree.map(head.head_view, params)
    for h in range(3):
        chex.assert_trees_all_close(jax.tree.map(lambda t, h=h: t[h], views),
                                    block_params(params, h, 5, head_split))
    chex.assert_trees_all_close(jax.tree.map(head.stored_layout, views), params)


def test_poca_alone_is_a_one_head_noah_head():
    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 8))
    head = NOAHHead(4, num_heads=1, key_ratio=0.25, dropout=0.1)
    poca = POCA(4, dropout=0.1)
    keys, values = x[..., :2].reshape(2, 9, 2), x[..., 2:].reshape(2, 9, 6)
    variables = head.init(jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes_and_dtypes(
        variables, poca.init(jax.random.key(1), keys, values))
    variables = {"params": random_params(variables, seed=2)}
    chex.assert_trees_all_close(head.apply(variables, x), poca.apply(variables, keys, values),
                                rtol=1e-6)


@pytest.mark.parametrize("head_split", [True, False])
@pytest.mark.parametrize("lecun", [False, True])
def test_init_draws_each_stored_kernel_with_its_fans_and_independent_blocks(head_split, lecun):
    # Kaiming-normal with fan_out = N*K, or (Mixer, gMLP) LeCun-normal with fan_in = Cin/G:
    # the fans of the stored kernel, not of one block's slice.
    classes, heads, channels = 500, 4, 256
    kwargs = {"kernel_init": noah_lecun_kernel_init} if lecun else {}
    head = NOAHHead(classes, heads, key_ratio=0.25, head_split=head_split, **kwargs)
    params = head.init(jax.random.key(3), jnp.zeros((1, 2, 2, channels)))["params"]
    groups = heads if head_split else 1
    for name, cin in (("query", 64), ("value", 192)):
        kernel = np.asarray(params[name]["kernel"])
        expected = np.sqrt(1.0 / (cin // groups)) if lecun else np.sqrt(2.0 / (heads * classes))
        np.testing.assert_allclose(kernel.std(), expected, rtol=0.02)
        blocks = np.asarray(head.head_view(kernel)).reshape(heads, -1)
        correlation = np.corrcoef(blocks)[np.triu_indices(heads, 1)]
        assert np.abs(correlation).max() < 5 / np.sqrt(blocks.shape[1]), name
        np.testing.assert_array_equal(params[name]["bias"], 0.0)


def test_blocks_draw_their_own_dropout_masks():
    # Uniform attention and values 1: each block's logit is the mean of its dropped values.
    # Shared masks would make every block equal, and the max over blocks their mean.
    head = NOAHHead(1, num_heads=4, key_ratio=0.5, dropout=0.5, merge="max")
    variables = {"params": {
        "query": {"kernel": jnp.zeros((4, 1, 1)), "bias": jnp.zeros((4,))},
        "value": {"kernel": jnp.zeros((4, 1, 1)), "bias": jnp.ones((4,))},
    }}
    x = jnp.ones((1, 50, 8))
    rngs = {"dropout": jax.random.key(0)}
    largest = head.apply(variables, x, train=True, rngs=rngs)
    mean = head.clone(merge="mean").apply(variables, x, train=True, rngs=rngs)
    assert float(largest[0, 0]) > float(mean[0, 0])


def test_linear_head_pools_then_projects():
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, 6))
    head = LinearHead(4)
    variables = head.init(jax.random.key(1), x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"] + 0.5
    out = head.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    expected = np.asarray(x, np.float64).mean(axis=(1, 2)) @ np.asarray(kernel, np.float64) + bias
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    pooled = LinearHead(4, pool="none").apply({"params": {"kernel": kernel, "bias": bias}},
                                              x.mean(axis=(1, 2)))
    np.testing.assert_allclose(pooled, out, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The two implementations: the readable einsums and the CPU path (noah_cpu).
# ---------------------------------------------------------------------------------------

SWITCHES = [{}, {"head_split": False}, {"kv_split": False},
            {"head_split": False, "kv_split": False}]


@pytest.mark.parametrize("switches", SWITCHES)
def test_training_with_dropout_repeats_the_readable_head_draw_for_draw(switches):
    """The CPU path (vmapped blocks in the classes-first layout, projections and
    `attention_pool` with their hand-written gradients) trains exactly as the readable
    einsums (all blocks at once, autodiff of einsum, softmax and sum): the same initial
    parameters, the same value dropout mask (one [N, K, B, L] `keep_mask` from the same
    key), and logits and gradients with respect to every parameter and the features that
    differ only by float rounding."""
    x = jax.random.normal(jax.random.key(3), (2, 7, 64))
    head = NOAHHead(10, 4, 0.5, 0.3, implementation="cpu", **switches)
    readable = head.clone(implementation="readable")
    variables = head.init(jax.random.key(0), x)
    chex.assert_trees_all_equal(variables, readable.init(jax.random.key(0), x))
    variables = {"params": random_params(variables, seed=5)}
    weights = jax.random.normal(jax.random.key(6), (2, 10))

    def loss(module, params, x, key):
        logits = module.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.sum(weights * logits), logits

    for key in range(3):
        args = (variables["params"], x, jax.random.key(key))
        (_, logits), grads = jax.value_and_grad(partial(loss, head), (0, 1), has_aux=True)(*args)
        (_, want), want_grads = jax.value_and_grad(partial(loss, readable), (0, 1),
                                                   has_aux=True)(*args)
        chex.assert_trees_all_close(logits, want, atol=1e-5, rtol=1e-5)
        chex.assert_trees_all_close(grads, want_grads, atol=1e-5, rtol=1e-5)


def assert_close_at_scale(got, want, tolerance):
    """Every leaf within `tolerance` times the largest magnitude in `want`: the error of a
    low-precision computation scales with its operands, not with each element (the query
    bias's gradient, zero in exact arithmetic, is rounding noise of that size)."""
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))

    def close(path, a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=tolerance * scale,
                                   err_msg=jax.tree_util.keystr(path))
    jax.tree_util.tree_map_with_path(close, got, want)


# bfloat16 keeps 8 significant bits; the two paths accumulate their products in different
# orders, so their projections differ by a few of its units.
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 4e-2)])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("switches", SWITCHES)
def test_both_implementations_give_the_same_logits_gradients_and_maps(switches, train, dtype,
                                                                    tolerance):
    """Jitted, eval and training with dropout, float32 and bfloat16 compute: the logits,
    the gradients (parameters and features), and the sown attention maps and values of
    the readable and the CPU path agree to the compute dtype's rounding."""
    x = jax.random.normal(jax.random.key(1), (3, 2, 5, 48))            # L = 10, C = 48
    head = NOAHHead(6, 4, 0.25, dropout=0.3, dtype=dtype, implementation="cpu", **switches)
    params = random_params(head.init(jax.random.key(0), x), seed=2)
    weights = jax.random.normal(jax.random.key(3), (3, 6))

    def step(module):
        @jax.jit
        def run(params, x):
            def loss(params, x):
                logits, state = module.apply({"params": params}, x, train=train,
                                             rngs={"dropout": jax.random.key(4)},
                                             mutable=["intermediates"])
                return jnp.sum(weights * logits), (logits, state["intermediates"])
            return jax.value_and_grad(loss, (0, 1), has_aux=True)(params, x)
        (_, (logits, maps)), grads = run(params, x)
        return logits, grads, maps

    logits, grads, maps = step(head)
    want_logits, want_grads, want_maps = step(head.clone(implementation="readable"))
    chex.assert_type(logits, jnp.float32)
    chex.assert_trees_all_equal_shapes_and_dtypes(maps, want_maps)
    (attention,), (values,) = maps["attention"], maps["values"]
    chex.assert_shape([attention, values], (3, 4, 6, 10))
    for got, want in ((logits, want_logits), (grads, want_grads), (maps, want_maps)):
        assert_close_at_scale(got, want, tolerance)
    if train and dtype == jnp.float32:  # the same values are dropped (zero) in both
        # (In bfloat16 a kept value may round to zero in one path.)
        np.testing.assert_array_equal(values == 0, want_maps["values"][0] == 0)
        assert 0.15 < float(jnp.mean(values == 0)) < 0.45


def test_poca_alone_agrees_between_implementations_with_dropout():
    keys = jax.random.normal(jax.random.key(0), (2, 9, 4))
    values = jax.random.normal(jax.random.key(1), (2, 9, 6))
    poca = POCA(5, dropout=0.4, implementation="cpu")
    variables = {"params": random_params(poca.init(jax.random.key(2), keys, values), seed=3)}
    rngs = {"dropout": jax.random.key(4)}
    got, state = poca.apply(variables, keys, values, True, rngs=rngs, mutable=["intermediates"])
    want, want_state = poca.clone(implementation="readable").apply(
        variables, keys, values, True, rngs=rngs, mutable=["intermediates"])
    chex.assert_trees_all_close((got, state), (want, want_state), atol=1e-5, rtol=1e-5)


def test_auto_is_the_cpu_path_on_cpu_and_a_bad_name_is_one_clear_error():
    x = jax.random.normal(jax.random.key(0), (2, 6, 16))
    head = NOAHHead(3, num_heads=2, dropout=0.2)
    variables = {"params": random_params(head.init(jax.random.key(1), x), seed=2)}
    rngs = {"dropout": jax.random.key(3)}
    auto = jax.jit(lambda v: head.apply(v, x, train=True, rngs=rngs))(variables)
    chosen = "cpu" if jax.default_backend() == "cpu" else "readable"
    same = jax.jit(lambda v: head.clone(implementation=chosen).apply(v, x, train=True,
                                                                     rngs=rngs))(variables)
    np.testing.assert_array_equal(auto, same)
    with pytest.raises(ValueError, match="implementation must be one of"):
        head.clone(implementation="gpu").init(jax.random.key(0), x)


def _softmax_weighted_sum(logits, values):
    return jnp.einsum("...l,...l->...", jax.nn.softmax(logits, axis=-1), values)


def test_attention_pool_and_its_gradient_equal_autodiff_of_softmax_and_sum():
    # [B, K, L] = [3, 11, 37]: logits spread over +-30 (a peaked softmax) and values of
    # both signs.
    q = 10.0 * jax.random.normal(jax.random.key(0), (3, 11, 37))
    v = jax.random.normal(jax.random.key(1), (3, 11, 37))
    g = jax.random.normal(jax.random.key(2), (3, 11))
    out, pullback = jax.vjp(attention_pool, q, v)
    expected, expected_pullback = jax.vjp(_softmax_weighted_sum, q, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(pullback(g), expected_pullback(g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    # float64 numpy: d/dv = g a, d/dq = g a (v - out).
    q64, v64, g64 = (np.asarray(t, np.float64) for t in (q, v, g))
    a = np.exp(q64 - q64.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a * v64).sum(-1)
    np.testing.assert_allclose(out, o, rtol=1e-5, atol=1e-6)
    g_q, g_v = pullback(g)
    np.testing.assert_allclose(g_v, g64[..., None] * a, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_q, g64[..., None] * a * (v64 - o[..., None]),
                               rtol=1e-4, atol=1e-6)


def test_dropout_attention_pool_is_the_pool_of_dropped_values_with_its_gradient():
    q = 5.0 * jax.random.normal(jax.random.key(0), (2, 6, 29))
    v = jax.random.normal(jax.random.key(1), (2, 6, 29))
    g = jax.random.normal(jax.random.key(2), (2, 6))
    keep = keep_mask(jax.random.key(3), 0.3, (2, 6, 29))

    def reference(q, v):   # autodiff of softmax, inverted dropout and the weighted sum
        return _softmax_weighted_sum(q, jnp.where(keep, v / 0.7, 0.0))

    out, pullback = jax.vjp(lambda q, v: dropout_attention_pool(q, v, keep, 0.3), q, v)
    expected, expected_pullback = jax.vjp(reference, q, v)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    for got, want in zip(pullback(g), expected_pullback(g)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    g_v = pullback(g)[1]
    assert np.all(np.asarray(g_v)[~np.asarray(keep)] == 0.0)  # dropped values get none
    # Under jit and vmap (NOAH's blocks) as well.
    mapped = jax.jit(jax.vmap(jax.grad(lambda q, v, k: dropout_attention_pool(q, v, k, 0.3).sum(),
                                       argnums=1)))(q, v, keep)
    np.testing.assert_allclose(mapped, jax.grad(lambda v: reference(q, v).sum())(v),
                               rtol=1e-5, atol=1e-6)


def test_attention_pool_is_stable_for_huge_logits_and_batches_under_vmap_and_jit():
    q = jnp.zeros((1, 2, 5)).at[0, 0, 3].set(1e4).at[0, 1, :].set(-1e4)
    v = jnp.arange(10.0).reshape(1, 2, 5)
    out = attention_pool(q, v)
    # Class 0 attends to position 3 only; class 1 has equal logits: the mean value.
    np.testing.assert_array_equal(out, [[3.0, 7.0]])
    grads = jax.grad(lambda q, v: attention_pool(q, v).sum(), argnums=(0, 1))(q, v)
    assert all(np.all(np.isfinite(t)) for t in grads)
    stacked_q = jax.random.normal(jax.random.key(3), (4, 2, 3, 6))
    stacked_v = jax.random.normal(jax.random.key(4), (4, 2, 3, 6))
    mapped = jax.jit(jax.vmap(attention_pool))(stacked_q, stacked_v)
    for h in range(4):
        np.testing.assert_allclose(mapped[h], _softmax_weighted_sum(stacked_q[h], stacked_v[h]),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_mask_keeps_one_minus_rate_independently(rate):
    shape = (4, 50, 1001)  # an odd last axis: the last word's second half is unused
    mask = np.asarray(keep_mask(jax.random.key(0), rate, shape))
    assert mask.shape == shape and mask.dtype == np.bool_
    n = mask.size
    np.testing.assert_allclose(mask.mean(), 1 - rate, atol=5 * np.sqrt(rate * (1 - rate) / n))
    # The two decisions that share a 32-bit word, and neighbours across words, are
    # uncorrelated.
    flat = mask[..., :1000].reshape(-1, 2).astype(np.float64)
    assert abs(np.corrcoef(flat[:, 0], flat[:, 1])[0, 1]) < 5 / np.sqrt(len(flat))
    pairs = mask[..., 1:1001].reshape(-1, 2).astype(np.float64)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5 / np.sqrt(len(pairs))
    # Same key, same mask; another key, another mask.
    np.testing.assert_array_equal(mask, keep_mask(jax.random.key(0), rate, shape))
    other = np.asarray(keep_mask(jax.random.key(1), rate, shape))
    assert 0.3 < (other != mask).mean() / (2 * rate * (1 - rate)) < 1.5


def _mix32_numpy(x):
    """C. Wellons' 'triple32' integer hash, written again in numpy uint32."""
    x = x.astype(np.uint32)
    for shift, factor in ((17, 0xED5AD4BB), (11, 0xAC4C1B51), (15, 0x31848BAB)):
        x = (x ^ (x >> np.uint32(shift))) * np.uint32(factor)
    return x ^ (x >> np.uint32(14))


def test_hashed_bits_hash_each_index_with_the_keys_seeds_however_sharded():
    shape = (3, 16, 5, 7)
    key = jax.random.key(11)
    bits = np.asarray(hashed_bits(key, shape))
    assert bits.dtype == np.uint32
    # Word (row, column) = mix(mix(row + s0) + mix(column + s1)), row the flat index over
    # the leading axes, with the key's two seed words.
    s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
    rows = np.arange(3 * 16 * 5, dtype=np.uint32).reshape(3, 16, 5, 1)
    cols = np.arange(7, dtype=np.uint32)
    with np.errstate(over="ignore"):
        want = _mix32_numpy(_mix32_numpy(rows + s0) + _mix32_numpy(cols + s1))
    np.testing.assert_array_equal(bits, want)
    # Computed shard by shard on 8 devices (the batch axis split, as the trainer shards
    # the head's mask), the words are the same.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    sharded = jax.jit(hashed_bits, static_argnums=1, out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(None, "data")))(key, shape)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(sharded), bits)
    # Another key, other words.
    assert (np.asarray(hashed_bits(jax.random.key(12), shape)) != bits).mean() > 0.99
    with pytest.raises(ValueError, match="32 bits"):
        jax.eval_shape(lambda k: hashed_bits(k, (2**16, 2**16, 3)), key)


def test_hashed_bits_look_uniform_and_independent():
    bits = np.asarray(hashed_bits(jax.random.key(0), (4, 256, 512)))   # 524,288 words
    n = bits.size
    # Every bit is set half of the time.
    ones = ((bits[..., None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=(0, 1, 2))
    assert np.abs(ones - 0.5).max() < 5 * 0.5 / np.sqrt(n)
    # Each 16-bit half (a dropout decision) is uniform: chi-square over its top 8 bits.
    for half in (bits & 0xFFFF, bits >> 16):
        counts = np.bincount((half >> 8).ravel(), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 6 * np.sqrt(2 * 255), chi2
    # Neighbours along a row, along a column, and across the leading axis are uncorrelated.
    u = bits.astype(np.float64) / 2**32
    limit = 5 / np.sqrt(n / 2)
    for a, b in ((u[..., :-1], u[..., 1:]), (u[:, :-1], u[:, 1:]), (u[:-1], u[1:])):
        assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < limit
