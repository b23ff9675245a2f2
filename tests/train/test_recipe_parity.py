"""Every recipe trains as the reference does: its own optimiser steps and schedules.

../shared/parity/recipes/ (its README) holds numbers produced by running the reference's
training code: two optimiser steps from a model fixture's weights on a fixed batch
(`<model>_steps.npz`) and the learning rate of every epoch of each recipe
(`schedules.json`). Our train step, built from the family's recipe config exactly as
the trainer builds it, must reproduce them to float noise. Every steps fixture in the
folder is tested, so new ones need no new code.
"""

import functools
import importlib
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import one_ulp_off
from noah_jax import convert
from noah_jax.train import optim, sharding, trainer
from noah_jax.models import create_model, model_overrides

SHARED = pathlib.Path(__file__).resolve().parents[3] / "shared"
RECIPES = SHARED / "parity" / "recipes"
STEP_FIXTURES = sorted(RECIPES.glob("*_steps.npz")) if RECIPES.is_dir() else []
pytestmark = pytest.mark.skipif(not RECIPES.is_dir(),
                                reason=f"{RECIPES} is absent (a clone without ../shared)")

# The recipe config of each family (its default arguments; the fixture names the model).
RECIPE_CONFIGS = {"resnet": "resnet18_noah", "mobilenetv2": "mobilenetv2_noah",
                  "mobilenetv3": "mobilenetv3_noah", "shufflenetv2": "shufflenetv2_noah",
                  "deit": "vit_noah", "pvt": "pvt_noah", "mixer": "mixer_noah",
                  "gmlp": "gmlp_noah"}
# The fixtures turn dropout and stochastic depth off (their README).
NO_DROPOUT = ("dropout", "drop_rate", "drop_path_rate", "attn_drop_rate")

# Tolerances, set from what float32 noise gives here (in brackets: measured worst).
LOSS_RTOL = 2e-5      # [7e-6]
STEP1_RTOL = 1e-4     # update norms after step 1 [8e-5]
STEP2_RTOL = 3e-3     # after step 2, which the reference itself moves by ~1e-3 under a
                      # one-ulp change of its weights (README) [5e-4]
GRAD_RTOL = 1e-4      # first-step gradients, of the tensor's largest [1e-5]
VALUE_TOL = 2e-2      # sampled values after step 2, of the tensor's largest update [5e-3]
ROUNDING_FACTOR = 4   # ... or, where the network amplifies rounding past that (the
ROUNDING_DRAWS = 3    # README's sensitivity), this many times our values' distance from
                      # one of these many reruns from weights one ulp off. Measured on
                      # ResNet-18 on an AVX2 CPU: layer3.1.bn1.bias 7.3% of its largest
                      # update off the reference; 9 of 12 draws move ours by 7.3%-8.4%
                      # (a branch: the other 3 by 1e-5), [1.0] times at worst
BN_TOL = 1e-3         # running statistics, of their largest change [1.5e-5]
EMA_TOL = 1e-6        # EMA values, of the largest value: the EMA moves by (1 - decay)
                      # of the update, below float32's resolution of the weights [6e-8]
NOISE = 1e-6          # a gradient below this times the model's largest is float noise
ELEMENT_NOISE = 1e-3  # under Adam, an element's gradient below this times its tensor's


def recipe_config(family: str):
    return importlib.import_module(f"configs.{RECIPE_CONFIGS[family]}").get_config()


def load_steps(path: pathlib.Path):
    with np.load(path) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays.pop("__meta__")))
    return arrays, meta


def start_weights(meta):
    """The model fixture's state_dict and its (model name, head)."""
    fixture = SHARED / meta["start_weights"].removeprefix("shared/")
    with np.load(fixture) as npz:
        state_dict = {k: npz[k].astype(np.float32) for k in npz.files if not k.startswith("__")}
        described = json.loads(str(npz["__meta__"]))
    head = "noah" if described["use_noah"] else "linear"
    return state_dict, described["model"].removeprefix("noah_"), head


