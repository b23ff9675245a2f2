"""Figures of what a classifier attends to, after the NOAH paper's Figure 2: each head's
attention map for one class (a), one head's maps for several classes (b), and rows of
Grad-CAM++ maps to set a baseline beside NOAH.

The functions take one image and its maps from noah_jax.models.explain (numpy or JAX arrays),
draw with matplotlib's Agg canvas (no pyplot, no global backend state), write a PNG to
`path` and return it as a pathlib.Path. The layout is a grid of panels, each
PANEL_WIDTH x PANEL_HEIGHT pixels at DPI dots per inch (a title band above a square
picture), so a figure of R rows and C panels per row is exactly
(C * PANEL_WIDTH) x (R * PANEL_HEIGHT) pixels (`figure_size`). The first panel of a
row is the image; the others overlay a map, upsampled bilinearly to the image and
scaled by its own maximum, in the 'jet' colour map.

Images: give `mean` and `std` to undo the input normalisation (x * std + mean), or a
display image with values in [0, 1]; values are clipped to [0, 1].
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from noah_jax.models.explain import upsample

DPI = 100
PANEL_WIDTH = 250    # pixels
PANEL_HEIGHT = 300   # pixels: a 50-pixel title band above a 250-pixel square
_TITLE_BAND = 50
_MARGIN = 5
_FONT_SIZE = 8
_COLOUR_MAP = "jet"
_OVERLAY_ALPHA = 0.5
_DEFAULT_TOP_CLASSES = 5


def figure_size(num_rows: int, num_columns: int) -> tuple[int, int]:
    """(width, height) in pixels of a figure of num_rows rows of num_columns panels."""
    return num_columns * PANEL_WIDTH, num_rows * PANEL_HEIGHT


def display_image(image, mean: Optional[Sequence[float]] = None,
                  std: Optional[Sequence[float]] = None) -> np.ndarray:
    """An image [H, W, 3] (or [H, W, 1]) as float RGB in [0, 1]: x * std + mean when
    both are given, then clipped."""
    x = np.asarray(image, np.float32)
    if x.ndim != 3 or x.shape[-1] not in (1, 3):
        raise ValueError(f"expected one image [H, W, 3] or [H, W, 1], got shape {x.shape}")
    if (mean is None) != (std is None):
        raise ValueError("give both mean and std, or neither")
    if mean is not None:
        x = x * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return np.clip(x, 0.0, 1.0)


def stretched(images) -> np.ndarray:
    """Preprocessed images [..., H, W, C] as pictures in [0, 1]: each image's own range
    stretched (undoes any normalisation up to contrast, without knowing its constants)."""
    x = np.asarray(images, np.float32)
    low = x.min(axis=(-3, -2, -1), keepdims=True)
    high = x.max(axis=(-3, -2, -1), keepdims=True)
    return (x - low) / np.maximum(high - low, 1e-6)


def _class_name(k: int, class_names: Optional[Sequence[str]]) -> str:
    name = str(class_names[k]) if class_names is not None else f"class {k}"
    return name if len(name) <= 28 else name[:25] + "..."


def _heat(maps, size: tuple[int, int]) -> np.ndarray:
    """Non-negative maps [..., h, w] -> [..., H, W] in [0, 1], each scaled by its max."""
    up = np.maximum(np.asarray(upsample(np.asarray(maps, np.float32), size)), 0.0)
    peak = up.max(axis=(-2, -1), keepdims=True)
    return np.divide(up, peak, out=np.zeros_like(up), where=peak > 0)


def _save(path, picture, rows: list[list[tuple[Optional[np.ndarray], str]]]
          ) -> pathlib.Path:
    """Draws rows of (heat map [H, W] in [0, 1] or None for the bare image, title) over
    `picture` [H, W, 3], or over pictures[i] in row i when given one per row."""
    pictures = picture if isinstance(picture, (list, tuple)) else [picture] * len(rows)
    num_rows, num_columns = len(rows), max(len(row) for row in rows)
    width, height = figure_size(num_rows, num_columns)
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    FigureCanvasAgg(figure)
    side = PANEL_HEIGHT - _TITLE_BAND - 2 * _MARGIN  # the picture's square, in pixels
    for i, row in enumerate(rows):
        for j, (heat, title) in enumerate(row):
            left = j * PANEL_WIDTH + (PANEL_WIDTH - side) / 2
            bottom = (num_rows - 1 - i) * PANEL_HEIGHT + _MARGIN
            axes = figure.add_axes((left / width, bottom / height, side / width, side / height))
            axes.imshow(pictures[i], interpolation="nearest")
            if heat is not None:
                axes.imshow(heat, cmap=_COLOUR_MAP, vmin=0.0, vmax=1.0, alpha=_OVERLAY_ALPHA,
                            interpolation="nearest")
            axes.set_title(title, fontsize=_FONT_SIZE)
            axes.set_axis_off()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, format="png")
    return path


def heads_figure(path, image, attention, contributions, probabilities, *,
                 class_index: Optional[int] = None, class_names: Optional[Sequence[str]] = None,
                 heads: Optional[Sequence[int]] = None, mean=None, std=None) -> pathlib.Path:
    """Figure (a): the image, then every head's attention map for one class.

    attention [N, K, h, w], contributions [N, K] and probabilities [K] are one image's
    (explain.Explanation fields at one batch index; probabilities e.g. the softmax of
    its logits). class_index: the class to show, by default the most probable. Titles:
    the class name and probability over the image, head n and its contribution
    sum_l a * v to the class's logit over head n's map. heads: the heads to show (by
    index), by default all. One row of len(heads) + 1 panels.
    """
    probabilities = np.asarray(probabilities)
    k = int(np.argmax(probabilities)) if class_index is None else int(class_index)
    picture = display_image(image, mean, std)
    heat = _heat(np.asarray(attention)[:, k], picture.shape[:2])
    contributions = np.asarray(contributions)
    heads = range(len(heat)) if heads is None else heads
    row = [(None, f"{_class_name(k, class_names)}\np = {probabilities[k]:.3g}")]
    row += [(heat[n], f"head {n}\ncontribution {contributions[n, k]:+.3g}") for n in heads]
    return _save(path, picture, [row])


def _true_classes(label, class_names: Optional[Sequence[str]]) -> str:
    """A class id, or a multi-hot row's first three positive classes, by name."""
    label = np.asarray(label)
    if label.ndim == 0:
        return _class_name(int(label), class_names)
    positives = [_class_name(int(k), class_names) for k in np.flatnonzero(label > 0)]
    return ", ".join(positives[:3]) + (", ..." if len(positives) > 3 else "") or "none"


