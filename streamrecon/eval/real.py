"""``streamrecon eval`` on real sequences with ground truth, side by side for several pose backends.

For every sequence and every backend name, the frames go through a fresh pipeline (the same
``build_pipeline`` as ``streamrecon run``, no files written) and the results are scored with
:func:`~streamrecon.eval.evaluate.score_results`: the trajectory from ``FrameResult.T_wc`` and the
depth from ``FrameResult.depth`` against the ground truth resized and cropped like the model input.

Baselines, beside the backends, on the same frames:

* ``identity``: the camera never moves (under Sim(3) alignment: the largest possible ATE);
* ``random walk``: :func:`~streamrecon.eval.baselines.random_walk_like` of the reference backend's own
  trajectory (``none`` when it ran, else the first backend that did): the same step lengths and step
  rotation angles in random directions; figures are the mean over
  :data:`~streamrecon.eval.baselines.RANDOM_WALK_SEEDS` seeds;
* ``constant depth`` (sequences with depth): one depth everywhere, median-scaled per frame, on the
  pixels the reference backend was scored on.

A backend that fails (unknown name, an exception while building or streaming) becomes an error row.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import fields, replace
from typing import Callable, Optional, Sequence

import numpy as np

from ..progress import bar
from .baselines import RANDOM_WALK_SEEDS, identity_trajectory, random_walk_like, step_angles_deg
from .datasets import EvalSequence
from .evaluate import EvalConfig, constant_baseline, gt_depth_at_model, score_results
from .metrics import MAP_KEYS, MAP_TAU, depth_metrics, path_length, trajectory_metrics

__all__ = ["evaluate_backends", "format_real_report"]

_logger = logging.getLogger(__name__)

_MASK_KEYS = ("masked_fraction", "mask_iou", "mask_precision", "mask_recall", "mask_tp", "mask_fp", "mask_fn",
              "map_dynamic_fraction")
_TRAJ_KEYS = ("ate_sim3", "ate_sim3_pct", "sim3_scale", "ate_se3", "ate_se3_pct", "rpe_trans", "rpe_rot_deg")
_DEPTH_KEYS = ("abs_rel", "delta1", "abs_rel_metric", "delta1_metric")


def _indices(n: int, max_frames: int, stride: int) -> list[int]:
    idx = list(range(0, n, max(1, stride)))
    return idx[:max_frames] if max_frames else idx


def _intrinsics_text(K: np.ndarray) -> str:
    return ",".join(str(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))


def _declared_backends() -> Optional[tuple]:
    """The backend names :class:`SlamSettings` declares (``None`` when it declares none)."""
    from ..settings import SlamSettings

    for f in fields(SlamSettings):
        if f.name == "backend":
            return f.metadata.get("choices")
    return None


def _parse_label(label: str) -> tuple[str, dict[str, str]]:
    """``"track+revisit+dynamic-mask=flow"`` -> ``("track", {"revisit": "", "dynamic-mask": "flow"})``;
    ``+network-every=N|auto``, ``+ba-worker=auto|thread|process`` and ``+depth-fit=scale|grid`` too."""
    backend, *parts = label.split("+")
    mods: dict[str, str] = {}
    for part in parts:
        key, _, value = part.partition("=")
        if key not in ("revisit", "dynamic-mask", "network-every", "ba-worker", "depth-fit") or (key != "revisit") != bool(value):
            raise ValueError(f"unknown backend modifier {part!r} in {label!r} (known: +revisit, +dynamic-mask=METHOD, "
                             "+network-every=N|auto, +ba-worker=auto|thread|process, +depth-fit=scale|grid)")
        if key == "dynamic-mask" and value not in ("attention", "flow", "residual"):
            raise ValueError(f"unknown dynamic mask {value!r} in {label!r} (attention, flow or residual)")
        if key == "ba-worker" and value not in ("auto", "thread", "process"):
            raise ValueError(f"unknown bundle-adjustment worker {value!r} in {label!r} (auto, thread or process)")
        if key == "depth-fit" and value not in ("scale", "grid"):
            raise ValueError(f"unknown depth fit {value!r} in {label!r} (scale or grid)")
        mods[key] = value
    return backend, mods


def _without_depth_fit(label: str) -> str:
    """The label without its ``+depth-fit=...`` (which changes the depth, never the poses)."""
    return "+".join(p for p in label.split("+") if not p.startswith("depth-fit="))


def _run_backend(loaded, seq: EvalSequence, idx: list[int], backend: str, known_intrinsics: bool,
                 size, state_policy: str, reset_every: int, refine: bool = False,
                 on_frame: Optional[Callable[[], None]] = None) -> tuple[dict, list]:
    """Stream frames ``idx`` of ``seq`` through a pipeline with ``backend``; ``(timing row, results)``."""
    from ..engine import Frame
    from ..pipeline import build_pipeline
    from ..settings import EngineSettings, MapSettings, PipelineConfig, SlamSettings

    backend, mods = _parse_label(backend)
    revisit = "revisit" in mods  # "none+revisit": a first pass builds the state, the second is scored
    declared = _declared_backends()
    if declared and backend not in declared:
        raise ValueError(f"unknown backend {backend!r} (the settings declare: {', '.join(declared)})")
    every = mods.get("network-every", "1")
    cfg = PipelineConfig(engine=EngineSettings(size=size, state_policy=state_policy, reset_every=reset_every,
                                               network_every=every),
                         map=MapSettings(dynamic_mask=mods.get("dynamic-mask", "off")),
                         slam=SlamSettings(backend=backend, refine=refine and backend != "none",
                                           ba_worker=mods.get("ba-worker", "auto"),
                                           depth_fit=mods.get("depth-fit", SlamSettings().depth_fit),
                                           intrinsics=_intrinsics_text(seq.K) if known_intrinsics else None))
    cfg.validate()
    collector = _DenseResults()  # --network-every: the network's results, scored on their frames
    pipe = build_pipeline(cfg, loaded, stream_id=seq.name, files=False, extra_sinks=[collector])
    results, push_s = [], 0.0
    if revisit:
        for i in idx:  # pass 1: the whole sequence into the state, nothing scored
            pipe.engine.process(pipe.prepare(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source=seq.name,
                                                   K=seq.K if known_intrinsics else None)))
        pipe.engine.revisit()
    try:
        for i in idx:
            frame = Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source=seq.name,
                          K=seq.K if known_intrinsics else None)
            t0 = time.perf_counter()
            results.append(pipe.push(frame))
            push_s += time.perf_counter() - t0
            if on_frame is not None:
                on_frame()
    finally:
        summary = pipe.close()
    loops = summary.slam.get("loop_closure", {}).get("closures") if isinstance(summary.slam, dict) else None
    if collector.by_index:
        results = [collector.by_index.get(r.index, r) for r in results]
    net = summary.network
    return {"ms_per_frame": 1e3 * push_s / max(1, len(results)), "pipeline_errors": pipe.n_errors,
            "loop_closures": loops, "final_poses": dict(pipe.final_poses),
            **({"network_frames": net["frames"], "network_fps": net["network_fps"], "poses_per_s": net["poses_per_s"]}
               if net else {})}, results


class _DenseResults:
    """A sink keeping the network's results (``--network-every``) by frame index."""

    name = "dense"

    def __init__(self) -> None:
        self.by_index: dict[int, object] = {}

    def on_frame(self, event) -> None:
        self.by_index.update({d.index: d for d in event.dense_results()})

    def on_probe(self, probe) -> None:
        pass

    def close(self, final) -> None:
        self.by_index.update({d.index: d for d in final.dense})


