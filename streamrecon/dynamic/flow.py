"""Moving pixels from two images alone: dense optical flow that the camera's motion cannot explain.

Needs no network, no intrinsics and no pose, so it works with any weights (``--dynamic-mask flow``).
Per frame, against the frame ``gap`` frames earlier (both seen like the model input, at about
:data:`WORK_WIDTH` pixels wide):

1. dense flow both ways (OpenCV DIS); a pixel whose flow does not come back within
   :data:`FB_PX` is occluded or unreliable and gets no score;
2. the camera's motion as a robust two-view model fitted on a grid of reliable pixels with
   texture: a fundamental matrix (RANSAC), or a homography when :data:`H_QUANTILE` of the pixels
   the fundamental matrix calls static fit it within ``tau`` (pure rotation, a plane, little parallax:
   the fundamental matrix is then not determined, and its RANSAC can fit a mover's motion together
   with the camera's);
3. every pixel's residual: its Sampson distance to the epipolar geometry (or its homography
   transfer error), in pixels;
4. score ``= clip(residual / (2 tau), 0, 1)``, 0.5 at ``tau`` = the larger of :data:`TAU_PX` and
   :data:`NOISE_K` times the median residual of the pair (its own flow noise), and 0 where the flow is
   not reliable or the image has no structure in two directions (uniform areas, single edges), then
   spread :data:`SPREAD_PX` pixels.

Limits: a mover whose image motion runs along its epipolar line (e.g. straight towards the camera
while it moves forward) is not seen; the first frame (and the first ``gap``) has no score.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import numpy as np

from ..preprocess import CropInfo

__all__ = ["FlowScorer", "model_view", "WORK_WIDTH", "TAU_PX", "FB_PX"]

WORK_WIDTH = 320  # flow resolution (pixels across), whatever the model's input size
TAU_PX = 0.75  # residual (WORK_WIDTH pixels) at which the score is 0.5
FB_PX = 1.0  # forward-backward flow disagreement beyond which a pixel is not judged
GRID_PX = 6  # spacing of the pixels the camera's motion is fitted on
MIN_FIT = 40  # fewer reliable grid pixels: no score for this frame
H_QUANTILE = 0.8  # the homography is used when this share of the epipolar inliers fit it within tau
MIN_EIGEN = 1e-5  # smallest structure-tensor eigenvalue (grey in [0, 1]) where a pixel's flow counts
SPREAD_PX = 1  # model pixels a judged pixel's score spreads to
NOISE_K = 4.0  # tau is at least this many times the median residual (the pair's flow noise)


def model_view(image: np.ndarray, crop: CropInfo, factor: int = 1) -> np.ndarray:
    """The original ``(H0, W0, 3)`` image resized and cropped like the model input, ``factor`` times
    the model's resolution: ``(factor H, factor W, 3)``."""
    import cv2

    h1, w1 = crop.resized_hw
    img = cv2.resize(image, (w1 * factor, h1 * factor), interpolation=cv2.INTER_AREA)
    x0, y0 = crop.crop_xy[0] * factor, crop.crop_xy[1] * factor
    h, w = crop.output_hw
    return img[y0:y0 + h * factor, x0:x0 + w * factor]


