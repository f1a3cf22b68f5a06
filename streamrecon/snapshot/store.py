"""Snapshot directories on disk: versioned, checksummed, written atomically, the last good ones kept.

Layout of a snapshot root (``--snapshot DIR``; ``serve``: ``<output-dir>/snapshots/<stream>/``)::

    DIR/LATEST                 the name of the newest complete snapshot (replaced atomically)
    DIR/snap-<UTC time>-f00000120/  an automatic snapshot (120 frames processed)
        manifest.json          format, version, what it holds, sha256 + size of every other file
        state.json             the stream's state tree (see streamrecon.snapshot.codec)
        tensors.safetensors    every array and tensor of the tree
    DIR/<name>/                a named snapshot (``save_snapshot``): never pruned
    DIR/.tmp-*/                a write in progress (or one a crash interrupted: removed later)

A write goes to a ``.tmp-`` directory (each file fsynced), then ``manifest.json`` last, then the
directory is renamed into place and ``LATEST`` replaced (both fsynced): a crash at any moment
leaves every earlier snapshot and ``LATEST`` as they were. Loading checks the format, the version
and every file's size and checksum before anything is parsed; a damaged, foreign or truncated
snapshot is refused with :class:`SnapshotError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..fileio import confine

__all__ = ["SnapshotError", "SnapshotStore", "SnapshotData", "FORMAT", "VERSION", "valid_name", "valid_user_name",
           "read_snapshot", "read_latest_good", "resolve_snapshot"]

_logger = logging.getLogger(__name__)
FORMAT = "streamrecon-snapshot"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FILES = ("state.json", "tensors.safetensors")
_AUTO = re.compile(r"snap-\d{8}T\d{12}-f\d{8,}")  # the automatic snapshots' names (the only ones pruned)


class SnapshotError(ValueError):
    """A snapshot that cannot be written or loaded; the message names the snapshot and the problem."""


def valid_name(name: Any) -> bool:
    """A snapshot name: letters, digits, ``_ . -``, 1..64 characters, not starting with a dot."""
    return isinstance(name, str) and bool(_NAME.fullmatch(name)) and ".." not in name and name != "LATEST"


def valid_user_name(name: Any) -> bool:
    """A name a user may give (``save_snapshot``): a :func:`valid_name` that is not an automatic one's
    (``snap-...``, pruned) and not ``LATEST``."""
    return valid_name(name) and not name.startswith("snap-")


@dataclass(frozen=True)
class SnapshotData:
    """A verified snapshot read into memory (nothing applied yet).

    Attributes:
        path: its directory. manifest: ``manifest.json``. state: the JSON tree of ``state.json``.
        tensors: ``name -> torch.Tensor`` (CPU) of ``tensors.safetensors``.
    """

    path: Path
    manifest: dict
    state: Any
    tensors: dict


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, data: bytes) -> dict:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class SnapshotStore:
    """Args:
        root: the snapshot root directory (created on the first write).
        keep: automatic snapshots kept (the newest; named ones are never pruned).
        boundary: a directory writes must stay inside (``serve``: its output directory): a snapshot root
            that a symlink carries outside it is refused (:class:`~streamrecon.fileio.UnsafePathError`).
    """

    def __init__(self, root: str | Path, keep: int = 2, boundary: Optional[str | Path] = None) -> None:
        if keep < 1:
            raise ValueError("keep must be >= 1")
        self.root = Path(root)
        self.keep = keep
        self.boundary = None if boundary is None else Path(boundary)

    # ------------------------------------------------------------------------------------------ write

    def write(self, state: Any, tensors: dict, meta: dict, name: Optional[str] = None) -> Path:
        """Write one snapshot atomically; returns its directory.

        Args:
            state: the JSON tree; tensors: its tensors; meta: what the manifest says besides the files.
            name: a name (``save_snapshot``); default ``snap-<UTC time>-f<frames processed>`` (pruned to ``keep``).
        """
        from safetensors.torch import save

        if name is not None and not valid_user_name(name):
            raise SnapshotError(f"snapshot name {str(name)[:80]!r}: use 1-64 letters, digits, '_', '.', '-' "
                                "(not LATEST, not starting with 'snap-': those are the automatic ones)")
        if self.boundary is not None:
            confine(self.boundary, self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_tmp()
        auto = name is None
        if auto:
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:].replace(".", "")
            name = f"snap-{stamp}-f{int(meta.get('frames', 0)):08d}"  # sorts by time, across runs
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))
        try:
            files = {"tensors.safetensors": _write_file(tmp / "tensors.safetensors", save(tensors) if tensors else
                                                        save({})),
                     "state.json": _write_file(tmp / "state.json", json.dumps(state, separators=(",", ":")).encode())}
            manifest = {"format": FORMAT, "version": VERSION, "name": name, "created": time.time(), **meta,
                        "files": files}
            _write_file(tmp / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())
            _fsync_dir(tmp)
            final = self.root / name
            if final.exists():  # a named snapshot overwritten: the old copy is kept aside until the new one is in
                old = self.root / f".old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                _fsync_dir(self.root)
                os.replace(tmp, final)
                _fsync_dir(self.root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if auto:
            self._set_latest(name)
            self._prune()
        _logger.info("snapshot %s written (%.1f MB, %.0f ms)", final,
                     sum(f["bytes"] for f in files.values()) / 1e6, 1e3 * (time.perf_counter() - t0))
        return final

    def _set_latest(self, name: str) -> None:
        tmp = self.root / f".tmp-LATEST-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / "LATEST")
        _fsync_dir(self.root)

    def _clean_tmp(self) -> None:
        """Remove what interrupted writes left behind; an overwritten snapshot whose replacement never
        landed (a crash between the two renames) is put back."""
        for p in self.root.glob(".tmp-*"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        for p in self.root.glob(".old-*"):
            back = self.root / p.name[len(".old-"):]
            if back.exists():
                shutil.rmtree(p, ignore_errors=True)
            else:
                os.replace(p, back)

    def _prune(self) -> None:
        autos = sorted(p for p in self.root.glob("snap-*") if p.is_dir() and _AUTO.fullmatch(p.name))
        latest = self.latest_name()
        for p in autos[:-self.keep]:
            if p.name != latest:
                shutil.rmtree(p, ignore_errors=True)

    # ------------------------------------------------------------------------------------------ read

    def latest_name(self) -> Optional[str]:
        try:
            name = (self.root / "LATEST").read_text().strip()
        except OSError:
            return None
        return name if valid_name(name) and (self.root / name / "manifest.json").is_file() else None

    def names(self) -> list[str]:
        """Complete snapshots (with a manifest), oldest first by creation."""
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            try:
                if p.is_dir() and valid_name(p.name) and (p / "manifest.json").is_file():
                    out.append((p.stat().st_mtime, p.name))
            except OSError:  # pruned meanwhile
                continue
        return [n for _, n in sorted(out)]

    def list(self) -> list[dict]:
        """Name, frames and creation time of each complete snapshot (the manifests are read, not verified)."""
        rows = []
        for n in self.names():
            try:
                m = json.loads((self.root / n / "manifest.json").read_text())
                rows.append({"name": n, "frames": m.get("frames"), "created": m.get("created"),
                             "bytes": sum(int(f.get("bytes") or 0) for f in m.get("files", {}).values()),
                             "latest": n == self.latest_name()})
            except (OSError, ValueError, AttributeError, TypeError, RecursionError):
                rows.append({"name": n, "damaged": True})
        return rows

    def path_of(self, name: Optional[str] = None) -> Path:
        """A snapshot's directory: ``name``, else the latest (``LATEST``, else the newest complete one)."""
        if name is not None:
            if not valid_name(name):
                raise SnapshotError(f"snapshot name {str(name)[:80]!r} is not valid")
            p = self.root / name
            if not (p / "manifest.json").is_file():
                raise SnapshotError(f"no snapshot {name!r} in {self.root} (have: {', '.join(self.names()) or 'none'})")
            return p
        latest = self.latest_name()
        if latest is None:
            names = self.names()
            if not names:
                raise SnapshotError(f"{self.root}: no complete snapshot here")
            latest = names[-1]
        return self.root / latest


