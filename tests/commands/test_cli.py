"""main.py's command line: every model override a recipe's model accepts can be set
from a flag, and mistakes on the command line end in one line naming the valid ones."""

import dataclasses
import importlib
import pathlib
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from noah_jax import cli
from noah_jax.data import preprocess
from noah_jax.models import create_model, input_preprocessing, model_override_types

ROOT = pathlib.Path(__file__).resolve().parents[2]

# Every recipe file, with arguments that pick each model family it builds.
RECIPE_ARGS = [
    ("resnet18_noah", ""), ("resnet50_noah", "depth=101,head=linear"),
    ("mobilenetv2_noah", "width=050"), ("vit_noah", ""), ("vit_noah", "demo"),
    ("mixer_noah", "variant=s16_050"), ("gmlp_noah", "variant=ti16,head=linear"),
    ("coco_resnet101_noah", "init=/ckpt"), ("coco_vit_large_noah", "init=/ckpt"),
    ("vit_noah", "variant=base_384"), ("mobilenetv3_noah", "variant=large,head=linear"),
    ("mobilenetv3_noah", "demo"), ("shufflenetv2_noah", "width=200"),
    ("shufflenetv2_noah", "demo"), ("pvt_noah", "variant=medium,head=linear"),
    ("pvt_noah", "demo"), ("vit_noah", "demo,multilabel"), ("mixer_noah", "demo,multilabel"),
    ("pvt_noah", "demo,multilabel"), ("mobilenetv2_noah", "demo,width=035"),
    ("mobilenetv2_noah", "demo,multilabel,width=035"),
]


@pytest.mark.parametrize("name,arg", RECIPE_ARGS)
def test_every_recipe_declares_every_override_of_its_model(name, arg):
    # As main.py loads it: the recipe's config with its model's overrides declared.
    config = cli.declare_model_overrides(
        importlib.import_module(f"configs.{name}").get_config(arg or None))
    declared = set(config.model.overrides)
    assert declared == set(model_override_types(config.model.name)) - {"dtype"}
    # Unset ones are None, which create_model reads as "the model's own value".
    model = create_model(config.model.name, num_classes=10, **config.model.overrides)
    for key, value in config.model.overrides.items():
        if value is not None:
            assert setting(model, key) == value, key


def setting(model, key):
    """A model's value of override `key`: a backbone field, else its head's setting."""
    if key in {f.name for f in dataclasses.fields(model)}:
        return getattr(model, key)
    return model.head_setting(key)


