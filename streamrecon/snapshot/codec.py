"""A pickle-free codec for the state of a stream: a tree of plain values -> JSON + named tensors.

:func:`pack` turns a tree (``None``, bools, ints, floats, strings, lists, tuples, dicts, sets,
deques, ``Counter``, ``array.array``, numpy arrays and scalars, torch tensors, and objects of the
*allow-listed* classes) into a JSON-able structure plus a flat ``name -> torch.Tensor`` dict for
safetensors; :func:`unpack` is its inverse. Nothing is ever executed or imported from the data: a
class is rebuilt only when its name is in the ``classes`` allow-list the caller gives, and only
from the fields that class declares.

A class takes part in one of two ways:

* a dataclass: its fields are packed; it is rebuilt with its constructor;
* any class with ``_snapshot_fields`` (a tuple of attribute names): those attributes are packed
  (or what its ``_snapshot_get()`` returns for them, e.g. arrays trimmed to their used rows); it is
  rebuilt with ``cls.__new__`` and the attributes set, then ``_after_restore()`` is called when the
  class has one (to recreate what is not data: matchers, caches).

Arrays keep their dtype and shape exactly (bit-identical round trip); floats go through JSON's
``repr`` (exact for float64). Unknown types raise :class:`TypeError` naming where they were.
"""

from __future__ import annotations

import array
import dataclasses
from collections import Counter, deque
from typing import Any, Mapping

import numpy as np

__all__ = ["pack", "unpack", "load_fields", "dump_fields", "CodecError"]


class CodecError(ValueError):
    """The data does not decode (a foreign or damaged snapshot): the message names where."""


def _tensor(a):
    import torch

    if isinstance(a, torch.Tensor):
        return a.detach().to("cpu").contiguous().clone()
    a = np.array(a, order="C", copy=True)  # (keeps 0-d arrays 0-d, unlike ascontiguousarray)
    if a.dtype == np.uint16 or a.dtype == np.uint32 or a.dtype == np.uint64:  # torch lacks them: keep the bits
        return torch.from_numpy(a.view({2: np.int16, 4: np.int32, 8: np.int64}[a.itemsize]))
    if a.dtype.kind not in "biuf" and a.dtype != np.bool_:
        raise TypeError(f"array of dtype {a.dtype} cannot be stored")
    return torch.from_numpy(a)


class _Packer:
    def __init__(self, classes: Mapping[str, type]) -> None:
        self.by_type = {cls: name for name, cls in classes.items()}
        self.tensors: dict[str, Any] = {}

    def _key(self, path: str) -> str:
        key = path or "root"
        n = 1
        while key in self.tensors:
            n += 1
            key = f"{path}#{n}"
        return key

    def __call__(self, v: Any, path: str) -> Any:
        import torch

        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return int(v)
        if isinstance(v, np.bool_):
            return bool(v)
        if isinstance(v, (float, np.floating)):
            f = float(v)
            return f if np.isfinite(f) else {"$f": repr(f)}
        if isinstance(v, np.ndarray):
            key = self._key(path)
            self.tensors[key] = _tensor(v)
            return {"$a": key, "dtype": v.dtype.str}
        if isinstance(v, torch.Tensor):
            key = self._key(path)
            self.tensors[key] = _tensor(v)
            return {"$t": key}
        if isinstance(v, array.array):
            key = self._key(path)
            self.tensors[key] = _tensor(np.frombuffer(v.tobytes(), dtype=v.typecode) if len(v) else
                                        np.zeros(0, dtype=v.typecode))
            return {"$aa": key, "typecode": v.typecode}
        if isinstance(v, Counter):
            return {"$c": [[self(k, f"{path}.k{n}"), self(x, f"{path}.{n}")] for n, (k, x) in enumerate(v.items())]}
        if isinstance(v, deque):
            return {"$q": [self(x, f"{path}.{n}") for n, x in enumerate(v)], "maxlen": v.maxlen}
        if isinstance(v, dict):
            return {"$d": [[self(k, f"{path}.k{n}"), self(x, f"{path}.{k}" if isinstance(k, (str, int)) else f"{path}.{n}")]
                           for n, (k, x) in enumerate(v.items())]}
        if isinstance(v, list):
            return [self(x, f"{path}.{n}") for n, x in enumerate(v)]
        if isinstance(v, tuple):
            return {"$tu": [self(x, f"{path}.{n}") for n, x in enumerate(v)]}
        if isinstance(v, (set, frozenset)):
            return {"$s": [self(x, f"{path}.{n}") for n, x in enumerate(sorted(v, key=repr))]}
        name = self.by_type.get(type(v))
        if name is None:
            raise TypeError(f"{path}: {type(v).__name__} cannot be stored in a snapshot")
        if dataclasses.is_dataclass(v):
            return {"$o": name, "f": {f.name: self(getattr(v, f.name), f"{path}.{f.name}") for f in dataclasses.fields(v)}}
        vals = v._snapshot_get() if hasattr(v, "_snapshot_get") else {a: getattr(v, a) for a in type(v)._snapshot_fields}
        return {"$o": name, "f": {a: self(x, f"{path}.{a}") for a, x in vals.items()}}