def _nan_row(keys) -> dict:
    return {k: math.nan for k in keys}


def _constant_depth(seq: EvalSequence, idx: list[int], results: list) -> dict:
    """One depth everywhere (median scaling makes the value irrelevant) on the pixels where the
    backend's depth was scored: valid ground truth at model resolution and a finite positive prediction."""
    rows = []
    for i, r in zip(idx, results):
        if not getattr(r, "network", True):
            continue
        gt = gt_depth_at_model(seq.depth(i), r.crop)
        mask = (gt > 0) & np.isfinite(r.depth) & (r.depth > 0)
        rows.append(depth_metrics(np.ones_like(gt), gt, mask))
    return {k: float(np.nanmean([row[k] for row in rows])) for k in ("abs_rel", "delta1")}


def _random_walk(ref_T: np.ndarray, gt: np.ndarray, seeds: int) -> dict:
    per_seed = [trajectory_metrics(random_walk_like(ref_T, seed), gt) for seed in range(seeds)]
    out = {k: float(np.nanmean([m[k] for m in per_seed])) for k in _TRAJ_KEYS}
    out.update({f"{k}_std": float(np.nanstd([m[k] for m in per_seed])) for k in ("ate_sim3", "ate_sim3_pct")})
    return out


def _evaluate_sequence(loaded, seq: EvalSequence, backends: Sequence[str], known_intrinsics: bool, size,
                       max_frames: int, stride: int, baselines: bool, state_policy: str, reset_every: int,
                       cfg: EvalConfig, refine: bool = False, on_frame: Optional[Callable[[], None]] = None) -> dict:
    idx = _indices(len(seq), max_frames, stride)
    gt = seq.T_wc[idx]
    rows: list[dict] = []
    runs: dict[str, tuple[np.ndarray, list]] = {}
    for b in backends:
        row = {"label": b, "kind": "backend", "backend": b}
        try:
            timing, results = _run_backend(loaded, seq, idx, b, known_intrinsics, size, state_policy, reset_every,
                                           refine, on_frame)
            scores = score_results(seq, idx, results, cfg)
        except Exception as e:  # one backend failing must not stop the others
            _logger.warning("%s: backend %s failed: %s: %s", seq.name, b, type(e).__name__, e)
            row.update(_nan_row(_TRAJ_KEYS + _DEPTH_KEYS + MAP_KEYS), ms_per_frame=math.nan,
                       error=f"{type(e).__name__}: {e}")
            rows.append(row)
            continue
        T = np.stack([r.T_wc for r in results])
        final = timing.pop("final_poses", {})
        row.update({k: scores[k] for k in _TRAJ_KEYS + _DEPTH_KEYS + MAP_KEYS}, **timing)
        row.update({k: scores[k] for k in _MASK_KEYS if k in scores})
        if not seq.has_depth:
            row.update(_nan_row(_DEPTH_KEYS + MAP_KEYS))
        same = [name for name, (T_other, _) in runs.items() if np.array_equal(T_other, T)]
        if same:
            row["same_as"] = same[0]  # e.g. a backend name the pipeline does not (yet) act on
        runs.setdefault(b, (T, results))
        rows.append(row)
        for kind, T_final in final.items():  # the poses revised after the stream: loop-closed / refined
            rows.append({"label": f"{b} ({kind})", "kind": "backend", "backend": b, "revised": kind,
                         **trajectory_metrics(T_final, gt), **_nan_row(_DEPTH_KEYS)})

    reference = "none" if "none" in runs else next(iter(runs), None)
    if baselines:
        ident = {"label": "identity", "kind": "baseline", **trajectory_metrics(identity_trajectory(len(idx)), gt)}
        ident["sim3_scale"] = math.nan  # no motion to scale: the alignment's scale is a convention (1)
        rows.append(ident | _nan_row(_DEPTH_KEYS))
        if reference is not None:
            ref_T, ref_results = runs[reference]
            rows.append({"label": f"random walk ({reference} steps, {RANDOM_WALK_SEEDS} seeds)", "kind": "baseline",
                         "reference": reference, "seeds": RANDOM_WALK_SEEDS,
                         **_random_walk(ref_T, gt, RANDOM_WALK_SEEDS)} | _nan_row(_DEPTH_KEYS))
            if seq.has_depth:  # depth on the reference's pixels; the map: one depth, identity poses
                flat = constant_baseline(seq, replace(cfg, max_frames=0, stride=1), idx=idx)
                rows.append({"label": "constant depth", "kind": "baseline", "reference": reference,
                             **_nan_row(_TRAJ_KEYS), **_constant_depth(seq, idx, ref_results),
                             **{k: flat[k] for k in MAP_KEYS}})
    return {"name": seq.name, "fmt": seq.fmt, "frames": len(idx), "has_depth": seq.has_depth,
            "path_length": path_length(gt), "rotation_sum_deg": float(step_angles_deg(gt).sum()) if len(gt) > 1 else 0.0,
            "reference": reference, "rows": rows}


