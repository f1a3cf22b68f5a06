"""A stream's whole state <-> a snapshot: what :class:`~streamrecon.pipeline.StreamPipeline` holds.

Captured (between two frames, in the frame loop; the arrays are copied, so the stream goes on while
a writer thread saves them):

* **engine**: the recurrent state (state tokens, LocalMemory, the fresh flag), the segment base
  pose and counters, the last intrinsics / pose / model input (for resets and probes);
* **pipeline**: the global map (every voxel aggregate and its index, exactly), the trajectory, the
  loop-closure row epochs, counters, the frames buffered for a map swap;
* **geometry stage**: the focal history, tracking counters, the correction epochs, and the tracker
  (tracks, keyframes, the local-BA window and a result waiting to be applied) and the loop closer
  (the keyframe database with clouds, landmarks and ORB descriptors, the place database and its
  vocabulary, loop edges, corrections and maps it finished but the stream has not taken yet).

Not captured: timing statistics, sinks, threads. With ``--deterministic`` a resumed stream equals
the uninterrupted one exactly; with the background threads, a bundle adjustment still running at the
snapshot is not in it (the stream goes on without that one result).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .codec import CodecError, dump_fields, load_fields, pack, unpack
from .store import SnapshotData, SnapshotError

__all__ = ["capture", "restore", "model_fingerprint", "prefetch_fingerprint", "check_compatible", "snapshot_meta",
           "relocalise_from", "decode"]

_logger = logging.getLogger(__name__)

_ENGINE = ("base", "segment", "processed", "last_K", "last_hw", "last_T_wc")
_PIPELINE = ("processed", "n_errors", "errors", "k_given", "segments_seen", "conf_max", "empty_map_warned",
             "map_rebuilds", "_since_kf", "_map_epoch", "_rows", "_row_epochs", "_unlocalised", "unlocalised_dropped")
_STAGE = ("epoch", "correction_of", "_focals", "states", "track_ms", "_net_prev", "_T_prev", "_map", "localised",
          "reloc_info")
_TRACKER = ("keyframes", "n_keyframes", "_prev", "cur", "kf_px", "X", "geo", "tid", "refined", "n_kf_tracks",
            "T_prev", "kf_T", "kf_index", "scale", "index", "prior_first", "_next_tid", "_win", "_pt_ids", "_pt_X",
            "_epoch", "_ba_ready", "_ba_sum_ms", "_ba_sum_it", "_ba_sum_lat", "ba_stats")
_LOOP = ("db", "order", "places", "loops", "epoch", "_corrections", "_last_closure_at", "stats")


def _classes() -> dict[str, type]:
    from ..mapping.voxel_map import GlobalMap, MapConfig, _Table
    from ..pipeline.trajectory import Trajectory
    from ..slam.local_ba import BAResult
    from ..slam.loop import Correction, KeyframeEntry, MapRebuild, _Stats
    from ..slam.places import BowVocabulary, PlaceDatabase
    from ..slam.sim3 import LoopEdge
    from ..slam.tracker import KeyframeRecord

    return {"GlobalMap": GlobalMap, "MapConfig": MapConfig, "VoxelTable": _Table, "Trajectory": Trajectory,
            "BAResult": BAResult, "Correction": Correction, "KeyframeEntry": KeyframeEntry, "MapRebuild": MapRebuild,
            "LoopStats": _Stats, "BowVocabulary": BowVocabulary, "PlaceDatabase": PlaceDatabase, "LoopEdge": LoopEdge,
            "KeyframeRecord": KeyframeRecord}


_FP_LOCK = threading.Lock()


def model_fingerprint(model) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, bytes; computed once per model object:
    3 s for the 512-DPT model on 2 cores, so a stream with snapshots starts it on a thread at once,
    :func:`prefetch_fingerprint`)."""
    fp = getattr(model, "_streamrecon_fingerprint", None)
    if fp is not None:
        return fp
    with _FP_LOCK:
        fp = getattr(model, "_streamrecon_fingerprint", None)
        return fp if fp is not None else _fingerprint(model)


def prefetch_fingerprint(model) -> None:
    """Compute :func:`model_fingerprint` on a thread (the first snapshot then finds it ready)."""
    if getattr(model, "_streamrecon_fingerprint", None) is None:
        threading.Thread(target=model_fingerprint, args=(model,), name="weights-sha256", daemon=True).start()