def _older_hint(p: Path) -> str:
    root = p.parent
    others = [n for n in SnapshotStore(root).names() if n != p.name] if (root / "LATEST").exists() else []
    return f" (other snapshots there: {', '.join(others[-3:])})" if others else ""


def resolve_snapshot(path: str | Path) -> Path:
    """``path`` itself when it is a snapshot (has ``manifest.json``), else the latest one inside it."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    if not p.exists():
        raise SnapshotError(f"snapshot not found: {p}")
    return SnapshotStore(p).path_of()


def read_snapshot(path: str | Path) -> SnapshotData:
    """Read and verify a snapshot (see the module docstring); nothing is applied."""
    from safetensors.torch import load

    p = resolve_snapshot(path)
    try:
        manifest = json.loads((p / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SnapshotError(f"{p}/manifest.json is unreadable: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        fmt = manifest.get("format") if isinstance(manifest, dict) else None
        raise SnapshotError(f"{p}: not a streamrecon snapshot (manifest format {str(fmt)[:40]!r})")
    if manifest.get("version") != VERSION:
        raise SnapshotError(f"{p}: snapshot format version {manifest.get('version')!r}; this streamrecon reads "
                            f"version {VERSION} only")
    files = manifest.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES) or not all(
            isinstance(f, dict) and isinstance(f.get("bytes"), int) and isinstance(f.get("sha256"), str)
            for f in files.values()):
        raise SnapshotError(f"{p}: the manifest lists files {sorted(files) if isinstance(files, dict) else files}, "
                            f"expected {list(_FILES)}")
    blobs = {}
    for fname in _FILES:
        fp = p / fname
        want = files[fname]
        try:
            data = fp.read_bytes()
        except OSError as e:
            raise SnapshotError(f"{fp} is missing or unreadable: {e}") from None
        if len(data) != want.get("bytes"):
            raise SnapshotError(f"{fp} is truncated or padded: {len(data)} bytes, the manifest says "
                                f"{want.get('bytes')}{_older_hint(p)}")
        if hashlib.sha256(data).hexdigest() != want.get("sha256"):
            raise SnapshotError(f"{fp} is corrupted: its sha256 does not match the manifest{_older_hint(p)}")
        blobs[fname] = data
    try:
        state = json.loads(blobs["state.json"])
        tensors = load(blobs["tensors.safetensors"])
    except Exception as e:  # checksums matched, so this is a writer bug or a forged file
        raise SnapshotError(f"{p}: state does not parse: {type(e).__name__}: {e}") from None
    return SnapshotData(p, manifest, state, tensors)


def read_latest_good(root: str | Path) -> tuple[SnapshotData, list[str]]:
    """The newest snapshot of ``root`` that loads (``LATEST`` first, then the others, newest first), and
    the errors of the damaged ones passed over (``serve --restore``: a robot's stream continues from
    the last good state). Raises :class:`SnapshotError` when none loads."""
    store = SnapshotStore(root)
    order = [n for n in [store.latest_name()] if n] + [n for n in reversed(store.names()) if n != store.latest_name()]
    errors: list[str] = []
    for n in order:
        try:
            return read_snapshot(store.root / n), errors
        except SnapshotError as e:
            errors.append(str(e))
    raise SnapshotError(f"{root}: no loadable snapshot ({'; '.join(errors) or 'none here'})")
