"""What a classifier looks at: NOAH's attention maps, each head's share of a logit, and
Grad-CAM++ on the feature map the head receives. Pure JAX; figures.py draws them.

Every zoo model ends with `self.classify(features)`, which builds the head as the
submodule 'head'. The functions here run the model once with a method interceptor
that records the head's input and an unbound copy of the head with its variables
(`split_at_head`), then work on the head alone:

  features  the head's input on the spatial grid, [B, h, w, C]. A CNN hands the head
            its last feature map [B, h, w, C]; a ViT (NOAH variant: no class token),
            Mixer or gMLP hands it patch tokens [B, L, C] in row-major order, which
            are put back on their h x w patch grid (`token_grid`: the factorisation
            L = h * w with the image's aspect ratio; a PVT's last stage works the same).
  attention NOAH's maps a [B, N, K, h, w]: for each (sample, head, class) a softmax
            over the h * w positions, as the head sows them.
  values    the values v [B, N, K, h, w] the head weighs with a.
  contributions  sum over positions of a * v [B, N, K]: head n's logit for class k;
            merged as the head merges its blocks (`heads.merge_blocks`), they are the
            logits.
  Grad-CAM++  from gradients of the class scores with respect to `features`
            (`grad_cam_plus_plus`), for NOAH and linear heads alike.

All maps are float32 on the feature grid; `upsample` brings them to the image size.
The models run in inference mode (train=False).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from noah_jax.models.heads import Classifier

Array = jax.Array


@struct.dataclass
class Explanation:
    """A NOAH model's view of a batch of images (shapes in the module docstring). A
    pytree (`merge` is static), so functions returning it can be jitted."""

    logits: Array          # [B, K]
    attention: Array       # [B, N, K, h, w], sums to 1 over (h, w)
    values: Array          # [B, N, K, h, w]
    contributions: Array   # [B, N, K], sum over (h, w) of attention * values
    features: Array        # [B, h, w, C], the head's input on the grid
    merge: str = struct.field(pytree_node=False)  # 'sum', 'mean' or 'max', as the head


def token_grid(num_tokens: int, image_size: Sequence[int]) -> tuple[int, int]:
    """The grid (h, w), h * w = num_tokens, whose aspect ratio is closest to the image's
    (H, W): a patch grid of an image whose sides are multiples of the patch (ViT, Mixer,
    gMLP, a PVT stage) has exactly the image's aspect ratio."""
    height, width = image_size
    target = math.log(height / width)
    candidates = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(candidates, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))


