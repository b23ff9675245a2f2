"""The reference's PyTorch state_dicts <-> our Flax variables, and a command to convert files.

    variables = torch_to_flax(state_dict, "resnet18", head="noah")       # a zoo model
    variables = torch_to_flax(state_dict, "noah_head", num_heads=4, key_ratio=0.5)  # NOAHHead
    state_dict = flax_to_torch(variables, "resnet18")                    # the way back

    python -m noah_jax.convert --model resnet18 --head noah --input ckpt.pth --output DIR \
        [--num-classes K] [--drop-head] [--class-names FILE] [--override key_ratio=0.25 ...]

A state_dict is a mapping from the reference's keys to numpy arrays (torch tensors are
accepted too). The class count comes from the head's weights, and for ViT/PVT/Mixer/gMLP the
image size from the number of tokens (e.g. a 448 px ViT); other settings that change
shapes (the head's num_heads, key_ratio, head_split, kv_split, ...) are given as
`create_model` overrides, the reference's defaults otherwise.

How names and layouts map is `noah_jax.models.conversion`'s (its docstring).

Class names. The checkpoint's meta records them for predictions (`noah_jax.predict`):
`--class-names FILE` (one per line, as many as the head has classes), else, for a
1000-class head, ImageNet-1k's (`catalog.imagenet_class_names`, WordNet synset ids).
The meta also records the evaluation input the reference fed the model (image_size,
eval_crop, eval_crop_ratio, eval_interpolation, mean, std: its family's values,
`noah_jax.models.input_preprocessing.reference_eval`), which `noah_jax.inference` uses.

Files (`load_state_dict`): `.pth`/`.pt`/`.pth.tar` through `torch.load(...,
weights_only=True)` (torch is optional and only needed for these), `.safetensors` (read
here from the format's spec, no package needed) and `.npz` (entries named `__x__` are
metadata, as in the parity fixtures, not weights). A checkpoint wrapped as
{'state_dict': ...} or {'model': ...} is unwrapped, DataParallel `module.` prefixes are
removed. A file that is not what its extension says (empty, cut short, a safetensors
header with a missing or mistyped field, a .npz that is no zip archive) raises a
WeightsFileError, a ValueError whose one line names the file and the problem; the
command prints that line and exits with status 1, as it does for every error.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pickle
import re
import sys
import zipfile
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from noah_jax import cli
from noah_jax.data import catalog
from noah_jax.errors import UserError
from noah_jax.models import create_model, input_preprocessing
# The in-memory conversion is the library's; the command reads and writes files with it.
from noah_jax.models.conversion import (  # noqa: F401 (flax_to_torch: the library API)
    HEAD_ONLY, ConversionError, _as_numpy_dict, fitting_models, flax_to_torch,
    infer_model_settings, summary, torch_to_flax)
from noah_jax.train import checkpoint


# ---------------------------------------------------------------------------------------
# Files.
# ---------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pth", ".pt", ".pth.tar")
_SUFFIXES = (*_TORCH_SUFFIXES, ".safetensors", ".npz")
_STATE_DICT_WRAPPERS = ("state_dict", "model")


def unwrap_state_dict(obj: Any) -> dict[str, Any]:
    """The state_dict inside a training checkpoint.

    Descends into {'state_dict': ...} or {'model': ...} (first match, repeatedly), then
    removes DataParallel's `module.` prefix if every key has it.
    """
    while isinstance(obj, Mapping):
        inner = next((obj[w] for w in _STATE_DICT_WRAPPERS if isinstance(obj.get(w), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state_dict (a mapping from names to tensors), got "
                         f"{type(obj).__name__}")
    if obj and all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


class WeightsFileError(UserError, ValueError):
    """A weights file that cannot be read as its extension says; the message names the
    file and what is wrong with it, in one line."""


def _reason(error: BaseException) -> str:
    """The first sentence of an error's message: libraries append advice and internals
    in further sentences and lines, which do not fit one line."""
    lines = str(error).strip().splitlines()
    return lines[0].split(". ")[0] if lines else ""


def _load_torch(path: str) -> Any:
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"reading {path} needs PyTorch, an optional dependency of noah_jax: pip install "
            "torch --index-url https://download.pytorch.org/whl/cpu (the CPU build; plain "
            "`pip install torch` also pulls CUDA libraries), or save the state_dict as "
            ".safetensors or .npz where torch is installed"
        ) from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own message runs to several paragraphs; it stays in the chain.
        raise WeightsFileError(
            f"{path} was refused by torch.load(weights_only=True), which never runs pickled "
            "code: it holds Python objects besides tensors, or is not a PyTorch file. If you "
            "trust the file, keep only its weights: torch.save(torch.load(path, "
            "weights_only=False)['model'], 'weights.pth') (or ['state_dict'])") from e
    except OSError:
        raise  # the file system's problem, not the file's content
    except Exception as e:
        # A truncated or foreign file fails deep inside torch with whatever error the
        # step that ran out of data raises (EOFError, RuntimeError from the zip reader,
        # KeyError for a missing archive member, ...): all mean the file is not one.
        reason = _reason(e)
        raise WeightsFileError(f"{path} is not a valid PyTorch file: torch.load failed with "
                               f"{type(e).__name__}{': ' + reason if reason else ''}") from e


# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec).
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": jnp.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


def _is_count(value: Any) -> bool:
    """A JSON non-negative integer (JSON's true/false arrive as Python bools, ints too)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _safetensors_entry(name: str, info: Any) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, start, end) of one header entry; a ValueError saying what is wrong
    with it otherwise."""
    if not isinstance(info, dict):
        raise ValueError(f"tensor {name!r} is described by a JSON {type(info).__name__}, "
                         "not an object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in info:
            raise ValueError(f"tensor {name!r} has no {field!r} in its header")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _SAFETENSORS_DTYPES:
        raise ValueError(f"tensor {name!r} has dtype {dtype!r}; readable dtypes: "
                         f"{', '.join(_SAFETENSORS_DTYPES)}")
    if not isinstance(shape, list) or not all(map(_is_count, shape)):
        raise ValueError(f"tensor {name!r} has shape {shape!r}, not a list of non-negative "
                         "integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        raise ValueError(f"tensor {name!r} has data_offsets {offsets!r}, not a [start, end] "
                         "pair of non-negative integers")
    return np.dtype(_SAFETENSORS_DTYPES[dtype]), tuple(shape), offsets[0], offsets[1]


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    """Reads a .safetensors file: u64 little-endian header size, JSON header, raw data.

    Done here rather than with `safetensors.numpy.load_file` because that loader has no
    bfloat16 (numpy lacks the type; here it is ml_dtypes' bfloat16, as in JAX), and
    checkpoints are often saved in bfloat16. The package serves the tests as an
    independent writer of the format. A file that does not follow the format raises a
    WeightsFileError that names the first problem found.
    """
    def invalid(problem: str) -> WeightsFileError:
        return WeightsFileError(f"{path} is not a valid safetensors file: {problem}")

    size = os.path.getsize(path)
    if size < 8:  # np.memmap cannot map an empty file, so this comes first
        raise invalid(f"it has {size} bytes, fewer than the 8 of its header size")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    header_size = int.from_bytes(data[:8].tobytes(), "little")
    if 8 + header_size > data.size:
        raise invalid(f"its header size {header_size} reaches beyond the file's "
                      f"{data.size} bytes")
    try:
        text = data[8:8 + header_size].tobytes().decode("utf-8")
    except UnicodeDecodeError:
        raise invalid("its header is not UTF-8 text") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise invalid(f"its header is not JSON ({_reason(e)})") from None
    if not isinstance(header, dict):
        raise invalid(f"its header is a JSON {type(header).__name__}, not an object")
    body = data[8 + header_size:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, start, end = _safetensors_entry(name, info)
        except ValueError as e:
            raise invalid(str(e)) from None
        if not start <= end <= body.size or end - start != math.prod(shape) * dtype.itemsize:
            raise invalid(f"tensor {name!r} ({info['dtype']} {list(shape)}) does not fit "
                          f"its data_offsets [{start}, {end}] in {body.size} bytes of data")
        tensors[name] = np.frombuffer(body[start:end].tobytes(), dtype).reshape(shape)
    return tensors


def _load_npz(path: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz (a zip of .npy files), without its `__x__` metadata entries;
    never unpickles (allow_pickle=False)."""
    # np.load decides what a file is from its first bytes: without this check a .npy or
    # a pickle named .npz would come back as something other than an archive.
    if not zipfile.is_zipfile(path):
        raise WeightsFileError(f"{path} is not a valid .npz file: it is not a zip archive")
    tensors = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for name in npz.files:
                if re.fullmatch(r"__.*__", name):
                    continue
                tensors[name] = npz[name]
                if not isinstance(tensors[name], np.ndarray):  # a member that is no .npy
                    raise ValueError(f"entry {name!r} is not a numpy array")
    except (ValueError, EOFError, zipfile.BadZipFile) as e:
        raise WeightsFileError(f"{path} is not a valid .npz file: {_reason(e)}") from None
    return tensors


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state_dict from .pth/.pt/.pth.tar, .safetensors or .npz (see module doc).

    A missing path or a folder raises FileNotFoundError / IsADirectoryError, a file that
    is not what its extension says a WeightsFileError (a ValueError); each message is
    one line naming the file.
    """
    path = os.fspath(path)
    name = os.path.basename(path).lower()
    if not name.endswith(_SUFFIXES):
        raise ValueError(f"cannot read {path}: unknown extension; supported: "
                         f"{', '.join(_SUFFIXES)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a weights file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if os.path.getsize(path) == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes)")
    if name.endswith(_TORCH_SUFFIXES):
        obj = _load_torch(path)
    elif name.endswith(".safetensors"):
        obj = _load_safetensors(path)
    else:
        obj = _load_npz(path)
    try:
        return _as_numpy_dict(unwrap_state_dict(obj))
    except ValueError as e:
        raise WeightsFileError(f"{path}: {e}") from None


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a bare string


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line in label order (surrounding spaces
    and trailing empty lines dropped); an empty line among them is a mistake."""
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f.read().splitlines()]
    while names and not names[-1]:
        names.pop()
    if "" in names:
        raise ConversionError(f"{path}: line {names.index('') + 1} is empty; the file needs "
                              "one class name per line, in label order")
    return names


def _class_names(path: Optional[str], num_classes: Optional[int], *, drop_head: bool
                 ) -> Optional[list[str]]:
    """The names to record: those of `path`, checked against the head's class count;
    without a file, ImageNet-1k's (WordNet synset ids) for a kept 1000-class head; else
    None (a dropped head's classes are the fine-tuning dataset's, recorded by training)."""
    if path is None:
        if num_classes == 1000 and not drop_head:
            return catalog.imagenet_class_names()
        return None
    names = read_class_names(path)
    if num_classes is not None and len(names) != num_classes:
        raise ConversionError(f"{path} has {len(names)} class names (one per line), but the "
                              f"model has {num_classes} classes")
    return names


def _does_not_fit(args: argparse.Namespace, state_dict: dict[str, np.ndarray],
                  error: ConversionError) -> str:
    """The command's one line for a file that does not convert into --model: what does
    not fit, counted (the full listing, a line per key, would run to hundreds of
    lines), and which zoo models the file fits instead."""
    if error.problems:
        message = f"{args.input} does not fit {error.target}: {summary(error.problems)}"
    else:  # e.g. no head of that kind in the file: its message says what it looked for
        message = str(error).rstrip(".")
    if args.model == HEAD_ONLY:
        return message
    found = fitting_models(state_dict, near=args.model, drop_head=args.drop_head,
                           overrides=dict(args.override))
    if (args.model, args.head) in found:  # the layout fits; the message names the problem
        return message
    if found:
        return message + "; its layout fits " + " or ".join(
            f"--model {name} --head {head}" for name, head in found)
    if error.problems:
        return message + ("; its layout fits no zoo model with the reference's settings "
                          "(settings that change shapes, such as num_heads, are given as "
                          "--override KEY=VALUE)")
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m noah_jax.convert",
        description="Convert a reference PyTorch checkpoint into an Orbax checkpoint that "
                    "training (config.init_from) and evaluation read.")
    parser.add_argument("--model", required=True, help="zoo name, e.g. resnet18")
    parser.add_argument("--head", choices=("noah", "linear"), default="noah",
                        help="the head the checkpoint has")
    parser.add_argument("--input", required=True,
                        help="checkpoint: " + ", ".join(_SUFFIXES))
    parser.add_argument("--output", required=True, help="new Orbax checkpoint directory")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="checked against the head's weights; with --drop-head, the class "
                             "count of the new head, recorded in the checkpoint's meta")
    parser.add_argument("--drop-head", action="store_true",
                        help="write the backbone only (fine-tuning on another label set)")
    parser.add_argument("--class-names", metavar="FILE", default=None,
                        help="text file of the class names in label order, one per line, "
                             "recorded in the checkpoint's meta (predictions show them); "
                             "without it a 1000-class model records ImageNet-1k's")
    parser.add_argument("--override", action="append", type=_parse_override, default=[],
                        metavar="KEY=VALUE",
                        help="create_model override, e.g. key_ratio=0.25 or head_split=False "
                             "(repeatable; values are Python literals)")
    args = parser.parse_args(argv)

    if checkpoint.latest_step(args.output) is not None:
        parser.error(f"{args.output} already holds a checkpoint; choose a new directory")
    try:
        state_dict = load_state_dict(args.input)
        try:
            num_classes, overrides = infer_model_settings(
                state_dict, args.model, head=args.head, num_classes=args.num_classes,
                drop_head=args.drop_head, **dict(args.override))
            variables = torch_to_flax(state_dict, args.model, head=args.head,
                                      num_classes=num_classes, drop_head=args.drop_head,
                                      **overrides)
        except ConversionError as e:
            raise ConversionError(_does_not_fit(args, state_dict, e)) from None
        class_names = _class_names(args.class_names, num_classes, drop_head=args.drop_head)
    except OSError as e:
        # The file system's errors read "[Errno 13] Permission denied: 'x.pth'" by default.
        message = f"cannot read {e.filename}: {e.strerror}" if e.filename and e.strerror else e
        parser.exit(1, f"{parser.prog}: error: {message}\n")
    except (ValueError, TypeError, ImportError) as e:  # the messages say it all
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    # The reference's evaluation input for this model (its family's mean/std, resize
    # and crop ratio at the size it is built for), which inference feeds it.
    model = create_model(args.model, num_classes=1, head=args.head, **overrides)
    meta = {"model": args.model, "head": args.head, "num_classes": num_classes,
            "overrides": overrides, "source": os.path.abspath(args.input),
            "dropped_head": args.drop_head,
            **input_preprocessing.reference_eval(model).eval_record()}
    if class_names is not None:
        meta["class_names"] = class_names
    try:
        checkpoint.save_model(args.output, variables, meta)
    except (UserError, OSError) as e:  # an output folder that cannot be written
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    count = sum(x.size for x in jax.tree.leaves(variables.get("params", {})))
    print(f"{args.input}: {len(state_dict)} tensors -> {args.output}: {args.model} "
          f"head={args.head}{' (dropped)' if args.drop_head else ''}, num_classes={num_classes}, "
          f"overrides={overrides}, {count:,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
