"""Relocalisation in a saved map (``run --relocalise SNAPSHOT``): which saved keyframe does this frame
see, and where is the frame in the saved map's world.

A new run starts with a fresh tracker in a provisional world. Every tracked frame, until one
succeeds, is matched against the snapshot's keyframe database with the loop closer's own tools:
place recognition (:class:`~streamrecon.slam.places.PlaceDatabase`, the best ``candidates``), then
geometric verification (:meth:`~streamrecon.slam.loop.LoopCloser._verify`: ORB descriptors at the
tracker's corners matched to the candidate's triangulated landmarks, PnP RANSAC, the relative scale
from the points both have). The tracker's corners have 3D points from the first frame on (the
network's depth, scaled), so a frame can be localised before anything is triangulated.

The result is the Sim(3) ``C`` from the provisional world to the saved one: the stage applies it as
a correction (the tracker moves into the saved world and the stream goes on there), the loop closer
records it, and the frames seen before it are brought through it (map and final trajectory).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .loop import KeyframeEntry, KeyframeInput, LoopCloser
from .sim3 import sim3_inv, sim3_parts

__all__ = ["Relocaliser", "Relocalisation"]


@dataclass(frozen=True)
class Relocalisation:
    """A successful relocalisation: ``C`` ``(4, 4)`` Sim(3) provisional world -> saved world; the
    saved keyframe matched, the PnP inliers and the scale (saved units per provisional unit)."""

    C: np.ndarray
    keyframe: int
    inliers: int
    scale: float
    score: float


class Relocaliser:
    """Args:
        loop: the loop closer holding the snapshot's keyframe database.
        candidates: keyframes verified per frame (best place-recognition scores first).
    """

    def __init__(self, loop: LoopCloser, candidates: int = 5) -> None:
        self.loop, self.candidates = loop, candidates
        self.ms_total = 0.0

    def try_frame(self, grey: np.ndarray, K: np.ndarray, T_wc: np.ndarray, px: np.ndarray, X_world: np.ndarray,
                  ids: np.ndarray, descriptor: Optional[np.ndarray] = None) -> Optional[Relocalisation]:
        """Localise one frame, or ``None``.

        Args:
            grey: ``(h, w)`` uint8 at tracking resolution; ``K`` in those pixels.
            T_wc: the frame's pose in the provisional world.
            px: ``(L, 2)`` the tracker's corners in this frame; ``X_world`` ``(L, 3)`` their points in the
                provisional world (NaN: none); ``ids`` their track ids.
            descriptor: the network's token descriptor (``place="tokens"``).
        """
        t0 = time.perf_counter()
        try:
            loop = self.loop
            Xc = (X_world - T_wc[:3, 3]) @ T_wc[:3, :3]  # provisional world -> this camera
            kf = KeyframeInput(kid=-1, epoch=loop.epoch, T_wc=T_wc, grey=grey, K=K, cloud=np.zeros((0, 3), np.float32),
                               colors=np.zeros((0, 3), np.uint8), conf=np.zeros(0, np.float32), descriptor=descriptor,
                               lm_px=px, lm_X=Xc.astype(np.float32), lm_ids=ids)
            q = loop._place_descriptor(kf)
            if q is None or len(loop.places) == 0:
                return None
            lm_px, lm_X, lm_desc, lm_ids = loop._landmarks(kf)
            query = KeyframeEntry(-1, T_wc, kf.cloud, kf.colors, kf.conf, K, lm_px, lm_X, lm_desc, lm_ids)
            ranked = loop.places.query(q, before=np.iinfo(np.int64).max, top=self.candidates)
            if not ranked:  # no vocabulary yet (a database of fewer than its keyframes): try the newest ones
                ranked = [(k, 0.0) for k in reversed(loop.order[-self.candidates:])]
            for cand, score in ranked:
                entry = loop.db.get(cand)
                if entry is None:
                    continue
                edge = loop._verify(entry, query)  # S_ab: this camera -> the keyframe's camera
                if edge is None:
                    continue
                T_saved = entry.S_wk @ edge.S_ij  # this camera -> the saved world (Sim(3))
                C = T_saved @ sim3_inv(T_wc)
                _, _, s = sim3_parts(C)
                return Relocalisation(C, int(cand), int(edge.inliers), float(s), float(score))
            return None
        finally:
            self.ms_total += 1e3 * (time.perf_counter() - t0)
