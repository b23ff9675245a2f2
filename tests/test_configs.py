"""The configs: one home per default. A recipe states only what differs from the base
config, and the augmentation defaults live in `Preprocess` alone."""

import ast
import pathlib

import pytest

from configs import common
from noah_jax.data import preprocess

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
    from_config = preprocess.Preprocess.from_config(c.dataset, c.augment)
    assert from_config == preprocess.Preprocess(image_size=c.dataset.image_size)
