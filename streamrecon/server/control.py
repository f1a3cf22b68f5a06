"""Control requests of the node (JSON request -> JSON reply, arrays as extra parts).

``ping``, ``stats``, ``reset`` (one stream), ``query_raymap`` (a virtual camera -> pointmap, confidence,
colours; the stream's state is untouched), ``save_map`` (only inside the node's output directory),
``save_snapshot`` / ``load_snapshot`` / ``list_snapshots`` (snapshots are named, never given as paths:
they live in ``<output-dir>/snapshots/<stream>/``), ``close_stream``, ``shutdown``. A malformed or
unknown request gets ``{"ok": false, "error": ...}``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .. import __version__
from ..fileio import UnsafePathError, confine
from ..wire import PROTOCOL_VERSION, WireError, decode_request, encode_reply

if TYPE_CHECKING:
    from .node import Node

__all__ = ["handle_request", "run_deferred", "Deferred", "COMMANDS"]

_logger = logging.getLogger(__name__)


class ControlError(ValueError):
    """A request the node understood but cannot carry out (the text goes back to the client)."""


@dataclass(frozen=True)
class Deferred:
    """A command whose slow part runs off the frame loop (a probe, writing a map): the request was
    checked and everything it reads was taken on the loop thread; ``work()`` returns the reply parts
    and runs in the node's control worker (:func:`run_deferred`)."""

    cmd: str
    work: Callable[[], list]


def run_deferred(d: Deferred) -> tuple[list, bool]:
    """``(reply parts, failed)`` of a deferred command (in the control worker); never raises."""
    try:
        return d.work(), False
    except ControlError as e:
        return encode_reply(False, cmd=d.cmd, error=str(e)), True
    except Exception as e:
        _logger.exception("control command %s failed", d.cmd)
        return encode_reply(False, cmd=d.cmd, error=f"internal error: {e}"), True


def _stream(node: "Node", req: dict):
    sid = req.get("stream_id")
    if not isinstance(sid, str):
        raise ControlError("this command needs a 'stream_id'")
    s = node.sessions.get(sid)
    if s is None:
        raise ControlError(f"no open stream {sid!r} (open: {sorted(node.sessions)[:20]})")
    return s


def _matrix(req: dict, name: str, shape: tuple, required: bool) -> Any:
    if req.get(name) is None:
        if required:
            raise ControlError(f"missing {name!r}")
        return None
    try:
        a = np.asarray(req[name], dtype=np.float64)
    except (TypeError, ValueError):
        raise ControlError(f"{name!r} must be numbers") from None
    if a.shape != shape or not np.isfinite(a).all():
        raise ControlError(f"{name!r} must be a finite {shape[0]}x{shape[1]} matrix")
    return a


def _export_dir(node: "Node", sid: str, relative: Any) -> Path:
    """``<output-dir>/exports/<stream>/<relative>`` (``None``: the folder itself): a client's ``save_map``
    lands in its own stream's exports folder, never in another stream's files or its own live ones
    (letters, digits, ``_ . -`` per component)."""
    from ..snapshot import valid_name

    if relative is None:
        return node.output_dir / "exports" / sid
    if not isinstance(relative, str) or not relative or len(relative) > 256:
        raise ControlError("path must be a non-empty relative path (at most 256 characters)")
    components = relative.split("/")
    if not all(valid_name(c) for c in components):
        raise ControlError(f"path {relative[:80]!r}: each component must be 1-64 letters, digits, '_', '.', '-' "
                           "(no '..', no absolute paths); it is a folder under exports/<stream>/")
    try:
        target = confine(node.output_dir, node.output_dir / "exports" / sid / Path(*components))
    except UnsafePathError:
        raise ControlError(f"path {relative[:80]!r} leaves the output directory") from None
    if target.exists() and not target.is_dir():
        raise ControlError(f"path {relative[:80]!r} is a file, not a folder")
    return target


def _ping(node: "Node", req: dict) -> list:
    return encode_reply(True, cmd="ping", version=__version__, protocol=PROTOCOL_VERSION)


def _stats(node: "Node", req: dict) -> list:
    return encode_reply(True, cmd="stats", node=node.stats(), streams={k: s.status() for k, s in node.sessions.items()})


