"""Reference resize/crop plan and the mapping back to the original image."""

from __future__ import annotations

import numpy as np
import pytest

from streamrecon.preprocess import plan_crop, preprocess_rgb, to_model_tensor


@pytest.mark.parametrize("hw,size,out", [((1080, 1920), 512, (288, 512)), ((480, 640), 512, (384, 512)),
                                         ((1000, 1000), 512, (384, 512)), ((720, 540), 512, (512, 384)),
                                         ((1080, 1920), 224, (224, 224)), ((1334, 1000), 224, (224, 224))])
def test_output_sizes_follow_the_reference(hw, size, out):
    info = plan_crop(*hw, size)
    assert info.output_hw == out
    assert out[0] % 16 == 0 and out[1] % 16 == 0


def test_pixel_and_intrinsics_mappings_are_inverse():
    info = plan_crop(1080, 1920, 512)
    uv = np.array([[0.0, 0.0], [511.0, 287.0], [100.5, 33.25]])
    assert np.allclose(info.to_model(info.to_original(uv)), uv)
    K0 = np.array([[1400.0, 0, 960], [0, 1400, 540], [0, 0, 1]])
    Km = info.K_to_model(K0)
    assert np.allclose(info.K_to_original(Km), K0)
    # projecting a 3D point with either K lands on corresponding pixels
    X = np.array([0.3, -0.2, 2.0])
    p0 = (K0 @ X)[:2] / X[2]
    pm = (Km @ X)[:2] / X[2]
    assert np.allclose(info.to_original(pm), p0)


def test_colours_line_up_with_the_original():
    rng = np.random.default_rng(0)
    rgb = np.zeros((480, 640, 3), np.uint8)
    rgb[::2] = rng.integers(0, 255, (240, 640, 3), dtype=np.uint8)  # detail a resize must not move
    rgb[200:280, 300:340] = (255, 0, 0)  # a red box
    out, info = preprocess_rgb(rgb, 512)
    ys, xs = np.nonzero((out[..., 0] > 200) & (out[..., 1] < 60))
    centre_model = np.array([xs.mean(), ys.mean()])
    assert np.allclose(info.to_original(centre_model), [319.5, 239.5], atol=1.0)


def test_normalisation():
    t = to_model_tensor(np.array([[[0, 255, 128]]], np.uint8))
    assert t.shape == (1, 3, 1, 1)
    assert np.allclose(t.flatten().numpy(), [-1.0, 1.0, (128 / 255 - 0.5) / 0.5], atol=1e-6)
    with pytest.raises(ValueError, match="uint8 RGB"):
        preprocess_rgb(np.zeros((10, 10), np.uint8), 512)
