"""Extensions written from outside the package, as a user's project would write them:
a model family (ToyNet) and a head (MlpHead). The tests that add them (test_families.py,
test_benchmark.py, test_head_registry.py) register them and clean up after themselves."""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from noah_jax.models.heads import Classifier
from noah_jax.models.layers import batch_norm, conv
from noah_jax.models.torch_names import TorchNames


class ToyNet(Classifier):
    """Two conv + BN stages, then a 1x1 projection that the baseline applies after
    pooling and NOAH on every position (as MobileNetV3 does), so the two heads' torch
    names and module indices differ."""

    width: int = 8
    last: int = 16
    dtype: Any = jnp.float32

    # The torch model would hold `features` (an nn.Sequential) and `classifier`; its
    # baseline classifier is Sequential(Flatten, Linear), torchvision-style `fc` accepted.
    torch_names: ClassVar[TorchNames] = TorchNames(noah_head=("classifier",),
                                                   linear_head=("classifier.1", "fc"))

    def adapt_checkpoint(self, variables: dict, target: dict) -> dict:
        # Its own loading quirk: checkpoints of an older ToyNet named the last 1x1
        # projection 'proj'; it is 'features_2' (NOAH) or 'features_3' (baseline) now.
        params = variables.get("params", {})
        new = next((k for k in ("features_2", "features_3") if k in target["params"]), None)
        if "proj" not in params or new is None or new in params:
            return variables
        params = {(new if k == "proj" else k): v for k, v in params.items()}
        return {**variables, "params": params}

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i in range(2):
            x = conv(self.width * (i + 1), 3, 2, self.dtype, f"features_{i}_0")(x)
            x = nn.relu(batch_norm(train, self.dtype, f"features_{i}_1")(x))
        index = 2
        if not self.head_wants_positions:
            x = x.mean(axis=(1, 2), keepdims=True)  # torch: features.2 is the pooling
            index = 3
        x = nn.relu(conv(self.last, 1, 1, self.dtype, f"features_{index}", use_bias=True)(x))
        return self.classify(x, train=train, dense_init=nn.initializers.normal(0.01))


VARIANTS = {
    "toynet_8": (ToyNet, dict(width=8, num_heads=2, key_ratio=0.5, dropout=0.0)),
    "toynet_4": (ToyNet, dict(width=4, num_heads=2, key_ratio=0.5, dropout=0.0)),
}


# An evaluator (noah_jax.train.evaluators), registered as a user's project would, with an
# option of its own that its config entry sets: config.evals.<name> = evaluation("topk", k=2).
import jax  # noqa: E402

from noah_jax import data  # noqa: E402
from noah_jax.train import evaluators  # noqa: E402


@evaluators.register("topk")
class TopK(evaluators.Evaluator):
    """Top-k accuracy on class ids, as the metric `top<k>`."""

    label_types = (data.CLASS_IDS,)

    def __init__(self, model, mesh, *, k: int = 2):
        self.k = k
        super().__init__(model, mesh)

    def batch_metrics(self, logits, batch):
        top = jax.lax.top_k(logits, self.k)[1]
        hits = (top == batch["label"][:, None]).any(-1)
        return {f"top{self.k}": jnp.sum(hits * batch["mask"]), "count": jnp.sum(batch["mask"])}


class MlpHead(nn.Module):
    """Global average pooling, then a 2-layer MLP: a head that is not the package's."""

    # What the registry asks of a head (noah_jax.models.heads).
    wants_positions: ClassVar[bool] = False   # one vector per image will do
    attention_maps: ClassVar[bool] = False
    init_role: ClassVar[str] = "dense"        # takes the family's linear-classifier init
    settings: ClassVar[tuple[str, ...]] = ("hidden",)

    num_classes: int
    hidden: int = 32
    dtype: Any = jnp.float32
    kernel_init: Any = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        if x.ndim > 2:  # a map or tokens: average the positions
            x = x.reshape(x.shape[0], -1, x.shape[-1]).mean(axis=1)
        x = nn.gelu(nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x))
        x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=self.kernel_init,
                     name="fc2")(x)
        return x.astype(jnp.float32)