def evaluate_backends(loaded, sequences: Sequence[EvalSequence], backends: Sequence[str] = ("none",),
                      known_intrinsics: bool = True, size=None, max_frames: int = 0, stride: int = 1,
                      baselines: bool = True, state_policy: str = "cut3r", reset_every: int = 0,
                      refine: bool = False, progress: Optional[bool] = None) -> dict:
    """Score every backend on every sequence, with the identity / random-walk / constant-depth baselines.

    Args:
        loaded: a :class:`~streamrecon.pipeline.LoadedModel` (shared by every pipeline).
        backends: ``SlamSettings.backend`` names, run in this order; a failure is an error row.
        known_intrinsics: give the pipeline the dataset's K (``--intrinsics`` and ``Frame.K``).
        size: the model input size (``None``: the model's own).
        max_frames, stride: which frames (every ``stride``-th, at most ``max_frames``; 0 = all).
        refine: also score ``--refine``'s global alignment (a ``<backend> (refined)`` row).
        progress: a progress bar over every frame streamed (None: on a terminal).

    Returns:
        ``{"sequences": [{name, fmt, frames, path_length, rows: [...]}, ...], "config": {...}}``; each row
        has ``label``, ``kind`` (``backend``/``baseline``), the trajectory and depth figures (NaN where
        they do not apply) and, for backends, ``ms_per_frame`` or ``error``.
    """
    from ..pipeline import resolve_conf_thresh

    cfg = EvalConfig(conf_thresh=resolve_conf_thresh(getattr(loaded, "info", None)))
    out = []
    total = sum(len(_indices(len(seq), max_frames, stride)) for seq in sequences) * len(backends)
    with warnings.catch_warnings(), bar(total, "eval", enabled=progress) as b:
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of frames without valid depth
        for seq in sequences:
            b.set_description(f"eval {seq.name}")
            out.append(_evaluate_sequence(loaded, seq, list(backends), known_intrinsics, size, max_frames, stride,
                                          baselines, state_policy, reset_every, cfg, refine, on_frame=lambda: b.update(1)))
    return {"sequences": out,
            "config": {"backends": list(backends), "known_intrinsics": known_intrinsics, "size": size,
                       "max_frames": max_frames, "stride": stride, "state_policy": state_policy,
                       "reset_every": reset_every, "refine": refine, "random_walk_seeds": RANDOM_WALK_SEEDS}}


