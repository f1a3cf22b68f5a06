"""Read official ``.pth`` checkpoints without running code from the file.

A ``.pth`` is a zip holding a pickle. Pickles can call any importable function; the official files
also pickle ``omegaconf`` objects (the hydra training config). We unpickle with an allow-list:

* torch's tensor rebuild helpers and storages, plain containers and scalars;
* any class from the ``omegaconf`` package and ``argparse.Namespace`` become *inert stand-ins*
  that only record their pickled state (omegaconf need not be installed);
* every other global is refused with :class:`UnsafeCheckpointError` naming it, before anything is
  called.

:func:`to_plain` turns the stand-in tree into dicts, lists and values.
"""

from __future__ import annotations

import collections
import pickle
import types
import zipfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["UnsafeCheckpointError", "load_pth", "to_plain", "Inert"]


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle references something outside the allow-list."""


class Inert:
    """Stand-in for a pickled config object: stores constructor args and state, runs nothing."""

    _qualname = "?"
    _args: tuple = ()
    _state: Any = None

    def __init__(self, *args: Any) -> None:
        self.__dict__["_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state

    def _item_list(self) -> list:
        return self.__dict__.setdefault("_items", [])

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict-like stand-in
        self._item_list().append((key, value))

    def append(self, value: Any) -> None:  # APPEND(S) on a list-like stand-in
        self._item_list().append((None, value))

    def extend(self, values: Any) -> None:
        for v in values:
            self.append(v)

    def __repr__(self) -> str:
        return f"<inert {self._qualname}>"


_STANDINS: dict[str, type] = {}


def _standin(qualname: str) -> type:
    if qualname not in _STANDINS:
        _STANDINS[qualname] = type(qualname.rsplit(".", 1)[-1], (Inert,), {"_qualname": qualname})
    return _STANDINS[qualname]


def _allowed_torch() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter"):
        fn = getattr(torch._utils, name, None)
        if fn is not None:
            allowed[("torch._utils", name)] = fn
    allowed[("torch", "Size")] = torch.Size
    for dtype_name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8",
                       "bool", "complex64"):
        allowed[("torch", dtype_name)] = getattr(torch, dtype_name)
    return allowed


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): collections.defaultdict,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "complex"): complex,
    ("builtins", "bool"): bool,
    ("builtins", "str"): str,
    ("builtins", "bytes"): bytes,
    ("builtins", "bytearray"): bytearray,
    ("_codecs", "encode"): __import__("_codecs").encode,  # protocol-2 bytes
}
_ALLOWED.update(_allowed_torch())
# Python-2 era names that pickle maps for protocol < 3 files
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_BUILTIN_ALIASES = {"long": "int", "unicode": "str"}
# data-only classes that may appear in configs: stored inert, never instantiated for real
_INERT_PREFIXES = ("omegaconf.",)
_INERT_NAMES = {"argparse.Namespace", "typing.Any", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path"}


def _numpy_allowed(module: str, name: str) -> Any:
    """numpy scalars/arrays (e.g. a pickled ``best_so_far``): reconstructors that only copy bytes."""
    if module not in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.dtypes"):
        return None
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    if name in ("scalar", "_reconstruct") and module != "numpy.dtypes":
        return getattr(multiarray, name)
    if name in ("ndarray", "dtype") and module == "numpy":
        return getattr(np, name)
    if module == "numpy.dtypes" and name.endswith("DType"):
        return getattr(np.dtypes, name, None)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        if module == "builtins":
            name = _BUILTIN_ALIASES.get(name, name)
        qualname = f"{module}.{name}"
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if qualname in _INERT_NAMES or module.startswith(_INERT_PREFIXES) or module == "omegaconf":
            return _standin(qualname)
        fn = _numpy_allowed(module, name)
        if fn is not None:
            return fn
        raise UnsafeCheckpointError(
            f"refusing to load: the checkpoint references {qualname!r}, which is not tensor data, a plain "
            "container or a config object (only trusted code could need it; nothing was executed)"
        )


# what torch.load needs of a pickle module
_safe_pickle_module = types.SimpleNamespace(
    __name__="streamrecon_safe_pickle",
    Unpickler=_RestrictedUnpickler,
    load=lambda f, **kw: _RestrictedUnpickler(f, **kw).load(),
    UnpicklingError=pickle.UnpicklingError,
)


def load_pth(path: str | Path) -> Any:
    """Unpickle a torch ``.pth`` file with the allow-list (tensors on CPU, memory-mapped when possible).

    Raises:
        UnsafeCheckpointError: the pickle references anything outside the allow-list.
        ValueError: the file is a TorchScript archive or not a torch checkpoint.
    """
    path = Path(path)
    mmap = False
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.endswith("constants.pkl") for n in names):
            raise ValueError(f"{path} is a TorchScript archive, not a state-dict checkpoint")
        mmap = True
    try:
        # weights_only=False only because a custom pickle module is given: every global still goes
        # through _RestrictedUnpickler.find_class, which refuses anything not on the allow-list.
        return torch.load(path, map_location="cpu", pickle_module=_safe_pickle_module, weights_only=False, mmap=mmap)
    except UnsafeCheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable torch checkpoint: {e}") from e


def to_plain(obj: Any, _depth: int = 0) -> Any:
    """Convert inert config stand-ins (DictConfig, ListConfig, value nodes, Namespace) to plain data.

    Tensors and other values pass through unchanged.
    """
    if _depth > 100:
        raise ValueError("config nesting too deep")
    rec = lambda o: to_plain(o, _depth + 1)  # noqa: E731
    if isinstance(obj, Inert):
        name = obj._qualname
        state = obj.__dict__.get("_state")
        if name.endswith("ListConfig"):
            content = state.get("_content") if isinstance(state, dict) else None
            return [rec(v) for v in content] if isinstance(content, list) else content
        if name.endswith("DictConfig"):
            content = state.get("_content") if isinstance(state, dict) else None
            return {k: rec(v) for k, v in content.items()} if isinstance(content, dict) else content
        if name.startswith("omegaconf.nodes") or name.endswith("Node"):
            return rec(state.get("_val")) if isinstance(state, dict) else None
        if name == "argparse.Namespace":
            return {k: rec(v) for k, v in (state or {}).items()}
        if name == "typing.Any":
            return None
        if isinstance(state, dict):
            return {k: rec(v) for k, v in state.items() if not k.startswith("_")}
        return None
    if isinstance(obj, dict):
        return type(obj)((k, rec(v)) for k, v in obj.items()) if isinstance(obj, collections.OrderedDict) \
            else {k: rec(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(rec(v) for v in obj)
    return obj
