"""SIGKILL trials: snapshots survive a process killed at any moment, and a killed run resumes.

    python tools/snapshot_kill_trials.py FOLDER --intrinsics fx,fy,cx,cy [--store-trials 200] [--run-trials 20]

1. **store**: a child writes snapshot after snapshot (``tests/snapshot_writer_child.py``, 4 MB each) and
   is killed at a random moment, ``--store-trials`` times; after each kill the latest snapshot must load,
   be whole, and be the last one finished (or the one being renamed).
2. **run**: ``streamrecon run FOLDER --backend slam --deterministic --snapshot-every N --flush-every 1`` is
   killed at a random moment, then resumed with ``--resume``, ``--run-trials`` times. Reported: the frames
   the killed run had processed (``trajectory.txt`` lines) beyond its last snapshot -- the work lost and
   done again -- and whether the resumed trajectory equals an uninterrupted run's exactly.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def store_trials(n: int, work: Path, rng) -> dict:
    from streamrecon.snapshot import read_snapshot

    root = work / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    last, bad, behind = 0, 0, 0
    for _ in range(n):
        p = subprocess.Popen([sys.executable, str(REPO / "tests" / "snapshot_writer_child.py"), str(root), "4", str(last)],
                             stdout=subprocess.PIPE, text=True, env=env)
        done = int(p.stdout.readline())
        time.sleep(float(rng.uniform(0, 0.3)))
        p.send_signal(signal.SIGKILL)
        out, _ = p.communicate()
        done = max([done] + [int(x) for x in out.split()])
        try:
            d = read_snapshot(root)
            i = d.state["i"]
            whole = bool((d.tensors["a"] == float(i)).all())
        except Exception:
            bad += 1
            continue
        bad += int(not whole or not (done <= i <= done + 1))
        behind = max(behind, done - i)
        last = i
    return {"trials": n, "unloadable_or_wrong": bad}


def _lines(path: Path) -> int:
    try:
        return sum(1 for x in path.read_text().splitlines() if x and not x.startswith("#"))
    except OSError:
        return 0


def run_trials(n: int, folder: str, intrinsics: str, every: int, work: Path, rng) -> dict:
    from streamrecon.mapping import read_tum
    from streamrecon.snapshot import read_snapshot

    base = [sys.executable, "-m", "streamrecon", "run", folder, "--backend", "slam", "--deterministic", "--intrinsics",
            intrinsics, "--no-progress", "--flush-every", "1"]
    full = work / "full"
    subprocess.run(base + ["--output-dir", str(full)], check=True, capture_output=True)
    _, T_full = read_tum(full / "trajectory.txt")
    total = len(T_full)
    t0 = time.monotonic()
    subprocess.run(base + ["--output-dir", str(work / "timing"), "--max-frames", "5"], check=True, capture_output=True)
    startup = time.monotonic() - t0
    lost, equal, killed_at = [], 0, []
    for k in range(n):
        out, snap = work / f"r{k}", work / f"s{k}"
        p = subprocess.Popen(base + ["--output-dir", str(out), "--snapshot", str(snap), "--snapshot-every", str(every)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(float(rng.uniform(startup, startup + 8.0)))
        p.send_signal(signal.SIGKILL)
        p.wait()
        done = _lines(out / "trajectory.txt")
        try:
            frames = int(read_snapshot(snap).manifest["frames"])
        except Exception:
            frames = 0  # killed before the first snapshot: everything is done again
        killed_at.append(done)
        lost.append(done - frames)
        r = subprocess.run(base + ["--output-dir", str(out) + "_resumed", "--snapshot", str(snap)]
                           + (["--resume", str(snap)] if frames else []), capture_output=True, text=True)
        if r.returncode == 0:
            _, T = read_tum(Path(str(out) + "_resumed") / "trajectory.txt")
            equal += int(T.shape == T_full.shape and np.array_equal(T, T_full))
        shutil.rmtree(out, ignore_errors=True)
    return {"trials": n, "frames": total, "snapshot_every": every, "killed_after_frames": killed_at,
            "frames_lost_max": int(max(lost)), "frames_lost_mean": round(float(np.mean(lost)), 2),
            "resumed_equal_uninterrupted": equal}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--intrinsics", required=True)
    ap.add_argument("--store-trials", type=int, default=200)
    ap.add_argument("--run-trials", type=int, default=20)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        if a.store_trials:
            print("store:", store_trials(a.store_trials, Path(tmp), rng), flush=True)
        if a.run_trials:
            print("run:", run_trials(a.run_trials, a.folder, a.intrinsics, a.every, Path(tmp), rng), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
