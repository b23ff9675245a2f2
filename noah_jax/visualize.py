"""What a trained model looks at, drawn as the NOAH paper's Figure 2.

  python -m noah_jax.visualize CHECKPOINT IMAGES_OR_FOLDERS... --out DIR \
      [--classes top|NAME,NAME,...] [--heads all|0,2] [--grad-cam] [--no-ema]

CHECKPOINT is a training workdir, its checkpoints/ folder or a converted checkpoint
(`noah_jax.inference.load`); images go through the run's evaluation preprocessing.
For each image, DIR receives:

  NOAH head    <i>_<name>_heads.png      (a) every head's attention map (softmax over
                                         positions) for the top class, or for the first
                                         of --classes; titles: class, probability, each
                                         head's contribution sum_l a*v to the logit
               <i>_<name>_head<n>.png    (b) head n's maps for the five top classes, or
                                         for --classes (head 0, or each --heads entry)
  with --grad-cam, or any other head:
               <i>_<name>_gradcam.png    Grad-CAM++ on the backbone's last feature map
                                         for the same classes (the paper's baseline view)

Maps live on the head's input grid (CNN feature map, or the token grid of ViT, Mixer
and gMLP) and are upsampled to the image. A wrong argument (no checkpoint there, an
unreadable image, a class name the model does not have, a head it does not have)
ends in one line and exit status 1 (2 for malformed options); paths are checked before
TensorFlow and JAX are imported, so a mistyped one is told at once.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from typing import Optional, Sequence

import numpy as np

from noah_jax import cli
from noah_jax.errors import ConfigError, UserError

_TOP_CLASSES = 5  # figure (b) and Grad-CAM++ by default


def class_indices(names: str, class_names: Sequence[str]) -> Optional[list[int]]:
    """--classes as indices: None for 'top', else each comma-separated name (or index)."""
    if names == "top":
        return None
    indices = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name in class_names:
            indices.append(list(class_names).index(name))
        elif name.isdigit() and int(name) < len(class_names):
            indices.append(int(name))
        else:
            close = difflib.get_close_matches(name, list(class_names), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--classes: the model has no class {name!r}{hint} (its "
                              f"{len(class_names)} classes: {', '.join(class_names[:10])}"
                              f"{', ...' if len(class_names) > 10 else ''})")
    if not indices:
        raise ConfigError("--classes: give 'top' or class names separated by commas")
    return indices


def parse_heads(heads: str) -> Optional[list[int]]:
    """--heads as head indices, None for 'all'; what needs no model (the indices'
    range is checked by `head_indices`)."""
    if heads == "all":
        return None
    chosen = [h.strip() for h in heads.split(",") if h.strip()]
    if not (chosen and all(h.isdigit() for h in chosen)):
        raise ConfigError(f"--heads={heads}: give 'all' or head indices separated by commas")
    return [int(h) for h in chosen]


def head_indices(heads: str, num_heads: int) -> list[int]:
    """--heads as indices into the model's N heads."""
    chosen = parse_heads(heads)
    if chosen is None:
        return list(range(num_heads))
    if any(h >= num_heads for h in chosen):
        raise ConfigError(f"--heads={heads}: give 'all' or head indices 0..{num_heads - 1} "
                          "separated by commas")
    return chosen


def visualize(checkpoint: str, images: Sequence[str], out: str, *, classes: str = "top",
              heads: str = "all", grad_cam: bool = False, ema: bool = True) -> list[str]:
    """Writes the figures (module docstring) and returns their paths."""
    from noah_jax.models import explain
    from noah_jax import figures, inference

    loaded = inference.load(checkpoint, ema=ema)
    paths = inference.image_files(images)
    chosen = class_indices(classes, loaded.class_names)
    model, variables, names = loaded.model, loaded.variables, loaded.class_names
    noah = model.head_class.attention_maps  # the head sows attention maps
    written = []
    for i, path in enumerate(paths):
        image = loaded.preprocess([path])
        stem = f"{i:04d}_{os.path.splitext(os.path.basename(path))[0]}"
        picture = figures.stretched(image[0])
        if noah:
            seen = explain.explain(model, variables, image)
            scores = loaded.scores(seen.logits)[0]
            attention, contributions = np.asarray(seen.attention[0]), seen.contributions[0]
            shown = head_indices(heads, attention.shape[0])
            written.append(figures.heads_figure(
                os.path.join(out, f"{stem}_heads.png"), picture, attention, contributions,
                scores, class_index=chosen[0] if chosen else None, class_names=names,
                heads=shown))
            # Figure (b) for each head named in --heads; by default for head 0 only.
            for n in shown if heads != "all" else shown[:1]:
                written.append(figures.classes_figure(
                    os.path.join(out, f"{stem}_head{n}.png"), picture, attention,
                    contributions, scores, head=n, classes=chosen, class_names=names))
        else:
            logits = model.apply(variables, image, train=False)
            scores = loaded.scores(logits)[0]
        if grad_cam or not noah:
            ranked = chosen or [int(k) for k in np.argsort(-scores)[:_TOP_CLASSES]]
            try:
                cams = explain.grad_cam_plus_plus(model, variables, image, ranked)[0]
            except ValueError as e:  # a class-token head (DeiT baseline): no feature map
                raise ConfigError(f"{loaded.meta.get('model')} head="
                                  f"{loaded.meta.get('head')}: {e}") from None
            written.append(figures.grad_cam_figure(
                os.path.join(out, f"{stem}_gradcam.png"), picture, cams, ranked, scores,
                class_names=names))
    return [str(p) for p in written]


