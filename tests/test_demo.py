"""The bundled model and ``streamrecon demo``: works out of the box, beats the baselines."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from streamrecon.weights import bundled_weights


def test_bundled_model_ships_and_loads():
    from streamrecon.checkpoint import load_model
    from streamrecon.config import preset

    path = bundled_weights()
    assert path is not None, "the bundled model is missing from the package"
    assert path.stat().st_size <= 25 * 2**20
    model = load_model(path)
    assert model.cfg == preset("streamrecon_small")


def test_demo_runs_offline_and_reports_accuracy(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "streamrecon", "demo", "--output-dir", str(out), "--frames", "12"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "accuracy vs ground truth" in r.stderr and "Traceback" not in r.stderr
    acc = json.loads((out / "accuracy.json").read_text())
    for key in ("abs_rel", "delta1", "ate_sim3", "accuracy", "completeness", "coverage", "fscore"):
        assert np.isfinite(acc[key]), key
        assert key not in acc["baseline_constant"] or np.isfinite(acc["baseline_constant"][key]), key
    assert "baseline (constant depth, identity poses)" in r.stderr  # printed beside the model's figures
    assert 0 <= acc["coverage"] <= 1 and 0 <= acc["baseline_constant"]["coverage"] <= 1
    for name in ("trajectory.txt", "map.ply", "map.glb", "recording.rrd", "summary.json", "sequence/poses.txt"):
        assert (out / name).exists(), name


def test_bundled_model_beats_the_baselines_where_it_has_learned(tmp_path):
    """What the bundled model has learned, on scenes it never saw: depth far better than the untrained
    network, metric depth better than a constant depth (the README's table has the full picture: it does
    not beat constant depth on median-scaled AbsRel on every set, nor learn camera motion yet)."""
    from streamrecon.eval.datasets import find_sequences
    from streamrecon.eval.evaluate import EvalConfig, evaluate
    from streamrecon.pipeline import load_resolved
    from streamrecon.settings import EngineSettings
    from streamrecon.synth.dataset import SynthConfig, make_dataset

    make_dataset(tmp_path / "ds", 3, 93_000_000, SynthConfig(frames=12, virtual=0))
    loaded = load_resolved(EngineSettings())  # the bundled model, with its CheckpointInfo
    report = evaluate(loaded, find_sequences(tmp_path / "ds"), EvalConfig())
    # the map metrics of the model and of its untrained twin use the bundled model's calibrated threshold
    assert report["config"]["conf_thresh"] == loaded.info.conf_thresh > 1.0
    ours, untrained, constant = (report[k]["mean"] for k in ("model", "untrained", "constant"))
    assert ours["abs_rel"] < 0.5 * untrained["abs_rel"] and ours["delta1"] > 2 * untrained["delta1"], report
    assert ours["completeness"] < untrained["completeness"]
    assert ours["abs_rel_metric"] < constant["abs_rel_metric"] and ours["delta1_metric"] > constant["delta1_metric"]


def test_run_uses_the_bundled_model_without_weights(tmp_path, shared):
    r = subprocess.run([sys.executable, "-m", "streamrecon", "run", str(shared / "data" / "cut3r_examples" / "003"),
                        "--output-dir", str(tmp_path / "o"), "--no-progress"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "using the bundled model" in r.stderr
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["processed"] == 4 and summary["model"]["size"] == 160
    meta = json.loads(bundled_weights().with_suffix(".json").read_text())
    assert summary["config"]["conf_thresh"] is None  # not given: the bundled model's calibrated threshold
    assert summary["map"]["conf_thresh"] == float(meta["conf_thresh"]) > 1.0


def test_the_readme_python_example_fills_the_map_with_the_bundled_model(tmp_path, shared):
    """The library applies the checkpoint's recommended threshold like the CLI (the map's own default,
    1.5, is above every confidence the bundled model gives)."""
    from streamrecon.engine import Frame
    from streamrecon.pipeline import build_pipeline, load_resolved
    from streamrecon.settings import EngineSettings, MapSettings, OutputSettings, PipelineConfig
    from streamrecon.sources import open_source

    cfg = PipelineConfig(engine=EngineSettings(), map=MapSettings(voxel_size=0.02),
                         outputs=OutputSettings(output_dir=str(tmp_path / "mine")))
    pipe = build_pipeline(cfg, load_resolved(cfg.engine))  # weights=None: the bundled model
    src = open_source(str(shared / "data" / "cut3r_examples" / "003"))
    for i, f in enumerate(src):
        pipe.push(Frame(image=f.image, seq=i, stamp=i / 30))
    src.close()
    summary = pipe.close()
    meta = json.loads(bundled_weights().with_suffix(".json").read_text())
    assert summary.map["conf_thresh"] == float(meta["conf_thresh"]) < summary.map["confidence_max"] < 1.5
    assert summary.map["points"] > 100 and len(pipe.gmap) == summary.map["points"]


def test_demo_replaces_a_demo_but_not_a_run(tmp_path, capsys):
    from streamrecon.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "trajectory.txt").write_text("# a real run\n")
    assert main(["demo", "--output-dir", str(run), "--frames", "3"]) == 2  # someone's run: refused
    assert "--overwrite" in capsys.readouterr().err and (run / "trajectory.txt").read_text() == "# a real run\n"
    demo = tmp_path / "demo"
    for _ in range(2):  # the second demo replaces the first without asking
        assert main(["demo", "--output-dir", str(demo), "--frames", "3", "--no-progress"]) == 0
    assert len(list((demo / "sequence" / "rgb").iterdir())) == 3