def _fingerprint(model) -> str:
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in sorted(model.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    fp = h.hexdigest()
    try:
        model._streamrecon_fingerprint = fp
    except AttributeError:
        pass
    return fp


_MAP_FLAGS = {"voxel_size": "--voxel-size", "max_points": "--max-points", "conf_thresh": "--conf-thresh",
              "budget_policy": "--budget-policy", "pixel_stride": "--pixel-stride"}


def _map_settings(cfg) -> dict:
    return {k: getattr(cfg, k) for k in _MAP_FLAGS}


def snapshot_meta(pipeline, extra: Optional[dict] = None) -> dict:
    """What the manifest records of the stream: frames, weights, the settings a resume must match."""
    e = pipeline.engine
    st = pipeline.stage
    return {"frames": pipeline.processed, "stream_id": pipeline.opt.stream_id,
            "weights": {"sha256": model_fingerprint(e.model), **(pipeline.opt.describe.get("checkpoint") or {})},
            "engine": {"size": e.cfg.size, "policy": e.cfg.policy, "precision": e.cfg.precision,
                       "reset_every": e.cfg.reset_every, "head": e.model.cfg.head_type},
            "backend": st.s.resolved_backend() if st is not None else "none",
            "intrinsics": None if st is None or st.cal is None else np.asarray(st.cal.K).reshape(-1).tolist(),
            "map": _map_settings(pipeline.gmap.cfg),
            "place": st.loop.cfg.place if st is not None and st.loop is not None else None,
            "settings": pipeline.opt.describe.get("config"),  # the run's whole resolved configuration
            **(extra or {})}


def capture(pipeline, extra_meta: Optional[dict] = None) -> tuple[Any, dict, dict]:
    """``(state tree, tensors, manifest meta)`` of a pipeline between two frames (copies; see the module)."""
    e = pipeline.engine
    tree: dict[str, Any] = {
        "engine": {**dump_fields(e, _ENGINE), "tokens": e.state.tokens, "mem": e.state.mem, "fresh": e.state.fresh,
                   "last_input": e._last_input},
        "pipeline": {**dump_fields(pipeline, _PIPELINE), "gmap": pipeline.gmap, "trajectory": pipeline.trajectory},
        "stage": None,
    }
    st = pipeline.stage
    if st is not None:
        s: dict[str, Any] = dump_fields(st, _STAGE)
        s["tracker"] = dump_fields(st.tracker, _TRACKER) if st.tracker is not None else None
        if st.loop is not None:
            if not st.loop.flush(timeout=30.0):  # the keyframes handed over must be in the database
                from .writer import SnapshotBusy

                raise SnapshotBusy("the loop closer is still working through its queue")
            with st.loop._lock:
                lp = dump_fields(st.loop, _LOOP)
                lp["db"] = dict(lp["db"])
                lp["order"] = list(lp["order"])
            lp["pending"] = list(st.loop._out.queue)  # results the stream has not taken yet
            s["loop"] = lp
        else:
            s["loop"] = None
        tree["stage"] = s
    json_tree, tensors = pack(tree, _classes())
    return json_tree, tensors, snapshot_meta(pipeline, extra_meta)


def check_compatible(pipeline, manifest: dict) -> None:
    """Refuse a snapshot the pipeline cannot continue (other weights, model size, update rule, backend)."""
    here = snapshot_meta(pipeline)
    w_snap = (manifest.get("weights") or {}).get("sha256")
    if w_snap != here["weights"]["sha256"]:
        raise SnapshotError(f"{manifest.get('name')}: the snapshot was made with other weights "
                            f"(sha256 {str(w_snap)[:12]}..., from {(manifest.get('weights') or {}).get('path')}); "
                            f"these are {here['weights']['sha256'][:12]}... ({here['weights'].get('path')})")
    snap_e = manifest.get("engine") or {}
    for k in ("size", "policy", "precision", "head"):
        if snap_e.get(k) != here["engine"][k]:
            flag = {"size": "--size", "policy": "--state-policy", "precision": "--precision", "head": "--weights"}[k]
            raise SnapshotError(f"{manifest.get('name')}: the snapshot's {k} is {snap_e.get(k)!r}, this run's is "
                                f"{here['engine'][k]!r} (set {flag} to match)")
    k_snap, k_here = manifest.get("intrinsics"), here["intrinsics"]
    if (k_snap is None) != (k_here is None) or (k_snap is not None and not np.allclose(k_snap, k_here, rtol=1e-9)):
        raise SnapshotError(f"{manifest.get('name')}: the snapshot was made with intrinsics {k_snap}, this run has "
                            f"{k_here} (give the same --intrinsics / --calib)")
    snap_map = manifest.get("map") or {}
    for k, flag in _MAP_FLAGS.items():
        if snap_map.get(k) != here["map"][k]:
            raise SnapshotError(f"{manifest.get('name')}: the snapshot's map has {k} {snap_map.get(k)!r}, this run's "
                                f"{here['map'][k]!r} (set {flag} to match)")
    if manifest.get("place") != here["place"]:
        raise SnapshotError(f"{manifest.get('name')}: the snapshot's place recognition is {manifest.get('place')!r}, "
                            f"this run's {here['place']!r} (set --place to match)")
    if manifest.get("backend") != here["backend"]:
        raise SnapshotError(f"{manifest.get('name')}: the snapshot's backend is {manifest.get('backend')!r}, this "
                            f"run's is {here['backend']!r} (set --backend, and the intrinsics, to match)")


def _parts(tree: Any, where: Path) -> dict:
    """The decoded tree's parts, every field set and type checked (:class:`SnapshotError` otherwise)."""
    from ..mapping.voxel_map import GlobalMap
    from ..pipeline.trajectory import Trajectory

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise SnapshotError(f"{where}: {what}")

    need(isinstance(tree, dict) and set(tree) == {"engine", "pipeline", "stage"}, "the state's parts are not "
         "engine / pipeline / stage")
    eng, p, s = dict(tree["engine"] or {}), dict(tree["pipeline"] or {}), tree["stage"]
    out: dict[str, Any] = {}
    for k in ("tokens", "mem", "fresh", "last_input"):
        need(k in eng, f"engine: no {k}")
        out[k] = eng.pop(k)
    out["gmap"], out["trajectory"] = p.pop("gmap", None), p.pop("trajectory", None)
    need(isinstance(out["gmap"], GlobalMap) and isinstance(out["trajectory"], Trajectory),
         "the map or the trajectory is missing or of the wrong type")
    fields = [("engine", eng, _ENGINE), ("pipeline", p, _PIPELINE)]
    out.update(engine=eng, pipeline=p, stage=None, tracker=None, loop=None, pending=[])
    if s is not None:
        need(isinstance(s, dict), "stage: not a mapping")
        s = dict(s)
        out["tracker"], out["loop"] = s.pop("tracker", None), s.pop("loop", None)
        out["stage"] = s
        fields.append(("stage", s, _STAGE))
        if out["tracker"] is not None:
            fields.append(("tracker", out["tracker"], _TRACKER))
        if out["loop"] is not None:
            need(isinstance(out["loop"], dict), "loop: not a mapping")
            out["loop"] = lp = dict(out["loop"])
            out["pending"] = lp.pop("pending", None)
            need(isinstance(out["pending"], list), "loop: no pending results")
            fields.append(("loop", lp, _LOOP))
    for name, vals, names in fields:
        need(isinstance(vals, dict) and set(vals) == set(names),
             f"{name}: fields {sorted(vals) if isinstance(vals, dict) else vals} != {sorted(names)}")
    for k in ("tokens", "mem", "fresh"):
        need(hasattr(out[k], "shape") and hasattr(out[k], "dtype"), f"engine: {k} is not a tensor")
    return out


def decode(pipeline, data: SnapshotData) -> dict:
    """The snapshot's state as checked objects, matched against the pipeline (nothing applied yet):
    every check a restore needs is here, so a snapshot that decodes restores."""
    check_compatible(pipeline, data.manifest)
    try:
        tree = unpack(data.state, data.tensors, _classes())
    except (CodecError, RecursionError) as e:
        raise SnapshotError(f"{data.path}: {e}") from None
    parts = _parts(tree, data.path)
    st = pipeline.stage
    if (parts["stage"] is not None) != (st is not None) or (st is not None and (
            (parts["tracker"] is None) != (st.tracker is None) or (parts["loop"] is None) != (st.loop is None))):
        raise SnapshotError(f"{data.path}: the snapshot's geometry stage does not match this run's settings "
                            "(backend, intrinsics, --refine)")
    want = pipeline.engine.state
    for k in ("tokens", "mem", "fresh"):
        t, ref = parts[k], getattr(want, k)
        if tuple(t.shape) != tuple(ref.shape) or t.dtype != ref.dtype:
            raise SnapshotError(f"{data.path}: state {k} is {tuple(t.shape)} {t.dtype}, the model needs "
                                f"{tuple(ref.shape)} {ref.dtype}")
    return parts


def restore(pipeline, data: SnapshotData) -> None:
    """Put a verified snapshot into a freshly built pipeline (all of it, or -- on an error -- nothing)."""
    parts = decode(pipeline, data)
    e = pipeline.engine
    try:  # the device copies first: an out-of-memory here changes nothing
        new_state = replace(e.state, tokens=parts["tokens"].to(e.device), mem=parts["mem"].to(e.device),
                            fresh=parts["fresh"].to(e.device))
        li = parts["last_input"]
        last_input = None if li is None else li.to(e.device)
    except (AttributeError, TypeError) as ex:
        raise SnapshotError(f"{data.path}: engine: {ex}") from None
    # from here on nothing can fail on the data: it was all decoded and checked
    e.state, e._last_input = new_state, last_input
    load_fields(e, parts["engine"], _ENGINE, "engine")
    load_fields(pipeline, parts["pipeline"], _PIPELINE, "pipeline")
    pipeline.gmap, pipeline.trajectory = parts["gmap"], parts["trajectory"]
    st = pipeline.stage
    if st is not None:
        load_fields(st, parts["stage"], _STAGE, "stage")
        if parts["tracker"] is not None:
            load_fields(st.tracker, parts["tracker"], _TRACKER, "tracker")
        if parts["loop"] is not None:
            with st.loop._lock:
                load_fields(st.loop, parts["loop"], _LOOP, "loop")
            for item in parts["pending"]:
                st.loop._out.put(item)
        if st.localised is False:  # a relocalising stream that had not localised yet goes on trying
            from ..slam.relocalise import Relocaliser

            st.reloc = Relocaliser(st.loop)
    _logger.info("resumed from %s: %d frames, %d map points", data.path, pipeline.processed, len(pipeline.gmap))


def relocalise_from(pipeline, data: SnapshotData) -> None:
    """Start a new run inside a snapshot's map: its global map and keyframe database are taken, the
    network state, tracker and trajectory start fresh, and the stage localises against the keyframes
    (:meth:`~streamrecon.slam.stage.GeometryStage.start_relocalisation`). Everything is checked before
    anything is changed."""
    from ..slam.loop import MapRebuild

    st = pipeline.stage
    if st is None or st.loop is None or st.tracker is None:
        raise SnapshotError("--relocalise needs --backend slam")
    try:
        parts = _parts(unpack(data.state, data.tensors, _classes()), data.path)
    except (CodecError, RecursionError, SnapshotError) as e:
        raise SnapshotError(f"{data.path}: cannot be relocalised in ({e})") from None
    lp = parts["loop"]
    if lp is None:
        raise SnapshotError(f"{data.path}: no keyframe database to relocalise in; it needs a snapshot of a "
                            "--backend slam run")
    if not lp["db"]:
        raise SnapshotError(f"{data.path}: the snapshot's keyframe database is empty")
    kind = getattr(lp["places"], "kind", None)
    if kind != st.loop.cfg.place:
        raise SnapshotError(f"{data.path}: the snapshot's place recognition is {kind!r}, this run's is "
                            f"{st.loop.cfg.place!r} (set --place to match)")
    if kind == "tokens":  # the network's descriptors are compared: the same network
        w_snap = (data.manifest.get("weights") or {}).get("sha256")
        if w_snap != model_fingerprint(pipeline.engine.model):
            raise SnapshotError(f"{data.path}: --place tokens compares the network's descriptors, and the snapshot "
                                "was made with other weights (use --place bow, or the same --weights)")
    try:
        first_index = max(int(data.manifest.get("frames") or 0), max((int(k) for k in lp["order"]), default=-1) + 1)
    except (TypeError, ValueError) as e:
        raise SnapshotError(f"{data.path}: bad frame counts ({e})") from None
    gmap = parts["gmap"]
    if parts["pipeline"]["_map_epoch"] != lp["epoch"]:  # a loop closed just before the snapshot: its map
        rebuilt = [m for m in parts["pending"] if isinstance(m, MapRebuild) and m.epoch == lp["epoch"]]
        gmap = rebuilt[-1].gmap if rebuilt else None
    # checked: apply
    with st.loop._lock:
        load_fields(st.loop, lp, _LOOP, "loop")
    if gmap is None:
        gmap = st.loop.rebuild_map(st.loop.map_factory() if st.loop.map_factory else type(parts["gmap"])(parts["gmap"].cfg))
    pipeline.gmap = gmap
    # frame indices go on from the saved run's: keyframe ids (= frame indices) stay unique in the database
    pipeline.engine.processed = first_index
    st.start_relocalisation()
    pipeline._map_epoch = st.epoch
    _logger.info("relocalising in %s: %d keyframes, %d map points", data.path, len(lp["db"]), len(gmap))
