"""Image preprocessing exactly as the reference demo's loader (``load_images``), and its inverse.

Torch-free except :func:`to_model_tensor` (so bridges can use it).

For ``size=512``: resize so the long side is 512, then centre-crop each side down to a multiple of
16 (a square input is cropped to 4:3, 512x384). For ``size=224``: resize so the *short* side is
about 224, then centre-crop a square. Resampling is Pillow's (LANCZOS when shrinking, BICUBIC
otherwise), new side = ``round(side * target / long_side)``. Pixels are normalised to ``[-1, 1]``.

:class:`CropInfo` records the scale and crop, so model pixels map back to the original image
(colours, intrinsics of a virtual camera) with :meth:`CropInfo.to_original` / ``K_to_original``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["CropInfo", "plan_crop", "preprocess_rgb", "preprocess_torch", "load_image_reference", "to_model_tensor", "upload"]


@dataclass(frozen=True)
class CropInfo:
    """How an original ``(H0, W0)`` image became the ``(H, W)`` model input.

    Model pixel ``(u, v)`` comes from original pixel ``((u + x0 + 0.5) / sx - 0.5, (v + y0 + 0.5) / sy - 0.5)``,
    with ``(x0, y0)`` the crop offset in the resized image and ``sx = W1 / W0``, ``sy = H1 / H0``
    the resize factors (``(W1, H1)`` the resized size).
    """

    original_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    crop_xy: tuple[int, int]
    output_hw: tuple[int, int]

    @property
    def scale_xy(self) -> tuple[float, float]:
        return self.resized_hw[1] / self.original_hw[1], self.resized_hw[0] / self.original_hw[0]

    def to_original(self, uv: np.ndarray) -> np.ndarray:
        """``(..., 2)`` model pixel coordinates -> original image pixel coordinates."""
        sx, sy = self.scale_xy
        uv = np.asarray(uv, dtype=np.float64)
        out = np.empty_like(uv)
        out[..., 0] = (uv[..., 0] + self.crop_xy[0] + 0.5) / sx - 0.5
        out[..., 1] = (uv[..., 1] + self.crop_xy[1] + 0.5) / sy - 0.5
        return out

    def to_model(self, uv: np.ndarray) -> np.ndarray:
        """``(..., 2)`` original pixel coordinates -> model pixel coordinates (inverse of the above)."""
        sx, sy = self.scale_xy
        uv = np.asarray(uv, dtype=np.float64)
        out = np.empty_like(uv)
        out[..., 0] = (uv[..., 0] + 0.5) * sx - 0.5 - self.crop_xy[0]
        out[..., 1] = (uv[..., 1] + 0.5) * sy - 0.5 - self.crop_xy[1]
        return out

    def K_to_original(self, K: np.ndarray) -> np.ndarray:
        """``(3, 3)`` intrinsics in model pixels -> intrinsics of the original image."""
        sx, sy = self.scale_xy
        K = np.asarray(K, dtype=np.float64).copy()
        K[0, 0] /= sx
        K[1, 1] /= sy
        K[0, 2] = (K[0, 2] + self.crop_xy[0] + 0.5) / sx - 0.5
        K[1, 2] = (K[1, 2] + self.crop_xy[1] + 0.5) / sy - 0.5
        return K

    def K_to_model(self, K: np.ndarray) -> np.ndarray:
        """``(3, 3)`` intrinsics of the original image -> intrinsics in model pixels."""
        sx, sy = self.scale_xy
        K = np.asarray(K, dtype=np.float64).copy()
        K[0, 0] *= sx
        K[1, 1] *= sy
        K[0, 2] = (K[0, 2] + 0.5) * sx - 0.5 - self.crop_xy[0]
        K[1, 2] = (K[1, 2] + 0.5) * sy - 0.5 - self.crop_xy[1]
        return K


def plan_crop(h0: int, w0: int, size: int) -> CropInfo:
    """The reference resize + centre crop for an ``(h0, w0)`` image at ``size`` 512 (or any long
    side) or 224 (square crop)."""
    if size == 224:
        target = round(size * max(w0 / h0, h0 / w0))
    else:
        target = size
    long_side = max(w0, h0)
    w1, h1 = (int(round(s * target / long_side)) for s in (w0, h0))
    cx, cy = w1 // 2, h1 // 2
    if size == 224:
        half = min(cx, cy)
        box = (cx - half, cy - half, cx + half, cy + half)
    else:
        halfw, halfh = ((2 * cx) // 16) * 8, ((2 * cy) // 16) * 8
        if w1 == h1:
            halfh = 3 * halfw / 4
        box = tuple(int(round(v)) for v in (cx - halfw, cy - halfh, cx + halfw, cy + halfh))
    x0, y0, x1, y1 = box
    return CropInfo(original_hw=(h0, w0), resized_hw=(h1, w1), crop_xy=(x0, y0), output_hw=(y1 - y0, x1 - x0))


def preprocess_rgb(rgb: np.ndarray, size: int) -> tuple[np.ndarray, CropInfo]:
    """Resize and crop an ``(H0, W0, 3)`` uint8 RGB image as the reference does.

    Returns:
        ``(H, W, 3)`` uint8 model-resolution image and its :class:`CropInfo`.
    """
    from PIL import Image

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    info = plan_crop(rgb.shape[0], rgb.shape[1], size)
    img = Image.fromarray(rgb)
    (h1, w1) = info.resized_hw
    if (w1, h1) != img.size:
        shrinking = max(img.size) > max(w1, h1)
        img = img.resize((w1, h1), Image.LANCZOS if shrinking else Image.BICUBIC)
    x0, y0 = info.crop_xy
    img = img.crop((x0, y0, x0 + info.output_hw[1], y0 + info.output_hw[0]))
    return np.array(img), info


def load_image_reference(path: str | Path, size: int) -> np.ndarray:
    """Open an image file as the reference loader does (EXIF orientation, RGB) and preprocess it."""
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        rgb = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return preprocess_rgb(rgb, size)[0]


def to_model_tensor(rgb: np.ndarray, device="cpu") -> "Tensor":
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float32 in ``[-1, 1]``: ``(u8 / 255 - 0.5) / 0.5``."""

    t = upload(np.ascontiguousarray(rgb), device).permute(2, 0, 1).unsqueeze(0).float()
    return (t / 255.0 - 0.5) / 0.5