def _grey(image: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _sampson(F: np.ndarray, x: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """Sampson distance (pixels) of correspondences ``x -> xp`` ``(N, 2)`` to ``xp^T F x = 0``."""
    xh = np.c_[x, np.ones(len(x))]
    xph = np.c_[xp, np.ones(len(xp))]
    Fx = xh @ F.T
    Ftxp = xph @ F
    num = np.einsum("ij,ij->i", xph, Fx) ** 2
    den = Fx[:, 0] ** 2 + Fx[:, 1] ** 2 + Ftxp[:, 0] ** 2 + Ftxp[:, 1] ** 2
    return np.sqrt(num / np.maximum(den, 1e-12))


def _transfer(H: np.ndarray, x: np.ndarray, xp: np.ndarray) -> np.ndarray:
    """Homography transfer error ``|H x - xp|`` (pixels)."""
    y = np.c_[x, np.ones(len(x))] @ H.T
    y = y[:, :2] / np.where(np.abs(y[:, 2:]) < 1e-12, 1e-12, y[:, 2:])
    return np.linalg.norm(y - xp, axis=1)


class FlowScorer:
    """Per-stream state of the flow score (the last ``gap`` images).

    Args:
        gap: compare each frame with the one this many frames earlier (more motion per pair).
        tau_px: residual (pixels at :data:`WORK_WIDTH`) where the score is 0.5.
    """

    def __init__(self, gap: int = 2, tau_px: float = TAU_PX) -> None:
        import cv2

        self.gap, self.tau = max(1, int(gap)), float(tau_px)
        self._prev: deque = deque(maxlen=self.gap)
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.model_used: Optional[str] = None  # "fundamental" / "homography" for the last frame

    @staticmethod
    def _homography_enough(H: np.ndarray, x: np.ndarray, xp: np.ndarray, f_in: np.ndarray, thr: float) -> bool:
        """Whether the homography explains the pixels the fundamental matrix calls static: the
        :data:`H_QUANTILE` quantile of their transfer error within ``thr`` (no parallax to speak of)."""
        static = f_in.reshape(-1).astype(bool)
        if static.sum() < MIN_FIT:
            return True
        return float(np.quantile(_transfer(H, x[static], xp[static]), H_QUANTILE)) <= thr

    def score(self, image: np.ndarray, crop: CropInfo) -> Optional[np.ndarray]:
        """``(H, W)`` float32 score at model resolution for the original ``image`` ``(H0, W0, 3)``
        (``crop``: how it maps to the model input), or ``None`` while there is no earlier frame."""
        import cv2

        h, w = crop.output_hw
        factor = max(1, int(round(WORK_WIDTH / max(1, w))))
        grey = _grey(model_view(image, crop, factor))
        prev = self._prev[0] if len(self._prev) == self.gap else None
        if prev is not None and prev.shape != grey.shape:
            prev = None  # the size changed (a new segment of another resolution)
        self._prev.append(grey)
        if prev is None:
            return None
        back = self._dis.calc(grey, prev, None)  # current pixel -> where it was
        fwd = self._dis.calc(prev, grey, None)
        hh, ww = grey.shape
        v, u = np.mgrid[0:hh, 0:ww].astype(np.float32)
        px, py = u + back[..., 0], v + back[..., 1]
        fb = cv2.remap(fwd, px, py, cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(1e3, 1e3))
        reliable = np.hypot(back[..., 0] + fb[..., 0], back[..., 1] + fb[..., 1]) < FB_PX
        reliable &= (px >= 0) & (px <= ww - 1) & (py >= 0) & (py <= hh - 1)
        gx = cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3)
        gy = cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3)
        textured = np.hypot(gx, gy) > 8.0
        g = GRID_PX * factor // 2 or 1
        sel = np.zeros_like(reliable)
        sel[g // 2::g, g // 2::g] = True
        sel &= reliable & textured
        x = np.c_[u[sel], v[sel]].astype(np.float64)
        xp = np.c_[px[sel], py[sel]].astype(np.float64)
        if len(x) < MIN_FIT:
            return None
        thr = self.tau * (w * factor) / WORK_WIDTH  # tau in work pixels
        F, f_in = cv2.findFundamentalMat(x, xp, cv2.FM_RANSAC, thr, 0.999)
        H, h_in = cv2.findHomography(x, xp, cv2.RANSAC, thr)
        nf = int(f_in.sum()) if F is not None and F.shape == (3, 3) else -1
        nh = int(h_in.sum()) if H is not None else -1
        all_x = np.c_[u.ravel(), v.ravel()].astype(np.float64)
        all_xp = np.c_[px.ravel(), py.ravel()].astype(np.float64)
        if nh >= 0 and (nf < 0 or self._homography_enough(H, x, xp, f_in, thr)):
            res, self.model_used = _transfer(H, all_x, all_xp), "homography"
        elif nf >= 0:
            res, self.model_used = _sampson(F[:3], all_x, all_xp), "fundamental"
        else:
            return None
        res = res.reshape(hh, ww) * (WORK_WIDTH / (w * factor))  # in WORK_WIDTH pixels
        # the flow's own noise on this pair: the residual of the median reliable textured pixel
        floor = float(np.median(res[reliable & textured])) if (reliable & textured).any() else 0.0
        tau = max(self.tau, NOISE_K * floor)
        s = np.clip(res / (2 * tau), 0.0, 1.0).astype(np.float32)
        # flow is only determined where the image has structure in two directions (not inside a
        # uniform patch, not along a single edge): elsewhere it is interpolated and proves nothing
        constrained = cv2.cornerMinEigenVal(grey, 2 * factor + 3) > MIN_EIGEN
        s[~(reliable & constrained)] = 0.0
        if SPREAD_PX:  # a judged pixel speaks for its neighbourhood (uniform parts of a mover)
            k = 2 * SPREAD_PX * factor + 1
            s = cv2.dilate(s, np.ones((k, k), np.uint8))
        if factor > 1:
            s = cv2.resize(s, (w, h), interpolation=cv2.INTER_AREA)
        return s
