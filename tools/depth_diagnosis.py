#!/usr/bin/env python3
"""Does the (bundled) model's depth depend on the image? Scores, and overfitting experiments (issue 15).

Examples:
    python tools/depth_diagnosis.py score ../shared/data/sun3d_studyroom ../shared/data/apc_shelf_scene0000
    python tools/depth_diagnosis.py score --weights outputs/overfit1/model.safetensors --synthetic 4
    python tools/depth_diagnosis.py probes --sequences 4          # raymap probe PSNR vs the mean colour
    python tools/depth_diagnosis.py depthstats ../shared/data/sun3d_studyroom --furnished 8   # depth spread per frame
    python tools/depth_diagnosis.py overfit --scenes 1 --steps 300 --out outputs/overfit1
    python tools/depth_diagnosis.py overfit --scenes 10 --steps 600 --out outputs/overfit10 --model-json '{"head_type": "dpt"}'

``score`` prints, per dataset, the model's median-scaled AbsRel beside a constant map and the model's
own average map, the log-depth correlations and the per-image dependence
(``streamrecon.eval.depth_dependence``). ``--synthetic N`` adds N held-out synthetic sequences
(seeds 91,000,000+; plain rooms, the issue's set), ``--furnished N`` N furnished ones like
configs/train_small_v5.yaml's (seeds 92,000,000+). ``overfit`` trains the small preset from scratch on a fixed pool of N synthetic
scenes (no refresh) and scores it on those scenes (seen) and on held-out ones: if even the seen scenes
get image-independent depth, the recipe, not the data or the time, is at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from streamrecon.eval.depth_dependence import collect_frames, dependence_scores

KEYS = ("abs_rel", "abs_rel_constant", "abs_rel_mean_map", "abs_rel_gt_mean", "gain_vs_constant", "corr", "corr_mean_map",
        "dependence")


#: the rooms of configs/train_small_v5.yaml: photographs, furniture, handheld pitch (``score --furnished``)
FURNISHED = {"textures": "skimage", "texture_prob": 0.5, "furniture": (2, 8), "pitch": (-0.55, 0.1), "aim_prob": 0.5}


def synthetic_sequences(seeds, height=112, width=160, frames=16, **synth):
    from streamrecon.eval.datasets import EvalSequence
    from streamrecon.synth.dataset import SynthConfig, render_sequence

    cfg = SynthConfig(height=height, width=width, frames=frames, **synth)
    out = []
    for s in seeds:
        r = render_sequence(int(s), cfg)
        out.append(EvalSequence.from_arrays(f"synth{s}", r["rgb"], r["depth"], r["T_wc"], r["K"]))
    return out


def _load(weights: str):
    from streamrecon.checkpoint import load_model
    from streamrecon.pipeline.resolve import resolve_weights

    return load_model(resolve_weights(weights or None)[0])


def _row(name: str, s: dict) -> str:
    return f"{name:<28} " + " ".join(f"{s[k]:>9.3f}" for k in KEYS) + f" {s['frames']:>6d}"


def header() -> str:
    short = {"abs_rel_constant": "constant", "abs_rel_mean_map": "own_mean", "abs_rel_gt_mean": "gt_mean",
             "gain_vs_constant": "gain", "corr_mean_map": "corr_mean"}
    return f"{'set':<28} " + " ".join(f"{short.get(k, k)[:9]:>9}" for k in KEYS) + f" {'frames':>6}"


def score(args) -> dict:
    model = _load(args.weights)
    report = {}
    print(header())
    for name, seqs in _sets(args):
        s = dependence_scores(collect_frames(model, seqs, max_frames=args.max_frames, stride=args.stride))
        report[name] = s
        print(_row(name, s), flush=True)
    return report


def _sets(args) -> list:
    """``(name, sequences)``: the datasets named, then the synthetic sets asked for."""
    from streamrecon.eval.datasets import find_sequences

    sets = [(Path(d).name, find_sequences(d)) for d in args.datasets]
    if getattr(args, "pool_scenes", 0):  # the first N scenes of a training pool (seed 0): what `overfit --scenes N` trained on
        sets.append((f"training pool x{args.pool_scenes}", synthetic_sequences(range(args.pool_scenes), frames=30)))
    if args.synthetic:
        held = synthetic_sequences(range(91_000_000, 91_000_000 + args.synthetic))
        sets.append((f"synthetic held-out x{args.synthetic}", held))
    if args.furnished:
        held = synthetic_sequences(range(92_000_000, 92_000_000 + args.furnished), **FURNISHED)
        sets.append((f"furnished held-out x{args.furnished}", held))
    return sets


def depth_stats(args) -> dict:
    """How the ground truth's depth is spread within a frame: the per-frame median depth, the ratio of its
    90th to 10th percentile and the shares of pixels nearer than half / farther than twice the median;
    the median and quartiles of each over the frames of a set (what renders teach vs what real frames hold)."""
    report = {}
    print(f"{'set':<28} {'median m':>16} {'p90/p10':>16} {'< median/2':>16} {'> 2 median':>16} {'frames':>6}")
    for name, seqs in _sets(args):
        rows = []
        for seq in seqs:
            for i in range(0, len(seq), max(1, args.stride)):
                d = seq.depth(i)
                d = d[np.isfinite(d) & (d > 0)]
                if d.size < 100:
                    continue
                med = float(np.median(d))
                p10, p90 = np.percentile(d, [10, 90])
                rows.append((med, p90 / p10, float((d < med / 2).mean()), float((d > 2 * med).mean())))
        a = np.asarray(rows)
        q = np.percentile(a, [25, 50, 75], axis=0)
        report[name] = {k: {"p25": q[0, j], "median": q[1, j], "p75": q[2, j]}
                        for j, k in enumerate(("median_m", "p90_over_p10", "near_share", "far_share"))}
        report[name]["frames"] = len(rows)
        cells = [f"{q[1, j]:.2f} ({q[0, j]:.2f}-{q[2, j]:.2f})" for j in range(4)]
        print(f"{name:<28} " + " ".join(f"{c:>16}" for c in cells) + f" {len(rows):>6d}", flush=True)
    return report


def overfit(args) -> dict:
    from streamrecon.train.trainer import TrainConfig, train

    model = json.loads(args.model_json) if args.model_json else "streamrecon_small"
    if isinstance(model, dict):
        from dataclasses import asdict

        from streamrecon.config import preset
        model = {**asdict(preset("streamrecon_small")), **model}
    cfg = TrainConfig(model=model, out_dir=args.out, steps=args.steps, batch_size=args.batch, views=args.views,
                      lr=args.lr, warmup=min(100, args.steps // 10), pool=args.scenes, pool_refresh_every=0,
                      val_every=0, save_every=max(50, args.steps // 4), log_every=25, seed=args.seed,
                      data={"height": 112, "width": 160, "frames": 30}, threads=args.threads, loss_norm=args.loss_norm)
    t0 = time.monotonic()
    train(cfg, progress=sys.stderr, bars=False)
    hours = (time.monotonic() - t0) / 3600
    from streamrecon.checkpoint import load_model

    m = load_model(Path(args.out) / "model.safetensors")
    # the pool's own sequences (SyntheticStream seeds them seed * 1_000_003 + i, stream seed = cfg.seed * 7919)
    seen = synthetic_sequences([args.seed * 7919 * 1_000_003 + i for i in range(args.scenes)], frames=30)
    held = synthetic_sequences(range(91_000_000, 91_000_000 + args.held_out))
    rep = {"scenes": args.scenes, "steps": args.steps, "train_hours": hours, "loss_norm": args.loss_norm,
           "seen": dependence_scores(collect_frames(m, seen)), "held_out": dependence_scores(collect_frames(m, held))}
    print(header())
    print(_row(f"seen ({args.scenes} scenes)", rep["seen"]))
    print(_row(f"held out ({args.held_out})", rep["held_out"]))
    return rep


def loss_split(args) -> dict:
    """How much of the training loss's 3D error is scale and how much is structure.

    The loss divides prediction and ground truth by the same GT factor (metric: scale must be learned).
    Per view: the error as the loss sees it, the error after the best single scale per view (what is
    left is structure), and the same two for a constant-depth pointmap."""
    import torch

    from streamrecon.synth.dataset import SynthConfig, SyntheticStream
    from streamrecon.train.losses import unproject
    from streamrecon.train.trainer import forward_sequence

    model = _load(args.weights).eval()
    stream = iter(SyntheticStream(batch_size=2, views=4, seed=123_456, cfg=SynthConfig(height=112, width=160)))
    rows = {k: [] for k in ("model_metric", "model_scaled", "constant_metric", "constant_scaled")}

    def err(p, g, m, factor):
        return float(((p - g).norm(dim=-1) / factor)[m].mean())

    def best_scale(p, g, m):  # least squares s minimising |s p - g|^2 over valid pixels
        return float((p[m] * g[m]).sum() / (p[m] * p[m]).sum().clamp(min=1e-12))

    with torch.inference_mode():
        for _ in range(args.batches):
            batch = next(stream)
            outs = forward_sequence(model, batch, [(True, False)] * 4)
            gt = unproject(batch["depth"], batch["K"])
            for b in range(gt.shape[0]):
                for v in range(gt.shape[1]):
                    m = batch["valid"][b, v]
                    g = gt[b, v]
                    factor = float(g[m].norm(dim=-1).mean())
                    p = outs[v].points_cam[b]
                    c = unproject(torch.ones_like(batch["depth"][b, v]), batch["K"][b, v]) * float(batch["depth"][b, v][m].mean())
                    for name, pred in (("model", p), ("constant", c)):
                        rows[f"{name}_metric"].append(err(pred, g, m, factor))
                        rows[f"{name}_scaled"].append(err(pred * best_scale(pred, g, m), g, m, factor))
    out = {k: float(np.mean(v)) for k, v in rows.items()}
    out["views"] = len(rows["model_metric"])
    print(f"3D error / GT mean distance over {out['views']} synthetic views (what the loss regresses):")
    for name in ("model", "constant"):
        print(f"  {name:<9} as trained (metric) {out[name + '_metric']:.3f}   after the best scale per view "
              f"{out[name + '_scaled']:.3f}   scale's share {1 - out[name + '_scaled'] / out[name + '_metric']:.0%}")
    return out


def resolution(args) -> dict:
    """What a perfect predictor at the token grid could reach: ground-truth depth averaged over each
    16x16 patch and upsampled back (bilinear), scored median-scaled like the model."""
    import cv2

    from streamrecon.eval.datasets import find_sequences

    sets = [(Path(d).name, find_sequences(d)) for d in args.datasets]
    sets.append(("synthetic held-out", synthetic_sequences(range(91_000_000, 91_000_000 + 4))))
    out = {}
    for name, seqs in sets:
        rows = []
        for seq in seqs:
            for i in range(0, len(seq), max(1, len(seq) // 16)):
                g = seq.depth(i).astype(np.float64)
                h, w = g.shape
                small = cv2.resize(g, (160, 160 * h // w), interpolation=cv2.INTER_NEAREST)  # the model's input size
                m = small > 0
                for p in (16, 8):
                    hh, ww = small.shape[0] // p, small.shape[1] // p
                    blocks = np.where(m, small, np.nan)[:hh * p, :ww * p].reshape(hh, p, ww, p)
                    mean = np.nanmean(blocks, axis=(1, 3))
                    mean = np.where(np.isfinite(mean), mean, np.nanmedian(mean))
                    up = cv2.resize(mean, (ww * p, hh * p), interpolation=cv2.INTER_LINEAR)
                    gg, mm = small[:hh * p, :ww * p], m[:hh * p, :ww * p]
                    s = np.median(gg[mm]) / np.median(up[mm])
                    rows.append((p, float(np.mean(np.abs(up[mm] * s - gg[mm]) / gg[mm]))))
        out[name] = {f"patch{p}": float(np.mean([r for q, r in rows if q == p])) for p in (16, 8)}
        print(f"{name:<24} token-grid oracle AbsRel: 16-px patches {out[name]['patch16']:.3f}, 8-px {out[name]['patch8']:.3f}")
    return out


def probes(args) -> dict:
    """Raymap probes on held-out synthetic views: RGB PSNR against the mean colour of the frames the
    model saw (the baseline a flat grey image cannot beat), and probe depth AbsRel (median-scaled)."""
    import cv2

    from streamrecon.engine import EngineConfig, Frame, StreamEngine, default_size
    from streamrecon.eval.evaluate import gt_depth_at_model
    from streamrecon.eval.metrics import depth_metrics
    from streamrecon.synth.dataset import SynthConfig, render_sequence

    model = _load(args.weights)
    rows = []

    def at_model(img, crop, interp):  # colour images, like gt_depth_at_model does depth
        h1, w1 = crop.resized_hw
        x = cv2.resize(img, (w1, h1), interpolation=interp) if img.shape[:2] != (h1, w1) else img
        y0, x0 = crop.crop_xy[1], crop.crop_xy[0]
        return x[y0:y0 + crop.output_hw[0], x0:x0 + crop.output_hw[1]]

    def psnr(a, b):
        mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
        return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-12)))

    for seed in range(91_000_000, 91_000_000 + args.sequences):
        seq = render_sequence(seed, SynthConfig(height=112, width=160, frames=16))
        eng = StreamEngine(model, EngineConfig(size=default_size(model)))
        res = [eng.process(Frame(image=seq["rgb"][i], seq=i, stamp=i / 30)) for i in range(len(seq["rgb"]))]
        crop = res[0].crop
        g0 = gt_depth_at_model(seq["depth"][0], crop)
        s = float(np.median(res[0].depth[g0 > 0]) / np.median(g0[g0 > 0]))  # model units per metre
        mean_rgb = np.mean([r.colors.reshape(-1, 3) for r in res], axis=(0, 1))
        T0inv = np.linalg.inv(seq["T_wc"][0])
        for v in range(len(seq["virtual"]["rgb"])):
            T = T0inv @ seq["virtual"]["T_wc"][v]
            T[:3, 3] *= s
            pr = eng.probe(T)
            gt_rgb = at_model(seq["virtual"]["rgb"][v], crop, cv2.INTER_AREA)
            gt_d = gt_depth_at_model(seq["virtual"]["depth"][v], crop)
            flat = np.broadcast_to(mean_rgb, gt_rgb.shape)
            dm = depth_metrics(pr.points_cam[..., 2], gt_d, gt_d > 0)
            rows.append({"psnr": psnr(pr.rgb, gt_rgb), "psnr_mean_colour": psnr(flat, gt_rgb),
                         "rgb_std": float(pr.rgb.reshape(-1, 3).std(0).mean()), "abs_rel": dm["abs_rel"]})
    out = {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}
    out["views"] = len(rows)
    print(f"raymap probes on {out['views']} held-out synthetic views: RGB PSNR {out['psnr']:.2f} dB vs mean colour "
          f"{out['psnr_mean_colour']:.2f} dB ({out['psnr'] - out['psnr_mean_colour']:+.2f}); probe RGB spread "
          f"{out['rgb_std']:.1f} grey levels; probe depth AbsRel {out['abs_rel']:.3f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("score")
    a.add_argument("datasets", nargs="*")
    a.add_argument("--weights", default="", help="checkpoint (default: the bundled model)")
    a.add_argument("--synthetic", type=int, default=0, help="N held-out synthetic sequences")
    a.add_argument("--furnished", type=int, default=0, help="N held-out furnished synthetic sequences (v5 rooms)")
    a.add_argument("--pool-scenes", type=int, default=0, help="the first N scenes of a seed-0 training pool")
    a.add_argument("--max-frames", type=int, default=0)
    a.add_argument("--stride", type=int, default=1)
    b = sub.add_parser("overfit")
    b.add_argument("--scenes", type=int, default=1)
    b.add_argument("--steps", type=int, default=300)
    b.add_argument("--batch", type=int, default=2)
    b.add_argument("--views", type=int, default=4)
    b.add_argument("--lr", type=float, default=3e-4)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--held-out", type=int, default=4)
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--loss-norm", default="metric", choices=("metric", "scale_invariant"))
    b.add_argument("--model-json", default="", help="ModelConfig fields over the small preset, e.g. '{\"head_type\": \"dpt\"}'")
    b.add_argument("--out", required=True)
    c = sub.add_parser("loss")
    c.add_argument("--weights", default="")
    c.add_argument("--batches", type=int, default=8)
    d = sub.add_parser("resolution")
    d.add_argument("datasets", nargs="*")
    f = sub.add_parser("depthstats")
    f.add_argument("datasets", nargs="*")
    f.add_argument("--synthetic", type=int, default=0)
    f.add_argument("--furnished", type=int, default=0)
    f.add_argument("--stride", type=int, default=1)
    e = sub.add_parser("probes")
    e.add_argument("--weights", default="")
    e.add_argument("--sequences", type=int, default=4)
    for p in (a, b, c, d, e, f):
        p.add_argument("--json", default="", help="also write the report here")
    args = ap.parse_args()
    rep = {"score": score, "overfit": overfit, "loss": loss_split, "resolution": resolution, "probes": probes,
           "depthstats": depth_stats}[args.cmd](args)
    if args.json:
        Path(args.json).write_text(json.dumps(rep, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