def upload(arr: np.ndarray, device="cpu") -> "Tensor":
    """A contiguous array as a tensor on ``device``; to a CUDA device through pinned (page-locked) host
    memory, asynchronously (the copy overlaps the host's work until the tensor is used)."""
    import torch

    t = torch.from_numpy(arr)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def preprocess_torch(rgb: np.ndarray, size: int, device="cpu") -> tuple["Tensor", np.ndarray, CropInfo]:
    """Fast path: upload the uint8 frame and resize/crop/normalise on ``device`` (GPU-side preprocessing).

    Same crop plan as :func:`preprocess_rgb`, but torch's antialiased bicubic resize instead of
    Pillow's LANCZOS: not bit-exact with the reference (a few grey levels on average, see
    docs/PERFORMANCE.md). Returns ``(x (1, 3, H, W) in [-1, 1], u8 (H, W, 3) colours, crop)``.
    """
    import torch
    import torch.nn.functional as F

    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}")
    info = plan_crop(rgb.shape[0], rgb.shape[1], size)
    rgb = np.ascontiguousarray(rgb) if rgb.flags.writeable else np.array(rgb)  # torch wants writable memory
    t = upload(rgb, device).permute(2, 0, 1)[None].float()
    if info.resized_hw != info.original_hw:
        t = F.interpolate(t, size=info.resized_hw, mode="bicubic", antialias=True, align_corners=False)
    x0, y0 = info.crop_xy
    t = t[..., y0:y0 + info.output_hw[0], x0:x0 + info.output_hw[1]].clamp(0, 255).round()
    u8 = t[0].permute(1, 2, 0).to(torch.uint8).cpu().numpy()
    return (t / 255.0 - 0.5) / 0.5, u8, info