def split_at_head(model: nn.Module, variables, images: Array):
    """Runs `model` on `images` (train=False) and returns (head, head_variables,
    features): an unbound copy of the model's head, its variables, and the head's input
    as the backbone gave it ([B, h, w, C], [B, L, C] or, for a class-token head, [B, C]).
    `head.apply(head_variables, features)` gives the model's logits.
    """
    captured = []

    def record_head_input(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        # The head is the submodule 'head' that Classifier.classify builds.
        if (context.method_name == "__call__" and module.name == "head"
                and isinstance(module.parent, Classifier)):
            captured.append((*module.unbind(), args[0]))
        return out

    with nn.intercept_methods(record_head_input):
        model.apply(variables, images, train=False)
    if len(captured) != 1:
        raise ValueError(f"expected the model to call its head ('head', built by "
                         f"Classifier.classify) once; it was called {len(captured)} times")
    return captured[0]


def _grid(features: Array, image_size: Sequence[int],
          grid: Optional[tuple[int, int]]) -> tuple[int, int]:
    if features.ndim == 4:
        return tuple(features.shape[1:3])
    if features.ndim == 3:
        return tuple(grid) if grid is not None else token_grid(features.shape[1], image_size)
    raise ValueError(
        f"the head receives features of shape {tuple(features.shape)}, with no positions "
        f"(a class-token head): there is no spatial map to explain. Use the model with "
        f"head='noah', or a family whose baseline pools a feature map.")


def feature_map(model: nn.Module, variables, images: Array,
                grid: Optional[tuple[int, int]] = None) -> Array:
    """The head's input on the spatial grid, [B, h, w, C]. `grid` overrides the token
    grid (`token_grid`) of a model whose head receives tokens [B, L, C]."""
    _, _, features = split_at_head(model, variables, images)
    h, w = _grid(features, images.shape[1:3], grid)
    return features.reshape(features.shape[0], h, w, features.shape[-1])


def explain(model: nn.Module, variables, images: Array,
            grid: Optional[tuple[int, int]] = None) -> Explanation:
    """The logits, attention maps, values and per-head contributions of a NOAH model
    (`create_model(..., head='noah')`) on `images` [B, H, W, 3]; see `Explanation`."""
    head, head_variables, features = split_at_head(model, variables, images)
    if not type(head).attention_maps:
        raise ValueError(f"attention maps need a NOAH head (or another head that sows "
                         f"them); this model's head is a {type(head).__name__} (build it "
                         f"with head='noah')")
    logits, state = head.apply(head_variables, features, train=False, mutable=["intermediates"])
    (attention,) = state["intermediates"]["attention"]  # [B, N, K, L]
    (values,) = state["intermediates"]["values"]
    contributions = jnp.einsum("bnkl,bnkl->bnk", attention, values)
    h, w = _grid(features, images.shape[1:3], grid)
    on_grid = lambda maps: maps.reshape(*maps.shape[:-1], h, w)
    return Explanation(logits=logits, attention=on_grid(attention), values=on_grid(values),
                       contributions=contributions,
                       features=features.reshape(features.shape[0], h, w, features.shape[-1]),
                       merge=head.merge)


def attention_maps(model: nn.Module, variables, images: Array,
                   grid: Optional[tuple[int, int]] = None) -> tuple[Array, Array]:
    """(logits [B, K], attention maps [B, N, K, h, w]) of a NOAH model on `images`."""
    e = explain(model, variables, images, grid)
    return e.logits, e.attention


def head_contributions(model: nn.Module, variables, images: Array) -> tuple[Array, Array]:
    """(logits [B, K], contributions [B, N, K]): head n's logit for class k,
    sum_l a * v. `heads.merge_blocks(contributions, model.head_setting('merge'))` is the logits."""
    e = explain(model, variables, images)
    return e.logits, e.contributions


def grad_cam_plus_plus(model: nn.Module, variables, images: Array, classes: Sequence[int],
                       grid: Optional[tuple[int, int]] = None) -> Array:
    """Grad-CAM++ maps [B, len(classes), h, w] (non-negative, float32) on the feature map
    A [B, h, w, C] the head receives, for the class scores S_k (the logits).

    Grad-CAM++ (Chattopadhyay et al., 2018) weighs channel c by
    w_c = sum_ij alpha_ijc * relu(g_ijc), g = dS_k/dA, with the closed form the paper
    derives for exp(S_k) when second derivatives of S_k vanish (its equation 19):
        alpha_ijc = g_ijc^2 / (2 g_ijc^2 + (sum_ab A_abc) g_ijc^3)   (0 where g = 0),
    and the map is relu(sum_c w_c A[..., c]). The paper's weights carry one more factor,
    exp(S_k) > 0 per (image, class): it scales a map without changing its shape, and is
    left out here (it overflows float32 for logits above ~88), as common implementations
    do. For a NOAH head S_k is not piecewise linear in A, so alpha is the usual
    approximation there too.
    """
    head, head_variables, features = split_at_head(model, variables, images)
    h, w = _grid(features, images.shape[1:3], grid)
    batch, channels = features.shape[0], features.shape[-1]
    classes = jnp.asarray(classes, jnp.int32)

    logits, pull_back = jax.vjp(lambda a: head.apply(head_variables, a, train=False), features)
    # One backward pass per requested class: the cotangent selects S_k of every image.
    cotangents = jax.nn.one_hot(classes, logits.shape[-1], dtype=logits.dtype)
    cotangents = jnp.broadcast_to(cotangents[:, None], (len(classes), *logits.shape))
    grads = jax.vmap(lambda ct: pull_back(ct)[0])(cotangents)  # [n, *features.shape]

    a = features.astype(jnp.float32).reshape(batch, h * w, channels)          # [B, L, C]
    g = grads.astype(jnp.float32).reshape(len(classes), batch, h * w, channels)  # [n, B, L, C]
    g2 = g * g
    denominator = 2 * g2 + jnp.sum(a, axis=1, keepdims=True) * g2 * g           # [n, B, L, C]
    alpha = jnp.where(g2 != 0, g2 / jnp.where(denominator != 0, denominator, 1.0), 0.0)
    weights = jnp.sum(alpha * jax.nn.relu(g), axis=2)                            # [n, B, C]
    cams = jax.nn.relu(jnp.einsum("nbc,blc->bnl", weights, a))
    return cams.reshape(batch, len(classes), h, w)


def upsample(maps: Array, size: Sequence[int]) -> Array:
    """Maps [..., h, w] -> [..., H, W] by bilinear interpolation (half-pixel centres, as
    an image resize), for overlaying on an image of size (H, W)."""
    maps = jnp.asarray(maps, jnp.float32)
    return jax.image.resize(maps, (*maps.shape[:-2], *size), method="bilinear")
