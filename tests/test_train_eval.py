"""Losses, a short training run with resume, and evaluation on synthetic / TUM / 7-Scenes folders."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from streamrecon.eval.datasets import EvalSequence, find_sequences
from streamrecon.eval.evaluate import EvalConfig, evaluate, format_report, score_results
from streamrecon.geometry import matrix_to_pose_encoding
from streamrecon.mapping import write_tum
from streamrecon.preprocess import plan_crop
from streamrecon.synth.dataset import SynthConfig, render_sequence, write_sequence
from streamrecon.train.losses import Cut3rLoss, relative_poses, unproject
from streamrecon.types import StepOutput

from .conftest import tiny_config

SMALL = SynthConfig(height=48, width=64, frames=6, virtual=0)


@pytest.fixture(scope="module")
def seq():
    return render_sequence(4242, SMALL)


def _batch(seq, views=3):
    rgb = torch.from_numpy(seq["rgb"][:views]).permute(0, 3, 1, 2).float()[None]
    return {"img": (rgb / 255 - 0.5) / 0.5, "depth": torch.from_numpy(seq["depth"][:views])[None],
            "valid": torch.from_numpy(seq["valid"][:views])[None], "T_wc": torch.from_numpy(seq["T_wc"][:views]).float()[None],
            "K": torch.from_numpy(np.broadcast_to(seq["K"], (views, 3, 3)).copy()).float()[None]}


def _perfect_outputs(batch, scale=1.0, conf=3.0):
    rel = relative_poses(batch["T_wc"].double()).float()
    pts = unproject(batch["depth"], batch["K"]) * scale
    world = pts @ rel[:, :, None, :3, :3].transpose(-1, -2) + rel[:, :, None, None, :3, 3] * scale
    outs = []
    for v in range(pts.shape[1]):
        pose = matrix_to_pose_encoding(rel[:, v])
        pose[:, :3] *= scale
        c = torch.full(pts.shape[2:4], conf)[None]
        outs.append(StepOutput(points_cam=pts[:, v], conf_cam=c, points_world=world[:, v], conf_world=c, pose=pose,
                               rgb=batch["img"][:, v].permute(0, 2, 3, 1)))
    return outs


def test_loss_is_minimal_for_the_ground_truth(seq):
    batch = _batch(seq)
    loss_fn = Cut3rLoss()
    _, logs = loss_fn(_perfect_outputs(batch), batch, [False, True, False])
    assert logs["err_self"] < 1e-5 and logs["err_cross"] < 1e-5 and logs["pose"] < 1e-4 and logs["rgb"] < 1e-10
    _, bad = loss_fn(_perfect_outputs(batch, scale=1.5), batch, [False, True, False])
    assert bad["err_self"] > 0.2 and bad["pose"] > 0.01  # metric: a wrong scale is penalised
    # the normalisation makes the error scale-free: same relative error at any scene scale
    big = dict(batch, depth=batch["depth"] * 10, T_wc=batch["T_wc"].clone())
    big["T_wc"][..., :3, 3] *= 10
    _, bad_big = loss_fn(_perfect_outputs(big, scale=1.5), big, [False, True, False])
    assert bad_big["err_self"] == pytest.approx(bad["err_self"], rel=1e-3)


def test_scale_invariant_loss_scores_structure_and_learns_scale_apart(seq):
    batch = _batch(seq)
    si = Cut3rLoss(norm="scale_invariant", scale_weight=0.1)
    _, exact = si(_perfect_outputs(batch), batch, [False, True, False])
    assert exact["err_self"] < 1e-5 and exact["pose"] < 1e-4 and exact["scale"] < 1e-6
    _, scaled = si(_perfect_outputs(batch, scale=1.5), batch, [False, True, False])
    # a wrong global scale: no 3D or pose error (structure is right), only the scale term, = |log 1.5|
    assert scaled["err_self"] < 1e-5 and scaled["err_cross"] < 1e-5 and scaled["pose"] < 1e-4
    assert scaled["scale"] == pytest.approx(np.log(1.5), rel=1e-4)
    # a wrong structure is still an error
    warped = _perfect_outputs(batch)
    ramp = torch.linspace(0.5, 1.5, warped[1].points_cam.shape[2])[None, None, :, None]  # depth tilted across the image
    warped[1] = replace(warped[1], points_cam=warped[1].points_cam * ramp)
    _, bad = si(warped, batch, [False, True, False])
    assert bad["err_self"] > 0.02
    with pytest.raises(ValueError, match="loss norm"):
        Cut3rLoss(norm="median")


def test_short_training_run_resumes_and_exports(tmp_path):
    from streamrecon.checkpoint import load_model
    from streamrecon.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=tiny_config("linear").to_dict(), out_dir=str(tmp_path / "run"), steps=4, batch_size=2,
                      views=3, warmup=2, val_every=4, val_sequences=1, val_frames=4, save_every=2, log_every=1,
                      data={"height": 48, "width": 64, "frames": 8}, pool=2, pool_refresh_every=1)
    val = train(cfg, progress=None)
    assert set(val) >= {"abs_rel", "ate_sim3_pct"} and all(np.isfinite(v) for v in val.values())
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2, 3, 4]
    ckpt = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert ckpt["step"] == 4
    cfg.steps = 6
    train(cfg, progress=None)  # resumes at step 4
    log = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "loss" in x] == [1, 2, 3, 4, 5, 6]
    model = load_model(tmp_path / "run" / "model.safetensors")
    assert model.cfg == tiny_config("linear")
    first = log[0]["loss"]
    assert all(np.isfinite(x["loss"]) for x in log if "loss" in x) and first > 0


def test_ema_weights_are_exported_and_resume(tmp_path):
    """``ema: d``: model.safetensors holds the moving average (first update: a copy), last.pt the raw
    weights and the average, so a resumed run continues the same average."""
    from streamrecon.checkpoint import load_model
    from streamrecon.train.trainer import TrainConfig, train

    d = 0.7
    cfg = TrainConfig(model=tiny_config("linear").to_dict(), out_dir=str(tmp_path / "run"), steps=1, batch_size=1,
                      views=2, warmup=1, val_every=0, save_every=1, log_every=1, export_dtype="float32", ema=d,
                      data={"height": 48, "width": 64, "frames": 6}, pool=1)
    train(cfg, progress=None)
    raw1 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    out1 = load_model(tmp_path / "run" / "model.safetensors").state_dict()
    assert all(torch.equal(out1[k], v) for k, v in raw1.items())
    cfg.steps = 2
    train(cfg, progress=None)  # resumes at step 1
    raw2 = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    out2 = load_model(tmp_path / "run" / "model.safetensors").state_dict()
    name = next(k for k, v in raw2.items() if v.is_floating_point() and v.ndim == 2 and not torch.equal(v, raw1[k]))
    assert torch.allclose(out2[name], d * raw1[name] + (1 - d) * raw2[name], atol=1e-6)
    assert not torch.allclose(out2[name], raw2[name], atol=1e-6)
    with pytest.raises(ValueError, match="ema"):
        train(TrainConfig(model=tiny_config("linear").to_dict(), out_dir=str(tmp_path / "bad"), steps=1, ema=1.5,
                          data={"height": 48, "width": 64, "frames": 6}, pool=1), progress=None)


def _fake_result(depth, T, h, w):
    crop = plan_crop(h, w, max(h, w))
    K = np.array([[50.0, 0, w / 2], [0, 50.0, h / 2], [0, 0, 1]])
    pts = unproject(torch.from_numpy(depth).double(), torch.from_numpy(K)).numpy()
    return SimpleNamespace(crop=crop, depth=depth, T_wc=T, points_world_pose=pts @ T[:3, :3].T + T[:3, 3],
                           conf_cam=np.full(depth.shape, 3.0)), K


def test_scoring_ground_truth_gives_zero_error(seq):
    n, (h, w) = len(seq["rgb"]), seq["rgb"].shape[1:3]
    results, Ks = zip(*[_fake_result(seq["depth"][i], seq["T_wc"][i], h, w) for i in range(n)])
    gt = EvalSequence.from_arrays("s", seq["rgb"], seq["depth"], seq["T_wc"], Ks[0])
    scores = score_results(gt, list(range(n)), list(results), EvalConfig())
    assert scores["abs_rel"] < 1e-6 and scores["abs_rel_metric"] < 1e-6 and scores["delta1"] == 1.0
    assert scores["ate_sim3"] < 1e-6 and scores["ate_se3"] < 1e-6 and scores["rpe_rot_deg"] < 1e-3
    assert scores["accuracy"] < 0.05 and scores["completeness"] < 0.05


def _write_tum(seq, d):
    (d / "rgb").mkdir(parents=True)
    (d / "depth").mkdir()
    stamps = 1305031102.0 + np.arange(len(seq["rgb"])) / 30
    rgb_lines, depth_lines = ["# color images"], ["# depth maps"]
    for i, t in enumerate(stamps):
        cv2.imwrite(str(d / "rgb" / f"{t:.6f}.png"), seq["rgb"][i][..., ::-1])
        cv2.imwrite(str(d / "depth" / f"{t + 0.004:.6f}.png"), np.round(seq["depth"][i] * 5000).astype(np.uint16))
        rgb_lines.append(f"{t:.6f} rgb/{t:.6f}.png")
        depth_lines.append(f"{t + 0.004:.6f} depth/{t + 0.004:.6f}.png")
    (d / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (d / "depth.txt").write_text("\n".join(depth_lines) + "\n")
    write_tum(d / "groundtruth.txt", list(stamps - 0.003), seq["T_wc"])


def _write_7scenes(seq, d):
    d.mkdir(parents=True)
    for i in range(len(seq["rgb"])):
        cv2.imwrite(str(d / f"frame-{i:06d}.color.png"), seq["rgb"][i][..., ::-1])
        mm = np.round(seq["depth"][i] * 1000).astype(np.uint16)
        mm[0, 0] = 65535  # invalid marker
        cv2.imwrite(str(d / f"frame-{i:06d}.depth.png"), mm)
        np.savetxt(d / f"frame-{i:06d}.pose.txt", seq["T_wc"][i])


def test_datasets_in_every_format_read_back(tmp_path, seq):
    write_sequence(seq, tmp_path / "data" / "synthetic" / "seq_a")
    _write_tum(seq, tmp_path / "data" / "tum" / "rgbd_dataset_fake")
    _write_7scenes(seq, tmp_path / "data" / "7scenes" / "chess" / "seq-01")
    K = seq["K"]
    found = {s.fmt: s for s in find_sequences(tmp_path / "data", K=K)}
    assert set(found) == {"synthetic", "tum", "7scenes"}
    for fmt, s in found.items():
        assert len(s) == len(seq["rgb"]), fmt
        assert np.array_equal(s.rgb(2), seq["rgb"][2]), fmt
        tol = {"synthetic": 1e-6, "tum": 0.5 / 5000 + 1e-6, "7scenes": 0.5 / 1000 + 1e-6}[fmt]  # half a quantum
        d = s.depth(3)
        ok = d > 0
        assert np.abs(d[ok] - seq["depth"][3][ok]).max() <= tol, fmt
        assert np.allclose(s.T_wc, seq["T_wc"], atol=1e-5), fmt
    assert found["7scenes"].depth(0)[0, 0] == 0  # 65535 = invalid
    assert np.allclose(find_sequences(tmp_path / "data" / "7scenes")[0].K[0, 0], 585.0)  # format default


def test_evaluate_reports_model_and_baselines(tmp_path, seq, shared):
    from streamrecon.checkpoint import load_model

    write_sequence(seq, tmp_path / "ds" / "a")
    model = load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    report = evaluate(model, find_sequences(tmp_path / "ds"), EvalConfig(size=64))
    for row in ("model", "untrained", "constant"):
        assert np.isfinite(report[row]["mean"]["abs_rel"]) and np.isfinite(report[row]["mean"]["ate_sim3"]), row
    # constant depth + identity poses: median scaling cannot fix a flat depth map; poses do not move
    assert report["constant"]["mean"]["abs_rel"] > 0.05
    assert report["constant"]["sequences"][0]["ate_sim3"] > 0 or np.isnan(report["constant"]["sequences"][0]["ate_sim3"])
    text = format_report(report)
    assert "model" in text and "untrained" in text and "constant" in text
    r = subprocess.run([sys.executable, "-m", "streamrecon", "eval", str(tmp_path / "ds"), "--weights",
                        str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--size", "64", "--no-baselines",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "AbsRel" in r.stdout and json.loads((tmp_path / "r.json").read_text())["n_sequences"] == 1
    r = subprocess.run([sys.executable, "-m", "streamrecon", "eval", str(tmp_path / "nothing")], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "not found" in r.stderr


def test_training_progress_goes_to_its_stream_never_to_stdout(tmp_path, capsys):
    """Bars (and the validation line) on the progress stream; stdout carries only the command's JSON."""
    import io

    from streamrecon.train.trainer import TrainConfig, train

    cfg = TrainConfig(model=tiny_config("linear").to_dict(), out_dir=str(tmp_path / "run"), steps=2, batch_size=1,
                      views=2, warmup=1, val_every=2, val_sequences=1, val_frames=3, save_every=2, log_every=1,
                      data={"height": 48, "width": 64, "frames": 4}, pool=1)
    for bars in (True, False):
        stream = io.StringIO()
        train(cfg, progress=stream, bars=bars, resume=False)
        text = stream.getvalue()
        assert "val @ 2" in text and ("train: 100%" in text if bars else "step 2/2" in text), text
        assert ("rendering the training pool" in text) == bars
        assert capsys.readouterr().out == ""


def test_every_training_config_reads_and_a_bad_loss_norm_is_a_clear_error(tmp_path):
    from dataclasses import fields
    from pathlib import Path

    from streamrecon.cli import main, read_settings
    from streamrecon.train.trainer import TrainConfig

    configs = sorted((Path(__file__).parent.parent / "configs").glob("train_*.yaml"))
    assert len(configs) >= 4
    for c in configs:  # every key is a TrainConfig field, and the model and loss resolve
        cfg = TrainConfig(**read_settings(str(c), {f.name for f in fields(TrainConfig)}))
        cfg.model_config()
        cfg.effects()
        Cut3rLoss(norm=cfg.loss_norm, scale_weight=cfg.scale_weight)
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: streamrecon_small\nloss_norm: median\n")
    assert main(["train", "--config", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
