"""Helpers shared by several test files (test files never import one another).

conftest.py puts this folder on sys.path, so tests use `import helpers`.
"""

from __future__ import annotations

import importlib
import pathlib
import re
import shlex
import socket

import chex
import jax
import ml_collections
import numpy as np
from optax import tree_utils

from noah_jax.data import Source
from noah_jax.models import create_model


def set_fields(c: ml_collections.ConfigDict, **changes) -> ml_collections.ConfigDict:
    """Sets config fields named with '__' for '.' (model__overrides__depth=1); dicts
    become ConfigDicts. Returns `c`, changed in place."""
    for key, value in changes.items():
        node = c
        *path, leaf = key.split("__")
        for p in path:
            node = node[p]
        node[leaf] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    return c


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test cluster's
    coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bce_float64(logits, labels) -> np.ndarray:
    """Multi-label binary cross-entropy summed over classes, [B], in float64 numpy."""
    x, y = np.float64(logits), np.float64(labels)
    return (np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x)))).sum(-1)


# The moment buffers each optimiser keeps per parameter (optax state field names), and
# how many int32 step counters its chain holds (Adam's own, and the schedule's).
OPTIMIZER_STATE_LAYOUT = {"sgd": (("trace",), 1), "adamw": (("mu", "nu"), 2)}


def assert_optimizer_state_fits(opt_state, params, optimizer_name: str) -> None:
    """The optimiser state of `noah_jax.train.optim.make_optimizer` (with a schedule) over
    `params` holds exactly one buffer per parameter for each of the optimiser's moments,
    shaped and typed like the parameter, and int32 scalar step counters, nothing else."""
    moments, num_counters = OPTIMIZER_STATE_LAYOUT[optimizer_name]
    for name in moments:
        buffers = tree_utils.tree_get_all_with_path(opt_state, name)
        assert len(buffers) == 1, f"expected one '{name}' tree in the state, got {len(buffers)}"
        chex.assert_trees_all_equal_shapes_and_dtypes(buffers[0][1], params)
    counters = [leaf for _, leaf in tree_utils.tree_get_all_with_path(opt_state, "count")]
    assert len(counters) == num_counters
    for counter in counters:
        assert counter.shape == () and counter.dtype == np.int32
    num_params = len(jax.tree.leaves(params))
    assert len(jax.tree.leaves(opt_state)) == len(moments) * num_params + num_counters


