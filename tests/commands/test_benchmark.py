"""python -m noah_jax.benchmark on a toy model: the JSON it writes, its FLOP count
against an analytic one, its ratios, and its errors."""

import json
import math
import os
import statistics
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from noah_jax import benchmark, models
from noah_jax.models.heads import Classifier
from noah_jax.models import layers
from extensions import VARIANTS as TOY_FAMILY


class DepthwiseToy(Classifier):
    """A stem conv and one depthwise conv: the smallest model with a depthwise layer."""

    depthwise: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(layers.conv(8, 3, 2, self.dtype, "stem")(x.astype(self.dtype)))
        x = nn.relu(layers.conv(8, 3, 1, self.dtype, "depthwise", groups=8,
                                depthwise=self.depthwise)(x))
        return self.classify(x, train=train, dense_init=nn.initializers.zeros)


@pytest.fixture
def toy_family():
    extra = {"depthwise_toy": (DepthwiseToy, dict(num_heads=2))}
    models.register_family({**TOY_FAMILY, **extra})
    yield
    models.unregister_family({**TOY_FAMILY, **extra})


def test_flops_of_a_dense_layer_equal_the_analytic_count():
    batch, fan_in, fan_out = 8, 32, 16
    x, w, b = jnp.ones((batch, fan_in)), jnp.ones((fan_in, fan_out)), jnp.ones((fan_out,))
    compiled = jax.jit(lambda x, w, b: x @ w + b).lower(x, w, b).compile()
    # A multiply and an add per weight and example, and the bias added to each output.
    assert benchmark.cost_flops(compiled) == 2 * batch * fan_in * fan_out + batch * fan_out


def test_peaks_of_known_devices():
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.4
    assert benchmark.peak_tflops("NVIDIA H100 80GB HBM3", "float32") == 66.9
    assert benchmark.peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.5
    assert benchmark.peak_tflops("NVIDIA H100 NVL", "float32") == 60.0
    assert benchmark.peak_tflops("TPU v5 lite", "bfloat16") == 197.0  # v5e, not v5p
    assert benchmark.peak_tflops("TPU v5", "bfloat16") == 459.0
    assert benchmark.peak_tflops("cpu", "float32") is None


