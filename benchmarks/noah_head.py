"""Training-step time of the NOAH head alone: POCA blocks against the grouped projections.

    .venv/bin/python benchmarks/noah_head.py [--repeats 11] [--iters 5] [--batch 32] \
        [--shapes resnet50,deit_tiny,resnet50_dense]

`NOAHHead` composes N POCA blocks (one vmapped module working in a classes-first
[K, B, L] layout, its projections and the weighted sum by `heads.attention_pool` with
hand-written gradients); it replaced a head that computed all blocks at once with two
grouped projections and autodiff of softmax and einsum. That head is kept here, as
`GroupedNOAHHead`, with the same dropout mask (`heads.keep_mask`): both heads take the
same parameters and give the same logits and gradients (checked before timing, and in
tests/models/test_heads.py). Measured 2026-11-26 on the 2-core CPU machine, --batch 16, POCA /
grouped: deit_small 0.455 (321 -> 146 ms), mixer_s16 0.480 (337 -> 161 ms), resnet50
0.770 (120 -> 92 ms).

Timed: one jitted forward and backward pass (gradients with respect to the parameters and
the features, as in training), with dropout 0.1 in training mode. Each repeat runs both
heads for --iters steps, alternating which goes first; the table gives the median time per
step over the repeats and the ratio POCA / grouped. Shapes (B = --batch, K = 1000, N = 4):

  resnet50        L=49 (7x7), C=2048, r=1/8
  deit_tiny       L=196 (14x14), C=192, r=1/2
  deit_small      L=196, C=384, r=1/2
  mixer_s16       L=196, C=512, r=1/2
  resnet50_dense  resnet50 with head_split=False (one dense projection, the ablation)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: import the package from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from noah_jax.models.heads import GroupedProjection, NOAHHead, _KeepMask  # noqa: E402

SHAPES = {  # name: (L, C, key_ratio, head_split)
    "resnet50": (49, 2048, 1 / 8, True),
    "deit_tiny": (196, 192, 1 / 2, True),
    "deit_small": (196, 384, 1 / 2, True),
    "mixer_s16": (196, 512, 1 / 2, True),
    "resnet50_dense": (49, 2048, 1 / 8, False),
}


class GroupedNOAHHead(NOAHHead):
    """The head before POCA blocks: both projections of all heads at once, then the
    attention over [B, L, N, K]. Same parameters and outputs as NOAHHead."""

    @nn.compact
    def __call__(self, x, train=False):
        batch, length, channels = x.shape
        n, k = self.num_heads, self.num_classes
        ck, _ = self.channel_split(channels)
        groups = n if self.head_split else 1
        keys, values = (x[..., :ck], x[..., ck:]) if self.kv_split else (x, x)

        def projection(name):
            return GroupedProjection(n * k, groups, dtype=self.dtype, param_dtype=self.param_dtype,
                                     kernel_init=self.kernel_init, bias_init=self.bias_init,
                                     name=name)

        q = projection("query")(keys).reshape(batch, length, n, k)
        v = projection("value")(values).reshape(batch, length, n, k)
        a = jax.nn.softmax(q.astype(jnp.float32), axis=1)
        self.sow("intermediates", "attention", jnp.transpose(a, (0, 2, 3, 1)))
        if train and self.dropout > 0:  # NOAHHead's mask: [N, K, B, L], same key
            keep = _KeepMask(self.dropout, name="Dropout_0")((n, k, batch, length))
            v = jnp.where(jnp.transpose(keep, (2, 3, 0, 1)), v / (1.0 - self.dropout), 0.0)
        per_head = jnp.einsum("blnk,blnk->bnk", a, v.astype(jnp.float32))
        return per_head.sum(axis=1)


def training_step(head):
    """Jitted loss, gradients with respect to (params, features), of a cross-entropy-like
    loss of the head's logits."""
    def loss(params, x, key):
        logits = head.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def setup(shape: str, batch: int, num_classes: int = 1000, num_heads: int = 4):
    """(heads {name: module}, params, features) for one shape; the heads' outputs are
    checked to agree."""
    length, channels, ratio, head_split = SHAPES[shape]
    kwargs = dict(num_heads=num_heads, key_ratio=ratio, dropout=0.1, head_split=head_split)
    heads = {"grouped": GroupedNOAHHead(num_classes, **kwargs),
             "poca": NOAHHead(num_classes, **kwargs)}
    x = jax.random.normal(jax.random.key(0), (batch, length, channels))
    params = heads["poca"].init(jax.random.key(1), x)["params"]
    params = jax.tree.map(lambda t: t + 0.01, params)  # non-zero biases
    grouped_tree = jax.tree.map(jnp.shape, heads["grouped"].init(jax.random.key(1), x))
    assert grouped_tree == jax.tree.map(jnp.shape, {"params": params}), shape
    outputs = {name: training_step(head.clone(dropout=0.0))(params, x, jax.random.key(2))
               for name, head in heads.items()}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5),
                 outputs["grouped"], outputs["poca"])
    return heads, params, x


def time_heads(shape: str, batch: int, repeats: int, iters: int) -> dict[str, float]:
    """Median seconds per training step of each head."""
    heads, params, x = setup(shape, batch)
    steps = {name: training_step(head) for name, head in heads.items()}
    key = jax.random.key(3)
    for step in steps.values():  # compile, warm up
        jax.block_until_ready(step(params, x, key))
    times = {name: [] for name in steps}
    order = list(steps)
    for repeat in range(repeats):
        for name in order if repeat % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for i in range(iters):
                out = steps[name](params, x, jax.random.fold_in(key, i))
            jax.block_until_ready(out)
            times[name].append((time.perf_counter() - start) / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    args = parser.parse_args(argv)
    shapes = args.shapes.split(",")
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    print(f"machine: {jax.devices()[0].platform}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"B={args.batch}, K=1000, N=4, median of {args.repeats} x {args.iters} steps")
    print("| shape | grouped ms/step | POCA ms/step | POCA / grouped |")
    print("|---|---:|---:|---:|")
    for shape in shapes:
        t = time_heads(shape, args.batch, args.repeats, args.iters)
        print(f"| {shape} | {1e3 * t['grouped']:.2f} | {1e3 * t['poca']:.2f} | "
              f"{t['poca'] / t['grouped']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
