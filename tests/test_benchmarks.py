"""The benchmark scripts run and print what they promise (tiny sizes; no timing asserted)."""

import re

import pytest

pytest.importorskip("tensorflow")

from benchmarks import input_pipeline  # noqa: E402


def test_input_pipeline_benchmark_prints_a_row_per_recipe_and_way_of_reading(capsys):
    assert input_pipeline.main(["--num_images", "4", "--batch_size", "2", "--batches", "1",
                                "--warmup", "0", "--recipes", "cnn,deit,eval"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"synthesized 4 JPEGs .* mean size [\d.]+ KB", out)
    for read in ("memory", "tfrecord", "array_record"):
        for recipe in ("cnn", "deit") + (("eval",) if read == "memory" else ()):
            assert re.search(rf"^{read}\s+{recipe}\s+[\d.]+ images/s\s+[\d.]+ images/s/core",
                             out, re.M), (read, recipe)
    assert not re.search(r"^(tfrecord|array_record)\s+eval", out, re.M)
    assert ("| pipeline | in memory images/s (/core) | TFRecord files images/s (/core) | "
            "ArrayRecord files images/s (/core) |") in out
    assert re.search(r"^\| eval .* \| [\d.]+ \([\d.]+\) \| - \| - \|$", out, re.M)
    assert "mixer" not in out.split("machine:")[0]
    with pytest.raises(SystemExit):
        input_pipeline.main(["--recipes", "cnn,bogus"])
    with pytest.raises(SystemExit):
        input_pipeline.main(["--reads", "memory,parquet"])


def test_start_time_benchmark_times_each_start_of_each_format(tmp_path, capsys):
    import json
    from benchmarks import start_time
    out_file = tmp_path / "results.json"
    assert start_time.main(["--root", str(tmp_path / "data"), "--sizes", "1000",
                            "--repeats", "1", "--batch_size", "16", "--starts",
                            "first start,resume", "--out", str(out_file)]) == 0
    results = json.loads(out_file.read_text())
    rows = {(r["format"], r["start"]): r for r in results["rows"]}
    assert sorted(rows) == sorted((f, s) for f in ("tfrecord", "array_record")
                                  for s in ("first start", "resume"))
    assert all(r["records"] == 1000 and r["seconds"] > 0 for r in rows.values())
    assert rows["array_record", "resume"]["step"] == 1500 // 16
    # The first start wrote the record index that the later ones read.
    assert list((tmp_path / "data").glob("*/start_time_images/1000/1.0.0/noah_jax_record_index"))
    with pytest.raises(SystemExit):
        start_time.main(["--root", str(tmp_path), "--sizes", "1234"])
    with pytest.raises(SystemExit):
        start_time.main(["--root", str(tmp_path), "--starts", "warm"])


def test_benchmark_recipes_are_the_configs_augmentation():
    deit = input_pipeline.preprocess_for("deit")
    assert (deit.rand_augment_layers, deit.rand_augment_magnitude, deit.repeats) == (2, 9.0, 3)
    assert (deit.mixup_alpha, deit.cutmix_alpha, deit.random_erasing) == (0.8, 1.0, 0.25)
    assert deit.mix_label_smoothing == pytest.approx(0.1)
    mixer = input_pipeline.preprocess_for("mixer")
    assert (mixer.rand_augment_layers, mixer.rand_augment_magnitude,
            mixer.rand_augment_increasing, mixer.mixup_alpha) == (3, 6.0, True, 0.5)
    assert (mixer.eval_crop_ratio, mixer.mean, mixer.train_interpolation) == (
        pytest.approx(0.9), (0.5, 0.5, 0.5), "random")
    cnn = input_pipeline.preprocess_for("cnn")
    assert not cnn.mixes and cnn.rand_augment_layers == 0 and cnn.image_size == 224


def test_noah_head_benchmark_checks_both_implementations_agree_and_prints_a_row(capsys):
    from benchmarks import noah_head
    assert noah_head.main(["--repeats", "1", "--iters", "1", "--batch", "2",
                           "--shapes", "deit_tiny"]) == 0  # setup() asserts they agree
    out = capsys.readouterr().out
    assert "| shape | readable ms/step | cpu ms/step | readable / cpu |" in out
    assert re.search(r"^\| deit_tiny \| [\d.]+ \| [\d.]+ \| [\d.]+ \|$", out, re.M)
    with pytest.raises(SystemExit):
        noah_head.main(["--shapes", "resnet50,bogus"])