def _reset(node: "Node", req: dict) -> list:
    s = _stream(node, req)
    keep, clear = req.get("keep_trajectory", True), req.get("clear_map", False)
    if not isinstance(keep, bool) or not isinstance(clear, bool):
        raise ControlError("keep_trajectory and clear_map must be true or false")
    s.engine.reset(keep_trajectory=keep)
    if clear:
        s.gmap.clear()
    return encode_reply(True, cmd="reset", stream_id=s.stream_id, segment=s.engine.segment)


def _query_raymap(node: "Node", req: dict) -> list:
    s = _stream(node, req)
    T = _matrix(req, "T_wc", (4, 4), True)
    K = _matrix(req, "K", (3, 3), False)
    size = req.get("size")
    hw = None
    if size is not None:
        if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and 16 <= v <= 4096 and v % 16 == 0
                                                                 for v in size)):
            raise ControlError("size must be [H, W], multiples of 16 between 16 and 4096")
        hw = (size[0], size[1])
        if hw[0] * hw[1] > node.cfg.max_probe_pixels:
            raise ControlError(f"size {hw[0]}x{hw[1]} is over the node's probe budget of {node.cfg.max_probe_pixels} "
                               "pixels (--max-probe-pixels): a probe stalls every stream while it runs")
    elif s.engine.last_hw is not None and s.engine.last_hw[0] * s.engine.last_hw[1] > node.cfg.max_probe_pixels:
        raise ControlError("the stream's frame size is over the node's probe budget (--max-probe-pixels): give a size")
    if (K is None or hw is None) and s.engine.last_K is None:
        raise ControlError("the stream has no frame yet: give both K and size")
    from ..probe import valid_probe_name

    name = req.get("name", "query")
    if not valid_probe_name(name):
        raise ControlError("'name' must be 1-64 letters, digits, '_', '.', '-' (it names the probe's files)")
    compute = s.pipeline.probe_later(T, K, hw, name=name)  # the state as of now; the work off the frame loop

    def work() -> list:
        probe = compute()
        return encode_reply(True, cmd="query_raymap", stream_id=s.stream_id, K=probe.K.reshape(-1).tolist(),
                            arrays={"points_cam": probe.points_cam, "points_world": probe.points_world,
                                    "conf": probe.conf, "rgb": probe.rgb, "pose_estimate": probe.pose_estimate,
                                    **probe.map_arrays()})

    return Deferred("query_raymap", work)


def _save_map(node: "Node", req: dict) -> list:
    """``{"stream_id", "path"?}``: trajectory, map and status now, into ``<output-dir>/exports/<stream>/``
    (or ``path`` under it) -- never into the stream's live folder, whose files its pipeline owns."""
    s = _stream(node, req)
    target = _export_dir(node, s.stream_id, req.get("path"))
    try:
        write = s.export_later(target, node.output_dir)  # the map and trajectory as of now; written off the loop
    except OSError as e:
        raise ControlError(f"map not written: {e}") from None

    def work() -> list:
        try:
            files = write()
        except OSError as e:
            raise ControlError(f"map not written: {e}") from None
        return encode_reply(True, cmd="save_map", stream_id=s.stream_id, files=files)

    return Deferred("save_map", work)


def _snapshot_name(req: dict, new: bool):
    """The request's snapshot ``name`` (``new``: one a client may give; else any existing one's)."""
    from ..snapshot import valid_name, valid_user_name

    name = req.get("name")
    if name is not None and not (valid_user_name if new else valid_name)(name):
        raise ControlError("'name' must be a snapshot name: 1-64 letters, digits, '_', '.', '-' (not a path"
                           + (", not LATEST, not starting with 'snap-')" if new else ")"))
    return name


def _stream_id_field(req: dict, key: str, required: bool = True):
    from ..wire import valid_stream_id

    sid = req.get(key)
    if sid is None and not required:
        return None
    if not valid_stream_id(sid):
        raise ControlError(f"{key!r} must be a stream id (letters, digits and . _ : @ -, at most 128)")
    return sid


