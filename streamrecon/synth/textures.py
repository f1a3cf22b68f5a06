"""Photographic textures for the synthetic scenes (issue 15: scenes closer to real images).

A texture bank is a list of RGB images, ``(3, H, W)`` float tensors in ``[0, 1]``, that surfaces of
:func:`~streamrecon.synth.scene.random_scene` may carry instead of a procedural pattern. Sources
(``SynthConfig.textures``):

* ``"skimage"``: the photographs bundled in the scikit-image wheel whose licence allows any use
  (:data:`SKIMAGE_TEXTURES`, each with its source and licence). scikit-image is an optional training
  dependency (``pip install scikit-image``); it is imported only here, and only when asked for.
* a directory: every ``*.png`` / ``*.jpg`` / ``*.jpeg`` in it (the user answers for the licences).

Nothing is downloaded and nothing is shipped with the package: the images are read from where they
are installed, at training time. Images are reduced so their longer side is at most ``max_side``
pixels (the renderer samples them at 160x112).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["SKIMAGE_TEXTURES", "load_textures", "sample_texture"]

log = logging.getLogger(__name__)

# file in skimage/data -> (what it shows, licence as scikit-image's documentation states it)
SKIMAGE_TEXTURES: dict[str, tuple[str, str]] = {
    "brick.png": ("brick wall (CC0Textures Bricks25)", "CC0-1.0"),
    "grass.png": ("grass (CC0Textures)", "CC0-1.0"),
    "gravel.png": ("gravel (CC0Textures Gravel04)", "CC0-1.0"),
    "coffee.png": ("a cup of coffee on a table (Rachel Michetti)", "CC0-1.0"),
    "chelsea.png": ("a cat on a carpet (Stefan van der Walt)", "CC0-1.0"),
    "camera.png": ("a photographer outdoors, greyscale (Lav Varshney)", "CC0-1.0"),
    "astronaut.png": ("astronaut portrait (NASA Great Images)", "public domain"),
    "rocket.jpg": ("a rocket on its launch pad (SpaceX)", "public domain"),
}

_EXTS = (".png", ".jpg", ".jpeg")


def _read(path: Path, max_side: int) -> Tensor:
    import cv2

    im = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if im is None:
        raise ValueError(f"texture {path}: not a readable image")
    im = np.ascontiguousarray(im[..., ::-1])
    s = max_side / max(im.shape[:2])
    if s < 1:
        im = cv2.resize(im, (max(2, round(im.shape[1] * s)), max(2, round(im.shape[0] * s))),
                        interpolation=cv2.INTER_AREA)
    return torch.from_numpy(im).permute(2, 0, 1).float() / 255.0


@lru_cache(maxsize=4)
def _load(source: str, max_side: int) -> tuple[Tensor, ...]:
    if source == "skimage":
        try:
            import skimage
        except ImportError as e:
            raise ValueError("textures: 'skimage' needs scikit-image (pip install scikit-image)") from e
        folder = Path(skimage.__file__).parent / "data"
        paths = [folder / n for n in SKIMAGE_TEXTURES if (folder / n).is_file()]
        if not paths:
            raise ValueError(f"textures: 'skimage': none of {sorted(SKIMAGE_TEXTURES)} in {folder}")
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"textures: {source!r} is neither 'skimage' nor a directory")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in _EXTS)
        if not paths:
            raise ValueError(f"textures: no .png/.jpg images in {folder}")
    out = tuple(_read(p, max_side) for p in paths)
    log.info("textures: %d images from %s", len(out), folder)
    return out


def load_textures(source: str, max_side: int = 256) -> tuple[Tensor, ...]:
    """The texture bank of ``source`` (``"skimage"`` or a directory; ``""``: none); cached per process.

    Returns:
        a tuple of ``(3, H, W)`` float tensors in ``[0, 1]``.
    """
    if not source:
        return ()
    return _load(str(source), int(max_side))


def sample_texture(tex: Tensor, uv: Tensor) -> Tensor:
    """Colours of ``tex`` ``(3, H, W)`` at texture coordinates ``uv`` ``(N, 2)`` (``u`` across,
    ``v`` down, one repeat per unit, wrapped), bilinear; returns ``(N, 3)``."""
    _, h, w = tex.shape
    frac = uv - torch.floor(uv)
    x = frac[:, 0] * w - 0.5
    y = frac[:, 1] * h - 0.5
    x0, y0 = torch.floor(x), torch.floor(y)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    x0, y0 = x0.long(), y0.long()
    flat = tex.reshape(3, -1).T  # (H*W, 3)

    def at(xi: Tensor, yi: Tensor) -> Tensor:
        return flat[(yi % h) * w + (xi % w)]

    top = at(x0, y0) * (1 - fx) + at(x0 + 1, y0) * fx
    bot = at(x0, y0 + 1) * (1 - fx) + at(x0 + 1, y0 + 1) * fx
    return (top * (1 - fy) + bot * fy).to(uv.dtype)