def parse(argv, monkeypatch):
    """config_flags on a fresh flag registry, parsed as main.py parses its command line
    (cli.parse_flags; config_flags reads the overrides from sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["main.py", *argv])
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True)
    cli.parse_flags(sys.argv, values)
    return values.config


@pytest.mark.parametrize("config,overrides,expected", [
    ("vit_noah.py", ["img_size=32", "key_ratio=0.25", "head_split=False"],
     dict(img_size=32, key_ratio=0.25, head_split=False)),
    ("resnet18_noah.py", ["stage_sizes=(1,1,1,1)", "num_heads=2"],
     dict(stage_sizes=(1, 1, 1, 1), num_heads=2)),
    ("mixer_noah.py:variant=s16", ["mlp_ratio=(0.5,2.0)", "img_size=64"],
     dict(mlp_ratio=(0.5, 2.0), img_size=64)),
    ("gmlp_noah.py", ["num_blocks=2", "merge=mean"], dict(num_blocks=2, merge="mean")),
    ("mobilenetv2_noah.py", ["width=0.5", "dropout=0.0"], dict(width=0.5, dropout=0.0)),
])
def test_listed_overrides_reach_the_model_from_flags(config, overrides, expected,
                                                    monkeypatch):
    c = parse([f"--config={ROOT / 'configs' / config}",
               *(f"--config.model.overrides.{o}" for o in overrides)], monkeypatch)
    model = create_model(c.model.name, num_classes=10, **c.model.overrides)
    assert {k: setting(model, k) for k in expected} == expected
    # The recipe's own choices stay where no flag touched them.
    if "vit_noah" in config:
        assert model.drop_path_rate == 0.1 and model.depth == 12


def test_the_loaded_config_declares_the_models_overrides_and_stays_locked(monkeypatch):
    c = parse([f"--config={ROOT / 'configs' / 'vit_noah.py'}"], monkeypatch)
    assert set(c.model.overrides) == set(model_override_types(c.model.name)) - {"dtype"}
    assert c.model.overrides.img_size is None and c.model.overrides.drop_path_rate == 0.1
    with pytest.raises((AttributeError, KeyError)):
        c.model.overrides.bogus = 1
    assert cli.load_config(f"{ROOT / 'configs' / 'vit_noah.py'}").to_dict() == c.to_dict()


def test_the_pixel_limit_is_set_from_a_flag_and_reaches_the_pipelines(monkeypatch):
    c = parse([f"--config={ROOT / 'configs' / 'resnet18_noah.py'}"], monkeypatch)
    assert c.dataset.max_image_pixels == preprocess.MAX_IMAGE_PIXELS == 89_478_485
    c = parse([f"--config={ROOT / 'configs' / 'resnet18_noah.py'}",
               "--config.dataset.max_image_pixels=250000"], monkeypatch)
    c = input_preprocessing.resolve(c)
    assert preprocess.Preprocess.from_config(c.dataset, c.augment).max_image_pixels == 250_000


def test_the_family_preprocessing_is_set_from_flags(monkeypatch):
    c = parse([f"--config={ROOT / 'configs' / 'resnet18_noah.py'}",
               "--config.dataset.mean=(0.5,0.5,0.5)", "--config.dataset.std=(0.5,0.5,0.5)",
               "--config.dataset.eval_interpolation=bicubic",
               "--config.dataset.eval_crop_ratio=0.9",
               "--config.augment.train_interpolation=random"], monkeypatch)
    c = input_preprocessing.resolve(c)
    p = preprocess.Preprocess.from_config(c.dataset, c.augment)
    assert (p.mean, p.std, p.eval_interpolation, p.eval_crop_ratio, p.train_interpolation) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9, "random")


MISTAKES = [
    (["--config=configs/vit_noah.py", "--config.batchsize=16"],
     ["--config.batchsize: config has no field 'batchsize' (did you mean 'batch_size'?)",
      "its fields: asl, attention_figure_images, augment,"]),
    (["--config=configs/resnet18_noah.py", "--config.model.overrides.img_size=32"],
     ["config.model.overrides has no field 'img_size'",
      "block, bn_group_size, dropout, head_split, implementation, key_ratio, kv_split, "
      "merge, num_heads, stage_sizes"]),
    (["--config=configs/vit_noah.py:varaint=tiny"],
     ["unknown config argument 'varaint'", "'variant'"]),
    (["--config=configs/vit.py"], ["there is no file 'configs/vit.py'"]),
    (["--config=configs/vit_noah.py", "--config.batch_size=many"],
     ["--config.batch_size=many", "invalid literal for int()"]),
]


def test_command_line_mistakes_end_in_one_line_naming_the_valid_ones(tmp_path):
    procs = [subprocess.Popen([sys.executable, "main.py", *argv, f"--workdir={tmp_path}/w"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for argv, _ in MISTAKES]
    for proc, (argv, needles) in zip(procs, MISTAKES):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2, (argv, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err)
        for needle in needles:
            assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "w").exists()


def test_explain_falls_back_to_the_errors_last_line():
    error = ValueError("Traceback (most recent call last):\n  ...\nKeyError: 'x'")
    assert cli.explain(["main.py", "--bogus"], error) == "KeyError: 'x'"
    assert cli.explain(["main.py"], AttributeError("'quoted'")) == "quoted"
