"""Atomic file writes: write to a temporary file in the target directory, then rename over.

A reader (or a crash, or Ctrl-C) never sees a half-written file: it sees the old file or the new
one. Files get the usual permissions (``0o666`` minus the umask), not ``mkstemp``'s ``0o600``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_open", "confine", "UnsafePathError"]


class UnsafePathError(OSError):
    """A write that would land outside its root directory (``..``, an absolute path, or a symlink that
    leads out). An ``OSError``, so every place that reports a failed write reports this one too."""


def confine(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` itself if it stays inside ``root`` once every symlink on the way is followed; else
    :class:`UnsafePathError`. Both are taken as given (absolute, or relative to the current
    directory, like every path of the node). The one check every write of the node goes through
    (``root`` is the output directory of ``run`` / ``serve``)."""
    target = Path(path)
    if "\x00" in str(target) or "\x00" in str(root):
        raise UnsafePathError(f"{str(path)[:80]!r}: a path with a NUL byte")
    try:
        base, resolved = Path(root).resolve(), target.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python < 3.13)
        raise UnsafePathError(f"{target}: cannot be resolved ({e})") from None
    if resolved != base and base not in resolved.parents:
        raise UnsafePathError(f"{target} leads outside the output directory {base} (to {resolved})")
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` atomically."""
    if mode not in ("w", "wb"):
        raise ValueError("atomic_open supports 'w' and 'wb'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)
