"""``streamrecon run SOURCE [...]``: the streaming node on a camera, video or folder.

Flags come from the settings dataclasses (:class:`RunConfig` + :class:`PipelineConfig`); ``--config``
reads a YAML file with sections ``engine:`` / ``map:`` / ``outputs:``; flags override it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .flags import add_settings_flags, settings_from_args

__all__ = ["register", "load_run_config"]


def register(sub: argparse._SubParsersAction) -> None:
    from ..run_settings import RunConfig
    from ..settings import EngineSettings, MapSettings, OutputSettings, SlamSettings

    p = sub.add_parser(
        "run", help="reconstruct from a camera, a video file or an image folder",
        description="Stream frames through the model, grow a global map, and write trajectory.txt (TUM), "
                    "map.ply/map.glb and summary.json to --output-dir. Flags override --config values.",
    )
    p.add_argument("source", nargs="?", default=argparse.SUPPRESS,
                   help="image folder, video file, camera (0, cam:0, /dev/video0) or live:VIDEO (replay as a camera)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file with sections engine:/map:/outputs: and the run settings (configs/run.yaml)")
    add_settings_flags(p, (RunConfig, EngineSettings, MapSettings, OutputSettings, SlamSettings))
    p.set_defaults(handler=_run)


def load_run_config(config_path: Path | None, overrides: dict[str, Any]):
    """Defaults <- YAML file <- explicit flags."""
    from ..run_settings import RunConfig
    from ..settings import load_yaml

    values: dict[str, Any] = load_yaml(config_path, RunConfig) if config_path is not None else {}
    values.update(overrides)
    return RunConfig.of(**values)


def _run(args: argparse.Namespace) -> int:
    from ..pipeline import format_summary
    from ..runner import run

    cfg = load_run_config(args.config, settings_from_args(args))
    summary = run(cfg)
    print(format_summary(summary.to_dict()), file=sys.stderr)
    if summary.fatal_error:
        return 1
    return _SIGNAL_EXIT.get(summary.stop_reason, 0) if summary.interrupted else 0


#: a run stopped by a signal exits like the shell reports one (its outputs are written all the same)
_SIGNAL_EXIT = {"SIGINT": 130, "SIGTERM": 143}