def assert_follows_source_protocol(source, *, name: str, num_classes: int,
                                   image_shape: tuple[int, int, int], num_train_examples: int,
                                   num_eval_examples: int, class_names: list[str],
                                   multilabel: bool = False, local_batch_size: int = 4) -> None:
    """`source` has the attribute values given and its iterators yield what
    noah_jax/data/base.py's `Source` documents: training batches {'image' float32
    [b, H, W, 3], 'label' int32 [b] class ids (multi-label: float32 [b, K] multi-hot)}
    and, over the whole evaluation set, equally long {'image', 'label', 'mask'} batches
    whose mask marks each of the num_eval_examples examples once."""
    assert isinstance(source, Source)
    assert (source.name, source.num_classes, tuple(source.image_shape)) == (
        name, num_classes, image_shape)
    assert source.class_names == class_names and len(class_names) == num_classes
    assert all(isinstance(n, str) for n in source.class_names)
    assert (source.num_train_examples, source.num_eval_examples) == (
        num_train_examples, num_eval_examples)
    assert source.multilabel is multilabel
    assert source.eval_label_type == ("multi_hot" if multilabel else "class_ids")
    b = local_batch_size

    def check_labels(labels):
        if multilabel:
            assert labels.shape == (b, num_classes) and labels.dtype == np.float32
            assert set(np.unique(labels).tolist()) <= {0.0, 1.0}
        else:
            assert labels.shape == (b,) and labels.dtype == np.int32
            assert labels.min() >= 0 and labels.max() < num_classes

    batches = source.train_batches(start_step=0, local_batch_size=b, process_index=0,
                                   process_count=1)
    for _ in range(2):
        batch = next(batches)
        assert set(batch) == {"image", "label"}
        assert batch["image"].shape == (b, *image_shape)
        assert batch["image"].dtype == np.float32 and np.isfinite(batch["image"]).all()
        check_labels(batch["label"])

    masks = []
    for batch in source.eval_batches(local_batch_size=b, process_index=0, process_count=1):
        assert set(batch) == {"image", "label", "mask"}
        assert batch["image"].shape == (b, *image_shape) and batch["image"].dtype == np.float32
        check_labels(batch["label"])
        assert batch["mask"].shape == (b,) and batch["mask"].dtype == np.float32
        masks.append(batch["mask"])
    masks = np.concatenate(masks)
    # Padding only at the end of the last batch, and every example marked exactly once.
    assert len(masks) == -(-num_eval_examples // b) * b
    np.testing.assert_array_equal(masks, np.arange(len(masks)) < num_eval_examples)


def demo_config(**changes) -> ml_collections.ConfigDict:
    """The README demo, shrunk: a 1-block NOAH ViT, 6 steps of 16 digits."""
    c = importlib.import_module("configs.vit_noah").get_config("demo")
    c.model.overrides.depth = 1
    c.model.overrides.embed_dim = 96
    c.model.overrides.attn_heads = 3
    c.num_epochs = 0.0
    c.total_steps = 6
    c.batch_size = 16
    c.eval_batch_size = 48   # 360 eval digits = 7.5 batches: the last one is padded
    c.log_every_steps = 3
    c.eval_every_steps = 6
    c.checkpoint_every_steps = 3
    c.attention_figure_images = 0  # drawn only where a test checks it
    return set_fields(c, **changes)


def write_test_digits(folder) -> tuple[list[str], np.ndarray]:
    """The 360 test digits of the demo (load_digits() at digits.split_indices()'s test
    indices, in that order) as 8x8 grey PNGs folder/<label>/<index>.png of pixel value
    round(255 * level / 16). Returns (paths, labels int [360])."""
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from noah_jax.data import digits

    data = load_digits()
    _, test = digits.split_indices()
    paths = []
    for index in test:
        pixels = np.round(data.images[index] * 255 / 16).astype(np.uint8)[..., None]
        path = pathlib.Path(folder) / str(data.target[index]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(tf.io.encode_png(pixels).numpy())
        paths.append(str(path))
    return paths, data.target[test]


def _key_name(key) -> str:
    for attribute in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    raise TypeError(f"unexpected pytree key {key!r}")


def leaves_by_name(tree, value=lambda leaf: np.asarray(jax.device_get(leaf))) -> dict:
    """Every leaf by its '/'-joined path ('opt_state/1/0/trace/head/bias'), as numpy
    arrays (or `value(leaf)`). optax keeps its state in namedtuples and tuples, which
    Orbax stores as dicts and lists: both give the same names."""
    return {"/".join(_key_name(k) for k in path): value(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shardings_by_name(tree) -> dict:
    """(mesh axis sizes, partition spec) of every jax.Array in `tree`, by name."""
    return leaves_by_name(tree, lambda leaf: (dict(leaf.sharding.mesh.shape),
                                              leaf.sharding.spec))


def one_ulp_off(array: np.ndarray, seed=0) -> np.ndarray:
    """`array` with every float element moved by one ulp, up or down as the random bits
    of `seed` (anything np.random.default_rng takes) say: the smallest change there is,
    to measure how much a computation amplifies rounding (how far its outputs move)."""
    array = np.asarray(array)
    if not np.issubdtype(array.dtype, np.floating):
        return array
    towards = np.where(np.random.default_rng(seed).random(array.shape) < 0.5, np.inf, -np.inf)
    return np.nextafter(array, towards.astype(array.dtype))


def assert_equal_to_rounding(actual, expected, one_ulp_rerun, *, rtol: float,
                             factor: float) -> None:
    """Each float leaf of `actual` equals `expected` to `rtol` of the leaf's largest
    value, or, where the computation amplifies rounding past that, to within `factor`
    times the distance between `expected` and `one_ulp_rerun` (the same computation from
    inputs one ulp off, `one_ulp_off`). A leaf-wise, not element-wise, scale: elements
    near zero carry the same absolute noise as the rest."""
    actual, expected = leaves_by_name(actual), leaves_by_name(expected)
    rerun = leaves_by_name(one_ulp_rerun)
    assert actual.keys() == expected.keys() == rerun.keys()
    for name, want in expected.items():
        if not np.issubdtype(want.dtype, np.floating) or want.size == 0:
            np.testing.assert_array_equal(actual[name], want, err_msg=name)
            continue
        want = want.astype(np.float64)
        error = np.abs(actual[name] - want).max()
        rounding = np.abs(rerun[name] - want).max()
        allowed = max(rtol * np.abs(want).max(), factor * rounding)
        assert error <= allowed, (f"{name}: off by {error:.3g}; allowed {allowed:.3g} "
                                  f"(largest value {np.abs(want).max():.3g}, one-ulp "
                                  f"rerun moves it by {rounding:.3g})")


# Small models of each family for the explanation tests (test_explain.py, test_figures.py):
# (create_model overrides, image side). The side gives a 3x3 feature grid in every family.
TINY_MODELS = {
    "resnet18": ({}, 96),
    "deit_tiny_patch16_224": ({"img_size": 48, "depth": 1}, 48),
    "mixer_s16_224": ({"img_size": 48, "num_blocks": 1}, 48),
}


def tiny_model(name: str, head: str = "noah", batch: int = 2, num_classes: int = 6,
               seed: int = 0, **overrides):
    """(model, variables, images [batch, side, side, 3]) of a TINY_MODELS model."""
    base, side = TINY_MODELS[name]
    model = create_model(name, num_classes=num_classes, head=head, **{**base, **overrides})
    images = jax.random.normal(jax.random.key(seed), (batch, side, side, 3))
    variables = model.init(jax.random.key(seed + 1), images)
    return model, variables, images


def readme_commands(prefix: str) -> list[list[str]]:
    """Every command in the README's bash blocks that runs `prefix` (continuation lines
    joined, the TPU one taken out of its gcloud quotes), as argument lists."""
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", readme, flags=re.S):
        block = re.sub(r"<<'(\w+)'\n.*?\n\1\n", "\n", block, flags=re.S)  # heredoc bodies
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)  # comments
            for part in re.split(r'&&|--command="', line):
                part = part.strip()
                if part.count('"') % 2:  # the end of the gcloud --command="..."
                    part = part.rstrip('"')
                words = shlex.split(part)
                head = prefix.split()
                for start in range(len(words)):
                    # `python` or `.venv/bin/python`, then the rest of the prefix.
                    here = words[start:start + len(head)]
                    if (here and here[0].split("/")[-1] == head[0]
                            and here[1:] == head[1:]):
                        commands.append(words[start + len(head):])
                        break
    return commands