def _save_snapshot(node: "Node", req: dict) -> list:
    """``{"stream_id", "name"?}``: the stream's whole state now (``name``: kept until overwritten; without
    one, an automatic snapshot, pruned to ``--snapshot-keep``)."""
    from ..snapshot import SnapshotError

    s = _stream(node, req)
    name = _snapshot_name(req, new=True)
    try:
        path = s.pipeline.save_snapshot(name)
    except (SnapshotError, OSError) as e:
        raise ControlError(f"snapshot not written: {e}") from None
    return encode_reply(True, cmd="save_snapshot", stream_id=s.stream_id, name=path.name, frames=s.processed,
                        bytes=sum(f.stat().st_size for f in path.iterdir()))


def _list_snapshots(node: "Node", req: dict) -> list:
    """``{"stream_id"?}``: snapshot names (and frames, size, creation time) of one stream, or of every stream."""
    sid = _stream_id_field(req, "stream_id", required=False)
    if sid is not None:
        return encode_reply(True, cmd="list_snapshots", stream_id=sid, snapshots=node.snapshots(sid).list())
    root = node.output_dir / "snapshots"
    streams = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return encode_reply(True, cmd="list_snapshots", streams={k: node.snapshots(k).list() for k in streams[:200]})


def _load_snapshot(node: "Node", req: dict) -> list:
    """``{"stream_id", "name"?, "from_stream"?}``: the stream continues from a snapshot (its own, or another
    stream's: ``from_stream``; ``name`` omitted: the latest). An open stream is closed first (its files
    written, no snapshot taken); a snapshot that does not load leaves the open stream as it was."""
    from ..snapshot import SnapshotError, read_snapshot

    sid = _stream_id_field(req, "stream_id")
    src = _stream_id_field(req, "from_stream", required=False) or sid
    name = _snapshot_name(req, new=False)
    try:
        data = read_snapshot(node.snapshots(src).path_of(name))
    except SnapshotError as e:
        raise ControlError(str(e)) from None
    old = node.sessions.get(sid)
    lossless = old.lossless if old is not None else node.cfg.lossless
    if old is None and len(node.sessions) >= node.cfg.max_streams:
        raise ControlError("too many streams")
    if old is not None:
        from ..snapshot.state import decode

        try:  # checked against the open stream's pipeline before it is closed
            decode(old.pipeline, data)
        except SnapshotError as e:
            raise ControlError(str(e)) from None
        node.close_stream(sid, final_snapshot=False)
    try:
        s = node.open_session(sid, lossless, data)
    except SnapshotError as e:
        raise ControlError(str(e)) from None
    return encode_reply(True, cmd="load_snapshot", stream_id=sid, name=data.path.name, from_stream=src,
                        frames=s.processed, map_points=len(s.gmap))


def _close_stream(node: "Node", req: dict) -> list:
    s = _stream(node, req)
    return encode_reply(True, cmd="close_stream", stream_id=s.stream_id, files=node.close_stream(s.stream_id))


def _shutdown(node: "Node", req: dict) -> list:
    node.stop()
    return encode_reply(True, cmd="shutdown")


COMMANDS: dict[str, Callable[["Node", dict], list]] = {
    "ping": _ping, "stats": _stats, "reset": _reset, "query_raymap": _query_raymap, "save_map": _save_map,
    "save_snapshot": _save_snapshot, "load_snapshot": _load_snapshot, "list_snapshots": _list_snapshots,
    "close_stream": _close_stream, "shutdown": _shutdown,
}


def handle_request(node: "Node", parts: list) -> "list | Deferred":
    """Reply parts for one request (or a :class:`Deferred` for the node's control worker); never raises."""
    try:
        req = decode_request(parts)
    except WireError as e:
        node.counters["control_errors"] += 1
        return encode_reply(False, error=str(e))
    cmd = req["cmd"]
    handler = COMMANDS.get(cmd)
    if handler is None:
        node.counters["control_errors"] += 1
        return encode_reply(False, cmd=cmd, error=f"unknown command {cmd[:40]!r}; known: {', '.join(COMMANDS)}")
    try:
        return handler(node, req)
    except ControlError as e:
        node.counters["control_errors"] += 1
        return encode_reply(False, cmd=cmd, error=str(e))
    except Exception as e:  # a failing command must not take the node down
        node.counters["control_errors"] += 1
        _logger.exception("control command %s failed", cmd)
        return encode_reply(False, cmd=cmd, error=f"internal error: {e}")
