"""Loop closure (``--backend slam``): the keyframe database, place recognition, geometric
verification, the Sim(3) pose graph and the re-anchored map -- all in one background thread.

The geometry stage hands every new keyframe to :meth:`LoopCloser.submit` (never blocks: a full
queue drops the keyframe and counts it). The thread, per keyframe:

1. brings its pose into the current world (corrections made since it was submitted are applied);
2. ORB descriptors at the tracker's corners (with their triangulated points: the landmarks), ORB
   features for the bag of words (``place="bow"``, ``orb_features``), and a subsampled coloured
   cloud of the keyframe's pointmap in its own camera frame (``cloud_points``, float16): **map
   points are stored relative to their keyframe**;
3. place recognition (:class:`~streamrecon.slam.places.PlaceDatabase`) against keyframes at least
   ``min_gap`` keyframes older; the best ``candidates`` are **verified** against the candidate's
   triangulated landmarks (ORB descriptors at the tracker's landmarks matched to the query's ORB
   features, mutual ratio test; PnP RANSAC, ``min_inliers``; the relative scale from the landmarks
   both triangulated) -> a Sim(3) loop edge; the network's depth takes no part (it may be poor);
4. a verified loop -> :func:`~streamrecon.slam.sim3.optimize_pose_graph` over every keyframe in the
   database (odometry edges: the poses as they are; all loop edges so far), the correction of the
   newest keyframe ``C = S_new S_old^-1`` for the stage (the tracker moves onto the corrected
   world at its next frame), and -- with ``rebuild_map`` -- a new global map integrated from the
   keyframe clouds at their corrected poses, handed to the pipeline to swap in.

The database is bounded (``max_keyframes``): beyond it, every second keyframe of the older half
that no loop edge uses is dropped, so memory stays flat on long runs.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from .places import PlaceDatabase
from .sim3 import LOOP_ROT, ODOM_ROT, LoopEdge, optimize_pose_graph, sim3, sim3_inv, sim3_parts

__all__ = ["LoopConfig", "LoopCloser", "KeyframeInput", "Correction", "MapRebuild", "KeyframeEntry"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoopConfig:
    place: str = "bow"  # measured: tools/eval_places.py, docs/ACCURACY.md
    min_gap: int = 12  # keyframes between a query and a loop candidate
    candidates: int = 3
    orb_features: int = 500
    ratio: float = 0.8
    min_inliers: int = 25
    pnp_px: float = 3.0  # two-way reprojection threshold of the Sim(3) verification
    min_interval: int = 3  # keyframes after a closure before the next one
    max_keyframes: int = 1000
    cloud_points: int = 4096  # per keyframe: 53 KB, 53 MB for a full database
    rebuild_map: bool = True
    queue: int = 64
    gate_sigmas: float = 5.0  # a loop whose rotation disagrees with the odometry by more is refused (see _gate)


@dataclass(frozen=True)
class KeyframeInput:
    """What the stage sends for a new keyframe.

    Attributes:
        kid: the keyframe's processed-frame index.
        epoch: the stage's correction epoch when it was made (its pose is in that epoch's world).
        T_wc: ``(4, 4)`` its pose.
        grey: ``(h, w)`` uint8 at tracking resolution; ``K`` ``(3, 3)`` in those pixels.
        cloud: ``(M, 3)`` float32 camera-frame points, ``colors`` ``(M, 3)`` uint8, ``conf`` ``(M,)``.
        descriptor: the network's token descriptor (``place="tokens"``).
        lm_px: ``(L, 2)`` the tracker's corners in this keyframe (tracking pixels);
        lm_X: ``(L, 3)`` their triangulated positions in this keyframe's camera (the tracker's
            units; NaN for corners not triangulated yet).
        lm_ids: ``(L,)`` the tracker's persistent track ids of the corners (the same id in two
            keyframes is the same point, followed by the flow).
    """

    kid: int
    epoch: int
    T_wc: np.ndarray
    grey: np.ndarray
    K: np.ndarray
    cloud: np.ndarray
    colors: np.ndarray
    conf: np.ndarray
    descriptor: Optional[np.ndarray] = None
    lm_px: Optional[np.ndarray] = None
    lm_X: Optional[np.ndarray] = None
    lm_ids: Optional[np.ndarray] = None


@dataclass
class KeyframeEntry:
    """A keyframe in the database (the thread's own; ``S_wk`` is revised by the pose graph)."""

    kid: int
    S_wk: np.ndarray
    cloud: np.ndarray  # (M, 3) float16 keyframe-camera points
    colors: np.ndarray  # (M, 3) uint8
    conf: np.ndarray  # (M,) float32 (float16 would move confidences across a threshold close to 1)
    K: np.ndarray
    lm_px: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # (L, 2) tracker corners
    lm_X: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.float32))  # (L, 3) keyframe camera, NaN: none
    lm_desc: np.ndarray = field(default_factory=lambda: np.zeros((0, 32), np.uint8))  # (L, 32) ORB at them
    lm_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (L,) tracker track ids


