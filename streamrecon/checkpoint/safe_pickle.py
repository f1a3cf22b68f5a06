"""Read official ``.pth`` checkpoints without running code from the file.

A ``.pth`` is a zip holding a pickle. Pickles can call any importable function; the official files
also pickle ``omegaconf`` objects (the hydra training config). We unpickle with an allow-list:

* torch's tensor rebuild helpers and storages, plain containers and scalars;
* any class from the ``omegaconf`` package and ``argparse.Namespace`` become *inert stand-ins*
  that only record their pickled state (omegaconf need not be installed);
* every other global is refused with :class:`UnsafeCheckpointError` naming it, before anything is
  called.

Allowed callables that could turn a few bytes of pickle into a large allocation are wrapped:
``bytes``/``bytearray`` refuse a size argument, ``_codecs.encode`` only performs the latin-1
encoding protocol-2 pickles use (no ``hex``/``base64`` chains), numpy arrays and scalars must be
plain numeric data (no object or structured dtypes, whose raw bytes would be read as pointers).

The zip container is checked before torch reads it (:func:`check_zip_container`): declared record
sizes against the file and :data:`MAX_RECORD_BYTES` / :data:`MAX_INFLATE_RATIO`, tensor storage
records uncompressed. The legacy (torch < 1.6) tar and raw-pickle formats are refused: torch's
reader for them extracts tar members to disk (a FIFO member blocks it forever) and allocates every
storage at the size the pickle declares.

:func:`to_plain` turns the stand-in tree into dicts, lists and values, memoised by identity and
within :data:`MAX_PLAIN_NODES` nodes.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import pickle
import reprlib
import tarfile
import types
import zipfile
from pathlib import Path
from typing import Any, Optional

import torch

from .errors import CheckpointError

__all__ = ["UnsafeCheckpointError", "load_pth", "to_plain", "Inert", "check_zip_container",
           "MAX_RECORD_BYTES", "MAX_INFLATE_RATIO", "MAX_PLAIN_NODES"]

#: largest record torch may read into memory (``data.pkl`` and the small text records); tensor
#: storages are memory-mapped and bounded by the file instead
MAX_RECORD_BYTES = 64 * 2**20
#: largest declared ``uncompressed / compressed`` size of a deflated record (a zip bomb beyond it)
MAX_INFLATE_RATIO = 200
#: most nodes :func:`to_plain` expands (counting shared sub-objects once per reference)
MAX_PLAIN_NODES = 200_000
#: most bytes ``bytes(...)`` / ``bytearray(...)`` may build from a pickle
_MAX_PICKLED_BYTES = 64 * 2**20
# the first bytes of torch's legacy (< 1.6) raw-pickle format: the pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The checkpoint's pickle references something outside the allow-list (or calls an allowed
    one with arguments that would make it allocate far more than the file holds)."""


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


