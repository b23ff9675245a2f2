"""The configs: one home per default. A recipe states only what differs from the base
config, and the augmentation defaults live in `Preprocess` alone."""

import ast
import importlib
import pathlib

import pytest

from configs import common
from noah_jax.data import preprocess
from noah_jax.models import input_preprocessing

ROOT = pathlib.Path(__file__).resolve().parents[1]


def literal_assignments(path: pathlib.Path):
    """(function, 'a.b.c', value) for each `c.a.b.c = <literal>` in a config file's
    functions other than base_config (the defaults) and apply_demo (which turns any
    recipe into the demo, so it states its values whatever the recipe's)."""
    tree = ast.parse(path.read_text())
    for fn in (n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)):
        if fn.name in ("base_config", "apply_demo"):
            continue
        for node in ast.walk(fn):
            if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
                continue
            target = node.targets[0]
            names = []
            while isinstance(target, ast.Attribute):
                names.append(target.attr)
                target = target.value
            if not (isinstance(target, ast.Name) and target.id == "c" and names):
                continue
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue  # from an argument or computed: not a restated default
            yield fn.name, ".".join(reversed(names)), value


CONFIG_FILES = sorted((ROOT / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIG_FILES, ids=[p.name for p in CONFIG_FILES])
def test_recipes_state_only_what_differs_from_the_base_config(path):
    base = common.base_config()
    restated = []
    for function, dotted, value in literal_assignments(path):
        node = base
        for part in dotted.split("."):
            node = node[part] if part in node else None
            if node is None:
                break
        if node is not None and node == value and type(node) is type(value):
            restated.append(f"{function}: c.{dotted} = {value!r}")
    assert not restated, f"{path.name} restates base-config values: {restated}"


def test_the_restating_check_sees_a_restated_value(tmp_path):
    fake = tmp_path / "fake.py"
    fake.write_text("def get_config():\n    c = common.base_config()\n"
                    "    c.batch_size = 256\n    c.schedule.base_lr = 0.2\n    return c\n")
    assert list(literal_assignments(fake)) == [("get_config", "batch_size", 256),
                                               ("get_config", "schedule.base_lr", 0.2)]


def test_augmentation_defaults_have_one_home():
    c = common.base_config()
    assert set(c.augment) == set(preprocess.AUGMENT_FIELDS)
    # The family's fields are None until resolved; the base model's (ResNet-18) values
    # are the Preprocess defaults.
    assert all(c.dataset[name] is None for name in preprocess.FAMILY_FIELDS)
    from_config = preprocess.Preprocess.from_config(input_preprocessing.resolve(c).dataset,
                                                    c.augment)
    assert from_config == preprocess.Preprocess(image_size=c.dataset.image_size)


def recipe(module, arg=None):
    """A recipe's Preprocess as training builds it (the family's fields resolved)."""
    c = input_preprocessing.resolve(importlib.import_module(f"configs.{module}").get_config(arg))
    return preprocess.Preprocess.from_config(c.dataset, c.augment, c.label_smoothing)


@pytest.mark.parametrize("module", ["mixer_noah", "gmlp_noah"])
def test_the_mlp_recipes_are_the_references_yaml(module):
    # mlp/configs/default_noah.yaml: aa rand-m6-n3-mstd1.0-inc1, ratio [0.67, 1.5],
    # train_interpolation random, crop_pct 0.9; mean/std/interpolation from the model.
    p = recipe(module)
    assert (p.rand_augment_layers, p.rand_augment_magnitude, p.rand_augment_std,
            p.rand_augment_increasing) == (3, 6.0, 1.0, True)
    assert p.crop_ratio == (0.67, 1.5) and p.crop_scale == (0.08, 1.0)
    assert p.train_interpolation == "random"
    assert (p.mean, p.std, p.eval_interpolation, p.eval_crop_ratio) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.9)
    assert p.rand_augment_fill == (128, 128, 128)  # timm: round(255 * 0.5)


@pytest.mark.parametrize("module", ["vit_noah", "pvt_noah"])
def test_the_deit_recipe_crops_and_evaluates_bicubic(module):
    p = recipe(module)
    assert (p.train_interpolation, p.eval_interpolation, p.eval_crop_ratio) == (
        "bicubic", "bicubic", 0.875)
    assert (p.mean, p.std) == (preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)
    assert p.crop_ratio == (3 / 4, 4 / 3) and p.rand_augment_fill == (124, 116, 104)


