"""Adding a model family as noah_jax/models/__init__.py describes, from outside the
package: a toy family defined here joins the zoo, converts both ways under its own
torch names and trains with either head, without any change to noah_jax."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noah_jax import convert, models
from noah_jax.errors import ConfigError
from extensions import VARIANTS


@pytest.fixture
def toy_family():
    models.register_family(VARIANTS)
    yield
    models.unregister_family(VARIANTS)


def random_variables(model, size=16):
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(np.float32), shapes)


def test_a_registered_family_is_in_the_zoo(toy_family):
    assert models.list_models()[-2:] == ["toynet_8", "toynet_4"]
    model = models.create_model("toynet_4", num_classes=5, head="linear", last=12)
    assert (model.width, model.last) == (4, 12)
    # The table's head settings are the NOAH head's (the linear head has none).
    noah = models.create_model("toynet_4", num_classes=5, head="noah", last=12)
    assert (noah.width, noah.last, noah.head_setting("num_heads")) == (4, 12, 2)
    assert models.model_override_types("toynet_8")["width"] is int
    with pytest.raises(ConfigError, match="valid overrides for this model: .*'width'"):
        models.create_model("toynet_8", num_classes=5, depth=3)


def test_it_leaves_the_zoo_when_unregistered():
    models.register_family(VARIANTS)
    models.unregister_family(VARIANTS)
    assert "toynet_8" not in models.list_models()
    with pytest.raises(ConfigError, match="unknown model 'toynet_8'"):
        models.create_model("toynet_8", num_classes=5)


def test_names_already_taken_and_malformed_entries_are_refused(toy_family):
    with pytest.raises(ValueError, match=r"\['toynet_8'\] are already registered"):
        models.register_family({"toynet_8": VARIANTS["toynet_8"]})
    with pytest.raises(ValueError, match=r"\['resnet18'\] are already registered"):
        models.register_family({"resnet18": VARIANTS["toynet_8"]})
    with pytest.raises(TypeError, match="must be \\(a Classifier subclass"):
        models.register_family({"toynet_x": (nn.Dense, {})})


@pytest.mark.parametrize("head,expected", [
    # NOAH: the 1x1 projection on every position is features.2, the head `classifier`.
    ("noah", {"features.0.0.weight": (8, 3, 3, 3), "features.1.1.running_var": (16,),
              "features.2.weight": (16, 16, 1, 1), "features.2.bias": (16,),
              "classifier.query.weight": (10, 4, 1, 1), "classifier.value.bias": (10,)}),
    # Baseline: pooling is features.2, so the projection is features.3; Linear at .1.
    ("linear", {"features.3.weight": (16, 16, 1, 1), "classifier.1.weight": (5, 16),
                "classifier.1.bias": (5,)}),
])
def test_its_own_torch_names_convert_both_ways(toy_family, head, expected):
    model = models.create_model("toynet_8", num_classes=5, head=head)
    variables = random_variables(model)
    state_dict = convert.flax_to_torch(variables, "toynet_8")
    for key, shape in expected.items():
        assert state_dict[key].shape == shape, key
    # 2 x (conv + 4 BN tensors), the projection's weight and bias, the head's tensors.
    assert len(state_dict) == 2 * 5 + 2 + (4 if head == "noah" else 2)
    again = convert.torch_to_flax(state_dict, "toynet_8", head=head)
    flat, flat_again = (jax.tree_util.tree_leaves_with_path(t) for t in (variables, again))
    for (path, a), (path_again, b) in zip(flat, flat_again, strict=True):
        assert path == path_again
        np.testing.assert_array_equal(np.asarray(a), b)


def test_the_alias_of_its_baseline_head_is_accepted(toy_family):
    model = models.create_model("toynet_8", num_classes=5, head="linear")
    state_dict = convert.flax_to_torch(random_variables(model), "toynet_8")
    aliased = {k.replace("classifier.1.", "fc."): v for k, v in state_dict.items()}
    variables = convert.torch_to_flax(aliased, "toynet_8", head="linear")
    np.testing.assert_array_equal(variables["params"]["head"]["kernel"],
                                  state_dict["classifier.1.weight"].T)
    with pytest.raises(convert.ConversionError, match="missing: classifier.query.weight"):
        convert.torch_to_flax(aliased, "toynet_8", head="noah", num_classes=5)


def test_both_heads_train(toy_family):
    images = jax.random.normal(jax.random.key(0), (4, 16, 16, 3))
    labels = jnp.array([0, 1, 2, 3])
    for head in ("noah", "linear"):
        model = models.create_model("toynet_8", num_classes=4, head=head)
        variables = model.init(jax.random.key(1), images)

        def loss(params):
            logits, _ = model.apply({**variables, "params": params}, images, train=True,
                                    mutable=["batch_stats"])
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

        grads = jax.grad(loss)(variables["params"])
        # The backbone's first conv learns under either head.
        assert np.abs(np.asarray(grads["features_0_0"]["kernel"])).sum() > 0


@pytest.mark.parametrize("head", ["noah", "linear"])
def test_its_own_loading_quirk_is_what_restore_model_runs(toy_family, tmp_path, head):
    # A checkpoint of an older ToyNet, whose last projection was 'proj' (see ToyNet's
    # adapt_checkpoint): refused as it stands, restored exactly through the hook.
    from noah_jax.train import checkpoint
    model = models.create_model("toynet_8", num_classes=5, head=head)
    variables = random_variables(model)
    new = "features_2" if head == "noah" else "features_3"
    old = {**variables, "params": {("proj" if k == new else k): v
                                   for k, v in variables["params"].items()}}
    checkpoint.save_model(tmp_path, old, checkpoint.model_settings("toynet_8", head, 5))
    target = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        checkpoint.restore_model(tmp_path, target)
    assert sorted(error.value.problems) == [
        f"missing in checkpoint: params/{new}/bias (16,)",
        f"missing in checkpoint: params/{new}/kernel (1, 1, 16, 16)",
        "unexpected in checkpoint: params/proj/bias (16,)",
        "unexpected in checkpoint: params/proj/kernel (1, 1, 16, 16)"]
    checkpoint.check_model_fits(tmp_path, target, adapt=model.adapt_checkpoint)  # fits
    restored, _ = checkpoint.restore_model(tmp_path, target, adapt=model.adapt_checkpoint)
    jax.tree.map(np.testing.assert_array_equal, restored, variables)
    # The zoo's own families leave it as a mismatch: the quirk is ToyNet's alone.
    with pytest.raises(checkpoint.CheckpointMismatchError):
        checkpoint.restore_model(tmp_path, target, adapt=models.create_model(
            "resnet18", num_classes=5).adapt_checkpoint)