def run_reference_steps(path: pathlib.Path, depthwise: str = "auto",
                        weights_one_ulp_off: int | None = None):
    """Our two steps from the fixture's weights, with the family's recipe config (and
    the model's depthwise convolutions in the `depthwise` form, where it has some).
    ours["one_ulp_off"](draw) runs them again from weights one ulp off, each element up
    or down as the draw's random bits say (once per draw, when asked)."""
    z, meta = load_steps(path)
    config = recipe_config(meta["recipe"])
    state_dict, model_name, head = start_weights(meta)
    if weights_one_ulp_off is not None:
        state_dict = {k: one_ulp_off(v, seed=[weights_one_ulp_off, i])
                      for i, (k, v) in enumerate(state_dict.items())}
    config.model.name, config.model.head = model_name, head
    overrides = {k: v for k, v in config.model.overrides.to_dict().items() if v is not None}
    fields = model_overrides(model_name)
    overrides.update({k: 0.0 for k in NO_DROPOUT if k in fields})
    if "depthwise" in fields:
        overrides["depthwise"] = depthwise
    model = create_model(model_name, num_classes=1000, head=head, **overrides)
    shape_settings = {k: v for k, v in overrides.items()
                      if k not in NO_DROPOUT and k not in ("bn_group_size", "depthwise")}
    variables = convert.torch_to_flax(state_dict, model_name, head=head, **shape_settings)

    # The recipe's peak lr is the fixture's; it is held there (the schedule is tested
    # on its own below), everything else is the recipe's as the trainer builds it.
    peak = config.schedule.base_lr * config.batch_size / config.schedule.base_batch_size
    np.testing.assert_allclose(peak, meta["lr"], rtol=1e-9)
    config.schedule.name = "constant"
    config.schedule.warmup_epochs = 0.0
    schedule = optim.learning_rate_schedule(config, total_steps=10, steps_per_epoch=5)
    tx = optim.make_optimizer(config, schedule, model)
    mesh = sharding.create_mesh(1, 1, devices=jax.devices()[:1])
    params = jax.tree.map(jnp.asarray, variables["params"])
    batch_stats = jax.tree.map(jnp.asarray, variables.get("batch_stats", {}))
    image_size = z["__images__"].shape[-1]
    state = trainer.init_train_state(model, tx, (image_size, image_size, 3), jax.random.key(0),
                                   ema=config.ema_decay > 0)
    state = dict(state, params=params, batch_stats=batch_stats, opt_state=tx.init(params))
    if "ema_params" in state:
        state["ema_params"] = params

    images = np.transpose(z["__images__"], (0, 1, 3, 4, 2))  # NCHW -> NHWC
    labels = z["__labels__"] if "__labels__" in z else z["__targets__"]
    step = jax.jit(trainer.make_train_step(model, tx, config, schedule, mesh))
    per_example_loss = trainer.loss_function(config)

    @jax.jit
    def first_gradient(params):
        def loss(p):
            logits, _ = model.apply({"params": p, "batch_stats": batch_stats},
                                    jnp.asarray(images[0]), train=True,
                                    mutable=["batch_stats"], rngs={"dropout": jax.random.key(0)})
            return per_example_loss(logits, jnp.asarray(labels[0])).mean()
        return jax.grad(loss)(params)

    torch = lambda v: convert.flax_to_torch(jax.device_get(v), model_name)  # noqa: E731
    after, losses = [], []
    for k in range(2):
        state, metrics = step(state, {"image": jnp.asarray(images[k]),
                                      "label": jnp.asarray(labels[k])})
        losses.append(float(metrics["loss"]))
        after.append(torch({"params": state["params"], "batch_stats": state["batch_stats"]}))
    ours = {"w0": torch(variables), "w1": after[0], "w2": after[1], "loss": losses,
            "grad": torch({"params": first_gradient(params)}),
            "ema": torch({"params": state["ema_params"]}) if "ema_params" in state else None,
            "one_ulp_off": functools.cache(lambda draw: run_reference_steps(
                path, depthwise, weights_one_ulp_off=draw)[2])}
    decayed, _ = optim.decayed_names(config.optimizer.decay_rule, params, model)
    return z, meta, ours, set(decayed)