def gallery_figure(path, images, attention, contributions, probabilities, *,
                   labels: Optional[Sequence[int]] = None,
                   class_names: Optional[Sequence[str]] = None, mean=None, std=None
                   ) -> pathlib.Path:
    """Figure (a) for several images, one row each: the image, then every head's map
    for the image's most probable class. images [B, H, W, C], attention [B, N, K, h, w],
    contributions [B, N, K], probabilities [B, K]; `labels` (the true classes: ids [B],
    or multi-hot [B, K]) are named in the first panel's title when given. B rows of
    N + 1 panels."""
    probabilities = np.asarray(probabilities)
    pictures, rows = [], []
    for b in range(len(probabilities)):
        k = int(np.argmax(probabilities[b]))
        picture = display_image(images[b], mean, std)
        heat = _heat(np.asarray(attention[b])[:, k], picture.shape[:2])
        truth = f" (true {_true_classes(labels[b], class_names)})" if labels is not None else ""
        row = [(None, f"{_class_name(k, class_names)}{truth}\np = {probabilities[b, k]:.3g}")]
        row += [(heat[n], f"head {n}\ncontribution {float(contributions[b][n, k]):+.3g}")
                for n in range(len(heat))]
        pictures.append(picture)
        rows.append(row)
    return _save(path, pictures, rows)


def _top_classes(probabilities, classes: Optional[Sequence[int]]) -> list[int]:
    if classes is not None:
        return [int(k) for k in classes]
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return [int(k) for k in order[:_DEFAULT_TOP_CLASSES]]


def classes_figure(path, image, attention, contributions, probabilities, *, head: int = 0,
                   classes: Optional[Sequence[int]] = None,
                   class_names: Optional[Sequence[str]] = None, mean=None,
                   std=None) -> pathlib.Path:
    """Figure (b): the image, then one head's attention maps for several classes.

    Arrays as in `heads_figure`. classes: the classes to show, by default the five
    most probable. Titles: class name, probability, and the head's contribution to
    the class's logit. One row of len(classes) + 1 panels.
    """
    probabilities, contributions = np.asarray(probabilities), np.asarray(contributions)
    classes = _top_classes(probabilities, classes)
    picture = display_image(image, mean, std)
    heat = _heat(np.asarray(attention)[head, classes], picture.shape[:2])
    row = [(None, f"head {head}")]
    row += [(heat[i], f"{_class_name(k, class_names)}\np = {probabilities[k]:.3g}\n"
                      f"contribution {contributions[head, k]:+.3g}")
            for i, k in enumerate(classes)]
    return _save(path, picture, [row])


def comparison_figure(path, image, rows: Sequence[tuple[str, object, Optional[object]]],
                      classes: Sequence[int], *, class_names: Optional[Sequence[str]] = None,
                      mean=None, std=None) -> pathlib.Path:
    """Rows of maps for the same classes, one row per method or model, as the paper's
    Figure 2(b) sets a baseline's Grad-CAM++ beside NOAH's attention.

    rows: (label, maps [len(classes), h, w], probabilities [K] or None) per row, e.g.
    ('ResNet-18 Grad-CAM++', cams[i], softmax(baseline_logits[i])) and
    ('NOAH head 0', explanation.attention[i, 0][classes], softmax(noah_logits[i])).
    Each row: the image titled with its label, then one panel per class titled with
    the class name and, where given, the row's probability of it.
    """
    classes = [int(k) for k in classes]
    picture = display_image(image, mean, std)
    drawn = []
    for label, maps, probabilities in rows:
        maps = np.asarray(maps)
        if maps.shape[0] != len(classes):
            raise ValueError(f"row {label!r}: {maps.shape[0]} maps for {len(classes)} classes")
        heat = _heat(maps, picture.shape[:2])
        titles = [_class_name(k, class_names) for k in classes]
        if probabilities is not None:
            p = np.asarray(probabilities)
            titles = [f"{t}\np = {p[k]:.3g}" for t, k in zip(titles, classes)]
        drawn.append([(None, label)] + list(zip(heat, titles)))
    return _save(path, picture, drawn)


def grad_cam_figure(path, image, cams, classes: Sequence[int], probabilities=None, *,
                    class_names: Optional[Sequence[str]] = None, label: str = "Grad-CAM++",
                    mean=None, std=None) -> pathlib.Path:
    """A row of Grad-CAM++ maps: the image, then cams [len(classes), h, w] (one image's
    `explain.grad_cam_plus_plus` maps) over it, titled with class and probability."""
    return comparison_figure(path, image, [(label, cams, probabilities)], classes,
                             class_names=class_names, mean=mean, std=std)
