"""Speed of the zoo's training and inference steps on this machine: images/s, compile
time, FLOPs, model FLOP utilisation and memory.

    python -m noah_jax.benchmark --models resnet50,deit_small_patch16_224 --heads noah,linear \
        --batch 128 --dtype bfloat16 --mode train,infer [--minimal] [--out DIR]

What is timed is what users run: the train step is `noah_jax.train.trainer.jit_train_step` (the
trainer's own update, with its NaN guard, metrics, sharding and donated state) on a
recipe's optimiser (`--config`, default the ResNet recipe's SGD), built by the trainer's
`setup`, and inference is the single-label evaluator's step (`Evaluator.step`,
`noah_jax.train.evaluators`). The data is synthetic (random
images and labels made once on the host and placed on the devices), so nothing here
needs TensorFlow and the input pipeline is not part of the time.

Every variant (model x head x mode x batch size x device count) is compiled first
(compile time = trace, lower and compile); then the variants are timed in rounds, each
round running every variant for `--steps` steps in a rotated order, so that a slow
minute of the machine hits all variants alike. The step time is the median over rounds.
Before its timed steps in a round, a variant runs `--settle` untimed steps (default 1):
on CPU, the first step of a program that follows another program is slower (README.md,
"Performance", gives the measurement), a cost that a training run, repeating one
program, does not pay.

  --minimal   also times a bare step of the same model, loss and optimiser (no NaN
              guard, no metrics, no schedule read), for the trainer's own cost.
  --batch-sizes 32,64,128   images/s against batch size.
  --devices 1,8             the same global batch on the first 1 and 8 devices (on CPU,
              fake devices: XLA_FLAGS=--xla_force_host_platform_device_count=8).
  --depthwise grouped,shifted   both formulations of the depthwise convolutions
              (the `depthwise` setting of the models that have them,
              `noah_jax.models.layers.DepthwiseConv`; default auto: this backend's choice).

FLOPs are XLA's cost analysis of the compiled step: it counts the program one device runs,
so a step's FLOPs are that times the device count. XLA counts a depthwise (grouped)
convolution's backward pass as several times its real work, so MobileNets' FLOPs and
MFU under the grouped form are overstated. MFU is
FLOPs / step time / the devices' peak, for device kinds with a known peak (PEAK_TFLOPS:
dense bfloat16, and float32 where the hardware has a float32 rate); `null` otherwise.
Memory is XLA's memory analysis of the compiled step (arguments, outputs and temporaries
per device) and, where the backend reports it (GPU, TPU), the process's peak.

Output: a markdown table on stdout, and with --out DIR `benchmark.json` (every field of
every variant, the ratios, the device and the date) and `benchmark.md`. Ratios: NOAH's
cost (noah / linear step time, same model, mode, batch and devices) and the trainer's
cost (train / minimal), and shifted / grouped depthwise convolutions.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from noah_jax import cli
from noah_jax.train import evaluators, sharding, trainer
from noah_jax.errors import ConfigError, UserError
from noah_jax.models import create_model, layers, list_models, model_overrides

# Peak dense TFLOP/s per device: (bfloat16, float32). float32 is None where matrix units
# have no float32 rate of their own (TPUs run float32 matmuls as bfloat16 passes).
# Sources: NVIDIA's H100/H200/A100 datasheets (dense, i.e. half the "with sparsity"
# figures; float32 without TF32), Google Cloud's TPU system architecture pages. The
# longest name contained in the device kind wins ("H100 PCIe" before "H100").
PEAK_TFLOPS: dict[str, tuple[float, Optional[float]]] = {
    "H200": (989.4, 66.9),
    "H100": (989.4, 66.9),          # SXM ("NVIDIA H100 80GB HBM3")
    "H100 PCIe": (756.5, 51.0),
    "H100 NVL": (835.5, 60.0),
    "A100": (312.0, 19.5),
    "TPU v4": (275.0, None),
    "TPU v5 lite": (197.0, None),   # v5e
    "TPU v5e": (197.0, None),
    "TPU v5p": (459.0, None),
    "TPU v5": (459.0, None),        # v5p reports itself as "TPU v5"
    "TPU v6 lite": (918.0, None),   # v6e (Trillium)
    "TPU v6e": (918.0, None),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODES = ("train", "infer")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "resnet18_noah.py")


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """The peak of one device of this kind in this dtype, or None if unknown."""
    for name in sorted(PEAK_TFLOPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if name.lower() in device_kind.lower():
            bf16, fp32 = PEAK_TFLOPS[name]
            return bf16 if dtype == "bfloat16" else fp32
    return None


def cost_flops(compiled) -> Optional[float]:
    """FLOPs of a compiled computation by XLA's cost analysis (None if not reported)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


