"""CLI flags generated from the settings dataclasses (one declaration: name, type, default, help).

Every field declared with :func:`streamrecon.settings.setting` becomes ``--field-name``; booleans get
``--x/--no-x``; ``repeat`` fields may be given several times. Unset flags stay out of the namespace,
so a YAML value is only overridden by a flag that was really given. Deprecated spellings
(:data:`~streamrecon.settings.DEPRECATED_NAMES`) are accepted with a warning.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import MISSING, Field, fields
from typing import Any, Iterable

from ..settings import _DTYPE_NAMES, DEPRECATED_NAMES, flag_name

__all__ = ["add_settings_flags", "settings_from_args"]

_logger = logging.getLogger(__name__)
_INTERNAL = {"config", "handler", "command", "verbose", "threads"}


def _parse_type(annotation: str):
    a = annotation.replace("Optional[", "").replace("]", "").replace(" ", "")
    if a.startswith("list[") or a.startswith("tuple["):
        a = a.split("[", 1)[1]
    return {"int": int, "float": float, "str": str, "bool": bool}.get(a.split("|")[0], str)


def _default_text(f: Field) -> str:
    if f.default is not MISSING:
        d = f.default
        return "" if d is None or d is False or d == "" else f" (default {d})"
    return ""


class _Deprecated(argparse.Action):
    """An old spelling: warn, then store under the new name."""

    def __call__(self, parser, namespace, values, option_string=None):
        _logger.warning("%s is deprecated; use %s", option_string, flag_name(self.dest))
        if self.dest == "precision":
            values = _DTYPE_NAMES.get(values, values)
        setattr(namespace, self.dest, values)


def add_settings_flags(parser: argparse.ArgumentParser, classes: Iterable[type], skip: Iterable[str] = ()) -> None:
    """Add one flag per field of each settings dataclass (fields with ``metadata['cli']``)."""
    skip = set(skip)
    seen: set[str] = set()
    for cls in classes:
        group = parser.add_argument_group(cls.__name__.replace("Settings", "").replace("Config", "").lower() or None,
                                          (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        for f in fields(cls):
            meta = f.metadata
            if f.name in skip or f.name in seen or "help" not in meta or not meta.get("cli", True):
                continue
            seen.add(f.name)
            names = [flag_name(f.name)] + ([meta["short"]] if meta.get("short") else [])
            kind = _parse_type(str(f.type))
            kw: dict[str, Any] = {"default": argparse.SUPPRESS, "dest": f.name,
                                  "help": meta["help"] + _default_text(f)}
            if kind is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = kind
                if meta.get("choices"):
                    kw["choices"] = list(meta["choices"])
                if meta.get("repeat"):
                    kw["action"] = "append"
            group.add_argument(*names, **kw)
    for old, new in DEPRECATED_NAMES.items():
        if new in seen:
            parser.add_argument(flag_name(old), dest=new, action=_Deprecated, default=argparse.SUPPRESS,
                                help=argparse.SUPPRESS)


def settings_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as flat ``name -> value`` pairs."""
    return {k: v for k, v in vars(args).items() if k not in _INTERNAL}