@pytest.fixture(scope="module", params=STEP_FIXTURES, ids=lambda p: p.stem)
def steps(request):
    # MobileNetV3's depthwise convolutions in the grouped form, which XLA compiles in
    # about half the time of the CPU's default shifted form at this full size; the two
    # are equal to float noise, values and gradients (test_layers), and test_models
    # runs a train step of every depthwise family in the default form.
    return run_reference_steps(request.param, depthwise="grouped")


def test_the_fixtures_are_there():
    assert {p.stem for p in STEP_FIXTURES} >= {
        "resnet18_noah_steps", "mobilenetv3_small_noah_steps",
        "noah_deit_tiny_patch16_224_steps", "noah_mixer_s16_050_224_steps"}


def test_weight_decay_groups_are_the_references(steps):
    z, meta, ours, decayed = steps
    groups = meta["weight_decay_groups"]
    assert decayed == set(groups["decayed"])
    assert set(ours["w0"]) - decayed - {k for k in ours["w0"] if "running_" in k} == set(
        groups["not_decayed"])


def test_losses_match(steps):
    z, meta, ours, _ = steps
    np.testing.assert_allclose(ours["loss"], z["__loss__"], rtol=LOSS_RTOL)


def noise_driven(z, ours, meta, decayed):
    """Parameters whose gradient is float noise (a bias that cannot change the loss):
    their gradients are not compared, nor, where noise alone moves them (Adam, or SGD
    without decay on them), their updates (the fixtures' README)."""
    largest = max(float(z[f"g1/{k}"]) for k in ours["grad"])
    noisy = {k for k in ours["grad"] if z[f"g1/{k}"] < NOISE * largest}
    moved_by_noise = {k for k in noisy if meta["optimizer"] == "adamw" or k not in decayed}
    return noisy, moved_by_noise


def test_first_gradients_match(steps):
    z, meta, ours, decayed = steps
    noisy, _ = noise_driven(z, ours, meta, decayed)
    for key, grad in ours["grad"].items():
        if key in noisy:
            continue
        np.testing.assert_allclose(np.linalg.norm(grad.astype(np.float64)), z[f"g1/{key}"],
                                   rtol=GRAD_RTOL, err_msg=key)
        sampled, reference = grad.reshape(-1)[z[f"i/{key}"]], z[f"gs/{key}"]
        assert np.abs(sampled - reference).max() <= GRAD_RTOL * np.abs(reference).max(), key


def test_updates_match(steps):
    z, meta, ours, decayed = steps
    _, skipped = noise_driven(z, ours, meta, decayed)
    w0 = ours["w0"]
    checked = 0
    for key in w0:
        if key in skipped or f"d1/{key}" not in z:
            continue
        for k, rtol in ((1, STEP1_RTOL), (2, STEP2_RTOL)):
            moved = np.linalg.norm(ours[f"w{k}"][key].astype(np.float64) - w0[key])
            np.testing.assert_allclose(moved, z[f"d{k}/{key}"], rtol=rtol,
                                       err_msg=f"d{k}/{key}")
        index = z[f"i/{key}"]
        start = w0[key].reshape(-1)[index].astype(np.float64)
        keep = slice(None)
        if meta["optimizer"] == "adamw" and f"gs/{key}" in z:
            # Adam's step is sign-like: an element whose gradient is noise next to its
            # tensor's largest (a bias partly cancelled by a softmax) moves arbitrarily.
            gradient = np.abs(z[f"gs/{key}"])
            keep = gradient >= ELEMENT_NOISE * gradient.max()
        ours_after = ours["w2"][key].reshape(-1)[index][keep]
        reference_moved = (z[f"s/{key}"] - start)[keep]
        error = np.abs(ours_after - start[keep] - reference_moved).max()
        allowed = VALUE_TOL * np.abs(reference_moved).max()
        # Past that, the difference is rounding if our own steps from weights one ulp
        # off move as far (e.g. BatchNorm over a few 4x4 maps, on some CPUs).
        for draw in range(ROUNDING_DRAWS):
            if error <= allowed:
                break
            rerun_after = ours["one_ulp_off"](draw)["w2"][key].reshape(-1)[index][keep]
            allowed = max(allowed, ROUNDING_FACTOR * np.abs(rerun_after - ours_after).max())
        assert error <= allowed, (key, error, allowed)
        checked += 1
    assert checked >= 0.9 * len([k for k in w0 if f"d1/{k}" in z])


