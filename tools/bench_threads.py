"""Frames per second of ``streamrecon run`` per thread setting, on an idle machine and beside a
competing CPU-heavy process (a second ``streamrecon bench``), as a robot's computer would be.

    python tools/bench_threads.py ../shared/data/cut3r_examples/lady-running.mp4 [--frames 60]
        [--setting default --setting "threads=1" --setting "env:OMP_NUM_THREADS=1" ...] [--json out.json]

A setting is ``default`` (no flag, no environment), ``threads=N`` (``--threads N``), or
``env:NAME=VALUE[,NAME=VALUE]`` (environment variables only, e.g. the settings before ``--threads``
existed). Each setting runs twice per load condition, alternating with the others; the table gives
both figures (fps = processed frames / wall time of the frame loop, from ``summary.json``).
The competing process runs with its own defaults for the whole loaded phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_SETTINGS = ("default", "threads=1", "threads=2", "env:OMP_NUM_THREADS=1",
                    "env:OMP_WAIT_POLICY=PASSIVE", "env:OMP_WAIT_POLICY=ACTIVE")


def _command(setting: str, source: str, frames: int, out: Path) -> tuple[list[str], dict]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_") and k != "STREAMRECON_THREADS"}
    cmd = [sys.executable, "-m", "streamrecon", "run", source, "--repeat", "20", "--max-frames", str(frames),
           "--no-progress", "--viewer", "none", "--output-dir", str(out)]
    if setting.startswith("threads="):
        cmd += ["--threads", setting.split("=", 1)[1]]
    elif setting.startswith("env:"):
        for pair in setting[4:].split(","):
            k, v = pair.split("=", 1)
            env[k] = v
    elif setting != "default":
        raise SystemExit(f"unknown setting {setting!r}")
    return cmd, env


def _fps(setting: str, source: str, frames: int, tmp: Path) -> float:
    out = tmp / f"run{len(list(tmp.iterdir()))}"  # a fresh folder per run
    cmd, env = _command(setting, source, frames, out)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{setting}: run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return float(json.loads((out / "summary.json").read_text())["fps"])


def _load(weights: str, images: str, pythonpath: str | None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMP_")}
    if pythonpath:  # e.g. a checkout of an earlier version: the same competitor before and after a change
        env["PYTHONPATH"] = pythonpath
    return subprocess.Popen([sys.executable, "-m", "streamrecon", "bench", "--model", weights, "--size", "112x160",
                             "--frames", "1000000", "--warmup", "1", "--images", images], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source")
    ap.add_argument("--frames", type=int, default=60, help="frames per run (idle)")
    ap.add_argument("--loaded-frames", type=int, default=30, help="frames per run beside the competing process")
    ap.add_argument("--setting", action="append", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-idle", action="store_true")
    ap.add_argument("--load-pythonpath", default=None,
                    help="PYTHONPATH of the competing process (default: this checkout, its default threads)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    settings = args.setting or list(DEFAULT_SETTINGS)
    weights = str(Path(__file__).resolve().parents[1] / "streamrecon/weights/streamrecon_small.safetensors")
    results: dict[str, dict[str, list[float]]] = {s: {"idle": [], "loaded": []} for s in settings}
    with tempfile.TemporaryDirectory() as td:
        tmp = Path(td)
        phases = ([] if args.no_idle else [("idle", args.frames)]) + [("loaded", args.loaded_frames)]
        for phase, frames in phases:
            load = _load(weights, args.source, args.load_pythonpath) if phase == "loaded" else None
            try:
                if load is not None:
                    time.sleep(8.0)  # the competitor is loaded and stepping
                for _ in range(args.repeats):
                    for s in settings:
                        fps = _fps(s, args.source, frames, tmp)
                        if load is not None and load.poll() is not None:
                            raise SystemExit(f"the competing process exited ({load.returncode}): no load")
                        results[s][phase].append(fps)
                        print(f"{phase:7s} {s:32s} {fps:7.2f} fps", file=sys.stderr, flush=True)
            finally:
                if load is not None:
                    load.terminate()
                    load.wait()
    print("| setting | idle fps | beside a second `streamrecon bench` fps |")
    print("|---|---|---|")
    for s in settings:
        r = results[s]
        print(f"| `{s}` | {' / '.join(f'{v:.2f}' for v in r['idle']) or '-'} | "
              f"{' / '.join(f'{v:.2f}' for v in r['loaded'])} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
