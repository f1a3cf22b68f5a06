"""``streamrecon`` command line: one entry point, one module per group of subcommands.

Each command module exposes ``register(subparsers)``; a command's handler returns the exit code.
Errors the user can fix (missing file, bad checkpoint) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

from .. import __version__

__all__ = ["main", "build_parser"]

_COMMAND_MODULES = ("model_cmds", "run_cmd", "serve_cmd", "train_cmds", "bench_cmd")


class UserError(Exception):
    """An error caused by the command's input; printed without a traceback."""


def read_settings(path, allowed: set[str]) -> dict:
    """A flat YAML settings file as a dict (``-`` in keys read as ``_``); unknown keys are an error."""
    from ..settings import read_yaml_mapping

    data = {str(k).replace("-", "_"): v for k, v in read_yaml_mapping(path).items()}
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise UserError(f"{path}: unknown settings {unknown}")
    return data


#: commands that need the reconstruction node's dependencies (torch); the rest run on a light install
NODE_COMMANDS = {"run", "serve", "bench", "train", "eval", "demo", "convert", "parity", "info"}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the input cannot work": one line, exit 2. Anything else is ours: exit 1."""
    from ..settings import SettingsError
    from ..sources import SourceError

    kinds: list[type[BaseException]] = [UserError, SettingsError, SourceError, FileNotFoundError, NotADirectoryError,
                                        IsADirectoryError, PermissionError]
    try:
        from ..checkpoint import CheckpointError, UnsafeCheckpointError
        from ..config import ConfigError
        from ..snapshot.store import SnapshotError

        kinds += [CheckpointError, UnsafeCheckpointError, ConfigError, SnapshotError]
    except ImportError:  # a light install (no torch): no checkpoint can have been read
        pass
    return tuple(kinds)


def _torch_missing() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("torch") is None
    except ImportError:
        return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamrecon", description="Online streaming 3D reconstruction (CUT3R).")
    parser.add_argument("--version", action="version", version=f"streamrecon {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    for name, command in sub.choices.items():  # one name for every command
        if name in NODE_COMMANDS:
            command.add_argument("--threads", type=int, default=None, metavar="N",
                                 help="CPU threads for the model's maths (0 = one per core; default 1, with idle "
                                      "threads sleeping at once: the fastest beside other processes, see "
                                      "docs/PERFORMANCE.md; OMP_NUM_THREADS / OMP_WAIT_POLICY are honoured)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if args.command in NODE_COMMANDS and _torch_missing():
        print(f"streamrecon {args.command}: error: this command needs the reconstruction node's dependencies "
              "(torch is not installed): pip install 'streamrecon[node]'", file=sys.stderr)
        return 2
    if args.command in NODE_COMMANDS:
        from ..threads import configure

        try:  # before torch starts its thread pools
            configure(getattr(args, "threads", None))
        except ValueError as e:
            print(f"streamrecon {args.command}: error: {e}", file=sys.stderr)
            return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print(f"streamrecon {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if isinstance(e, user_errors()):
            print(f"streamrecon {args.command}: error: {_describe(e)}", file=sys.stderr)
            return 2
        if args.verbose:
            traceback.print_exc()
        print(f"streamrecon {args.command}: internal error: {type(e).__name__}: {e} "
              "(this is a bug in streamrecon; run with -v for the traceback and report it)", file=sys.stderr)
        return 1


def _describe(e: BaseException) -> str:
    try:
        from ..checkpoint import CheckpointError, UnsafeCheckpointError

        if isinstance(e, (CheckpointError, UnsafeCheckpointError)):
            return f"incompatible checkpoint: {e}"
    except ImportError:
        pass
    return str(e)