def test_batch_norm_statistics_match(steps):
    z, meta, ours, _ = steps
    keys = [k[3:] for k in z if k.startswith("bn/")]
    if not keys:
        pytest.skip(f"{meta['recipe']} has no BatchNorm")
    for key in keys:
        change = np.abs(z[f"bn/{key}"] - ours["w0"][key]).max()
        error = np.abs(ours["w2"][key] - z[f"bn/{key}"]).max()
        assert error <= BN_TOL * change, (key, error, change)


def test_ema_matches(steps):
    z, meta, ours, _ = steps
    keys = [k[4:] for k in z if k.startswith("ema/")]
    if not keys:
        pytest.skip(f"{meta['recipe']} keeps no EMA")
    assert ours["ema"] is not None, "the recipe keeps no EMA, the reference does"
    for key in keys:
        sampled = ours["ema"][key].reshape(-1)[z[f"i/{key}"]]
        reference = z[f"ema/{key}"]
        assert np.abs(sampled - reference).max() <= EMA_TOL * np.abs(reference).max(), key


# ----------------------------------------------------------------------------------
# Schedules: the lr of every epoch, at every step of it.
# ----------------------------------------------------------------------------------
SCHEDULES = (json.loads((RECIPES / "schedules.json").read_text())["recipes"]
             if RECIPES.is_dir() else {})


def test_every_family_has_a_reference_schedule():
    assert set(SCHEDULES) == set(RECIPE_CONFIGS)


@pytest.mark.parametrize("family", sorted(RECIPE_CONFIGS))
def test_schedule_gives_the_reference_lr_at_every_step(family):
    reference = SCHEDULES[family]
    config = recipe_config(family)
    assert config.batch_size == reference["batch_size"]
    assert config.num_epochs == reference["epochs"]
    steps_per_epoch = 7
    total = reference["epochs"] * steps_per_epoch
    lr = optim.learning_rate_schedule(config, total_steps=total,
                                      steps_per_epoch=steps_per_epoch)
    ours = np.asarray(jax.vmap(lr)(jnp.arange(total)), np.float64)
    expected = np.repeat(reference["lr"], steps_per_epoch)
    np.testing.assert_allclose(ours, expected, rtol=2e-6)


@pytest.mark.parametrize("family", ["deit", "mixer", "mobilenetv2"])
def test_the_per_step_form_follows_the_same_curve(family):
    """schedule.per_epoch=False: the same curve, sampled at every step (at epoch
    boundaries it gives the per-epoch values of epoch_lag=0)."""
    reference = SCHEDULES[family]
    config = recipe_config(family)
    config.schedule.per_epoch = False
    config.schedule.epoch_lag = 0
    steps_per_epoch = 4
    total = reference["epochs"] * steps_per_epoch
    lr = optim.learning_rate_schedule(config, total_steps=total,
                                      steps_per_epoch=steps_per_epoch)
    ours = np.asarray(jax.vmap(lr)(jnp.arange(total)), np.float64)
    values = np.asarray(reference["lr"])
    if family == "deit":  # epoch e >= 1 of the reference trains at the value for e - 1
        np.testing.assert_allclose(ours[:-steps_per_epoch:steps_per_epoch], values[1:],
                                   rtol=2e-6)
    else:
        np.testing.assert_allclose(ours[::steps_per_epoch], values, rtol=2e-6)
    assert not np.allclose(ours[1::steps_per_epoch], ours[::steps_per_epoch])  # moves within


