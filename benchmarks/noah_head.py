"""Training-step time of NOAH's two implementations: readable einsums against the CPU path.

    .venv/bin/python benchmarks/noah_head.py [--repeats 5] [--iters 3] [--batch 16] \
        [--shapes resnet18,deit_tiny] [--models resnet18,deit_tiny_patch16_224] [--out DIR]

`NOAHHead(implementation="readable")` computes the POCA blocks with `heads.poca_blocks`,
`implementation="cpu"` with `noah_cpu.poca_blocks`; "auto" picks one per backend. Both take
the same parameters and dropout mask and give the same logits and gradients (checked here
before timing, and in tests/models/test_heads.py).

Timed, for each of --shapes: the head alone, one jitted forward and backward pass
(gradients with respect to the parameters and the features, as in training) with dropout
0.1 in training mode; each repeat runs both implementations for --iters steps, alternating
which goes first. For each of --models: the trainer's train step of the zoo model with the
NOAH head (`noah_jax.benchmark.build_variants`, float32, 224 px, the ResNet recipe's
optimiser), built once with each implementation and timed interleaved
(`noah_jax.benchmark.time_variants`). The tables give the median time per step and the
ratio readable / cpu. Head shapes (B = --batch, K = 1000, N = 4):

  resnet18        L=49 (7x7), C=512, r=1/2
  resnet50        L=49, C=2048, r=1/8
  deit_tiny       L=196 (14x14), C=192, r=1/2
  deit_small      L=196, C=384, r=1/2
  resnet50_dense  resnet50 with head_split=False (one dense projection, the ablation)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):  # run as a script: import the package from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from noah_jax.models.heads import NOAHHead  # noqa: E402

IMPLEMENTATIONS = ("readable", "cpu")
SHAPES = {  # name: (L, C, key_ratio, head_split)
    "resnet18": (49, 512, 1 / 2, True),
    "resnet50": (49, 2048, 1 / 8, True),
    "deit_tiny": (196, 192, 1 / 2, True),
    "deit_small": (196, 384, 1 / 2, True),
    "resnet50_dense": (49, 2048, 1 / 8, False),
}


def training_step(head):
    """Jitted loss, gradients with respect to (params, features), of a cross-entropy-like
    loss of the head's logits."""
    def loss(params, x, key):
        logits = head.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[:, 0])
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def setup(shape: str, batch: int, num_classes: int = 1000, num_heads: int = 4):
    """(heads {implementation: module}, params, features) for one shape; the two
    implementations' initial parameters and training outputs are checked to agree."""
    length, channels, ratio, head_split = SHAPES[shape]
    heads = {name: NOAHHead(num_classes, num_heads=num_heads, key_ratio=ratio, dropout=0.1,
                            head_split=head_split, implementation=name)
             for name in IMPLEMENTATIONS}
    x = jax.random.normal(jax.random.key(0), (batch, length, channels))
    inits = [head.init(jax.random.key(1), x)["params"] for head in heads.values()]
    jax.tree.map(np.testing.assert_array_equal, *inits)
    params = jax.tree.map(lambda t: t + 0.01, inits[0])  # non-zero biases
    outputs = [training_step(head)(params, x, jax.random.key(2)) for head in heads.values()]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5), *outputs)
    return heads, params, x


def time_heads(shape: str, batch: int, repeats: int, iters: int) -> dict[str, float]:
    """Median seconds per training step of the head alone, per implementation."""
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


def time_models(models: list[str], batch: int, rounds: int, steps: int) -> list[dict]:
    """The trainer's train step of each model with each implementation: benchmark
    records with an 'implementation' field."""
    from noah_jax import benchmark, cli
    config = cli.load_config(benchmark.DEFAULT_CONFIG)
    variants, names = [], []
    for model in models:
        for name in IMPLEMENTATIONS:
            print(f"compiling {model} implementation={name}", file=sys.stderr, flush=True)
            built = benchmark.build_variants(config, model, "noah", ["train"], batch, 1,
                                             "float32", None, minimal=False,
                                             extra_overrides={"implementation": name})
            variants += built
            names += [name] * len(built)
    benchmark.time_variants(variants, steps=steps, rounds=rounds, warmup=1, settle=1)
    return [dict(v.record(None), implementation=name) for v, name in zip(variants, names)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="head alone: repeats")
    parser.add_argument("--iters", type=int, default=3, help="head alone: steps per repeat")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--shapes", default="resnet18,deit_tiny",
                        help=f"head shapes, of {', '.join(SHAPES)} (empty: none)")
    parser.add_argument("--models", default="",
                        help="zoo models whose full train step to time (empty: none)")
    parser.add_argument("--rounds", type=int, default=3, help="models: rounds")
    parser.add_argument("--steps", type=int, default=2, help="models: steps per round")
    parser.add_argument("--out", default=None, help="folder for noah_head.json")
    args = parser.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = sorted(set(shapes) - set(SHAPES))
    if unknown:
        parser.error(f"unknown shapes {unknown}; choose from {sorted(SHAPES)}")
    models = [m for m in args.models.split(",") if m]
    print(f"machine: {jax.devices()[0].platform}, {os.cpu_count()} CPUs, jax {jax.__version__}; "
          f"B={args.batch}, K=1000, N=4")
    result = {"backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "jax": jax.__version__, "batch": args.batch, "heads": {}, "models": []}
    if shapes:
        print(f"the head alone, median of {args.repeats} x {args.iters} steps")
        print("| shape | readable ms/step | cpu ms/step | readable / cpu |")
        print("|---|---:|---:|---:|")
    for shape in shapes:
        t = time_heads(shape, args.batch, args.repeats, args.iters)
        result["heads"][shape] = t
        print(f"| {shape} | {1e3 * t['readable']:.2f} | {1e3 * t['cpu']:.2f} | "
              f"{t['readable'] / t['cpu']:.3f} |", flush=True)
    if models:
        records = time_models(models, args.batch, args.rounds, args.steps)
        result["models"] = records
        print(f"the trainer's train step, median of {args.rounds} rounds of {args.steps} steps")
        print("| model | readable s/step | cpu s/step | readable / cpu |")
        print("|---|---:|---:|---:|")
        for model in models:
            step = {r["implementation"]: r["step_s"] for r in records if r["model"] == model}
            print(f"| {model} | {step['readable']:.3f} | {step['cpu']:.3f} | "
                  f"{step['readable'] / step['cpu']:.3f} |", flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "noah_head.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
