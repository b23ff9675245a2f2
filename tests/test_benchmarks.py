"""The benchmark scripts run and print what they promise (tiny sizes; no timing asserted)."""

import re

import pytest

pytest.importorskip("tensorflow")

from benchmarks import input_pipeline  # noqa: E402


def test_input_pipeline_benchmark_prints_a_row_per_recipe(capsys):
    assert input_pipeline.main(["--num_images", "3", "--batch_size", "2", "--batches", "1",
                                "--warmup", "0", "--recipes", "cnn,deit,eval"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"synthesized 3 JPEGs .* mean size [\d.]+ KB", out)
    for recipe in ("cnn", "deit", "eval"):
        assert re.search(rf"^{recipe}\s+[\d.]+ images/s\s+[\d.]+ images/s/core", out, re.M)
    assert "| pipeline | images/s | images/s/core |" in out
    assert "mixer" not in out.split("machine:")[0]
    with pytest.raises(SystemExit):
        input_pipeline.main(["--recipes", "cnn,bogus"])


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
