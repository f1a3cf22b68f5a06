"""``streamrecon`` command line: one entry point, one module per group of subcommands.

Each command module exposes ``register(subparsers)``; a command's handler returns the exit code.
Errors the user can fix (missing file, bad checkpoint) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from .. import __version__

__all__ = ["main", "build_parser"]

_COMMAND_MODULES = ("model_cmds", "run_cmd", "serve_cmd", "train_cmds", "bench_cmd")


class UserError(Exception):
    """An error caused by the command's input; printed without a traceback."""


def read_settings(path, allowed: set[str]) -> dict:
    """A YAML settings file as a dict (``-`` in keys read as ``_``); unknown keys are an error."""
    from pathlib import Path

    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of settings")
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown settings {unknown}")
    return data


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrecon", description="Online streaming 3D reconstruction (CUT3R).")
    parser.add_argument("--version", action="version", version=f"streamrecon {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except UserError as e:
        print(f"streamrecon {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"streamrecon {args.command}: interrupted", file=sys.stderr)
        return 130