@pytest.mark.parametrize("family,group", [("resnet", 32), ("mobilenetv2", 32),
                                          ("mobilenetv3", 32), ("shufflenetv2", 128)])
def test_cnn_recipes_normalise_over_one_reference_gpus_batch(family, group):
    """DDP on 8 GPUs without SyncBN (main.py:132 divides the batch by the world size)."""
    config = recipe_config(family)
    assert config.model.overrides.bn_group_size == group == config.batch_size // 8
    model = create_model(config.model.name, num_classes=10,
                         **{k: v for k, v in config.model.overrides.to_dict().items()
                            if v is not None})
    assert model.bn_group_size == group


# ----------------------------------------------------------------------------------
# Weight-decay groups of every model fixture, by the reference's rules on its keys.
# ----------------------------------------------------------------------------------
PARITY = SHARED / "parity"
MODEL_FIXTURES = sorted(PARITY.glob("*.npz")) + sorted(PARITY.glob("extra/*.npz"))
FAMILY_OF = (("resnet", "resnet"), ("mobilenetv2", "mobilenetv2"),
             ("mobilenetv3", "mobilenetv3"), ("shufflenetv2", "shufflenetv2"),
             ("deit", "deit"), ("pvt", "pvt"), ("mixer", "mixer"), ("gmlp", "gmlp"))
# The models' no_weight_decay() (vit/deit/noah_vision_transformer.py:207,
# vision_transformer.py:262, vit/pvt/classification/noah_pvt.py:187, pvt.py:187).
NO_WEIGHT_DECAY = {("deit", True): {"pos_embed"}, ("deit", False): {"pos_embed", "cls_token"},
                   ("pvt", True): set(), ("pvt", False): {"cls_token"}}


def reference_decays(family: str, key: str, shape, noah: bool) -> bool:
    """The reference's groups, written out from its code."""
    if family in ("resnet", "mobilenetv2"):  # SGD over model.parameters() (main.py:142)
        return True
    if family in ("mobilenetv3", "shufflenetv2"):  # utils/misc.py:55
        return "weight" in key and len(shape) > 1 and "attention" not in key
    # timm's add_weight_decay / param_groups_weight_decay
    skip = NO_WEIGHT_DECAY.get((family, noah), set())
    return not (len(shape) <= 1 or key.endswith(".bias") or key in skip)


@pytest.mark.parametrize("path", MODEL_FIXTURES, ids=lambda p: p.stem)
def test_every_model_fixture_is_decayed_as_its_recipe_decays_it(path):
    with np.load(path) as npz:
        described = json.loads(str(npz["__meta__"]))
        shapes = {k: npz[k].shape for k in npz.files if not k.startswith("__")}
    if described.get("family") == "head":
        pytest.skip("a head on its own has no recipe")
    name = described["model"].removeprefix("noah_")
    family = next(f for prefix, f in FAMILY_OF if name.startswith(prefix))
    noah = bool(described["use_noah"])
    config = recipe_config(family)
    model = create_model(name, num_classes=described["num_classes"],
                         head="noah" if noah else "linear")
    size = getattr(model, "img_size", 224)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))["params"]
    decayed, kept = optim.decayed_names(config.optimizer.decay_rule, params, model)
    parameters = {k: s for k, s in shapes.items()
                  if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert set(decayed) | set(kept) == set(parameters)
    expected = {k for k, s in parameters.items() if reference_decays(family, k, s, noah)}
    assert set(decayed) == expected