def _refuse(what: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(f"refusing to load: the checkpoint's pickle {what} (refused before running it)")


def _short(obj: Any) -> str:
    """A bounded repr of pickled data for messages (a huge or deep container stays short)."""
    try:
        return reprlib.repr(obj)[:80]
    except Exception:  # a stand-in or array that cannot describe itself
        return type(obj).__name__


def _byte_string_builder(kind: type) -> Any:
    """``bytes`` / ``bytearray`` for REDUCE, refusing a size (``bytearray(2**31)``) or a huge result.

    A function, not the type: pickle's NEWOBJ needs a class, so ``bytes.__new__(bytes, n)`` cannot
    be reached through it either.
    """

    def build(*args: Any) -> Any:
        if args and not isinstance(args[0], (bytes, bytearray, str, list, tuple)):
            raise _refuse(f"calls {kind.__name__}({type(args[0]).__name__}); only {kind.__name__}() of bytes, "
                          "text or a list is data (a number would be a size to allocate)")
        if args and len(args[0]) > _MAX_PICKLED_BYTES:
            raise _refuse(f"builds a {kind.__name__} of {len(args[0])} items (more than {_MAX_PICKLED_BYTES})")
        return kind(*args)

    build.__name__ = kind.__name__
    return build


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it (``encode(text, 'latin1')``), nothing else:
    bytes-to-bytes codecs (``hex``, ``base64``...) chained would grow the data at every step."""
    if not isinstance(obj, str) or str(encoding).replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise _refuse(f"calls _codecs.encode({type(obj).__name__}, {_short(encoding)}); only text -> latin-1 "
                      "(protocol-2 bytes) is allowed")
    return obj.encode("latin1", errors)


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
    ("builtins", "bytes"): _byte_string_builder(bytes),
    ("builtins", "bytearray"): _byte_string_builder(bytearray),
    ("_codecs", "encode"): _latin1_encode,  # protocol-2 bytes
}
_ALLOWED.update(_allowed_torch())
# Python-2 era names that pickle maps for protocol < 3 files
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_BUILTIN_ALIASES = {"long": "int", "unicode": "str"}
# data-only classes that may appear in configs: stored inert, never instantiated for real
_INERT_PREFIXES = ("omegaconf.",)
_INERT_NAMES = {"argparse.Namespace", "typing.Any", "pathlib.PosixPath", "pathlib.WindowsPath", "pathlib.Path"}


# numpy kinds whose raw bytes are plain values (no pointers, no fields)
_NUMPY_DATA_KINDS = "biufcmMSU"
class _NdarrayMarker:
    """What the pickle gets for ``numpy.ndarray``: usable only as the subtype argument of
    ``_reconstruct`` (calling ``ndarray(shape)`` would allocate any size the pickle names)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise _refuse("calls numpy.ndarray(...) directly (an allocation of any size it names)")

    def __repr__(self) -> str:
        return "<numpy.ndarray marker>"


_NDARRAY_MARKER = _NdarrayMarker()


def _check_numpy_dtype(dtype: Any, where: str) -> None:
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMPY_DATA_KINDS or dtype.names is not None \
            or dtype.subdtype is not None:
        raise _refuse(f"holds a numpy {where} of dtype {_short(dtype)}; only plain numeric or text dtypes are "
                      "allowed (object or structured dtypes would read raw bytes as pointers)")


@functools.lru_cache(maxsize=None)
def _numpy_classes() -> tuple[type, Any, Any]:
    import numpy as np

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    class CheckedArray(np.ndarray):
        """What a pickled array becomes: ``__setstate__`` checks the dtype and the data size first."""

        def __setstate__(self, state: Any) -> None:
            if not isinstance(state, tuple) or len(state) not in (4, 5):
                raise _refuse("holds a numpy array with a malformed state")
            shape, dtype, rawdata = state[-4], state[-3], state[-1]
            _check_numpy_dtype(dtype, "array")
            if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
                raise _refuse("holds a numpy array with a malformed shape")
            if not isinstance(rawdata, bytes) or len(rawdata) != math.prod(shape) * dtype.itemsize:
                raise _refuse(f"holds a numpy array of shape {_short(shape)} whose data does not match it")
            super().__setstate__(state)

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _NDARRAY_MARKER or shape != (0,):
            raise _refuse(f"calls numpy's _reconstruct with {_short(subtype)} and shape {_short(shape)} (a pickled "
                          "array passes numpy.ndarray and (0,))")
        return multiarray._reconstruct(CheckedArray, (0,), dtype)

    def scalar(dtype: Any, data: Any = None) -> Any:
        _check_numpy_dtype(dtype, "scalar")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise _refuse(f"holds a numpy scalar whose data is not {dtype.itemsize} bytes")
        return multiarray.scalar(dtype, data)

    return CheckedArray, reconstruct, scalar


def _numpy_allowed(module: str, name: str) -> Any:
    """numpy scalars/arrays (e.g. a pickled ``best_so_far``) of plain numeric dtypes: checked
    reconstructors that only copy bytes (see :func:`_numpy_classes`)."""
    if module not in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy", "numpy.dtypes"):
        return None
    import numpy as np

    _, reconstruct, scalar = _numpy_classes()
    if module == "numpy.dtypes":
        cls = getattr(np.dtypes, name, None) if name.endswith("DType") else None
        try:
            return cls if cls is not None and cls().kind in _NUMPY_DATA_KINDS else None
        except TypeError:  # a DType that needs arguments (structured, parametric)
            return None
    if name == "scalar" and module != "numpy":
        return scalar
    if name == "_reconstruct" and module != "numpy":
        return reconstruct
    if module == "numpy" and name == "ndarray":
        return _NDARRAY_MARKER
    if module == "numpy" and name == "dtype":
        return np.dtype  # a dtype alone allocates nothing; arrays and scalars check theirs
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


def _legacy_format(head: bytes) -> Optional[str]:
    """Which legacy torch format ``head`` (the first 512 bytes) starts, if any."""
    if head.startswith(_LEGACY_MAGIC):
        return "raw-pickle"
    try:
        tarfile.TarInfo.frombuf(head[:tarfile.BLOCKSIZE], tarfile.ENCODING, "surrogateescape")
    except (tarfile.TarError, ValueError):
        return None
    return "tar"


def _storage_record(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def check_zip_container(path: str | Path, zf: zipfile.ZipFile) -> None:
    """Refuse a zip whose records would make torch read (or inflate) more than the file justifies.

    Checked from the central directory alone, before any record is read: every record lies within
    the file; a stored record declares as many bytes as it holds; records torch reads into memory
    (all but the tensor storages) stay under :data:`MAX_RECORD_BYTES`, and a deflated one within
    :data:`MAX_INFLATE_RATIO` of its compressed size; tensor storages, which are memory-mapped,
    are stored uncompressed. torch's reader allocates exactly the declared size of a record and
    never inflates past it, so the declared sizes bound what it reads.

    Raises:
        CheckpointError: naming the first offending record.
    """
    file_size = os.path.getsize(path)
    for info in zf.infolist():
        name = info.filename
        if info.header_offset + info.compress_size > file_size:
            raise CheckpointError(f"{path}: zip record {name!r} extends past the end of the file (truncated or corrupt)")
        if info.compress_type == zipfile.ZIP_STORED:
            if info.file_size != info.compress_size:
                raise CheckpointError(f"{path}: zip record {name!r} is stored uncompressed but declares "
                                      f"{info.file_size} bytes for {info.compress_size} (corrupt)")
        elif _storage_record(name):
            raise CheckpointError(f"{path}: tensor record {name!r} is compressed; torch writes (and memory-maps) "
                                  "tensor data uncompressed: re-save the checkpoint with torch.save")
        elif info.file_size > MAX_INFLATE_RATIO * max(info.compress_size, 1):
            raise CheckpointError(f"{path}: zip record {name!r} would inflate {info.compress_size} bytes to "
                                  f"{info.file_size} (more than {MAX_INFLATE_RATIO}x: a zip bomb or a corrupt file)")
        if not _storage_record(name) and info.file_size > MAX_RECORD_BYTES:
            raise CheckpointError(f"{path}: zip record {name!r} declares {info.file_size} bytes, more than the "
                                  f"{MAX_RECORD_BYTES} a checkpoint's pickle or metadata may take")


def load_pth(path: str | Path) -> Any:
    """Unpickle a torch ``.pth`` file with the allow-list (tensors on CPU, memory-mapped).

    Only torch's zip format (torch >= 1.6, what every current checkpoint uses) is read; the zip is
    checked by :func:`check_zip_container` first.

    Raises:
        UnsafeCheckpointError: the pickle references anything outside the allow-list.
        CheckpointError (a ``ValueError``): the file is a TorchScript archive, a legacy-format
            checkpoint, a hostile or corrupt zip, or not a torch checkpoint.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
    if not head.startswith(b"PK\x03\x04"):  # torch's own test for its zip format
        legacy = _legacy_format(head)
        if legacy is not None:
            raise CheckpointError(f"{path} is a legacy torch checkpoint ({legacy} format, torch < 1.6), which is "
                                  "not read (its reader extracts files and trusts declared sizes): load and re-save "
                                  "it with torch.save in a trusted environment")
        raise CheckpointError(f"{path} is not a readable torch checkpoint: not a torch zip archive")
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_container(path, zf)
            names = zf.namelist()
    except CheckpointError:
        raise
    except Exception as e:  # BadZipFile, struct or OS errors of a corrupt central directory
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {e}") from e
    if any(n.endswith("constants.pkl") for n in names):
        raise CheckpointError(f"{path} is a TorchScript archive, not a state-dict checkpoint")
    try:
        # weights_only=False only because a custom pickle module is given: every global still goes
        # through _RestrictedUnpickler.find_class, which refuses anything not on the allow-list.
        # mmap=True also keeps torch off its legacy reader for anything that is not its zip format.
        return torch.load(path, map_location="cpu", pickle_module=_safe_pickle_module, weights_only=False, mmap=True)
    except (UnsafeCheckpointError, CheckpointError):
        raise
    except (MemoryError, RecursionError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint: its pickle is too large or too deeply "
                              f"nested ({type(e).__name__})") from e
    except Exception as e:  # anything the pickle's data makes torch or an allowed constructor raise
        raise CheckpointError(f"{path} is not a readable torch checkpoint: {type(e).__name__}: {e}") from e


class _PlainWalk:
    """One :func:`to_plain` conversion: memoised by identity, bounded in depth and expanded size."""

    def __init__(self, max_nodes: int) -> None:
        self.max_nodes = max_nodes
        self.done: dict[int, tuple[Any, int]] = {}  # id -> (converted, expanded size)
        self.keep: list[Any] = []  # the converted objects, so that their ids stay unique
        self.visited = 0

    def convert(self, obj: Any, depth: int) -> tuple[Any, int]:
        """``(plain value, nodes it expands to)``."""
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if depth > 100:
            raise CheckpointError("config nesting too deep (more than 100 levels, or a cycle)")
        self.visited += 1
        if self.visited > self.max_nodes:
            raise CheckpointError(f"config too large: more than {self.max_nodes} objects")
        out, size = self._convert(obj, depth + 1)
        if size > self.max_nodes:
            raise CheckpointError(f"config too large: its shared sub-objects expand to more than "
                                  f"{self.max_nodes} nodes")
        self.done[key] = (out, size)
        self.keep.append(obj)
        return out, size

    def _items(self, pairs: Any, depth: int) -> tuple[list[tuple[Any, Any]], int]:
        out, size = [], 1
        for k, v in pairs:
            value, n = self.convert(v, depth)
            out.append((k, value))
            size += n
        return out, size

    def _values(self, values: Any, depth: int) -> tuple[list[Any], int]:
        pairs, size = self._items(((None, v) for v in values), depth)
        return [v for _, v in pairs], size

    def _convert(self, obj: Any, depth: int) -> tuple[Any, int]:
        if isinstance(obj, Inert):
            return self._convert_inert(obj, depth)
        if isinstance(obj, dict):
            pairs, size = self._items(obj.items(), depth)
            return (collections.OrderedDict(pairs) if isinstance(obj, collections.OrderedDict) else dict(pairs)), size
        if isinstance(obj, (list, tuple)):
            values, size = self._values(obj, depth)
            return type(obj)(values), size
        if isinstance(obj, _numpy_classes()[0]):
            return obj.view(obj.__class__.__mro__[1]), 1  # a checked array as a plain numpy array
        return obj, 1

    def _convert_inert(self, obj: Inert, depth: int) -> tuple[Any, int]:
        name = obj._qualname
        state = obj.__dict__.get("_state")
        content = state.get("_content") if isinstance(state, dict) else None
        if name.endswith("ListConfig"):
            return self._values(content, depth) if isinstance(content, list) else self.convert(content, depth)
        if name.endswith("DictConfig"):
            if not isinstance(content, dict):
                return self.convert(content, depth)
            pairs, size = self._items(content.items(), depth)
            return dict(pairs), size
        if name.startswith("omegaconf.nodes") or name.endswith("Node"):
            return self.convert(state.get("_val"), depth) if isinstance(state, dict) else (None, 1)
        if name == "argparse.Namespace":
            pairs, size = self._items((state or {}).items() if isinstance(state, dict) else (), depth)
            return dict(pairs), size
        if name == "typing.Any":
            return None, 1
        if isinstance(state, dict):
            pairs, size = self._items(((k, v) for k, v in state.items() if not str(k).startswith("_")), depth)
            return dict(pairs), size
        return None, 1


def to_plain(obj: Any, max_nodes: Optional[int] = None) -> Any:
    """Convert inert config stand-ins (DictConfig, ListConfig, value nodes, Namespace) to plain data.

    Tensors and other values pass through unchanged. An object reached several times is converted
    once (the result shares it), so the work is linear in the pickle; the result's expanded size
    (every reference counted) is bounded by ``max_nodes`` (default :data:`MAX_PLAIN_NODES`), so
    walking it later is bounded too.

    Raises:
        CheckpointError: deeper than 100 levels (or cyclic), or larger than ``max_nodes``.
    """
    return _PlainWalk(MAX_PLAIN_NODES if max_nodes is None else max_nodes).convert(obj, 0)[0]