def _step_flops(compiled, num_devices: int) -> Optional[float]:
    """FLOPs of one step on all devices: XLA analyses the per-device program."""
    flops = cost_flops(compiled)
    return None if flops is None else flops * num_devices


def memory_bytes(compiled) -> dict[str, Optional[int]]:
    """Per-device bytes of a compiled computation's arguments, outputs and temporaries."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        m = None
    if m is None:
        return {"argument_bytes": None, "output_bytes": None, "temp_bytes": None}
    return {"argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes),
            "temp_bytes": int(m.temp_size_in_bytes)}


def process_peak_bytes() -> Optional[int]:
    stats = jax.local_devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


@dataclasses.dataclass
class Variant:
    """One thing to time: a compiled step and the arguments it runs on."""

    model: str
    head: str
    mode: str            # 'train', 'infer' or 'minimal'
    batch: int
    devices: int
    dtype: str
    image_size: int
    depthwise: str       # how the model's depthwise convolutions were computed
    run: Callable[[], Any] = dataclasses.field(repr=False)  # one step; returns what to block on
    compile_s: float = 0.0
    flops: Optional[float] = None
    memory: dict = dataclasses.field(default_factory=dict)
    times: list[float] = dataclasses.field(default_factory=list)

    def record(self, peak: Optional[float]) -> dict[str, Any]:
        step = statistics.median(self.times)
        achieved = self.flops / step / 1e12 if self.flops else None
        return {
            "model": self.model, "head": self.head, "mode": self.mode, "batch": self.batch,
            "devices": self.devices, "dtype": self.dtype, "image_size": self.image_size,
            "depthwise": self.depthwise,
            "step_s": step, "step_s_all": self.times, "images_per_s": self.batch / step,
            "compile_s": self.compile_s, "flops_per_step": self.flops,
            "tflops_per_s": achieved,
            "mfu": achieved / (peak * self.devices) if achieved and peak else None,
            **self.memory,
        }


def _compile(fn, *args) -> tuple[Any, float]:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - start


def minimal_train_step(model, tx: optax.GradientTransformation, config) -> Callable:
    """The same model, loss and optimiser as the trainer's step, and nothing else: no NaN
    guard, no metrics, no EMA, no gradient accumulation."""
    per_example_loss = trainer.loss_function(config)

    def step(state, batch):
        def loss_fn(params):
            logits, new_vars = model.apply({"params": params,
                                            "batch_stats": state["batch_stats"]},
                                           batch["image"], train=True,
                                           rngs={"dropout": jax.random.key(0)},
                                           mutable=["batch_stats"])
            return per_example_loss(logits, batch["label"]).mean(), new_vars

        grads, new_vars = jax.grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return dict(state, params=optax.apply_updates(state["params"], updates),
                    batch_stats=new_vars.get("batch_stats", state["batch_stats"]),
                    opt_state=opt_state)

    return step


def benchmark_config(config, model_name: str, head: str, num_devices: int, image_size: int,
                     depthwise: str = "auto", extra_overrides: Optional[dict] = None):
    """`config` (the recipe's optimiser, loss and dtype) for this model and head on a
    mesh over `num_devices` devices; the model's overrides are only the image size
    (where it has one), the depthwise formulation (where it has depthwise
    convolutions) and `extra_overrides` (e.g. the NOAH head's `implementation`), not the
    recipe's."""
    names = model_overrides(model_name)
    overrides = dict(extra_overrides or {})
    if "img_size" in names:
        overrides["img_size"] = image_size
    if "depthwise" in names:
        overrides["depthwise"] = depthwise
    config = config.copy_and_resolve_references()
    config.model.name, config.model.head = model_name, head
    config.model.overrides = ml_collections.ConfigDict(overrides)
    config.mesh.data, config.mesh.model = num_devices, 1
    return config


def build_variants(config, model_name: str, head: str, modes: Sequence[str], batch: int,
                   num_devices: int, dtype: str, image_size: Optional[int],
                   minimal: bool, num_classes: int = 1000, seed: int = 0,
                   depthwise: str = "auto",
                   extra_overrides: Optional[dict] = None) -> list[Variant]:
    """Compiled train / inference / minimal steps of one model with one head, built by
    the trainer's own `setup`."""
    devices = jax.devices()[:num_devices]
    if len(devices) < num_devices:
        raise ConfigError(f"--devices {num_devices}: only {jax.device_count()} devices here")
    if batch % num_devices:
        raise ConfigError(f"--batch {batch} is not divisible by {num_devices} devices")
    probe = create_model(model_name, num_classes=num_classes, head=head)
    size = image_size or getattr(probe, "img_size", 224)
    config = benchmark_config(config, model_name, head, num_devices, size, depthwise,
                              extra_overrides)
    config.dtype = dtype
    image_shape = (size, size, 3)
    built = trainer.setup(config, num_classes=num_classes, image_shape=image_shape,
                          total_steps=1_000_000, steps_per_epoch=1000, devices=devices)
    data_sharding = sharding.batch_sharding(built.mesh)
    rng = np.random.default_rng(seed)
    batch_arrays = {"image": rng.standard_normal((batch, *image_shape), np.float32),
                    "label": rng.integers(0, num_classes, (batch,)).astype(np.int32),
                    "mask": np.ones((batch,), np.bool_)}
    on_devices = jax.device_put(batch_arrays, data_sharding)
    train_batch = {k: on_devices[k] for k in ("image", "label")}
    describe = dict(model=model_name, head=head, batch=batch, devices=num_devices, dtype=dtype,
                    image_size=size, depthwise=layers.depthwise_formulation(depthwise))

    def fresh_state():
        return jax.jit(built.init_state, out_shardings=built.state_sharding)(
            jax.random.key(seed))

    variants = []
    wanted = [m for m in modes if m == "train"] + (["minimal"] if minimal else [])
    for mode in wanted:
        state = fresh_state()
        if mode == "train":
            step = built.train_step
        else:
            step = jax.jit(minimal_train_step(built.model, built.tx, config),
                           in_shardings=(built.state_sharding, data_sharding),
                           out_shardings=built.state_sharding, donate_argnums=0)
        compiled, seconds = _compile(step, state, train_batch)
        holder = {"state": state}

        def run(compiled=compiled, holder=holder, mode=mode):
            out = compiled(holder["state"], train_batch)
            holder["state"] = out[0] if mode == "train" else out
            return holder["state"]["params"]

        variants.append(Variant(mode=mode, run=run, compile_s=seconds,
                                flops=_step_flops(compiled, num_devices),
                                memory=memory_bytes(compiled), **describe))
    if "infer" in modes:
        state = fresh_state()
        scorer = evaluators.get("single")(built.model, built.mesh)
        args = (state["params"], state["batch_stats"], on_devices)
        compiled, seconds = _compile(scorer.step, *args)
        variants.append(Variant(mode="infer", run=lambda c=compiled, a=args: c(*a),
                                compile_s=seconds, flops=_step_flops(compiled, num_devices),
                                memory=memory_bytes(compiled), **describe))
    return variants


def time_variants(variants: Sequence[Variant], *, steps: int, rounds: int, warmup: int,
                  settle: int = 0) -> None:
    """Fills each variant's `times` (seconds per step, one entry per round): in every
    round each variant runs `settle` untimed steps, then `steps` timed ones."""
    for v in variants:
        for _ in range(warmup):
            jax.block_until_ready(v.run())
    for r in range(rounds):
        order = list(variants[r % len(variants):]) + list(variants[:r % len(variants)])
        for v in order:
            for _ in range(settle):
                jax.block_until_ready(v.run())
            start = time.perf_counter()
            for _ in range(steps):
                out = v.run()
            jax.block_until_ready(out)
            v.times.append((time.perf_counter() - start) / steps)


# (name, the field compared, its value on top, its value below); the other fields match.
RATIOS = (("noah/linear", "head", "noah", "linear"),
          ("train/minimal", "mode", "train", "minimal"),
          ("shifted/grouped", "depthwise", "shifted", "grouped"))
_VARIANT_FIELDS = ("model", "head", "mode", "batch", "devices", "depthwise")


def ratios(records: Sequence[dict]) -> list[dict[str, Any]]:
    """Step-time ratios of variants that differ in one field only: NOAH's cost (noah /
    linear), the trainer's cost (train / minimal), the depthwise formulations.

    `value` is the ratio of the two median step times; `per_round` the ratio within
    each round, with its median, minimum and maximum."""
    out = []
    for name, field, top, bottom in RATIOS:
        others = [f for f in _VARIANT_FIELDS if f != field]
        below = {tuple(r[f] for f in others): r for r in records if r[field] == bottom}
        for r in records:
            match = below.get(tuple(r[f] for f in others))
            if r[field] == top and match is not None:
                # Rounds interleave the variants, so the two steps of one round ran
                # seconds apart: their ratio is free of the machine's slower drifts, and
                # the spread over rounds says how far a single ratio can be trusted.
                per_round = [a / b for a, b in zip(r["step_s_all"], match["step_s_all"])]
                out.append({"ratio": name, **{f: r[f] for f in others},
                            "value": r["step_s"] / match["step_s"],
                            "per_round": per_round,
                            "per_round_median": statistics.median(per_round),
                            "per_round_min": min(per_round),
                            "per_round_max": max(per_round)})
    return out


def markdown(result: dict[str, Any]) -> str:
    def num(x, fmt):
        return "" if x is None else format(x, fmt)

    lines = [f"{result['device']['kind']} x{result['device']['count']} "
             f"({result['device']['backend']}), {result['date']}, {result['dtype']}", "",
             "| model | head | mode | batch | devices | depthwise | images/s | step ms "
             "| compile s | GFLOPs/step | MFU | temp MiB |",
             "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        lines.append(
            f"| {r['model']} | {r['head']} | {r['mode']} | {r['batch']} | {r['devices']} "
            f"| {r['depthwise']} | {r['images_per_s']:.1f} | {1e3 * r['step_s']:.1f} | {r['compile_s']:.1f} "
            f"| {num(r['flops_per_step'] and r['flops_per_step'] / 1e9, '.1f')} "
            f"| {num(r['mfu'] and 100 * r['mfu'], '.1f')}{'%' if r['mfu'] else ''} "
            f"| {num(r['temp_bytes'] and r['temp_bytes'] / 2**20, '.0f')} |")
    if result["ratios"]:
        lines += ["", "| ratio | model | head | mode | batch | devices | depthwise | value "
                      "| per round: median (min-max) |",
                  "|---|---|---|---|---:|---:|---|---:|---:|"]
        for q in result["ratios"]:
            lines.append(f"| {q['ratio']} | {q['model']} | {q.get('head', '')} "
                         f"| {q.get('mode', '')} | {q['batch']} | {q['devices']} "
                         f"| {q.get('depthwise', '')} | {q['value']:.3f} "
                         f"| {q['per_round_median']:.3f} ({q['per_round_min']:.3f}-"
                         f"{q['per_round_max']:.3f}) |")
    return "\n".join(lines) + "\n"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _choices(valid: Sequence[str], what: str) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v for v in text.split(",") if v]
        unknown = [v for v in values if v not in valid]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown {what} {unknown or text!r}; valid: "
                                             f"{', '.join(valid)}")
        return values
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noah_jax.benchmark",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=_choices(list_models(), "model"),
                        default=["resnet50"], help="comma-separated zoo names")
    parser.add_argument("--heads", type=_choices(("noah", "linear"), "head"),
                        default=["noah", "linear"])
    parser.add_argument("--mode", type=_choices(MODES, "mode"), default=["train"],
                        help="train, infer or both (train,infer)")
    parser.add_argument("--batch", type=cli.int_at_least(1), default=32,
                        help="global batch size")
    parser.add_argument("--batch-sizes", type=_int_list, default=None,
                        help="several global batch sizes (overrides --batch)")
    parser.add_argument("--devices", type=_int_list, default=None,
                        help="device counts to run on (default: all devices)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--image-size", type=cli.int_at_least(1), default=None,
                        help="input side (default: the model's own, 224 for CNNs)")
    parser.add_argument("--depthwise", type=_choices(("auto", "grouped", "shifted"),
                                                     "depthwise formulation"),
                        default=["auto"], help="depthwise convolutions: grouped, shifted or "
                                               "both (grouped,shifted); auto: the backend's")
    parser.add_argument("--minimal", action="store_true",
                        help="also time a bare train step (the trainer's own cost)")
    parser.add_argument("--steps", type=cli.int_at_least(1), default=5,
                        help="steps per variant per round")
    parser.add_argument("--rounds", type=cli.int_at_least(1), default=5,
                        help="rounds (the median is taken)")
    parser.add_argument("--warmup", type=cli.int_at_least(0), default=2,
                        help="untimed steps per variant")
    parser.add_argument("--settle", type=cli.int_at_least(0), default=1,
                        help="untimed steps before each variant's timed steps in every round")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="recipe whose optimiser, loss and settings the train step uses "
                             "(path[:args], as main.py's --config)")
    parser.add_argument("--out", default=None, help="folder for benchmark.json and .md")
    args = parser.parse_args(argv)

    try:
        config = cli.load_config(args.config)
        config.dtype = args.dtype
        batches = args.batch_sizes or [args.batch]
        device_counts = args.devices or [jax.device_count()]
        variants = []
        for model in args.models:
            for head in args.heads:
                for batch in batches:
                    for count in device_counts:
                        for depthwise in args.depthwise:
                            print(f"compiling {model} head={head} batch={batch} devices={count}"
                                  f" depthwise={layers.depthwise_formulation(depthwise)} ("
                                  f"{', '.join(args.mode + ['minimal'] * args.minimal)})",
                                  file=sys.stderr, flush=True)
                            variants += build_variants(config, model, head, args.mode, batch,
                                                       count, args.dtype, args.image_size,
                                                       args.minimal, depthwise=depthwise)
    except (UserError, ValueError) as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    print(f"timing {len(variants)} variants: {args.rounds} rounds of {args.steps} steps",
          file=sys.stderr, flush=True)
    time_variants(variants, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                  settle=args.settle)

    device = jax.devices()[0]
    peak = peak_tflops(device.device_kind, args.dtype)
    records = [v.record(peak) for v in variants]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": {"kind": device.device_kind, "backend": jax.default_backend(),
                   "count": jax.device_count(), "host": platform.node(),
                   "cpu_count": os.cpu_count(), "peak_tflops": peak},
        "jax": jax.__version__, "dtype": args.dtype, "config": args.config,
        "steps": args.steps, "rounds": args.rounds, "warmup": args.warmup,
        "settle": args.settle,
        "process_peak_bytes": process_peak_bytes(),
        "results": records, "ratios": ratios(records),
    }
    table = markdown(result)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "benchmark.json"), "w") as f:
            json.dump(result, f, indent=1)
        with open(os.path.join(args.out, "benchmark.md"), "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    from noah_jax.train import host_memory
    host_memory.use_huge_pages()  # as main.py does, so that what is timed is what users run
    sys.exit(main())
