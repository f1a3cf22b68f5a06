"""The geometry stage of the pipeline: between the engine's result and the map.

``GeometryStage`` does, per frame, in frame order:

* **before the engine** (:meth:`prepare`): undistort the frame when the calibration has distortion,
  and attach the known ``K`` (``--intrinsics`` / ``--calib``) to frames that came without one;
* **after the engine** (:meth:`process`): choose the intrinsics -- the frame's given ``K`` if any,
  else the network's focal estimate smoothed over the sequence (running median) -- then, with
  ``backend="track"``, track the frame (:class:`~streamrecon.slam.tracker.Tracker`) for its pose and
  the network-depth scale; and return a new :class:`FrameResult` whose camera pointmap is the
  network depth (times the scale) unprojected with those intrinsics and whose world pointmap and
  ``T_wc`` are the tracked ones. The network's own values stay in ``K``; ``tracking`` says how the
  pose was found.

With ``backend="slam"`` every new keyframe also goes to the loop closer
(:class:`~streamrecon.slam.loop.LoopCloser`, a background thread): when it closes a loop, the
correction reaches the tracker at the next frame (the stream continues in the corrected world) and
the map rebuilt from the keyframe clouds is offered to the pipeline (:meth:`take_map`).

With ``backend="none"`` and no known intrinsics the result is passed through untouched.
When tracking is lost, the pose is the last good pose moved by the network's own relative motion
(scaled by the depth scale), and tracking restarts at that frame.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Optional

import numpy as np

from ..frames import Frame, FrameResult, TrackingInfo
from ..settings import SlamSettings
from .calib import Calibration, Undistorter, parse_intrinsics, read_calibration
from .depth_fit import fit_depth, sample_depth
from .loop import Correction, KeyframeInput, LoopCloser, LoopConfig, MapRebuild
from .tracker import Tracker, TrackerConfig, _inv

__all__ = ["GeometryStage", "PoseRecord", "calibration_from_settings"]

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoseRecord:
    """A tracked frame whose network result is still to come (``--network-every``): its index, pose,
    the loop-closure epoch it was tracked in, how it was tracked and, for a keyframe, ``(grey, Kt,
    track pixels, points in its camera, triangulated?, track ids)``."""

    index: int
    T_wc: np.ndarray
    epoch: int
    info: Optional[TrackingInfo]
    keyframe: Optional[tuple]
    scale: Optional[float] = None  # the tracker's depth scale when the frame was tracked (None: not known)
    samples: Optional[tuple] = None  # --depth-fit grid: (model pixels (N, 2), camera z (N,)) of its landmarks


def _track_to_model(crop, px: np.ndarray, f: float) -> np.ndarray:
    """Tracking pixels (the frame resized by ``f``) -> model pixels, both ``(N, 2)`` (u, v)."""
    return crop.to_model((px + 0.5) / f - 0.5)


def _edge(found):
    from .sim3 import LoopEdge

    return LoopEdge(found.keyframe, -1, found.C, found.inliers)


def calibration_from_settings(s: SlamSettings) -> Optional[Calibration]:
    if s.intrinsics:
        return parse_intrinsics(s.intrinsics)
    if s.calib:
        return read_calibration(s.calib)
    return None


class GeometryStage:
    """Args:
        settings: the ``slam:`` settings.
        calibration: known intrinsics (else from the settings).
    """

    def __init__(self, settings: SlamSettings, calibration: Optional[Calibration] = None,
                 tracker: Optional[TrackerConfig] = None, loop: Optional[LoopConfig] = None,
                 map_factory=None, loop_sync: bool = False) -> None:
        self.s = settings
        self.cal = calibration if calibration is not None else calibration_from_settings(settings)
        self.undistort = Undistorter(self.cal) if self.cal is not None and self.cal.distorted else None
        backend = settings.resolved_backend()
        tcfg = tracker or TrackerConfig()
        if settings.deterministic:
            tcfg, loop_sync = replace(tcfg, ba_sync=True), True
        elif settings.ba_worker == "process":  # "auto" is resolved by the pipeline builder (thread here)
            tcfg = replace(tcfg, ba_process=True)
        self.tracker = Tracker(tcfg) if backend in ("track", "slam") else None
        self.loop: Optional[LoopCloser] = None
        if backend == "slam" or (settings.refine and self.tracker is not None):
            # refine reads the keyframe database; without slam it is kept but never closes loops
            cfg = loop or LoopConfig(place=settings.place)
            if backend != "slam":
                cfg = replace(cfg, min_gap=10 ** 9, rebuild_map=False)
            self.loop = LoopCloser(cfg, map_factory=map_factory, sync=loop_sync)
        # keyframe clouds at the map's own pixel stride (a rebuilt map is as dense as the online one's keyframes)
        self._cloud_stride = map_factory().cfg.pixel_stride if map_factory is not None else 4
        self.epoch = 0  # loop-closure corrections applied
        self.corrections: list[Correction] = []
        self.correction_of: dict[int, np.ndarray] = {}  # epoch -> the Sim(3) that started it
        self._map: Optional[MapRebuild] = None
        self._new_loop: Optional[Correction] = None
        self._focals: deque = deque(maxlen=101)
        self._checked: set[tuple[int, int]] = set()
        self.states: Counter = Counter()
        self.track_ms: deque = deque(maxlen=10_000)
        self._net_prev: Optional[np.ndarray] = None
        self._T_prev: Optional[np.ndarray] = None
        self._rays_key: Optional[tuple] = None
        self._rays_cache: Optional[np.ndarray] = None
        # --relocalise: None (not relocalising), False (provisional world), True (in the saved world)
        self.localised: Optional[bool] = None
        self.reloc = None  # a Relocaliser while not localised
        self.reloc_info: dict[str, Any] = {}
        self._last_Kt: Optional[np.ndarray] = None
        self._last_f = 1.0
        self.fit_stats: Counter = Counter()  # --depth-fit grid: frames seen, frames fitted with the grid
        self._fit_residuals: deque = deque(maxlen=10_000)  # (landmarks, |log ratio| before, after)
        self._excl_key, self._excl_index = None, None  # cached tracking-pixel -> model-pixel lookup
        self.just_localised = False  # set by the frame that localised, cleared by the pipeline
        self.after_pose: Optional[Callable[[FrameResult], FrameResult]] = None  # set by the pipeline (masks)
        self.prior = None  # the newest network frame's depth (a DepthPrior): --network-every's frames track on it

    @property
    def active(self) -> bool:
        return self.tracker is not None or self.cal is not None

    # ------------------------------------------------------------------------------------------

    def prepare(self, frame: Frame) -> Frame:
        """Undistort and attach the known intrinsics (a new :class:`Frame`; the input is not changed)."""
        if self.cal is None:
            return frame
        h, w = frame.image.shape[:2]
        if (w, h) not in self._checked:
            self.cal.check_image(w, h)  # SettingsError names the mismatch
            self._checked.add((w, h))
        image = self.undistort(frame.image) if self.undistort is not None else frame.image
        K = frame.K if frame.K is not None else self.cal.K
        return replace(frame, image=image, K=K)

    def _intrinsics(self, r: FrameResult) -> np.ndarray:
        """Original-pixel ``K``: the given one, else the network's focal, smoothed (running median)."""
        self._focals.append((r.K_original[0, 0], r.K_original[1, 1]))  # reported beside a given K
        if r.K_given is not None:
            return r.K_given
        f = np.median(np.asarray(self._focals), axis=0)
        K = r.K_original.copy()
        K[0, 0], K[1, 1] = f
        return K

    def process(self, r: FrameResult, frame: Optional[Frame]) -> FrameResult:
        """The result with geometry-based pose and pointmaps (see the module docstring)."""
        if not self.active:
            return r
        K0 = self._intrinsics(r)
        K_model = r.crop.K_to_model(K0)
        scale, T_wc, info, kf = 1.0, r.T_wc, None, None
        if self.loop is not None:
            self._poll_loop()
        if self.tracker is not None:
            if frame is None:
                raise ValueError("the tracking backend needs the frame's image")
            T_wc, scale, info, kf = self._track(r, frame, K0)
            if self.localised is False:
                T_wc, scale = self._relocalise(r, info, T_wc, scale)
                info = replace(info, localised=bool(self.localised))
        samples = self._landmark_samples(r.crop, T_wc) if self.tracker is not None else None
        depth, info = self._fitted_depth(r.depth, scale, samples, info)
        pts_cam = (self._rays(r.depth.shape, K_model) * depth[..., None]).astype(np.float32)
        R, t = T_wc[:3, :3].astype(np.float32), T_wc[:3, 3].astype(np.float32)
        out = replace(r, T_wc=T_wc, points_cam=pts_cam, points_world_pose=pts_cam @ R.T + t, depth=depth,
                      K_used=K0, tracking=info)
        if self.after_pose is not None:  # the pipeline's residual dynamic mask: before the keyframe takes the cloud
            out = self.after_pose(out)
        if kf is not None and self.loop is not None and self.localised is not False:
            self._submit_keyframe(out, kf)  # (not in a provisional world: the database is the saved map's)
        if self.tracker is not None:
            self.set_prior(r, K_model, T_wc, scale, r.index)
        return out

    def _landmark_samples(self, crop, T_wc: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """The tracked frame's triangulated landmarks as ``(model pixels (N, 2), camera z (N,))`` in the
        tracker's units (for ``--depth-fit grid``); None without tracking or with ``--depth-fit scale``."""
        tr = self.tracker
        if self.s.depth_fit != "grid" or tr is None:
            return None
        geo = tr.geo & np.isfinite(tr.X).all(1)
        Xc = (tr.X[geo] - T_wc[:3, 3]) @ T_wc[:3, :3]  # world -> camera: R^T (X - t)
        return _track_to_model(crop, tr.cur[geo].astype(np.float64), self._last_f), Xc[:, 2].copy()

    def _fitted_depth(self, depth: np.ndarray, scale: float, samples, info) -> tuple[np.ndarray, Any]:
        """The network depth in map units and the frame's tracking info with how it was fitted: times
        ``scale`` (``--depth-fit scale``, or nothing to fit to), or bent to the landmark ``samples``
        (``--depth-fit grid``; see :mod:`.depth_fit`)."""
        if samples is None or info is None or info.state == "lost":
            if info is not None:
                info = replace(info, depth_fit="scale")
            return depth * np.float32(scale), info
        fit = fit_depth(depth, samples[0], samples[1], fallback_scale=scale)
        self.fit_stats["frames"] += 1
        if fit.grid:
            self.fit_stats["fitted"] += 1
            self._fit_residuals.append((fit.points, fit.residual0, fit.residual))
        res = None if fit.points == 0 or not np.isfinite(fit.residual) else round(float(fit.residual), 5)
        return fit.depth, replace(info, depth_fit="grid" if fit.grid else "scale", depth_fit_residual=res)

    # ------------------------------------------------------------------------------------------ relocalisation

    def start_relocalisation(self) -> None:
        """From the next frame on, localise against the loop closer's (restored) keyframe database."""
        from .relocalise import Relocaliser

        if self.tracker is None or self.loop is None:
            raise ValueError("relocalisation needs the slam backend")
        self.reloc = Relocaliser(self.loop)
        self.localised = False
        self.epoch = self.loop.epoch
        self.reloc_info = {"localised": False, "keyframes": len(self.loop.db), "attempts": 0}

    def _relocalise(self, r: FrameResult, info: TrackingInfo, T_wc: np.ndarray, scale: float) -> tuple[np.ndarray, float]:
        """Try to localise this frame in the saved map; on success move the stream into its world."""
        from .sim3 import correct_pose

        tr = self.tracker
        self.reloc_info["attempts"] += 1
        if info.state == "lost" or tr._prev is None or len(tr.cur) == 0:
            return T_wc, scale
        Kt = self._last_Kt
        found = self.reloc.try_frame(tr._prev, Kt, T_wc, tr.cur, tr.X, tr.tid, r.descriptor)
        if found is None:
            return T_wc, scale
        if tr.scale is None:
            tr.scale = 1.0  # the tracker's points are the network depth as it is: that is the unit C scales
        self.loop.add_correction(found.C)
        self._take(Correction(self.loop.epoch, found.C, _edge(found), {}, 0.0, 0.0, 0.0))
        self._new_loop = None  # not a loop closure (nothing to draw)
        self.localised = True
        self.just_localised = True
        self.reloc_info["ms_total"] = round(self.reloc.ms_total, 1)
        self.reloc = None
        self.reloc_info.update(localised=True, frame=r.index, keyframe=found.keyframe, inliers=found.inliers,
                               scale=round(found.scale, 5), score=round(found.score, 4), epoch=self.epoch)
        _logger.info("relocalised at frame %d against saved keyframe %d (%d inliers, scale %.3f)", r.index,
                     found.keyframe, found.inliers, found.scale)
        return correct_pose(found.C, T_wc), scale * found.scale

    def _poll_loop(self) -> None:
        for item in self.loop.poll():
            try:
                self._take(item)
            except Exception as e:  # a bad correction must not stop the stream
                _logger.warning("loop closure result skipped: %s: %s", type(e).__name__, e)

    def _take(self, item) -> None:
        """Apply one loop-closer result: a correction (the tracker moves onto the corrected world) or a map."""
        if isinstance(item, MapRebuild):
            self._map = item
            return
        if not isinstance(item, Correction):
            return
        from .sim3 import correct_pose, sim3_parts

        sim3_parts(item.C)  # raises on a degenerate correction: nothing applied
        self.tracker.apply_correction(item.C)
        if self._T_prev is not None:
            self._T_prev = correct_pose(item.C, self._T_prev)
        if self.prior is not None:
            self.prior.correct(lambda T: (correct_pose(item.C, T), sim3_parts(item.C)[2]))
        self.epoch = item.epoch
        self.correction_of[item.epoch] = item.C
        self.corrections.append(item)
        self._new_loop = item
        del self.corrections[:-100]

    def poll(self) -> None:
        """Take what the loop closer has finished (also done at every :meth:`process`)."""
        if self.loop is not None:
            self._poll_loop()

    def take_loop(self) -> Optional[dict]:
        """The loop closure applied at the latest :meth:`process`, for the viewer (``FrameEvent.loop``), once."""
        c, self._new_loop = self._new_loop, None
        if c is None:
            return None
        pos = {k: S[:3, 3] for k, S in c.poses.items()}
        edges = [np.stack([pos[e.i], pos[e.j]]) for e in self.loop.loops if e.i in pos and e.j in pos]
        return {"edges": np.asarray(edges, np.float32).reshape(-1, 2, 3),
                "keyframes": np.asarray([pos[k] for k in sorted(pos)], np.float32).reshape(-1, 3),
                "edge": (c.edge.i, c.edge.j, c.edge.inliers)}

    def take_map(self) -> Optional[MapRebuild]:
        """The map rebuilt after the latest loop closure, once (``None`` when there is none new)."""
        m, self._map = self._map, None
        if m is not None and m.epoch != self.epoch:
            return None  # a newer correction is on its way: its own rebuild follows
        return m

    def _submit_keyframe(self, out: FrameResult, kf: tuple, landmarks: Optional[tuple] = None) -> None:
        """``landmarks``: ``(pixels, points in the keyframe camera (NaN: not triangulated), ids)`` taken
        when the frame was tracked; default: the tracker's tracks now."""
        grey, Kt = kf
        tr = self.tracker
        if landmarks is not None:
            lm_px, lm_X, lm_ids = landmarks
        else:
            Tk = out.T_wc
            lm_px, lm_ids = tr.cur.copy(), tr.tid.copy()
            lm_X = (tr.X - Tk[:3, 3]) @ Tk[:3, :3]  # world -> this keyframe's camera
            lm_X[~tr.geo] = np.nan  # only triangulated points are landmarks (the network's depth may be poor)
        st = self._cloud_stride
        cloud = out.points_cam[::st, ::st].reshape(-1, 3)
        self.loop.submit(KeyframeInput(
            kid=out.index, epoch=self.epoch, T_wc=out.T_wc.copy(), grey=grey, K=Kt, cloud=cloud,
            colors=out.colors[::st, ::st].reshape(-1, 3),
            conf=out.world_points("pose", static_only=True)[1][::st, ::st].reshape(-1),  # movers: -inf, left out
            descriptor=out.descriptor, lm_px=lm_px, lm_X=lm_X, lm_ids=lm_ids))

    def _rays(self, hw: tuple[int, int], K: np.ndarray) -> np.ndarray:
        """``(H, W, 3)`` rays ``K^-1 [u, v, 1]`` of the model pixels (cached while ``K`` and the size stay)."""
        key = (hw, K.tobytes())
        if self._rays_key != key:
            h, w = hw
            v, u = np.mgrid[0:h, 0:w]
            self._rays_cache = np.stack([u, v, np.ones_like(u)], -1).astype(np.float64) @ np.linalg.inv(K).T
            self._rays_key = key
        return self._rays_cache

    def _exclusion(self, mask: np.ndarray, crop, shape: tuple[int, int], f: float) -> np.ndarray:
        """The model-resolution dynamic ``mask`` at tracking resolution ``shape`` (``f``: tracking / original
        scale); pixels outside the model's crop are never excluded."""
        key = (shape, f, crop)
        if self._excl_key != key:
            h, w = shape
            v, u = np.mgrid[0:h, 0:w]
            m = np.rint(_track_to_model(crop, np.c_[u.ravel(), v.ravel()], f)).astype(np.int64)
            hh, ww = crop.output_hw
            ok = (m[:, 0] >= 0) & (m[:, 0] < ww) & (m[:, 1] >= 0) & (m[:, 1] < hh)
            self._excl_index = (np.flatnonzero(ok), m[ok, 1], m[ok, 0])
            self._excl_key = key
        flat, my, mx = self._excl_index
        out = np.zeros(shape[0] * shape[1], bool)
        out[flat] = mask[my, mx]
        return out.reshape(shape)

    def _track(self, r: FrameResult, frame: Frame, K0: np.ndarray) -> tuple[np.ndarray, float, TrackingInfo, Optional[tuple]]:
        """Track a frame the network saw (its own depth is the prior, its pose the fallback's motion)."""
        # fallback: the last pose moved by the network's own relative motion (translation scaled)
        net = r.T_wc
        if self._T_prev is None or self._net_prev is None:
            fallback = np.eye(4) if self._T_prev is None else self._T_prev
        else:
            rel = _inv(self._net_prev) @ net
            rel[:3, 3] *= self.tracker.scale or 1.0
            fallback = self._T_prev @ rel
        out = self._track_core(frame, K0, r.crop, lambda T: r.depth, fallback, r.dynamic_mask)
        self._net_prev = net
        return out

    def _track_core(self, frame: Frame, K0: np.ndarray, crop, depth_map: Callable[[np.ndarray], np.ndarray],
                    fallback: np.ndarray, dynamic_mask: Optional[np.ndarray],
                    landmarks: bool = False) -> tuple[np.ndarray, float, TrackingInfo, Optional[tuple]]:
        """Track ``frame``; ``depth_map(T_wc) -> (H, W)`` the network depth (model pixels) at that pose.
        Returns ``(T_wc, depth scale, info, keyframe)``, the keyframe ``(grey, Kt)`` -- with ``landmarks``
        also the tracks as of now ``(pixels, points in the keyframe camera, ids)`` -- or ``None``."""
        import cv2

        t0 = time.perf_counter()
        img = frame.image
        h0, w0 = img.shape[:2]
        f = min(1.0, self.s.track_width / w0)
        grey = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
        if f < 1.0:
            grey = cv2.resize(grey, (int(round(w0 * f)), int(round(h0 * f))), interpolation=cv2.INTER_AREA)
        Kt = K0.copy()
        Kt[:2] *= f
        Kt[0, 2] = (K0[0, 2] + 0.5) * f - 0.5
        Kt[1, 2] = (K0[1, 2] + 0.5) * f - 0.5
        maps: dict = {}

        def depth_at(px: np.ndarray, T_wc: Optional[np.ndarray] = None) -> np.ndarray:
            key = None if T_wc is None else np.asarray(T_wc).tobytes()
            if key not in maps:
                maps[key] = depth_map(T_wc)
            z = sample_depth(maps[key], _track_to_model(crop, px, f))
            z[~(z > 0)] = np.nan  # behind the camera or invalid: no prior there
            return z

        self._last_Kt = Kt
        self._last_f = f
        exclude = None if dynamic_mask is None else self._exclusion(dynamic_mask, crop, grey.shape, f)
        res = self.tracker.track(grey, Kt, depth_at, fallback, exclude=exclude)
        self._T_prev = res.T_wc
        self.states[res.state] += 1
        ms = 1e3 * (time.perf_counter() - t0)
        self.track_ms.append(ms)
        info = TrackingInfo(**{f.name: getattr(res, f.name) for f in fields(TrackingInfo)} | {"ms": ms})
        scale = float(res.depth_scale or 1.0)
        kf = None
        if res.keyframe and res.state != "lost":
            kf = (grey, Kt)
            if landmarks:
                tr = self.tracker
                kf = kf + (tr.cur.copy(), (tr.X - res.T_wc[:3, 3]) @ res.T_wc[:3, :3], tr.geo.copy(), tr.tid.copy())
        return res.T_wc, scale, info, kf

    # ------------------------------------------------------------------------------------------ --network-every

    def track_only(self, frame: Frame, index: int, template: FrameResult) -> tuple[FrameResult, "PoseRecord"]:
        """Track a frame the network did not see (``--network-every``): the depth prior is the latest
        network frame's (:attr:`prior`) moved to this pose; ``template`` (a result of the network,
        the same image size) gives the crop and the principal point. Returns the pose-only result
        and what :meth:`process_dense` needs when this frame's network result arrives."""
        if self.tracker is None or self.prior is None:
            raise ValueError("--network-every needs the tracking backend and one network result first")
        if tuple(frame.image.shape[:2]) != tuple(template.crop.original_hw):
            raise ValueError(f"frame {frame.seq}: image {frame.image.shape[1]}x{frame.image.shape[0]} differs from the "
                             f"stream's {template.crop.original_hw[1]}x{template.crop.original_hw[0]}")
        if frame.K is not None:
            K0 = np.asarray(frame.K, np.float64)
        else:
            K0 = template.K_original.copy()
            K0[0, 0], K0[1, 1] = np.median(np.asarray(self._focals), axis=0)
        crop = template.crop
        K_model = crop.K_to_model(K0)
        prior, tr = self.prior, self.tracker
        T_wc, _, info, kf = self._track_core(
            frame, K0, crop, lambda T: prior.render(T, tr.scale or 1.0, K_model, crop.output_hw),
            self._T_prev if self._T_prev is not None else np.eye(4), None, landmarks=True)
        self._net_prev = None  # the next network frame's fallback starts from its own pose
        result = FrameResult.pose_only(seq=frame.seq, stamp=frame.stamp, source=frame.source, index=index,
                                       segment=template.segment, T_wc=T_wc, K=K_model, K_original=K0, crop=crop,
                                       tracking=info, K_given=None if frame.K is None else K0.copy())
        return result, PoseRecord(index, T_wc.copy(), self.epoch, info, kf, tr.scale,
                                  self._landmark_samples(crop, T_wc))

    def record_of(self, result: FrameResult) -> "PoseRecord":
        """The :class:`PoseRecord` of a frame :meth:`process` handled (its keyframe already submitted)."""
        return PoseRecord(result.index, result.T_wc.copy(), self.epoch, result.tracking, None)

    def process_dense(self, r: FrameResult, rec: "PoseRecord") -> FrameResult:
        """A network result that arrived after its frame was tracked: its pointmaps at the tracked pose
        (brought through the loop-closure corrections since), the current depth scale; a keyframe goes
        to the loop closer now. Also becomes the :attr:`prior`."""
        from .sim3 import correct_pose, sim3_parts

        K0 = self._intrinsics(r)
        K_model = r.crop.K_to_model(K0)
        T_wc, s_corr = rec.T_wc, 1.0
        for e in range(rec.epoch + 1, self.epoch + 1):
            if e in self.correction_of:
                T_wc = correct_pose(self.correction_of[e], T_wc)
                s_corr *= sim3_parts(self.correction_of[e])[2]
        # the scale the frame was tracked at: its keyframe landmarks were snapshotted in those units
        scale = float(rec.scale if rec.scale is not None else (self.tracker.scale or 1.0))
        depth, info = self._fitted_depth(r.depth, scale, rec.samples, rec.info)
        pts_cam = (self._rays(r.depth.shape, K_model) * depth[..., None]).astype(np.float32)
        R, t = T_wc[:3, :3].astype(np.float32), T_wc[:3, 3].astype(np.float32)
        out = replace(r, index=rec.index, T_wc=T_wc, points_cam=pts_cam, points_world_pose=pts_cam @ R.T + t,
                      depth=depth, K_used=K0, tracking=info)
        if rec.keyframe is not None and self.loop is not None and len(rec.keyframe) > 2:
            grey, Kt, px, X, geo, tid = rec.keyframe
            X = np.where(geo[:, None], X * s_corr, np.nan)
            self._submit_keyframe(out, (grey, Kt), landmarks=(px, X, tid))
        self.set_prior(r, K_model, T_wc, scale, rec.index)
        return out

    def set_prior(self, r: FrameResult, K_model: np.ndarray, T_wc: np.ndarray, scale: float, index: int) -> None:
        """The network frame later frames take their depth prior from (the newest one wins)."""
        from .prior import DepthPrior

        if self.prior is None or index >= self.prior.index:
            self.prior = DepthPrior(r.depth, K_model, T_wc.copy(), scale, index)

    def _fit_summary(self) -> dict[str, Any]:
        """``--depth-fit``: how many frames were fitted and the landmarks' median |log(z / depth)| before
        (the global scale alone) and after the fit, medians over the fitted frames."""
        out: dict[str, Any] = {"method": self.s.depth_fit, "frames": int(self.fit_stats["frames"]),
                               "grid_frames": int(self.fit_stats["fitted"])}
        if self._fit_residuals:
            a = np.asarray(self._fit_residuals, np.float64)
            out.update(landmarks_p50=int(np.median(a[:, 0])), log_residual_scale_p50=round(float(np.median(a[:, 1])), 4),
                       log_residual_grid_p50=round(float(np.median(a[:, 2])), 4))
        return out

    def finish(self, timeout: float = 60.0) -> None:
        """End of stream: let the loop closer process the keyframes it was handed (at most ``timeout`` s)."""
        if self.loop is not None:
            self.loop.flush(timeout)

    def close(self) -> None:
        """Stop the tracker's and the loop closer's background threads (if any)."""
        if self.tracker is not None and hasattr(self.tracker, "close"):
            self.tracker.close()
        if self.loop is not None:
            self.loop.close()

    def stats(self) -> dict[str, Any]:
        """For ``summary.json`` and the status heartbeat."""
        out: dict[str, Any] = {"backend": self.s.resolved_backend(), "intrinsics": None if self.cal is None else
                               {"K": self.cal.K.tolist(), "distortion": self.cal.dist.tolist(), "source": self.cal.source}}
        if self._focals:
            out["network_focal_px"] = [round(float(v), 2) for v in np.median(np.asarray(self._focals), axis=0)]
        if self.tracker is not None:
            ms = np.asarray(self.track_ms) if self.track_ms else np.zeros(1)
            out.update(states=dict(self.states), keyframes=self.tracker.n_keyframes,
                       keyframes_kept=len(self.tracker.keyframes), depth_scale=self.tracker.scale,
                       track_ms_p50=round(float(np.percentile(ms, 50)), 3),
                       track_ms_p99=round(float(np.percentile(ms, 99)), 3),
                       local_ba=dict(getattr(self.tracker, "ba_stats", {}) or {}),
                       tracks_on_movers_dropped=int(getattr(self.tracker, "dynamic_dropped", 0)),
                       lk_retries=int(getattr(self.tracker, "retries", 0)),
                       depth_fit=self._fit_summary())
        if self.loop is not None:
            out["loop_closure"] = self.loop.to_dict() | {"corrections_applied": self.epoch}
        if self.reloc_info:
            out["relocalise"] = dict(self.reloc_info, **({"ms_total": round(self.reloc.ms_total, 1)} if self.reloc else {}))
        return out