def run_attention_figure(config, workdir: str) -> Optional[str]:
    """After a training run (main.py, noah_jax.study): WORKDIR/attention.png, each NOAH
    head's attention map for the top class of the first `config.attention_figure_images`
    evaluation images, one row per image, drawn from the run's newest checkpoint (its
    raw parameters) with the model of `config` (its dtype too). Returns the path, or
    None where nothing is drawn: no images asked for, a head that draws no attention
    maps (its class's `attention_maps`), or a run of several processes. Its log lines go to the run's log.txt as well."""
    num_images = config.attention_figure_images
    if not num_images:
        return None
    import jax
    from absl import logging

    from noah_jax import data, figures
    from noah_jax.models import explain, input_preprocessing
    from noah_jax.models.heads import head_class
    from noah_jax.train import checkpoint, run_log, trainer

    run_log.attach(workdir)
    try:
        maps = head_class(config.model.head).attention_maps
        if not maps or jax.process_count() > 1:
            logging.info("no attention figure: %s", f"the model's head ({config.model.head}) "
                         "draws no attention maps" if not maps else "drawn by one process "
                         "only; use python -m noah_jax.visualize on the checkpoint")
            return None
        # The evaluation images and the model exactly as the trainer built them.
        config = input_preprocessing.resolve(config)
        source = data.get_source(config.dataset, seed=config.seed, augment=config.augment,
                                 label_smoothing=config.label_smoothing)
        model = trainer.build_model(config, source.num_classes)
        stored, _ = checkpoint.restore_model(os.path.join(workdir, "checkpoints"))
        variables = {"params": stored["params"], "batch_stats": stored.get("batch_stats", {})}
        batch = next(source.eval_batches(local_batch_size=num_images, process_index=0,
                                         process_count=1))
        images, labels = batch["image"][:num_images], batch["label"][:num_images]
        seen = explain.explain(model, variables, images)
        # A multi-label model scores each class by its own sigmoid, as its evaluation does.
        scores = (jax.nn.sigmoid(seen.logits) if source.multilabel
                  else jax.nn.softmax(seen.logits))
        path = os.path.join(workdir, "attention.png")
        figures.gallery_figure(path, figures.stretched(images), seen.attention,
                               seen.contributions, scores, labels=labels,
                               class_names=source.class_names)
        logging.info("attention maps of %d evaluation images drawn in %s", len(images), path)
        return path
    finally:
        run_log.detach()


def _argument_error(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with the paths and --heads, told before TensorFlow and JAX are
    imported (seconds); the class names and head count need the model."""
    try:
        parse_heads(args.heads)
    except ConfigError as e:
        return str(e)
    return (cli.checkpoint_path_error(args.checkpoint) or cli.missing_path_error(args.images)
            or cli.output_folder_error(args.out, "--out"))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m noah_jax.visualize",
        description="Draw what a trained model attends to (NOAH attention maps, Grad-CAM++).")
    parser.add_argument("checkpoint", help="a training workdir, its checkpoints/ folder, or "
                                           "a converted checkpoint")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="folder for the PNG figures")
    parser.add_argument("--classes", default="top",
                        help="'top' (the predicted classes) or class names, comma-separated")
    parser.add_argument("--heads", default="all",
                        help="'all' or NOAH head indices, comma-separated: the heads of "
                             "figure (a), and one figure (b) each ('all': head 0's only)")
    parser.add_argument("--grad-cam", action="store_true",
                        help="also Grad-CAM++ for a NOAH model (always for other heads)")
    parser.add_argument("--no-ema", action="store_true",
                        help="the raw parameters, not the run's EMA ones")
    args = parser.parse_args(argv)
    mistake = _argument_error(args)
    if mistake:
        print(f"{parser.prog}: error: {mistake}", file=sys.stderr)
        return 1
    from noah_jax.train import run_log
    run_log.quiet_library_notices()  # e.g. Orbax's "read only" notice, on purpose here
    try:
        written = visualize(args.checkpoint, args.images, args.out, classes=args.classes,
                            heads=args.heads, grad_cam=args.grad_cam, ema=not args.no_ema)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