@dataclass(frozen=True)
class Correction:
    """A loop closure: from ``epoch`` on, the world is ``C`` (Sim(3)) times the old one.

    Attributes:
        epoch: the new epoch.
        C: ``(4, 4)`` Sim(3) correction of the newest keyframe (apply to everything newer).
        edge: the loop edge (candidate ``i``, query ``j``).
        poses: keyframe id -> corrected ``S_wk``.
        graph_ms, initial_error, final_error: the pose graph's cost and errors.
    """

    epoch: int
    C: np.ndarray
    edge: LoopEdge
    poses: dict
    graph_ms: float
    initial_error: float
    final_error: float


@dataclass(frozen=True)
class MapRebuild:
    """A global map rebuilt from the keyframe clouds of epoch ``epoch`` (keyframes up to ``upto``)."""

    epoch: int
    upto: int
    gmap: Any
    ms: float


@dataclass
class _Stats:
    submitted: int = 0
    dropped: int = 0
    processed: int = 0
    queries: int = 0
    candidates: int = 0
    verified: int = 0
    closures: int = 0
    rejected: int = 0
    gated: int = 0
    culled: int = 0
    errors: int = 0
    graph_ms_total: float = 0.0
    graph_ms_max: float = 0.0
    rebuild_ms_max: float = 0.0
    keyframe_ms_total: float = 0.0
    last_error: Optional[str] = None
    edges: list = field(default_factory=list)  # (i, j, inliers)


