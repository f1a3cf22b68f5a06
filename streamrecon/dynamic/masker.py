"""``DynamicMasker``: one stream's dynamic-object masks, between the engine and the map.

Where each cue is known decides what it can keep out (see :mod:`streamrecon.pipeline.pipeline`)::

    engine (attention score) --> before_stage (attention, flow: mask) --> tracking --> after_stage (residual) --> map

* ``attention`` (:mod:`.attention`) and ``flow`` (:mod:`.flow`) are known before tracking: their
  masks keep moving pixels out of the tracker's features and out of the map;
* ``residual`` (:mod:`.residual`) needs the frame's final pose: it keeps them out of the map only.

The result that comes out is a new :class:`~streamrecon.frames.FrameResult` with ``dynamic`` (the
score) and ``dynamic_mask`` set; everything else is unchanged (the masked pixels are still returned).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from ..frames import Frame, FrameResult
from .masks import score_to_mask

if TYPE_CHECKING:
    from ..mapping import GlobalMap

__all__ = ["DynamicOptions", "DynamicMasker", "METHODS"]

METHODS = ("off", "attention", "flow", "residual")


@dataclass(frozen=True)
class DynamicOptions:
    """Args:
        method: one of :data:`METHODS`.
        thresh: score above which a pixel is masked.
        grow: pixels the mask is dilated by.
        gap: ``flow``: frames between the two images compared.
    """

    method: str = "off"
    thresh: float = 0.5
    grow: int = 1
    gap: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"dynamic mask method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 < self.thresh < 1.0:
            raise ValueError(f"dynamic mask threshold must be in (0, 1), got {self.thresh!r}")

    @property
    def active(self) -> bool:
        return self.method != "off"


class DynamicMasker:
    """Per-stream masks (see the module docstring); counters in :meth:`stats`."""

    def __init__(self, options: DynamicOptions) -> None:
        self.opt = options
        self.flow = None
        if options.method == "flow":
            from .flow import FlowScorer

            self.flow = FlowScorer(gap=options.gap)
        self.frames = 0  # frames seen
        self.scored = 0  # frames that got a score
        self.masked_px = 0
        self.total_px = 0
        self.ms = 0.0

    @property
    def before_tracking(self) -> bool:
        """Whether the mask is known before the geometric backend runs (and so keeps movers out of it)."""
        return self.opt.method in ("attention", "flow")

    def _with(self, r: FrameResult, score: Optional[np.ndarray], t0: float) -> FrameResult:
        self.frames += 1
        self.ms += 1e3 * (time.perf_counter() - t0)
        if score is None:
            return replace(r, dynamic=None, dynamic_mask=None)
        mask = score_to_mask(score, self.opt.thresh, self.opt.grow)
        self.scored += 1
        self.masked_px += int(mask.sum())
        self.total_px += mask.size
        return replace(r, dynamic=score.astype(np.float32, copy=False), dynamic_mask=mask)

    def before_stage(self, r: FrameResult, frame: Optional[Frame]) -> FrameResult:
        """``attention`` / ``flow``: the frame's score and mask (the engine computed the attention score)."""
        if not self.before_tracking:
            return r
        t0 = time.perf_counter()
        if self.flow is not None:
            score = None if frame is None else self.flow.score(frame.image, r.crop)
        else:
            score = r.dynamic
        return self._with(r, score, t0)

    def after_stage(self, r: FrameResult, gmap: Optional["GlobalMap"]) -> FrameResult:
        """``residual``: the frame (with its final pose and depth) against the map before it enters it
        (``gmap=None``: no map to compare with in this frame's world; the frame is not scored)."""
        if self.opt.method != "residual":
            return r
        from .residual import residual_score

        t0 = time.perf_counter()
        if gmap is None:
            return self._with(r, None, t0)
        xyz, rgb, _ = gmap.points()
        K = r.crop.K_to_model(r.K_used) if r.K_used is not None else r.K
        return self._with(r, residual_score(xyz, rgb, r.depth, r.T_wc, K, float(gmap.voxel_size)), t0)

    def stats(self) -> dict[str, Any]:
        """For ``summary.json``: the method, frames scored, the mean masked fraction, ms per frame."""
        return {"method": self.opt.method, "thresh": self.opt.thresh, "frames": self.frames, "scored": self.scored,
                "masked_fraction": round(self.masked_px / self.total_px, 4) if self.total_px else 0.0,
                "ms_per_frame": round(self.ms / self.frames, 2) if self.frames else 0.0}