class _Unpacker:
    def __init__(self, tensors: Mapping[str, Any], classes: Mapping[str, type]) -> None:
        self.tensors, self.classes = tensors, classes

    def _get(self, key: Any, path: str):
        if not isinstance(key, str) or key not in self.tensors:
            raise CodecError(f"{path}: tensor {key!r} is missing")
        return self.tensors[key]

    def __call__(self, v: Any, path: str) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, list):
            return [self(x, f"{path}.{n}") for n, x in enumerate(v)]
        if not isinstance(v, dict) or len(v) == 0:
            raise CodecError(f"{path}: unexpected value {str(v)[:60]}")
        tag = next(iter(v))
        if tag == "$f":
            return float(v["$f"])
        if tag == "$a":
            t = self._get(v["$a"], path)
            dt = np.dtype(v.get("dtype", "f4"))
            a = t.numpy()
            return a.view(dt) if a.dtype != dt and a.dtype.itemsize == dt.itemsize else a.astype(dt, copy=False)
        if tag == "$t":
            return self._get(v["$t"], path)
        if tag == "$aa":
            return array.array(v["typecode"], self._get(v["$aa"], path).numpy().tobytes())
        if tag == "$c":
            return Counter({self(k, path): self(x, path) for k, x in v["$c"]})
        if tag == "$q":
            return deque((self(x, f"{path}.{n}") for n, x in enumerate(v["$q"])), maxlen=v.get("maxlen"))
        if tag == "$d":
            return {_hashable(self(k, path)): self(x, f"{path}.{k}") for k, x in v["$d"]}
        if tag == "$tu":
            return tuple(self(x, f"{path}.{n}") for n, x in enumerate(v["$tu"]))
        if tag == "$s":
            return {_hashable(self(x, path)) for x in v["$s"]}
        if tag == "$o":
            cls = self.classes.get(v["$o"])
            if cls is None:
                raise CodecError(f"{path}: class {str(v['$o'])[:40]!r} is not one a snapshot may hold")
            f = v.get("f")
            if not isinstance(f, dict):
                raise CodecError(f"{path}: object without fields")
            vals = {k: self(x, f"{path}.{k}") for k, x in f.items()}
            if dataclasses.is_dataclass(cls):
                names = {x.name for x in dataclasses.fields(cls)}
                if set(vals) != names:
                    raise CodecError(f"{path}: {cls.__name__} fields {sorted(vals)} != {sorted(names)}")
                return cls(**vals)
            want = set(cls._snapshot_fields)
            if set(vals) != want:
                raise CodecError(f"{path}: {cls.__name__} fields {sorted(vals)} != {sorted(want)}")
            obj = cls.__new__(cls)
            for k, x in vals.items():
                setattr(obj, k, x)
            if hasattr(obj, "_after_restore"):
                obj._after_restore()
            return obj
        raise CodecError(f"{path}: unknown tag {tag[:20]!r}")


def _hashable(x: Any) -> Any:
    return tuple(_hashable(y) for y in x) if isinstance(x, (list, tuple)) else x


def pack(tree: Any, classes: Mapping[str, type], prefix: str = "") -> tuple[Any, dict[str, Any]]:
    """``(json_tree, tensors)`` of ``tree``; tensor names start with ``prefix``."""
    p = _Packer(classes)
    return p(tree, prefix), p.tensors


def unpack(json_tree: Any, tensors: Mapping[str, Any], classes: Mapping[str, type], path: str = "") -> Any:
    """The inverse of :func:`pack` (raises :class:`CodecError` on anything it does not expect)."""
    try:
        return _Unpacker(tensors, classes)(json_tree, path or "snapshot")
    except CodecError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise CodecError(f"{path or 'snapshot'}: {type(e).__name__}: {e}") from None


def dump_fields(obj: Any, names: tuple[str, ...]) -> dict[str, Any]:
    """The attributes ``names`` of a live object (engine, tracker, ...), for :func:`pack`."""
    return {n: getattr(obj, n) for n in names}


def load_fields(obj: Any, values: Mapping[str, Any], names: tuple[str, ...], what: str) -> None:
    """Set the attributes ``names`` of a live object from unpacked ``values`` (all of them, or none)."""
    if not isinstance(values, dict) or set(values) != set(names):
        got = sorted(values) if isinstance(values, dict) else type(values).__name__
        raise CodecError(f"{what}: expected fields {sorted(names)}, got {got}")
    for n in names:
        setattr(obj, n, values[n])
