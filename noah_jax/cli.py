"""Command-line plumbing for main.py: flag parsing whose mistakes end in one line.

ml_collections reports a mistyped config field (`--config.batchsize=16`) or an
unknown recipe argument (`configs/resnet18_noah.py:dept=18`) as a traceback with the
useful part at its end. `parse_flags` turns any flag or config mistake into one line
that names the valid fields, for `app.run(main, flags_parser=cli.parse_flags)`.
`int_at_least` is an argparse type for the other commands' counts and sizes.
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


class UsageError(Exception):
    """A mistake on the command line; the message says what to write instead."""


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """absl's flag parsing (of `flag_values`, by default absl's global FLAGS); on any
    error prints `error: ...` (one line) and exits 2."""
    try:
        spec = config_spec(argv)
        if spec is not None:  # config_flags would defer this error to the first use
            _check_config_path(spec)
        return (flags.FLAGS if flag_values is None else flag_values)(argv)
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
    """Runs a config file's `get_config(arg)` as config_flags does ('path.py:arg')."""
    _check_config_path(spec)
    path, _, arg = spec.partition(":")
    # Configs import `configs.common`: make the folder above configs/ importable.
    root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    if root not in sys.path:
        sys.path.insert(0, root)
    module_spec = importlib.util.spec_from_file_location("_noah_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


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