_COLUMNS = (("ate_sim3", "ATE Sim3 m", 4), ("ate_sim3_pct", "ATE Sim3 %", 1), ("ate_se3", "ATE SE3 m", 4),
            ("rpe_rot_deg", "RPE deg/f", 3), ("rpe_trans", "RPE m/f", 4), ("sim3_scale", "Sim3 scale", 3),
            ("abs_rel", "AbsRel", 3), ("delta1", "d<1.25", 3),
            ("accuracy", "map acc m", 3), ("completeness", "map comp m", 3),
            ("coverage", f"cov@{MAP_TAU * 100:.0f}cm", 3), ("fscore", f"F@{MAP_TAU * 100:.0f}cm", 3),
            ("ms_per_frame", "ms/frame", 0))


def _cell(v, digits: int) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


_MASK_COLUMNS = (("masked_fraction", "masked", 3), ("mask_iou", "mask IoU", 3), ("mask_precision", "mask P", 3),
                 ("mask_recall", "mask R", 3), ("map_dynamic_fraction", "map from movers", 3))


def format_real_report(report: dict) -> str:
    """A markdown table per sequence: rows = backends, then baselines (mask columns where masks ran)."""
    blocks = []
    for s in report["sequences"]:
        has_masks = any("masked_fraction" in r for r in s["rows"])
        columns = _COLUMNS + (_MASK_COLUMNS if has_masks else ())
        head = (f"### {s['name']} ({s['fmt']}): {s['frames']} frames, GT path {s['path_length']:.3f} m, "
                f"GT rotation {s['rotation_sum_deg']:.1f} deg" + ("" if s["has_depth"] else ", no depth GT"))
        lines = [head, "", "| | " + " | ".join(name for _, name, _ in columns) + " |",
                 "|---|" + "---:|" * len(columns)]
        notes = []
        for r in s["rows"]:
            if "error" in r:
                msg = r["error"].replace("|", "/").replace("\n", " ")
                lines.append(f"| {r['label']} | error: {msg[:120]} |" + " – |" * (len(columns) - 1))
                continue
            lines.append(f"| {r['label']} | " + " | ".join(_cell(r.get(k), d) for k, _, d in columns) + " |")
            masks_only = "dynamic-mask=" in r.get("backend", "")
            depth_only = _without_depth_fit(r.get("backend", "")) == _without_depth_fit(r.get("same_as") or "")
            if r.get("same_as") and not (masks_only and r["backend"].startswith("none+")) and not depth_only:
                why = ("the masks did not change tracking" if masks_only else
                       "no loop closed" if r.get("loop_closures") == 0 else "backend not acted on?")
                notes.append(f"{r['label']}: trajectory identical to {r['same_as']} ({why})")
        if notes:
            lines += [""] + [f"note: {n}" for n in notes]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