def test_the_benchmark_writes_every_field_for_every_variant(toy_family, tmp_path, capsys):
    assert benchmark.main([
        "--models", "toynet_4", "--heads", "noah,linear", "--mode", "train,infer",
        "--minimal", "--batch", "4", "--devices", "1,2", "--image-size", "16", "--steps", "2", "--rounds", "2",
        "--warmup", "1", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert result["device"]["backend"] == "cpu" and result["dtype"] == "float32"
    assert result["device"]["count"] == jax.device_count()
    records = result["results"]
    assert sorted((r["head"], r["mode"], r["devices"]) for r in records) == [
        (head, mode, devices) for head in ("linear", "noah")
        for mode in ("infer", "minimal", "train") for devices in (1, 2)]
    for r in records:
        assert r["model"] == "toynet_4" and r["batch"] == 4 and r["image_size"] == 16
        assert len(r["step_s_all"]) == 2
        for field in ("step_s", "images_per_s", "compile_s", "flops_per_step",
                      "argument_bytes", "temp_bytes"):
            assert math.isfinite(r[field]) and r[field] > 0, (field, r)
        assert r["images_per_s"] == pytest.approx(4 / r["step_s"])
        assert r["mfu"] is None and r["tflops_per_s"] > 0  # no known peak for a CPU
    by = {(r["head"], r["mode"]): r for r in records if r["devices"] == 1}
    # The same step on 2 devices does the same work: XLA counts one device's half, and
    # the benchmark reports both halves, plus what the cross-device reductions add (a
    # quarter of this toy's tiny step, less where XLA fuses differently; counting one
    # half would give about 0.5).
    for r in records:
        if r["devices"] == 2:
            one = by[r["head"], r["mode"]]["flops_per_step"]
            assert 0.75 * one <= r["flops_per_step"] <= 1.5 * one, r
    # Training costs more FLOPs than inference (the backward pass), and NOAH's head more
    # than the linear one (two projections to N*K instead of one to K).
    assert by["noah", "train"]["flops_per_step"] > 2 * by["noah", "infer"]["flops_per_step"]
    assert by["noah", "infer"]["flops_per_step"] > by["linear", "infer"]["flops_per_step"]
    ratios = {(q["ratio"], q.get("mode", "train"), q.get("head")): q["value"]
              for q in result["ratios"] if q["devices"] == 1}
    assert set(ratios) == {("noah/linear", m, None) for m in ("train", "infer", "minimal")} | {
        ("train/minimal", "train", h) for h in ("noah", "linear")}
    assert len(result["ratios"]) == 2 * len(ratios)
    assert ratios["noah/linear", "train", None] == pytest.approx(
        by["noah", "train"]["step_s"] / by["linear", "train"]["step_s"])
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    # Each round's ratio pairs the two variants' step times of that round.
    records_by = {(r["head"], r["mode"], r["devices"]): r for r in records}
    for q in result["ratios"]:
        if q["ratio"] != "noah/linear":
            continue
        top, below = (records_by[h, q["mode"], q["devices"]] for h in ("noah", "linear"))
        assert q["per_round"] == pytest.approx(
            [a / b for a, b in zip(top["step_s_all"], below["step_s_all"])])
        assert q["per_round_median"] == pytest.approx(statistics.median(q["per_round"]))
        assert q["per_round_min"] == min(q["per_round"])
        assert q["per_round_max"] == max(q["per_round"])
    table = (tmp_path / "benchmark.md").read_text()
    assert table in capsys.readouterr().out
    assert table.count("| toynet_4 |") == 12 + len(result["ratios"])


def test_depthwise_formulations_are_compared_in_one_run(toy_family, tmp_path):
    assert benchmark.main([
        "--models", "depthwise_toy", "--heads", "linear", "--depthwise", "grouped,shifted",
        "--batch", "4", "--devices", "1", "--image-size", "16", "--steps", "1", "--rounds", "1",
        "--warmup", "0", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["depthwise"] for r in result["results"]] == ["grouped", "shifted"]
    (ratio,) = result["ratios"]
    assert ratio["ratio"] == "shifted/grouped" and ratio["model"] == "depthwise_toy"
    assert ratio["value"] == pytest.approx(result["results"][1]["step_s"]
                                           / result["results"][0]["step_s"])
    # The formulation was each variant's own model setting: nothing global changed.
    assert models.create_model("depthwise_toy", num_classes=2, head="linear").depthwise == "auto"
    assert not hasattr(layers, "DEPTHWISE_FORMULATION")


def test_each_round_settles_a_variant_before_timing_it(monkeypatch):
    """warmup untimed steps per variant, then per round and variant (in rotated order)
    `settle` untimed steps directly before the `steps` timed ones."""
    log = []
    clock = iter(range(1000))
    monkeypatch.setattr(benchmark.time, "perf_counter", lambda: float(next(clock)))

    def variant(name):
        def run():
            log.append(name)
            next(clock)   # each step takes one tick: timed steps show up in `times`
            return jnp.zeros(())
        return benchmark.Variant(model="m", head=name, mode="train", batch=1, devices=1,
                                 dtype="float32", image_size=8, depthwise="grouped", run=run)

    a, b = variant("a"), variant("b")
    benchmark.time_variants([a, b], steps=2, rounds=3, warmup=1, settle=1)
    assert "".join(log) == "ab" + "aaabbb" + "bbbaaa" + "aaabbb"
    # Timed: two steps of one tick each, plus the tick of reading the clock at the start.
    assert a.times == b.times == [1.5, 1.5, 1.5]


@pytest.mark.parametrize("argv,message", [
    (["--models", "resnet17"], "unknown model ['resnet17']"),
    (["--mode", "eval"], "unknown mode ['eval']; valid: train, infer"),
    (["--batch-sizes", "0,4"], "expected positive integers"),
    (["--steps", "0"], "--steps: expected a positive integer, got '0'"),
    (["--rounds", "two"], "--rounds: expected a positive integer, got 'two'"),
    (["--settle", "-1"], "--settle: expected an integer >= 0, got '-1'"),
])
def test_wrong_arguments_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_more_devices_than_there_are_is_refused(toy_family, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.main(["--models", "toynet_4", "--devices", str(jax.device_count() + 1)])
    assert exit_info.value.code == 1
    assert f"only {jax.device_count()} devices here" in capsys.readouterr().err


def test_the_benchmark_runs_without_tensorflow(tmp_path):
    """Accelerator images often have JAX but no TensorFlow (this project's GPU machine
    has none): the benchmark's synthetic data and the trainer's step must not need it."""
    blocker = ("import sys\n"
               "for name in ('tensorflow', 'tensorflow_datasets', 'clu', 'tensorboard'):\n"
               "    sys.modules[name] = None  # an import of it raises ImportError\n"
               "from noah_jax import benchmark\n"
               "sys.exit(benchmark.main(sys.argv[1:]))\n")
    env = dict(os.environ, NOAH_JAX_HUGE_PAGES="0")
    done = subprocess.run(
        [sys.executable, "-c", blocker, "--models", "resnet18", "--heads", "noah",
         "--mode", "train,infer", "--batch", "2", "--devices", "1", "--image-size", "32",
         "--steps", "1", "--rounds", "1", "--warmup", "0", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((tmp_path / "benchmark.json").read_text())
    assert [(r["model"], r["mode"]) for r in result["results"]] == [
        ("resnet18", "train"), ("resnet18", "infer")]
