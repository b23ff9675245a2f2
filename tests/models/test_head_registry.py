"""The head registry: a head added from outside the package (tests/extensions.py's
MlpHead) is chosen by name, takes its own settings through create_model, trains, and
leaves when unregistered; the package's heads are found the same way."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from noah_jax import models
from noah_jax.errors import ConfigError, UnknownSettingError
from noah_jax.models import heads
from noah_jax.train import optim, sharding, trainer
from extensions import MlpHead

MODEL = "deit_tiny_patch16_224"
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def toy_head():
    heads.register_head("toy", MlpHead)
    yield
    heads.unregister_head("toy")


def test_the_package_heads_are_registered_with_their_capabilities():
    assert heads.registered_heads()[:2] == ("noah", "linear")
    assert heads.head_class("noah") is heads.NOAHHead
    assert (heads.NOAHHead.wants_positions, heads.NOAHHead.attention_maps) == (True, True)
    assert (heads.LinearHead.wants_positions, heads.LinearHead.attention_maps) == (False, False)
    with pytest.raises(ConfigError, match=r"^unknown head 'mlp': head must be one of the "
                       r"registered heads \(noah, linear\)$"):
        heads.head_class("mlp")


def test_the_default_head_keeps_the_flat_overrides():
    assert {"num_heads", "key_ratio", "dropout", "head_split", "kv_split", "merge",
            "dtype", "depth", "img_size"} <= set(models.model_overrides(MODEL))
    assert "num_heads" not in models.model_overrides(MODEL, head="linear")
    model = models.create_model(MODEL, num_classes=3, num_heads=2, merge="max", depth=1)
    # The VARIANTS table's NOAH settings, then the overrides; the backbone keeps its own.
    assert model.head_settings == (("dropout", 0.1), ("key_ratio", 0.5), ("merge", "max"),
                                   ("num_heads", 2))
    assert (model.head_setting("num_heads"), model.head_setting("kv_split"), model.depth) == (
        2, True, 1)
    # Another head's setting is ignored (one config serves every head of a study).
    linear = models.create_model(MODEL, num_classes=3, head="linear", num_heads=2, depth=1)
    assert linear.head_settings == ()
    with pytest.raises(KeyError, match="has no setting 'num_heads'"):
        linear.head_setting("num_heads")


def test_a_registered_head_builds_and_trains_a_zoo_model(toy_head):
    assert heads.registered_heads()[-1] == "toy"
    types = models.model_override_types(MODEL, head="toy")
    assert types["hidden"] is int and "num_heads" not in types
    assert "hidden" in models.model_override_types(MODEL, head=None)
    with pytest.raises(UnknownSettingError, match="unknown override"):
        models.create_model(MODEL, num_classes=4, head="toy", widht=3)

    # num_heads is the NOAH head's: ignored here, as a study's config gives it to both heads.
    model, variables, images = helpers.tiny_model(MODEL, head="toy", num_classes=4,
                                                  hidden=8, num_heads=2)
    assert model.head_settings == (("hidden", 8),)
    assert model.head_class is MlpHead and not model.head_wants_positions
    head = variables["params"]["head"]
    assert (head["fc1"]["kernel"].shape, head["fc2"]["kernel"].shape) == ((192, 8), (8, 4))
    # The DeiT baseline's class token is there: the head does not want positions.
    assert "cls_token" in variables["params"]
    logits = model.apply(variables, images, train=False)
    assert logits.shape == (2, 4) and logits.dtype == jnp.float32

    config = helpers.demo_config()
    mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    tx = optim.make_optimizer(config, schedule, model)
    state = trainer.init_train_state(model, tx, images.shape[1:], jax.random.key(0), ema=False)
    batch = {"image": images, "label": jnp.array([0, 3])}
    new_state, metrics = jax.jit(trainer.make_train_step(model, tx, config, schedule, mesh))(
        state, batch)
    # (The warm-up's first learning rate is 0: the step is checked by its gradient.)
    assert int(new_state["step"]) == 1 and np.isfinite(float(metrics["loss"]))
    assert float(metrics["grad_norm"]) > 0


def test_an_unregistered_head_is_gone(toy_head):
    heads.unregister_head("toy")
    with pytest.raises(ConfigError, match="unknown head 'toy'"):
        models.create_model(MODEL, num_classes=4, head="toy")


def test_a_head_must_declare_what_the_registry_asks():
    class Bare(MlpHead):
        settings = ("width",)  # not a field

    with pytest.raises(TypeError, match="setting 'width' must be a field"):
        heads.register_head("bare", Bare)
    with pytest.raises(ValueError, match="already registered"):
        heads.register_head("noah", MlpHead)
    assert "bare" not in heads.registered_heads()


def test_a_registered_heads_settings_are_declared_for_flags(toy_head):
    # main.py declares every registered head's settings on the loaded recipe, so that
    # --config.model.head=toy --config.model.overrides.hidden=8 reaches the toy head.
    from noah_jax import cli

    config = cli.load_config(f"{ROOT}/configs/vit_noah.py:demo")
    assert config.model.overrides.hidden is None
    assert config.model.overrides.num_heads is None
    config.model.head, config.model.overrides.hidden = "toy", 8
    model = trainer.build_model(config, num_classes=10)
    assert model.head_setting("hidden") == 8
