"""Camera effects for training images: what a real camera does to a picture and a renderer does not.

The synthetic renderer draws clean, sharp, noise-free, evenly exposed frames. Real video (phones,
webcams, RGB-D sensors) has exposure and white-balance errors, a tone curve, vignetting, defocus and
motion blur, sensor noise and JPEG / video compression. A small network trained on clean renders
learns cues that do not survive these (issue 15: the bundled model's depth did not transfer to real
frames). :func:`apply_camera_effects` degrades a training batch the way a camera would, with random
strengths, so that what the network learns holds for both.

Per sample (one sequence): exposure gain, tone curve (gamma), white balance, contrast, saturation and
vignetting are drawn once and shared by its views (one camera, one setting); blur, noise and the JPEG
quality are drawn per view (they change from frame to frame in handheld video). Geometry (depth,
poses, intrinsics) is untouched: these are photometric effects only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CameraEffects", "apply_camera_effects"]


@dataclass(frozen=True)
class CameraEffects:
    """Strength ranges of the effects (each drawn uniformly from its ``(low, high)``).

    Attributes:
        prob: chance a sample gets any effect (the others stay clean).
        exposure: gain on linear intensity; gamma: exponent of the tone curve applied after it.
        white_balance: spread of the per-channel gains (log scale, +-).
        contrast, saturation: factors about the image mean / the grey value.
        vignette: darkening at the image corners (fraction lost at the corner).
        blur_prob, blur_sigma: chance of a defocus blur per view and its Gaussian sigma (pixels).
        motion_prob, motion_length: chance of a linear motion blur per view and its length (pixels).
        read_noise, shot_noise: sensor noise std (in [0, 1] units) and its signal-dependent part.
        jpeg_prob, jpeg_quality: chance of JPEG compression per view and its quality.
    """

    prob: float = 0.8
    exposure: tuple = (0.6, 1.5)
    gamma: tuple = (0.8, 1.25)
    white_balance: float = 0.12
    contrast: tuple = (0.7, 1.2)
    saturation: tuple = (0.5, 1.2)
    vignette: tuple = (0.0, 0.4)
    blur_prob: float = 0.3
    blur_sigma: tuple = (0.4, 1.2)
    motion_prob: float = 0.3
    motion_length: tuple = (2.0, 6.0)
    read_noise: tuple = (0.0, 0.02)
    shot_noise: tuple = (0.0, 0.02)
    jpeg_prob: float = 0.5
    jpeg_quality: tuple = (35, 95)

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("prob"):
                if not 0.0 <= float(v) <= 1.0:
                    raise ValueError(f"camera_effects.{f.name} must be in [0, 1], got {v}")
            elif isinstance(f.default, tuple):
                if len(v) != 2 or not 0 <= float(v[0]) <= float(v[1]):
                    raise ValueError(f"camera_effects.{f.name} must be a range [low, high] with 0 <= low <= high, got {v}")
            elif float(v) < 0:
                raise ValueError(f"camera_effects.{f.name} must be >= 0, got {v}")

    @classmethod
    def from_dict(cls, d: dict) -> "CameraEffects":
        """From a config mapping (unknown keys are an error naming them)."""
        if not isinstance(d, dict):
            raise ValueError(f"camera_effects must be a mapping of CameraEffects fields, got {d!r}")
        known = {f.name for f in fields(cls)}
        bad = sorted(set(d) - known)
        if bad:
            raise ValueError(f"unknown camera_effects keys {bad}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def _u(g: torch.Generator, lo_hi, n: int = 1) -> Tensor:
    lo, hi = (float(v) for v in lo_hi)
    return lo + (hi - lo) * torch.rand(n, generator=g)


def _gauss_kernel(sigma: float) -> Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _motion_kernel(length: float, angle: float) -> Tensor:
    """A ``(k, k)`` kernel: a line of ``length`` pixels through the centre at ``angle`` (radians)."""
    r = max(1, int(math.ceil(length / 2)))
    k = torch.zeros(2 * r + 1, 2 * r + 1)
    for t in torch.linspace(-length / 2, length / 2, steps=max(3, int(4 * length))):
        x, y = r + float(t) * math.cos(angle), r + float(t) * math.sin(angle)
        x0, y0 = int(math.floor(x)), int(math.floor(y))
        fx, fy = x - x0, y - y0
        for dx, dy, wgt in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)), (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
            if 0 <= x0 + dx <= 2 * r and 0 <= y0 + dy <= 2 * r:
                k[y0 + dy, x0 + dx] += wgt
    return k / k.sum()


def _filter(x: Tensor, k2d: Tensor) -> Tensor:
    """``x`` ``(3, H, W)`` filtered by ``k2d`` per channel (replicate padding)."""
    kh, kw = k2d.shape
    xp = F.pad(x[None], (kw // 2, kw // 2, kh // 2, kh // 2), mode="replicate")
    return F.conv2d(xp, k2d.to(x).expand(3, 1, kh, kw), groups=3)[0]


def _jpeg(x: Tensor, quality: int) -> Tensor:
    import cv2

    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    ok, buf = cv2.imencode(".jpg", u8[..., ::-1], [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:  # (cannot happen for a uint8 image; keep the frame as it is)
        return x
    out = cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(x) / 255.0


def _one_view(x: Tensor, fx: CameraEffects, p: dict, g: torch.Generator) -> Tensor:
    """``x`` ``(3, H, W)`` in [0, 1] -> the same through the sample's camera ``p`` and this view's draws."""
    x = (x.clamp(0, 1) ** 2.2) * p["gain"] * p["wb"][:, None, None]  # roughly linear light
    x = x * p["vig"]
    x = x.clamp(0, 1) ** (p["gamma"] / 2.2)  # the camera's tone curve
    grey = x.mean(0, keepdim=True)
    x = grey + p["sat"] * (x - grey)
    x = (x - x.mean()) * p["contrast"] + x.mean()
    if float(torch.rand(1, generator=g)) < fx.blur_prob:
        k = _gauss_kernel(float(_u(g, fx.blur_sigma)))
        x = _filter(x, k[:, None] * k[None, :])
    if float(torch.rand(1, generator=g)) < fx.motion_prob:
        x = _filter(x, _motion_kernel(float(_u(g, fx.motion_length)), float(_u(g, (0.0, math.pi)))))
    read, shot = float(_u(g, fx.read_noise)), float(_u(g, fx.shot_noise))
    if read > 0 or shot > 0:
        std = torch.sqrt(read ** 2 + shot ** 2 * x.clamp(0, 1))
        x = x + std * torch.randn(x.shape, generator=g)
    x = x.clamp(0, 1)
    if float(torch.rand(1, generator=g)) < fx.jpeg_prob:
        x = _jpeg(x, int(round(float(_u(g, fx.jpeg_quality)))))
    return (x * 255).round() / 255  # 8-bit like the frames the node reads


def apply_camera_effects(img: Tensor, fx: CameraEffects, g: torch.Generator) -> Tensor:
    """Degrade a training batch like a real camera.

    Args:
        img: ``(B, V, 3, H, W)`` float in ``[-1, 1]`` (the trainer's normalisation), on the CPU.
        fx: the effect ranges; g: the generator every draw comes from (deterministic by its seed).

    Returns:
        A new ``(B, V, 3, H, W)`` tensor in ``[-1, 1]``; ``img`` is not modified. Samples that draw no
        effect (``1 - fx.prob`` of them) are returned unchanged.
    """
    if img.ndim != 5 or img.shape[2] != 3:
        raise ValueError(f"camera effects expect images (B, V, 3, H, W), got {tuple(img.shape)}")
    out = img.clone()
    b, v, _, h, w = img.shape
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    r2 = (xx ** 2 + yy ** 2) / 2  # 1 at the corners
    for i in range(b):
        if float(torch.rand(1, generator=g)) >= fx.prob:
            continue
        p = {"gain": float(_u(g, fx.exposure)), "gamma": float(_u(g, fx.gamma)),
             "wb": torch.exp(_u(g, (-fx.white_balance, fx.white_balance), 3)),
             "contrast": float(_u(g, fx.contrast)), "sat": float(_u(g, fx.saturation)),
             "vig": (1 - float(_u(g, fx.vignette)) * r2).to(img)}
        for j in range(v):
            out[i, j] = _one_view(img[i, j] * 0.5 + 0.5, fx, p, g) * 2 - 1
    return out
