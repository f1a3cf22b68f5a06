"""Typed objects of the data flow (torch-free): ``Frame`` (from a source) -> ``FrameResult`` (engine).

Frames: ``T_wc`` is camera-to-world in the run's *global* world frame (the camera of the first frame;
with ``--reset-every`` the segments are chained into it). OpenCV camera axes. Model-resolution
images are ``(H, W)``; the original image is ``(H0, W0)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .preprocess import CropInfo

__all__ = ["Frame", "FrameResult", "ProbeResult", "TrackingInfo"]


@dataclass
class Frame:
    """One camera frame as a source delivers it.

    Attributes:
        image: ``(H0, W0, 3)`` uint8 RGB.
        seq: sequence number at the source (gaps mean frames the source dropped).
        stamp: capture time in seconds (sensor/file time when known, else arrival time).
        source: a name for the stream (file name, ``cam:0``, ZeroMQ ``stream_id``).
        K: ``(3, 3)`` intrinsics of the original image when the source knows them, else ``None``.
    """

    image: np.ndarray
    seq: int
    stamp: float
    source: str = ""
    K: Optional[np.ndarray] = None


@dataclass(frozen=True)
class TrackingInfo:
    """How the geometric backend found a frame's pose.

    Attributes:
        state: ``init``, ``ok``, ``weak`` or ``lost`` (lost: the fallback pose, tracking restarted).
        method: ``first``, ``pnp``, ``essential``, ``prior`` or ``fallback``.
        tracked, inliers: feature tracks into this frame, and those consistent with the pose.
        keyframe: whether the frame became a keyframe.
        depth_scale: factor applied to the network depth to match the tracked map (None: not yet known).
        ms: tracking time.
        localised: ``--relocalise``: whether the frame's pose is in the saved map's world yet (``False``:
            a provisional world until the first frame is matched to a saved keyframe); ``None`` otherwise.
        depth_fit: how this frame's network depth was fitted to the landmarks (``--depth-fit``):
            ``grid`` (the correction field), ``scale`` (one factor: too few landmarks, the field did
            not predict held-out ones better, or ``--depth-fit scale``); ``None`` without network depth.
        depth_fit_residual: the landmarks' median ``|log(z / depth)|`` left after the fit (None: no
            landmarks used).
    """

    state: str
    method: str
    tracked: int
    inliers: int
    keyframe: bool
    depth_scale: Optional[float]
    ms: float
    localised: Optional[bool] = field(default=None, kw_only=True)
    depth_fit: Optional[str] = field(default=None, kw_only=True)
    depth_fit_residual: Optional[float] = field(default=None, kw_only=True)


@dataclass(frozen=True)
class FrameResult:
    """Everything the node knows about one processed frame (CPU numpy arrays). Frozen: made by the
    engine, never modified downstream (the pipeline keeps its own timings).

    Attributes:
        seq, stamp, source: copied from the :class:`Frame`.
        index: running count of processed frames (0-based).
        segment: index of the reset segment this frame belongs to.
        T_wc: ``(4, 4)`` float64 camera-to-world in the global world frame.
        points_cam: ``(H, W, 3)`` pointmap in this camera's frame.
        points_world_pose: ``(H, W, 3)`` ``T_wc`` applied to ``points_cam`` (what the reference demo
            shows; the map uses it by default).
        points_world_head: ``(H, W, 3)`` the model's own world-frame head, chained into the global frame.
        conf_cam: ``(H, W)`` confidence of ``points_cam`` (and ``points_world_pose``).
        conf_world: ``(H, W)`` confidence of ``points_world_head``.
        depth: ``(H, W)`` z of ``points_cam``.
        K: ``(3, 3)`` estimated intrinsics at model resolution (Weiszfeld focal, pp ``(W//2, H//2)``).
        K_original: ``(3, 3)`` the same camera in original-image pixels.
        colors: ``(H, W, 3)`` uint8 input colours at model resolution (aligned with the pointmaps).
        crop: how the original image maps to model pixels.
        timings_ms: the engine's stage name -> milliseconds for this frame.
        K_given: ``(3, 3)`` intrinsics in original-image pixels that came with the frame
            (``Frame.K``: the wire header's ``K``, a ROS ``CameraInfo``), else ``None``.
        K_used: ``(3, 3)`` original-pixel intrinsics the geometry stage unprojected with (the given
            ``K``, else the network's focal smoothed over the sequence); ``None`` without that stage.
        tracking: how the geometric backend found ``T_wc`` (``None`` with ``--backend none``).
        descriptor: ``(ed,)`` float32, the mean of the frame's encoder tokens (place recognition).
        dynamic: ``(H, W)`` float32 in ``[0, 1]``, how likely each pixel is on a moving object
            (``--dynamic-mask``; ``None`` when off or not yet known, e.g. the first frame of ``flow``).
        dynamic_mask: ``(H, W)`` bool, the pixels kept out of the map (and of tracking, when known
            before it): :mod:`streamrecon.dynamic`.
        network: whether the network saw this frame. ``False`` (``--network-every``: a frame that
            was only tracked): ``T_wc``, ``K``, ``K_original``, ``K_used``, ``crop`` and ``tracking`` are
            set, every per-pixel array is empty (``(0, 0, ...)``); see :meth:`pose_only`.
    """

    seq: int
    stamp: float
    source: str
    index: int
    segment: int
    T_wc: np.ndarray
    points_cam: np.ndarray
    points_world_pose: np.ndarray
    points_world_head: np.ndarray
    conf_cam: np.ndarray
    conf_world: np.ndarray
    depth: np.ndarray
    K: np.ndarray
    K_original: np.ndarray
    colors: np.ndarray
    crop: CropInfo
    timings_ms: dict[str, float] = field(default_factory=dict)
    K_given: Optional[np.ndarray] = None
    K_used: Optional[np.ndarray] = None
    tracking: Optional[TrackingInfo] = None
    descriptor: Optional[np.ndarray] = None
    dynamic: Optional[np.ndarray] = None
    dynamic_mask: Optional[np.ndarray] = None
    network: bool = True

    @classmethod
    def pose_only(cls, seq: int, stamp: float, source: str, index: int, segment: int, T_wc: np.ndarray,
                  K: np.ndarray, K_original: np.ndarray, crop: CropInfo, tracking: Optional[TrackingInfo] = None,
                  K_given: Optional[np.ndarray] = None, timings_ms: Optional[dict[str, float]] = None) -> "FrameResult":
        """A frame the network did not see: its pose (and the intrinsics in use), no pixels."""
        e3, e2, e0 = np.zeros((0, 0, 3), np.float32), np.zeros((0, 0), np.float32), np.zeros((0, 0, 3), np.uint8)
        return cls(seq=seq, stamp=stamp, source=source, index=index, segment=segment, T_wc=T_wc, points_cam=e3,
                   points_world_pose=e3, points_world_head=e3, conf_cam=e2, conf_world=e2, depth=e2, K=K,
                   K_original=K_original, colors=e0, crop=crop, timings_ms=dict(timings_ms or {}), K_given=K_given,
                   K_used=K_original, tracking=tracking, network=False)

    def world_points(self, which: str = "pose", static_only: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``(points (H, W, 3), conf (H, W))`` in the global frame: ``"pose"`` = ``T_wc @ points_cam``
        with ``conf_cam``; ``"head"`` = the model's world head with ``conf_world``. With
        ``static_only``, the confidence is ``-inf`` on :attr:`dynamic_mask` (below any threshold: what the map takes)."""
        if which == "pose":
            pts, conf = self.points_world_pose, self.conf_cam
        elif which == "head":
            pts, conf = self.points_world_head, self.conf_world
        else:
            raise ValueError(f"world points must be 'pose' or 'head', got {which!r}")
        if static_only and self.dynamic_mask is not None and self.dynamic_mask.any():
            conf = np.where(self.dynamic_mask, np.float32(-np.inf), conf)
        return pts, conf


@dataclass
class ProbeResult:
    """What the model predicts for a virtual camera (a raymap query; the state is unchanged).

    Attributes:
        name: probe name.
        frame_index: the index of the last frame the state had seen when the probe ran (the number of
            its ``frames/NNNNNN.npz``; -1 before the first frame).
        T_wc: ``(4, 4)`` the virtual camera, global world frame.
        K: ``(3, 3)`` its intrinsics (model resolution).
        points_cam: ``(H, W, 3)`` predicted geometry seen from the virtual camera (its frame).
        points_world: ``(H, W, 3)`` the same placed with the *given* pose (``T_wc @ points_cam``).
        conf: ``(H, W)`` confidence.
        rgb: ``(H, W, 3)`` uint8 predicted colours.
        pose_estimate: ``(4, 4)`` the model's own estimate of the virtual pose (global frame).
        map_rgb, map_depth, map_mask: what the global map already knows from there (``(H, W, 3)`` uint8,
            ``(H, W)`` float32 with NaN where empty, ``(H, W)`` bool coverage), rendered by
            :func:`streamrecon.mapping.render.render_map`; ``None`` when the probe ran without a map.
        disagreement: ``(H, W)`` float32 ``|depth - map depth| / map depth`` where both exist, else NaN.
    """

    name: str
    frame_index: int
    T_wc: np.ndarray
    K: np.ndarray
    points_cam: np.ndarray
    points_world: np.ndarray
    conf: np.ndarray
    rgb: np.ndarray
    pose_estimate: np.ndarray
    map_rgb: Optional[np.ndarray] = None
    map_depth: Optional[np.ndarray] = None
    map_mask: Optional[np.ndarray] = None
    disagreement: Optional[np.ndarray] = None

    def map_arrays(self) -> dict[str, np.ndarray]:
        """The map rendering and the disagreement, by name (empty without a map)."""
        if self.map_rgb is None:
            return {}
        return {"map_rgb": self.map_rgb, "map_depth": self.map_depth, "map_mask": self.map_mask,
                "disagreement": self.disagreement}
