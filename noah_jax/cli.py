"""Command-line plumbing for main.py: flag parsing whose mistakes end in one line.

ml_collections reports a mistyped config field (`--config.batchsize=16`) or an
unknown recipe argument (`configs/resnet18_noah.py:dept=18`) as a traceback with the
useful part at its end. `parse_flags` turns any flag or config mistake into one line
that names the valid fields, for `app.run(main, flags_parser=cli.parse_flags)`; it
also declares the chosen model's overrides on the loaded config
(`declare_model_overrides`), so that every one can be set from a flag.
For the other commands: `ArgumentParser` (argparse, one-line mistakes),
`int_at_least` (an argparse type for counts and sizes), and path checks that run
before TensorFlow and JAX are imported (`checkpoint_path_error`, `nearest_existing`, ...).

It imports no other module of the package and no JAX or TensorFlow, so every layer may
use it (the trainer checks its workdir path with `nearest_existing`); only loading a
config imports the model registry, inside the functions that do it.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import os
import re
import sys

from absl import flags


def int_at_least(minimum: int):
    """An argparse `type`: an integer no smaller than `minimum`, else one line saying so."""
    wanted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    return parse


def one_line(message: str) -> str:
    """A message on one line: a listing's lines after the first joined with '; '."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else ""
    return f"{lines[0]} {'; '.join(lines[1:])}"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes end in one line, `PROG: error: MESSAGE (see --help)`,
    without the usage block (status 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------
# Paths checked before the heavy imports: TensorFlow, JAX and Orbax take seconds to
# import, a mistyped path should not. Only os calls; what passes here may still be
# refused later, by the loader that reads it.
# ----------------------------------------------------------------------------------
CHECKPOINT_EXPECTED = ("expected a training workdir (with checkpoints/ inside), its "
                       "checkpoints/ folder, or a converted checkpoint (the --output of "
                       "python -m noah_jax.convert)")


def _holds_a_step(directory: str) -> bool:
    """Whether `directory` has an Orbax step folder (a number); True when it cannot be
    listed (no permission): then the loader says what is wrong."""
    try:
        return any(entry.name.isdigit() and entry.is_dir() for entry in os.scandir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


EXPORT_MANIFEST = "noah_export.json"  # noah_jax.export.MANIFEST


def checkpoint_path_error(path: str, *, exports: bool = False) -> str | None:
    """Why `path` cannot be a checkpoint for predict, export or visualize (the wording
    of `noah_jax.inference.find_checkpoint`), or None when it may be one. With
    `exports`, an export folder (holding noah_export.json) may be one too."""
    expected = (CHECKPOINT_EXPECTED + ", or an export folder (python -m noah_jax.export)"
                if exports else CHECKPOINT_EXPECTED)
    if not os.path.exists(path):
        return f"{path}: no such file or folder; {expected}"
    if exports and os.path.isfile(os.path.join(path, EXPORT_MANIFEST)):
        return None
    if not any(_holds_a_step(d) for d in (os.path.join(path, "checkpoints"), path)):
        if not exports and os.path.isfile(os.path.join(path, EXPORT_MANIFEST)):
            return (f"{path} is an export (python -m noah_jax.export), which holds the "
                    f"forward only: give the checkpoint it was exported from")
        return f"no checkpoint in {path}: {expected}"
    return None


def missing_path_error(paths: list[str]) -> str | None:
    """'PATH: no such file or folder' for the first local path that does not exist."""
    for path in paths:
        if "://" not in path and not os.path.exists(path):
            return f"{path}: no such file or folder"
    return None


def nearest_existing(path: str) -> str:
    """`path` made absolute, or its nearest ancestor that exists: what decides whether
    a folder can be made there."""
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    return existing


def output_folder_error(path: str, option: str) -> str | None:
    """Why no folder can be written at `path` (it is a file, or lies under one)."""
    existing = nearest_existing(path)
    if not os.path.isdir(existing):
        where = ("is a file" if existing == os.path.abspath(path)
                 else f"is under the file {existing}")
        return f"{option} {path} {where}: give a folder (new, or one to add to)"
    return None


class UsageError(Exception):
    """A mistake on the command line; the message says what to write instead."""


# absl's own --help exits 1 and knows no -h; these print the command's help and exit 0.
_SHORT_HELP = ("-h", "--help", "-help", "-?", "--helpshort")
_FULL_HELP = ("--helpfull",)


def help_text(flag_values: flags.FlagValues, doc: str | None, *, full: bool = False) -> str:
    """The command's docstring, then its own flags (with `full`, absl's too)."""
    modules = list(flag_values.flags_by_module_dict())
    own = [m for m in modules if not m.startswith("absl")]
    parts = [(doc or "").strip(), "\nflags:"]
    for module in modules if full else own:
        # module_help() heads each module's flags with its file's path; one heading here.
        parts.append(flag_values.module_help(module).removeprefix(f"\n{module}:\n"))
    if len(own) < len(modules) and not full:
        parts.append("\n--helpfull also lists absl's flags (logging, flagfile).")
    return "\n".join(parts) + "\n"


def _help_wanted(argv: list[str]) -> str | None:
    for arg in argv[1:]:
        if arg == "--":  # what follows is not for the flags
            return None
        if arg in _SHORT_HELP:
            return "short"
        if arg in _FULL_HELP:
            return "full"
    return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None, *,
                doc: str | None = None) -> list[str]:
    """absl's flag parsing (of `flag_values`, by default absl's global FLAGS); on any
    error prints `error: ...` (one line) and exits 2. `-h`/`--help` print `doc` (by
    default the __main__ module's docstring) and the flags, and exit 0."""
    values = flags.FLAGS if flag_values is None else flag_values
    wanted = _help_wanted(argv)
    if wanted is not None:
        if doc is None:
            doc = getattr(sys.modules.get("__main__"), "__doc__", None)
        sys.stdout.write(help_text(values, doc, full=wanted == "full"))
        sys.exit(0)
    _declare_on_load(values)
    try:
        spec = config_spec(argv)
        if spec is not None:  # config_flags would defer this error to the first use
            _check_config_path(spec)
        return values(argv)
    except Exception as e:
        # Whatever failed while parsing (flags, the config file, an override), the
        # message below names it; the traceback would only show ml_collections' insides.
        message = explain(argv, e)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def config_spec(argv: list[str], flag: str = "config") -> str | None:
    """The value of `--config=...` (or `--config ...`) in argv, or None."""
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{flag}="):
            return arg.split("=", 1)[1]
        if arg == f"--{flag}" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def overridden_paths(argv: list[str], flag: str = "config") -> list[tuple[str, str]]:
    """(argument, 'a.b.c') for each `--config.a.b.c[=value]` / `--noconfig.a.b`."""
    paths = []
    for arg in argv:
        match = re.match(rf"^--(?:no)?{flag}\.([^=]+)", arg)
        if match:
            paths.append((arg.split("=", 1)[0], match.group(1)))
    return paths


def _check_config_path(spec: str) -> None:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
        raise UsageError(f"--config={spec}: there is no file {path!r}; give a config file "
                         "such as configs/vit_noah.py (a path from the current directory)")


def load_config(spec: str):
    """Runs a config file's `get_config(arg)` as config_flags does ('path.py:arg'), and
    declares its model's overrides as `parse_flags` does: the config main.py loads."""
    _check_config_path(spec)
    path, _, arg = spec.partition(":")
    # Configs import `configs.common`: make the folder above configs/ importable.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_noah_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return declare_model_overrides(module.get_config(arg) if arg else module.get_config())


# ----------------------------------------------------------------------------------
# The model's overrides as config fields. A recipe sets only the overrides it uses;
# ml_collections refuses a flag for a field the config lacks, so the loaded config
# gets every other override of its model declared (None: the model's own value)
# before the `--config.model.overrides.X=...` flags are applied.
# ----------------------------------------------------------------------------------
def declare_model_overrides(config):
    """Declares every override that `create_model(config.model.name, ...)` accepts as a
    field of `config.model.overrides`, None where the recipe set none; the compute dtype
    is `config.dtype`, not an override. Returns `config` (a locked one stays locked).
    Imports the model registry, and with it JAX."""
    import ml_collections
    from noah_jax.models import model_override_types

    if not isinstance(config, ml_collections.ConfigDict):
        return config  # config_flags' stand-in for a file it could not read
    overrides = config.model.overrides
    with overrides.unlocked():
        # Every registered head's settings, so that a flag may also set those of a head
        # chosen by another flag (--config.model.head=...).
        for name, kind in model_override_types(config.model.name, head=None).items():
            if name != "dtype" and name not in overrides:
                overrides[name] = ml_collections.config_dict.placeholder(kind)
    return config


class _DeclaringParser:
    """A config flag's file parser, followed by `declare_model_overrides`; config_flags
    types each `--config.X` flag from the config this returns."""

    def __init__(self, parser):
        self.parser = parser

    def parse(self, argument):
        return declare_model_overrides(self.parser.parse(argument))

    def __getattr__(self, name):
        return getattr(self.parser, name)


def _declare_on_load(flag_values: flags.FlagValues) -> None:
    # ml_collections documents is_config_flag for callers; its package does not re-export it.
    from ml_collections.config_flags.config_flags import is_config_flag

    for name in list(flag_values):
        flag = flag_values[name]
        if is_config_flag(flag) and not isinstance(flag.parser, _DeclaringParser):
            flag.parser = _DeclaringParser(flag.parser)


def _missing_field(config, path: str) -> str | None:
    """Why `path` is not a field of `config`, or None when it is."""
    node, walked = config, "config"
    for part in path.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            if not keys:
                return f"{walked} is a value ({node!r}), not a group of fields"
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{walked} has no field {part!r}{hint}; its fields: {', '.join(sorted(keys))}"
        node, walked = node[part], f"{walked}.{part}"
    return None


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else type(error).__name__
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # KeyError / AttributeError quote their message
    return text


def explain(argv: list[str], error: BaseException) -> str:
    """One line saying what on the command line caused `error`."""
    spec = config_spec(argv)
    config = None
    if spec is not None:
        try:
            config = load_config(spec)
        except UsageError as e:
            return str(e)
        except Exception as e:
            return f"--config={spec}: {_last_line(e)}"
    if config is not None:
        for arg, path in overridden_paths(argv):
            why = _missing_field(config, path)
            if why is not None:
                return f"{arg}: {why}"
    return _last_line(error)