class LoopCloser:
    """Args:
        config: see :class:`LoopConfig`.
        map_factory: ``() -> GlobalMap`` for rebuilt maps (``None``: no rebuild).
        sync: process keyframes in the calling thread (deterministic, for tests).
    """

    def __init__(self, config: LoopConfig = LoopConfig(), map_factory: Optional[Callable[[], Any]] = None,
                 sync: bool = False) -> None:
        import cv2

        self.cfg = config
        self.map_factory = map_factory if config.rebuild_map else None
        # the map's confidence threshold: the cloud budget goes to points the map keeps
        self._conf_min = float(map_factory().cfg.conf_thresh) if map_factory is not None else -np.inf
        self.sync = sync
        self.db: dict[int, KeyframeEntry] = {}
        self.order: list[int] = []
        self.places = PlaceDatabase(config.place)
        self.loops: list[LoopEdge] = []
        self.epoch = 0
        self._corrections: list[np.ndarray] = []  # C of epoch n+1 at index n
        self._last_closure_at = -10 ** 9
        self.stats = _Stats()
        self._orb = cv2.ORB_create(config.orb_features)
        self._bf = cv2.BFMatcher(cv2.NORM_HAMMING)
        self._out: "queue.Queue[Any]" = queue.Queue()
        self._lock = threading.Lock()  # the database (read by refine / keyframe_poses)
        self._q: "queue.Queue[Optional[KeyframeInput]]" = queue.Queue(maxsize=config.queue)
        self._thread: Optional[threading.Thread] = None
        if not sync:
            self._thread = threading.Thread(target=self._run, name="loop-closure", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------------------------------ stage side

    def submit(self, kf: KeyframeInput) -> None:
        """Hand a new keyframe over (never blocks; a full queue drops it, counted)."""
        self.stats.submitted += 1
        if self.sync:
            self._process(kf)
            return
        try:
            self._q.put_nowait(kf)
        except queue.Full:
            self.stats.dropped += 1

    def poll(self) -> list:
        """Finished :class:`Correction` and :class:`MapRebuild` objects, oldest first."""
        out = []
        while True:
            try:
                out.append(self._out.get_nowait())
            except queue.Empty:
                return out

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every submitted keyframe is processed (end of stream, tests)."""
        if self.sync or self._thread is None:
            return True
        t_end = time.monotonic() + timeout
        while self._q.unfinished_tasks and time.monotonic() < t_end:
            time.sleep(0.005)
        if self._q.unfinished_tasks:
            _logger.warning("loop closure: %d keyframes still queued after %.0f s; the outputs leave them out",
                            self._q.unfinished_tasks, timeout)
        return not self._q.unfinished_tasks

    def close(self) -> None:
        if self._thread is not None:
            try:
                self._q.put(None, timeout=30)
            except queue.Full:  # the thread is stuck: it is a daemon, leave it
                _logger.warning("loop closure: the thread did not take the stop request")
            self._thread.join(timeout=30)
            self._thread = None

    def add_correction(self, C: np.ndarray) -> None:
        """A correction made outside the loop closer (relocalisation): keyframes submitted in the old
        epoch are brought through it; a new epoch starts."""
        with self._lock:
            self._corrections.append(np.asarray(C, np.float64))
            self.epoch += 1

    def keyframe_poses(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids (K,), S_wk (K, 4, 4))`` of the database, in time order."""
        with self._lock:
            ids = np.asarray(self.order, np.int64)
            poses = np.stack([self.db[k].S_wk for k in self.order]) if self.order else np.zeros((0, 4, 4))
        return ids, poses

    def entries(self) -> list[KeyframeEntry]:
        with self._lock:
            return [self.db[k] for k in self.order]

    def to_dict(self) -> dict:
        s = self.stats
        return {"place": self.cfg.place, "keyframes": len(self.db), "submitted": s.submitted, "dropped": s.dropped,
                "queries": s.queries, "candidates": s.candidates, "verified": s.verified, "closures": s.closures,
                "rejected": s.rejected, "gated": s.gated, "culled": s.culled, "errors": s.errors,
                "graph_ms_mean": round(s.graph_ms_total / s.closures, 3) if s.closures else 0.0,
                "graph_ms_max": round(s.graph_ms_max, 3), "rebuild_ms_max": round(s.rebuild_ms_max, 3),
                "keyframe_ms_mean": round(s.keyframe_ms_total / s.processed, 3) if s.processed else 0.0,
                "edges": [list(e) for e in s.edges[-50:]], "last_error": s.last_error}

    # ------------------------------------------------------------------------------------------ thread

    def _run(self) -> None:
        while True:
            kf = self._q.get()
            try:
                if kf is None:
                    return
                self._process(kf)
            except Exception as e:  # a bad keyframe must not end loop closure
                self.stats.errors += 1
                self.stats.last_error = f"{type(e).__name__}: {e}"
                _logger.warning("loop closure: keyframe skipped: %s", self.stats.last_error)
            finally:
                self._q.task_done()

    def _bring_forward(self, T: np.ndarray, epoch: int) -> np.ndarray:
        for C in self._corrections[epoch:]:
            T = C @ T
        return T

    def _place_descriptor(self, kf: KeyframeInput) -> Optional[np.ndarray]:
        """What place recognition compares: ORB descriptors of the whole image (``bow``) or the tokens."""
        if self.cfg.place != "bow":
            return kf.descriptor
        _, desc = self._orb.detectAndCompute(kf.grey, None)
        return np.zeros((0, 32), np.uint8) if desc is None else desc

    def _landmarks(self, kf: KeyframeInput) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """ORB descriptors at the tracker's corners: ``(px, camera-frame points, descriptors, track ids)``."""
        import cv2

        none = (np.zeros((0, 2), np.float32), np.zeros((0, 3), np.float32), np.zeros((0, 32), np.uint8),
                np.zeros(0, np.int64))
        if kf.lm_px is None or len(kf.lm_px) == 0:
            return none
        kps = [cv2.KeyPoint(float(x), float(y), 31.0, -1, 0, 0, n) for n, (x, y) in enumerate(kf.lm_px)]
        kps, desc = self._orb.compute(kf.grey, kps)
        if desc is None or not kps:
            return none
        keep = np.array([k.class_id for k in kps], int)
        ids = np.asarray(kf.lm_ids, np.int64) if kf.lm_ids is not None else -1 - np.arange(len(kf.lm_px))
        return (np.asarray(kf.lm_px, np.float32)[keep], np.asarray(kf.lm_X, np.float32)[keep], desc,
                ids[keep])

    def _cloud(self, kf: KeyframeInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The keyframe's cloud as stored: finite points the map would keep (confidence above its
        threshold), at most ``cloud_points`` of them."""
        ok = np.isfinite(kf.cloud).all(1) & (kf.conf > self._conf_min)
        idx = np.flatnonzero(ok)
        if len(idx) > self.cfg.cloud_points:
            idx = np.random.default_rng(kf.kid).choice(idx, self.cfg.cloud_points, replace=False)
            idx.sort()
        return kf.cloud[idx].astype(np.float16), kf.colors[idx], kf.conf[idx].astype(np.float32)

    def _process(self, kf: KeyframeInput) -> None:
        t0 = time.perf_counter()
        T = self._bring_forward(np.asarray(kf.T_wc, np.float64), kf.epoch)
        if not np.isfinite(T).all():
            self.stats.errors += 1
            self.stats.last_error = f"keyframe {kf.kid}: non-finite pose (skipped)"
            return
        q = self._place_descriptor(kf)
        cloud, colors, conf = self._cloud(kf)
        lm_px, lm_X, lm_desc, lm_ids = self._landmarks(kf)
        e = KeyframeEntry(kf.kid, T, cloud, colors, conf, kf.K.copy(), lm_px, lm_X, lm_desc, lm_ids)
        prev = self.order[-1] if self.order else None
        with self._lock:
            self.db[kf.kid] = e
            self.order.append(kf.kid)
        if q is not None:
            self.places.add(kf.kid, q)
        self.stats.processed += 1
        n = len(self.order)
        if q is not None and n > self.cfg.min_gap and self.stats.processed - self._last_closure_at > self.cfg.min_interval:
            self.stats.queries += 1
            before = self.order[-self.cfg.min_gap]
            for cand, _score in self.places.query(q, before=before, top=self.cfg.candidates, reference=prev):
                self.stats.candidates += 1
                edge = self._verify(self.db[cand], e)
                if edge is None:
                    continue
                if not self._gate(edge):
                    self.stats.gated += 1
                    continue
                self.stats.verified += 1
                if self._close(edge):
                    self._last_closure_at = self.stats.processed
                    break
        if len(self.order) > self.cfg.max_keyframes:
            self._cull()
        self.stats.keyframe_ms_total += 1e3 * (time.perf_counter() - t0)

    def _mutual(self, d_query: np.ndarray, d_train: np.ndarray) -> np.ndarray:
        """``(M, 2)`` (query index, train index) of mutual best matches that pass the ratio test."""
        if len(d_query) < 2 or len(d_train) < 2:
            return np.zeros((0, 2), int)
        fwd = self._bf.knnMatch(d_query, d_train, k=2)
        back = {m.queryIdx: m.trainIdx for m in self._bf.match(d_train, d_query)}
        pairs = [(p[0].queryIdx, p[0].trainIdx) for p in fwd
                 if len(p) == 2 and p[0].distance < self.cfg.ratio * p[1].distance and back.get(p[0].trainIdx) == p[0].queryIdx]
        return np.asarray(pairs, int).reshape(-1, 2)

    def _verify(self, a: KeyframeEntry, b: KeyframeEntry) -> Optional[LoopEdge]:
        """``S_ab`` (b's camera -> a's camera) from a's triangulated landmarks, or ``None``.

        Both keyframes carry ORB descriptors at the tracker's corners (``lm_*``; triangulated ones
        have a finite ``lm_X``). a's triangulated corners are matched to all of b's (ratio test,
        mutual); PnP RANSAC (``pnp_px``) gives the rotation and translation in a's units; the
        relative scale is the median ratio of distances from b's camera of the inliers b has
        triangulated too (a's moved into b vs b's own; fewer than 8: refused). The network's depth
        takes no part: a loop is as right as the tracker's geometry, whatever the weights.
        """
        import cv2

        tri = np.flatnonzero(np.isfinite(a.lm_X).all(1) & (a.lm_X[:, 2] > 0))
        if len(tri) < self.cfg.min_inliers or len(b.lm_desc) < self.cfg.min_inliers:
            return None
        m = self._mutual(b.lm_desc, a.lm_desc[tri])
        if len(m) < self.cfg.min_inliers:
            return None
        ib, ia = m[:, 0], tri[m[:, 1]]
        Xa, pb = a.lm_X[ia].astype(np.float64), b.lm_px[ib].astype(np.float64)
        found, rvec, tvec, inl = cv2.solvePnPRansac(Xa, pb, b.K, None, iterationsCount=200,
                                                    reprojectionError=self.cfg.pnp_px, confidence=0.999,
                                                    flags=cv2.SOLVEPNP_EPNP)
        if not found or inl is None or len(inl) < self.cfg.min_inliers:
            self.stats.rejected += 1
            return None
        inl = inl.reshape(-1)
        rvec, tvec = cv2.solvePnPRefineLM(Xa[inl], pb[inl], b.K, None, rvec, tvec)
        R = cv2.Rodrigues(rvec)[0]  # a's camera -> b's camera, a's units
        t = tvec.reshape(3)
        Xa_b = Xa[inl] @ R.T + t
        Xb = b.lm_X[ib[inl]].astype(np.float64)
        good = np.isfinite(Xb).all(1) & (Xb[:, 2] > 0) & (Xa_b[:, 2] > 0)
        if good.sum() < 8:  # no shared landmarks: the relative scale is unknown, and a monocular graph needs it
            self.stats.rejected += 1
            return None
        s = float(np.median(np.linalg.norm(Xa_b[good], axis=1) / np.linalg.norm(Xb[good], axis=1)))
        if not (0.2 < s < 5.0):
            self.stats.rejected += 1
            return None
        # x_a = R^T (s x_b - t)
        return LoopEdge(a.kid, b.kid, sim3(R.T, -R.T @ t, 1.0) @ sim3(np.eye(3), np.zeros(3), s), int(len(inl)),
                        depth=float(np.median(np.linalg.norm(Xa[inl], axis=1))))

    def _gate(self, edge: LoopEdge) -> bool:
        """Is the loop's rotation plausible given the odometry between its keyframes?

        Tracking drifts in rotation by about ``odom_rot`` per keyframe (the pose graph's model), so the
        odometry chain from ``i`` to ``j`` and the loop edge should agree within
        ``gate_sigmas * sqrt(n odom_rot^2 + loop_rot^2)``; a loop outside is a wrong match (seen on
        fast synthetic orbits: 2-8 deg off between keyframes 12 apart) and would bend the graph."""
        n = self.order.index(edge.j) - self.order.index(edge.i)
        odo = sim3_inv(self.db[edge.i].S_wk) @ self.db[edge.j].S_wk
        Ra, _, _ = sim3_parts(odo)
        Rb, _, _ = sim3_parts(edge.S_ij)
        ang = float(np.arccos(np.clip((np.trace(Ra.T @ Rb) - 1) / 2, -1, 1)))
        return ang <= self.cfg.gate_sigmas * np.sqrt(max(n, 1) * ODOM_ROT ** 2 + LOOP_ROT ** 2)

    def _close(self, edge: LoopEdge) -> bool:
        """Optimise the pose graph with ``edge`` and publish the correction (and the rebuilt map)."""
        ids = list(self.order)
        old = {k: self.db[k].S_wk for k in ids}
        try:
            res = optimize_pose_graph(ids, [old[k] for k in ids], self.loops + [edge])
        except Exception as e:
            self.stats.errors += 1
            self.stats.last_error = f"pose graph: {type(e).__name__}: {e}"
            return False
        newest = ids[-1]
        try:
            if not all(np.isfinite(P).all() for P in res.poses.values()):
                raise ValueError("non-finite poses")
            C = res.poses[newest] @ sim3_inv(old[newest])
            _, _, s = sim3_parts(C)
        except (ValueError, np.linalg.LinAlgError) as e:
            self.stats.errors += 1
            self.stats.last_error = f"pose graph: {e}"
            return False
        self.loops.append(edge)
        del self.loops[:-200]  # bounded: the newest loop edges
        with self._lock:
            for k in ids:
                self.db[k].S_wk = res.poses[k]
        self.epoch += 1
        self._corrections.append(C)
        st = self.stats
        st.closures += 1
        st.graph_ms_total += res.ms
        st.graph_ms_max = max(st.graph_ms_max, res.ms)
        st.edges.append((edge.i, edge.j, edge.inliers))
        del st.edges[:-50]
        _logger.info("loop closed: keyframe %d <-> %d (%d inliers), correction %.3f m, scale %.3f, graph %.0f ms",
                     edge.j, edge.i, edge.inliers, float(np.linalg.norm(C[:3, 3])), s, res.ms)
        self._out.put(Correction(self.epoch, C, edge, dict(res.poses), res.ms, res.initial_error, res.final_error))
        if self.map_factory is not None:
            t0 = time.perf_counter()
            gmap = self.rebuild_map(self.map_factory())
            ms = 1e3 * (time.perf_counter() - t0)
            st.rebuild_ms_max = max(st.rebuild_ms_max, ms)
            self._out.put(MapRebuild(self.epoch, newest, gmap, ms))
        return True

    def rebuild_map(self, gmap, poses: Optional[dict] = None):
        """Integrate every keyframe cloud at its pose (``poses``: id -> ``S_wk``, default the database's)."""
        for e in self.entries():
            S = e.S_wk if poses is None else poses.get(e.kid, e.S_wk)
            X = e.cloud.astype(np.float32) @ S[:3, :3].T.astype(np.float32) + S[:3, 3].astype(np.float32)
            gmap.integrate(X, e.colors, e.conf.astype(np.float32), e.kid)
        return gmap

    def _cull(self) -> None:
        used = {k for ed in self.loops for k in (ed.i, ed.j)}
        half = self.order[: len(self.order) // 2]
        drop = {k for n, k in enumerate(half) if n % 2 == 1 and k not in used}
        if len(self.order) - len(drop) > self.cfg.max_keyframes:  # a route revisited again and again
            drop = {k for n, k in enumerate(half) if n % 2 == 1}
            self.loops = [e for e in self.loops if e.i not in drop and e.j not in drop]
        if not drop:
            return
        with self._lock:
            for k in drop:
                del self.db[k]
            self.order = [k for k in self.order if k not in drop]
        self.places.remove(drop)
        self.stats.culled += len(drop)