@pytest.mark.parametrize("module", ["resnet18_noah", "resnet50_noah", "mobilenetv2_noah",
                                    "mobilenetv3_noah", "shufflenetv2_noah"])
def test_the_cnn_recipes_are_torchvisions(module):
    p = recipe(module)
    assert (p.train_interpolation, p.eval_interpolation, p.eval_crop_ratio) == (
        "bilinear", "bilinear", 0.875)
    assert (p.mean, p.std) == (preprocess.IMAGENET_MEAN, preprocess.IMAGENET_STD)


def test_a_family_field_set_in_the_config_is_kept():
    c = importlib.import_module("configs.mixer_noah").get_config()
    c.dataset.eval_crop_ratio = 0.875
    c.dataset.mean = (0.485, 0.456, 0.406)
    resolved = input_preprocessing.resolve(c)
    assert resolved.dataset.eval_crop_ratio == 0.875
    assert tuple(resolved.dataset.mean) == (0.485, 0.456, 0.406)
    assert resolved.dataset.std == (0.5, 0.5, 0.5) and resolved.dataset.eval_interpolation == (
        "bicubic")
    assert c.dataset.std is None  # the config itself is left as it was


# The recipes (not common.py) with arguments that build each: the COCO ones need init=.
RECIPE_FILES = [p for p in CONFIG_FILES if p.name not in ("__init__.py", "common.py")]
RECIPE_ARG = {"coco_resnet101_noah": "init=/ckpt", "coco_vit_large_noah": "init=/ckpt"}


@pytest.mark.parametrize("path", RECIPE_FILES, ids=[p.name for p in RECIPE_FILES])
def test_recipes_name_the_model_and_set_only_the_overrides_they_use(path):
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
    assert imported == {"configs"}, imported  # nothing of noah_jax.models
    for arg in (RECIPE_ARG.get(path.stem), "demo"):
        if arg == "demo" and "demo" not in path.read_text():
            continue
        c = importlib.import_module(f"configs.{path.stem}").get_config(arg)
        # main.py declares the others (noah_jax/cli.py declare_model_overrides).
        assert None not in c.model.overrides.values(), c.model.overrides


@pytest.mark.parametrize("module,arg,message", [
    ("vit_noah", "variant=large", "variant must be one of tiny_050, tiny_075, tiny, small, "
                                  "base, base_384, got 'large'"),
    ("resnet18_noah", "depth=20", "depth must be one of 18, 34, 50, 101, 152, got 20"),
    ("mobilenetv2_noah", "width=140", "width must be one of 035, 050, 075, 100, got '140'"),
    ("shufflenetv2_noah", "demo,width=075", "width must be one of 050, 100, 150, 200, got"),
    ("mixer_noah", "variant=ti16", "variant must be one of s16, s16_075, s16_050, b16, got"),
    ("gmlp_noah", "variant=s16_075", "variant must be one of ti16, ti16_075, ti16_050, s16,"),
    ("mobilenetv3_noah", "variant=huge", "variant must be one of small, large, got 'huge'"),
    ("pvt_noah", "variant=huge", "variant must be one of tiny_050, tiny_075, tiny, small, "
                                 "medium, large, got 'huge'"),
])
def test_an_unknown_variant_is_refused_naming_the_registrys_choices(module, arg, message):
    with pytest.raises(ValueError) as error:
        importlib.import_module(f"configs.{module}").get_config(arg)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_recipes_variants_are_the_registered_models_its_names_match():
    from extensions import VARIANTS as TOY_FAMILY
    from noah_jax import models

    family = {"pvt_toy": TOY_FAMILY["toynet_8"]}
    models.register_family(family)
    try:
        c = importlib.import_module("configs.pvt_noah").get_config("variant=toy")
        assert c.model.name == "pvt_toy"
    finally:
        models.unregister_family(family)
    with pytest.raises(ValueError, match="variant must be one of .*large, got 'toy'"):
        importlib.import_module("configs.pvt_noah").get_config("variant=toy")
    vit = importlib.import_module("configs.vit_noah")
    assert [vit.get_config(f"variant={v}").model.name for v in ("tiny_050", "base_384")] == [
        "deit_tiny_050_patch16_224", "deit_base_patch16_384"]
