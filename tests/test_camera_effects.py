"""Camera effects on training images (streamrecon.train.camera_effects)."""

from __future__ import annotations

import json

import pytest
import torch

from streamrecon.train.camera_effects import CameraEffects, apply_camera_effects

from .conftest import tiny_config

OFF = dict(exposure=(1.0, 1.0), gamma=(1.0, 1.0), white_balance=0.0, contrast=(1.0, 1.0), saturation=(1.0, 1.0),
           vignette=(0.0, 0.0), blur_prob=0.0, motion_prob=0.0, read_noise=(0.0, 0.0), shot_noise=(0.0, 0.0),
           jpeg_prob=0.0)


def _batch(b=3, v=2, h=40, w=56, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(b, 1, 3, h // 8, w // 8, generator=g)  # blocky: edges for blur to soften
    img = torch.nn.functional.interpolate(base.flatten(0, 1), size=(h, w), mode="nearest").view(b, 1, 3, h, w)
    img = img.expand(b, v, 3, h, w).clone()
    return (img * 255).round() / 255 * 2 - 1


def test_effects_are_deterministic_keep_the_range_and_leave_the_input_alone():
    img = _batch()
    keep = img.clone()
    a = apply_camera_effects(img, CameraEffects(prob=1.0), torch.Generator().manual_seed(3))
    b = apply_camera_effects(img, CameraEffects(prob=1.0), torch.Generator().manual_seed(3))
    c = apply_camera_effects(img, CameraEffects(prob=1.0), torch.Generator().manual_seed(4))
    assert torch.equal(img, keep)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == img.shape and a.min() >= -1 and a.max() <= 1
    assert torch.allclose((a * 0.5 + 0.5) * 255, ((a * 0.5 + 0.5) * 255).round(), atol=1e-3)  # 8-bit levels
    assert (a - img).abs().mean() > 0.02


def test_with_prob_zero_or_every_effect_off_the_images_are_unchanged():
    img = _batch()
    assert torch.equal(apply_camera_effects(img, CameraEffects(prob=0.0), torch.Generator().manual_seed(0)), img)
    same = apply_camera_effects(img, CameraEffects(prob=1.0, **OFF), torch.Generator().manual_seed(0))
    assert (same - img).abs().max() <= 2 / 255 + 1e-6  # only the round trip through linear light and 8 bits


def test_each_effect_does_what_it_says():
    img = _batch(b=1, v=1)
    x = img * 0.5 + 0.5

    def run(**kw):
        return apply_camera_effects(img, CameraEffects(prob=1.0, **(OFF | kw)), torch.Generator().manual_seed(1)) * 0.5 + 0.5

    assert run(exposure=(1.4, 1.4)).mean() > x.mean() + 0.03
    assert run(exposure=(0.6, 0.6)).mean() < x.mean() - 0.03
    def edges(t):
        return float(((t[..., 1:] - t[..., :-1]) ** 2).mean() + ((t[..., 1:, :] - t[..., :-1, :]) ** 2).mean())  # gradient energy

    for blur in (dict(blur_prob=1.0, blur_sigma=(1.0, 1.0)), dict(motion_prob=1.0, motion_length=(5.0, 5.0))):
        y = run(**blur)
        assert edges(y) < 0.7 * edges(x)
        assert abs(float(y.mean() - x.mean())) < 0.02  # blur moves no light
    noisy = run(read_noise=(0.05, 0.05))
    assert 0.02 < float((noisy - x).std()) < 0.08
    vig = run(vignette=(0.5, 0.5))
    centre, corner = (vig / x.clamp_min(1e-3))[..., 18:22, 26:30], (vig / x.clamp_min(1e-3))[..., :3, :3]
    assert float(corner.mean()) < float(centre.mean()) - 0.1
    grey = run(saturation=(0.0, 0.0))
    assert float((grey - grey.mean(2, keepdim=True)).abs().max()) <= 2 / 255
    jpg = run(jpeg_prob=1.0, jpeg_quality=(10, 10))
    assert float((jpg - x).abs().mean()) > 0.005


def test_the_views_of_a_sample_share_one_camera_setting():
    img = _batch(b=4, v=3)  # the views of a sample are the same picture
    out = apply_camera_effects(img, CameraEffects(prob=1.0, **(OFF | dict(exposure=(0.6, 1.5), white_balance=0.2))),
                               torch.Generator().manual_seed(2))
    for i in range(4):
        assert torch.equal(out[i, 0], out[i, 1]) and torch.equal(out[i, 0], out[i, 2])
    assert not torch.equal(out[0, 0], out[1, 0])


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="unknown camera_effects keys.*blurr"):
        CameraEffects.from_dict({"blurr": 1})
    with pytest.raises(ValueError, match="jpeg_prob"):
        CameraEffects.from_dict({"jpeg_prob": 2})
    with pytest.raises(ValueError, match="exposure"):
        CameraEffects.from_dict({"exposure": [1.5, 0.5]})
    with pytest.raises(ValueError, match="mapping"):
        CameraEffects.from_dict([1, 2])
    with pytest.raises(ValueError, match=r"\(B, V, 3, H, W\)"):
        apply_camera_effects(torch.zeros(2, 3, 8, 8), CameraEffects(), torch.Generator())


def test_training_with_camera_effects_runs_and_a_bad_key_stops_the_cli(tmp_path):
    from streamrecon.cli import main
    from streamrecon.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=tiny_config("linear").to_dict(), out_dir=str(tmp_path / "run"), steps=2, batch_size=2,
                      views=2, warmup=1, val_every=2, val_sequences=1, val_frames=3, save_every=2, log_every=1,
                      data={"height": 48, "width": 64, "frames": 4}, pool=1, camera_effects={"prob": 1.0})
    train(cfg, progress=None)
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2] and all(x["loss"] > 0 for x in log if "loss" in x)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: streamrecon_small\ncamera_effects: {blurr: 1}\n")
    assert main(["train", "--config", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
