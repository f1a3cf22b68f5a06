"""``streamrecon run SOURCE --weights PATH [...]``: the streaming node on a camera, video or folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import UserError, read_settings

__all__ = ["register", "load_run_config"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="reconstruct from a camera, a video file or an image folder",
        description="Stream frames through the model, grow a global map, and write trajectory.txt (TUM), "
                    "map.ply/map.glb and summary.json to --output-dir. Flags override --config values.",
    )
    S = argparse.SUPPRESS  # unset flags stay out of the namespace, so the YAML value wins
    p.add_argument("source", nargs="?", default=S,
                   help="image folder, video file, camera (0, cam:0, /dev/video0) or live:VIDEO (replay as a camera)")
    p.add_argument("--config", type=Path, default=None, help="YAML file with any of the settings below")
    p.add_argument("--weights", default=S, help="checkpoint (.pth official container, or .safetensors)")
    p.add_argument("--size", type=int, default=S, help="model input: 512 = long side 512 (DPT), 224 = square (linear)")
    p.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1 (default auto)")
    p.add_argument("--conf-thresh", type=float, default=S,
                   help="keep map points with confidence above this (default: the checkpoint's recommendation, else 1.5)")
    p.add_argument("--stride", type=int, default=S, help="use every n-th frame of a file source")
    p.add_argument("--max-frames", type=int, default=S, help="stop after this many processed frames (0 = all)")
    p.add_argument("--output-dir", default=S, help="where outputs go (outputs/run)")
    p.add_argument("--viewer", choices=["spawn", "web", "none"], default=S, help="live Rerun viewer (none)")
    p.add_argument("--save-rrd", default=S, help="record the Rerun view to this .rrd file")
    p.add_argument("--state-policy", choices=["cut3r", "ttt3r"], default=S, help="state update rule (cut3r)")
    p.add_argument("--reset-every", type=int, default=S, help="reset the state every N frames, chaining poses (0 = never)")
    p.add_argument("--probe", action="append", default=S,
                   help="raymap probe: orbit[:N] or cameras.json, optional @end|@every:N|@i,j,k (repeatable)")
    p.add_argument("--save-frames", action="store_true", default=S, help="write frames/NNNNNN.npz per frame")
    p.add_argument("--voxel-size", type=float, default=S, help="map voxel size in world units (0.02)")
    p.add_argument("--max-points", type=int, default=S, help="hard budget of map points (2000000)")
    p.add_argument("--budget-policy", choices=["coarsen", "evict"], default=S, help="what the map does at the budget")
    p.add_argument("--map-points", choices=["pose", "head"], default=S,
                   help="map from T_wc x camera pointmap (pose, default) or the model's world head (head)")
    p.add_argument("--pixel-stride", type=int, default=S, help="integrate every n-th pixel into the map")
    p.add_argument("--repeat", type=int, default=S, help="loop a file source this many times (soak tests)")
    p.add_argument("--fps", type=float, default=S, help="timestamps for image folders without time in names (30)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=S,
                   help="read and preprocess the next frames of a file source while the model runs "
                        "(default: on when the model runs on a GPU; on a CPU it competes with the model for cores)")
    p.add_argument("--fast-preprocess", action="store_true", default=S,
                   help="resize on the model's device with torch (faster on GPU; not bit-exact with the reference)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=S,
                   help="fp32 (checkpoint-exact, default) or bf16/fp16 autocast of the trunk (faster; measured drift)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=S, help="progress line (auto: on a TTY)")
    p.set_defaults(handler=_run)


def load_run_config(config_path: Path | None, overrides: dict[str, Any]):
    """Defaults <- YAML file <- explicit flags."""
    from ..runner import RunConfig

    values: dict[str, Any] = read_settings(config_path, RunConfig.field_names()) if config_path is not None else {}
    values.update(overrides)
    if isinstance(values.get("probe"), str):
        values["probe"] = [values["probe"]]
    return RunConfig(**values)


def _run(args: argparse.Namespace) -> int:
    from ..checkpoint import CheckpointError, UnsafeCheckpointError
    from ..runner import format_summary, run
    from ..sources import SourceError

    overrides = {k: v for k, v in vars(args).items() if k not in ("config", "handler", "command", "verbose")}
    cfg = load_run_config(args.config, overrides)
    try:
        summary = run(cfg)
    except (SourceError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    except (CheckpointError, UnsafeCheckpointError) as e:
        raise UserError(f"incompatible checkpoint {cfg.weights}: {e}") from None
    except (ValueError, RuntimeError) as e:
        raise UserError(str(e)) from None
    print(format_summary(summary), file=sys.stderr)
    return 1 if summary.get("fatal_error") else 0
