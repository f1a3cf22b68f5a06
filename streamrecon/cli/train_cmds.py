"""``train``, ``eval`` and ``demo`` commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import UserError, read_settings

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model on synthetic sequences (see configs/train_small.yaml)")
    p.add_argument("--config", type=Path, default=None, help="YAML training config")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--out-dir", default=None)
    p.add_argument("--init", default=None, help="start from these weights")
    p.add_argument("--device", default=None)
    p.add_argument("--no-resume", action="store_true", help="ignore OUT_DIR/last.pt")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="score a model on sequences with ground truth (depth, trajectory, map)")
    p.add_argument("dataset", type=Path, help="a sequence folder or a folder of them (synthetic, TUM RGB-D, 7-Scenes, "
                                              "SUN3D/3DMatch, KITTI odometry, APC)")
    p.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--format", choices=["synthetic", "tum", "7scenes", "sun3d", "kitti", "apc"], default=None,
                   help="force the dataset format (default: detected per folder)")
    p.add_argument("--intrinsics", default=None, help="fx,fy,cx,cy for TUM / 7-Scenes (defaults per format)")
    p.add_argument("--backend", action="append", default=None, metavar="NAME",
                   help="pose backend to score (repeatable, e.g. --backend none --backend track); given, or on "
                        "SUN3D / KITTI / APC data, the per-backend report with identity / random-walk / constant-"
                        "depth baselines is printed (default backend: none); modifiers: NAME+revisit (the revisit "
                        "pass), NAME+dynamic-mask=METHOD (attention, flow or residual masks; mask IoU on sets with "
                        "motion masks), NAME+network-every=N|auto, NAME+ba-worker=auto|thread|process, "
                        "NAME+depth-fit=scale|grid")
    p.add_argument("--known-intrinsics", action=argparse.BooleanOptionalAction, default=True,
                   help="per-backend report: give the pipeline the dataset's intrinsics (default: on)")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--state-policy", choices=["cut3r", "ttt3r"], default="cut3r")
    p.add_argument("--reset-every", type=int, default=0)
    p.add_argument("--max-frames", type=int, default=0)
    p.add_argument("--stride", type=int, default=1)
    p.add_argument("--refine", action="store_true",
                   help="per-backend report: also score the final global alignment (--refine) of each backend")
    p.add_argument("--there-and-back", action="store_true",
                   help="per-backend report: also score each sequence played out and back (even frames, then the "
                        "odd ones in reverse): a revisit for the loop closer")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-baselines", action="store_true", help="skip the untrained and constant baselines")
    p.add_argument("--json", type=Path, default=None, help="write the full report here")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(handler=_eval)

    p = sub.add_parser("demo", help="render a synthetic sequence, reconstruct it with the bundled model, score it")
    p.add_argument("--output-dir", default="outputs/demo",
                   help="where the demo goes (an earlier demo there is replaced; a run's outputs only with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a run's outputs in --output-dir")
    p.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    p.add_argument("--seed", type=int, default=90_000_123, help="which held-out synthetic sequence")
    p.add_argument("--frames", type=int, default=30)
    p.add_argument("--viewer", choices=["spawn", "web", "none"], default="none")
    p.add_argument("--state-policy", choices=["cut3r", "ttt3r"], default="cut3r")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bars (default: on a terminal)")
    p.set_defaults(handler=_demo)


def _train(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from ..train.trainer import TrainConfig, train

    values = read_settings(args.config, {f.name for f in fields(TrainConfig)}) if args.config else {}
    for key in ("steps", "out_dir", "init", "device"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    try:
        cfg = TrainConfig(**values)
        cfg.model_config()
        cfg.effects()
        from ..train.losses import Cut3rLoss

        Cut3rLoss(norm=cfg.loss_norm, scale_weight=cfg.scale_weight)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad training config: {e}") from None
    if args.threads is None and "threads" in values:  # the config's count (0: one per core), as --threads would
        from ..threads import configure

        try:
            configure(int(values["threads"]))
        except (TypeError, ValueError) as e:
            raise UserError(f"bad training config: threads: {e}") from None
    val = train(cfg, resume=not args.no_resume, bars=args.progress)
    from ..threads import report as thread_report

    print(json.dumps({"out_dir": cfg.out_dir, "validation": val, "threads": thread_report()}))
    return 0


def _load(weights, device: str):
    """``(LoadedModel, path)`` of ``--weights`` or the bundled model."""
    from ..checkpoint import CheckpointError, UnsafeCheckpointError
    from ..pipeline.resolve import load_resolved
    from ..settings import EngineSettings

    try:
        loaded = load_resolved(EngineSettings(weights=weights, device=device))
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except (CheckpointError, UnsafeCheckpointError) as e:
        raise UserError(f"incompatible checkpoint {weights}: {e}") from None
    return loaded, loaded.info.path


def _eval(args: argparse.Namespace) -> int:
    import numpy as np

    from ..eval.datasets import REAL_FORMATS, find_sequences
    from ..eval.evaluate import EvalConfig, evaluate, format_report

    K = None
    if args.intrinsics:
        try:
            fx, fy, cx, cy = (float(v) for v in args.intrinsics.split(","))
        except ValueError:
            raise UserError("--intrinsics needs fx,fy,cx,cy") from None
        K = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]])
    try:
        sequences = find_sequences(args.dataset, args.format, K)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    if args.there_and_back:
        sequences = sequences + [s.there_and_back() for s in sequences]
    model, path = _load(args.weights, args.device)
    if args.backend or args.format in REAL_FORMATS or any(s.fmt in REAL_FORMATS for s in sequences):
        from ..eval.real import evaluate_backends, format_real_report

        report = evaluate_backends(model, sequences, backends=args.backend or ["none"],
                                   known_intrinsics=args.known_intrinsics, size=args.size, max_frames=args.max_frames,
                                   stride=args.stride, baselines=not args.no_baselines,
                                   state_policy=args.state_policy, reset_every=args.reset_every,
                                   refine=args.refine, progress=args.progress)
        report["weights"] = str(path)
        print(format_real_report(report))
    else:
        cfg = EvalConfig(size=args.size, policy=args.state_policy, reset_every=args.reset_every,
                         max_frames=args.max_frames, stride=args.stride)
        report = evaluate(model, sequences, cfg, baselines=not args.no_baselines, progress=args.progress)
        report["weights"] = str(path)
        print(format_report(report))
    if args.json:
        from ..fileio import atomic_write_text
        from ..threads import report as thread_report

        report["threads"] = thread_report()

        atomic_write_text(args.json, json.dumps(report, indent=1, default=str) + "\n")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    model, path = _load(args.weights, "auto")
    summary = run_demo(model, Path(args.output_dir), seed=args.seed, frames=args.frames, viewer=args.viewer,
                       policy=args.state_policy, progress=sys.stderr, bars=args.progress, overwrite=args.overwrite)
    print(summary, file=sys.stderr)
    return 0
