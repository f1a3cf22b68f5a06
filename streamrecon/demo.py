"""``streamrecon demo``: a complete offline run that needs nothing but the package.

Renders a held-out synthetic sequence (seed never used in training) as a camera would see it
(320x224 frames), runs the node on it (``streamrecon run``: map, trajectory, Rerun recording), and
scores the result against the ground truth the renderer knows.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Optional, TextIO

from .eval.datasets import EvalSequence
from .eval.evaluate import EvalConfig, constant_baseline, score_results
from .eval.metrics import MAP_KEYS, MAP_TAU
from .fileio import atomic_write_text
from .pipeline import format_summary
from .progress import bar, shown
from .runner import RunConfig, run
from .sinks.output_dir import claim_output_dir
from .synth.dataset import SynthConfig, render_sequence, write_sequence

__all__ = ["run_demo"]


def run_demo(model, out_dir: Path, seed: int = 90_000_123, frames: int = 30, viewer: str = "none",
             policy: str = "cut3r", height: int = 224, width: int = 320, progress: Optional[TextIO] = sys.stderr,
             bars: Optional[bool] = None, overwrite: bool = False) -> str:
    """Render, reconstruct, score. Returns the text summary (also in ``out_dir/accuracy.json``).

    An earlier demo in ``out_dir`` is replaced; another run's outputs there only with ``overwrite``.
    """
    out_dir = Path(out_dir)
    show = progress is not None and shown(bars, progress)
    if progress and not show:
        progress.write(f"rendering synthetic sequence {seed} ({frames} frames, {width}x{height})...\n")
    earlier_demo = (out_dir / "accuracy.json").is_file() or (out_dir / "sequence").is_dir()
    claim_output_dir(out_dir, overwrite=overwrite or earlier_demo)  # a demo's folder holds the last demo
    shutil.rmtree(out_dir / "sequence", ignore_errors=True)
    (out_dir / "accuracy.json").unlink(missing_ok=True)
    with bar(frames, f"rendering sequence {seed}", enabled=show, stream=progress) as b:
        seq = render_sequence(seed, SynthConfig(height=height, width=width, frames=frames, virtual=0),
                              on_view=lambda: b.update(1))
    seq_dir = write_sequence(seq, out_dir / "sequence")
    results = []
    summary = run(RunConfig.of(source=str(seq_dir / "rgb"), output_dir=str(out_dir), save_rrd=str(out_dir / "recording.rrd"),
                               viewer=viewer, state_policy=policy, progress=show, overwrite=True),
                  model=model, progress_stream=progress or sys.stderr, on_result=results.append)
    gt = EvalSequence.from_arrays(seq_dir.name, seq["rgb"], seq["depth"], seq["T_wc"], seq["K"])
    scores = score_results(gt, list(range(len(results))), results, EvalConfig(conf_thresh=summary["map"]["conf_thresh"]))
    flat = constant_baseline(gt, EvalConfig())
    scores.update(seed=seed, kind=seq["kind"], fps=summary["fps"],
                  baseline_constant={k: flat[k] for k in ("abs_rel", "ate_sim3_pct", *MAP_KEYS)})
    tau_cm = f"{MAP_TAU * 100:.0f}cm"
    atomic_write_text(out_dir / "accuracy.json", json.dumps(scores, indent=1) + "\n")
    lines = [format_summary(summary), "",
             f"accuracy vs ground truth ({seq['kind']} trajectory, {len(results)} frames):",
             f"  depth   AbsRel {scores['abs_rel']:.3f} (median-scaled), {scores['abs_rel_metric']:.3f} (metric); "
             f"delta<1.25 {scores['delta1']:.3f}",
             f"  camera  ATE {scores['ate_sim3']:.3f} m Sim(3) = {scores['ate_sim3_pct']:.1f}% of the "
             f"{scores['path_length']:.2f} m path; SE(3) {scores['ate_se3']:.3f} m; RPE {scores['rpe_rot_deg']:.2f} deg",
             f"  map     accuracy {scores['accuracy']:.3f} m, completeness {scores['completeness']:.3f} m, "
             f"coverage@{tau_cm} {scores['coverage']:.3f}, F@{tau_cm} {scores['fscore']:.3f} "
             f"({int(scores['map_points'])} points)",
             f"  baseline (constant depth, identity poses): AbsRel {flat['abs_rel']:.3f}, ATE {flat['ate_sim3_pct']:.1f}%, "
             f"map accuracy {flat['accuracy']:.3f} m, completeness {flat['completeness']:.3f} m, "
             f"coverage@{tau_cm} {flat['coverage']:.3f}, F@{tau_cm} {flat['fscore']:.3f}",
             f"  files   {out_dir}/ (sequence/ holds the rendered input and its ground truth)"]
    return "\n".join(lines)
