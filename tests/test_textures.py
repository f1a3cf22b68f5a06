"""Photographic textures in the synthetic scenes (issue 15): loading, wrapped bilinear sampling, the
renderer showing them, and scenes whose geometry does not change with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrecon.probe import look_at
from streamrecon.synth import intrinsics, random_scene, render
from streamrecon.synth.dataset import SynthConfig, render_sequence
from streamrecon.synth.scene import Scene
from streamrecon.synth.textures import load_textures, sample_texture


def _write_texture_dir(tmp_path, n=2):
    import cv2

    d = tmp_path / "tex"
    d.mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        im = np.zeros((40, 60, 3), np.uint8)
        im[:, :30] = (0, 0, 255)  # BGR on disk: red on the left half, blue on the right
        im[:, 30:] = (255, 0, 0)
        im[::7] = rng.integers(0, 255, (im[::7].shape), dtype=np.uint8)
        cv2.imwrite(str(d / f"t{k}.png"), im)
    (d / "notes.txt").write_text("not an image\n")
    return d


def test_a_directory_of_images_is_loaded_as_rgb(tmp_path):
    bank = load_textures(str(_write_texture_dir(tmp_path)), max_side=30)
    assert len(bank) == 2
    t = bank[0]
    assert t.shape == (3, 20, 30) and float(t.max()) <= 1.0  # longer side reduced to 30
    assert float(t[0, 2, 2]) > 0.9 and float(t[2, 2, 2]) < 0.1  # left half is red (RGB order)
    assert float(t[2, 2, -2]) > 0.9 and float(t[0, 2, -2]) < 0.1
    assert load_textures("") == ()


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="neither"):
        load_textures(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .png"):
        load_textures(str(tmp_path / "empty"))


def test_sampling_wraps_and_interpolates():
    tex = torch.zeros(3, 2, 2)
    tex[0, :, 0] = 1.0  # red column 0, black column 1
    at = sample_texture(tex, torch.tensor([[0.25, 0.25], [1.25, 3.25], [0.75, 0.25], [0.5, 0.25]]))
    assert torch.allclose(at[0], torch.tensor([1.0, 0, 0]))  # texel centre
    assert torch.allclose(at[1], at[0])  # one repeat per unit
    assert torch.allclose(at[2], torch.zeros(3))
    assert abs(float(at[3, 0]) - 0.5) < 1e-6  # half way between the two columns


def test_a_textured_wall_shows_the_photograph(tmp_path):
    bank = load_textures(str(_write_texture_dir(tmp_path, 1)))
    scene = Scene(room=torch.tensor([6.0, 3.0, 6.0]), room_colors=torch.full((6, 2, 3), 0.5),
                  room_patterns=["checker"] * 6, room_scales=torch.ones(6), objects=[],
                  lights=torch.tensor([[0.0, -2.7, 0.0]]), light_power=torch.tensor([6.0]), ambient=0.3, seed=0,
                  textures=bank, room_textures=[-1, -1, -1, -1, -1, 0], room_tex_scales=[1.0] * 6)
    T = torch.from_numpy(look_at(np.array([0.0, -1.5, 0.0]), np.array([0.0, -1.5, 1.0])))
    K = intrinsics(48, 64, 90)
    rgb = render(scene, T, K, 48, 64)["rgb"].float()
    r, b = rgb[..., 0].mean(), rgb[..., 2].mean()
    # the +z wall carries red and blue halves (x in [-3, 3] m spans 6 repeats): both colours, little green
    assert r > 2 * rgb[..., 1].mean() and b > 2 * rgb[..., 1].mean()
    plain = render(Scene(**{**scene.__dict__, "room_textures": [-1] * 6}), T, K, 48, 64)["rgb"].float()
    assert (plain[..., 0] - plain[..., 2]).abs().max() < 1  # grey pattern without the texture


def test_textures_change_colours_not_geometry(tmp_path):
    bank = load_textures(str(_write_texture_dir(tmp_path)))
    a, b = random_scene(7), random_scene(7, textures=bank, texture_prob=1.0)
    assert torch.equal(a.room, b.room) and len(a.objects) == len(b.objects)
    assert all(torch.equal(p.center, q.center) for p, q in zip(a.objects, b.objects))
    assert all(k >= 0 for k in b.room_textures) and all(p.texture >= 0 for p in b.objects)
    cfg = SynthConfig(height=28, width=40, virtual=0)
    plain = render_sequence(3, cfg, frames=2)
    tex = render_sequence(3, SynthConfig(height=28, width=40, virtual=0, textures=str(tmp_path / "tex"),
                                         texture_prob=1.0), frames=2)
    assert np.array_equal(plain["depth"], tex["depth"]) and np.array_equal(plain["T_wc"], tex["T_wc"])
    assert not np.array_equal(plain["rgb"], tex["rgb"])


def test_the_scikit_image_photographs_are_there_and_listed_with_licences():
    pytest.importorskip("skimage")  # the [train] extra; CI installs it with [dev]
    bank = load_textures("skimage")
    from streamrecon.synth.textures import SKIMAGE_TEXTURES

    assert len(bank) == len(SKIMAGE_TEXTURES)
    assert all(t.shape[0] == 3 and max(t.shape[1:]) <= 256 and float(t.std()) > 0.02 for t in bank)
    assert all(lic in ("CC0-1.0", "public domain") for _, lic in SKIMAGE_TEXTURES.values())
