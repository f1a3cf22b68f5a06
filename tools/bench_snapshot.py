"""Snapshot size and time per stream: the bundled model and the official 512-DPT architecture
(random weights: the sizes and times do not depend on the numbers).

    python tools/bench_snapshot.py ../shared/data/sun3d_studyroom [--frames 50] [--frames-512 4]

Per model: SUN3D fragment-1 through ``--backend slam`` (known intrinsics), then a snapshot: the
capture in the frame loop (ms), the write (ms, on the writer thread in a run), the size by part (model
state, map, keyframe database, the rest), and the read + verify + restore into a fresh pipeline (ms).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from streamrecon.engine import Frame
from streamrecon.eval.datasets import find_sequences
from streamrecon.pipeline import LoadedModel, build_pipeline, load_resolved
from streamrecon.settings import EngineSettings, PipelineConfig, SlamSettings
from streamrecon.snapshot import read_snapshot
from streamrecon.snapshot.state import _fingerprint, capture


def _bytes(tensors: dict, prefix: str) -> int:
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))


def bench(name: str, loaded, seq, frames: int, size, tmp: Path) -> dict:
    K = seq.K
    cfg = PipelineConfig(engine=EngineSettings(size=size), slam=SlamSettings(
        backend="slam", intrinsics=",".join(str(float(v)) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))))
    pipe = build_pipeline(cfg, loaded, files=False, snapshot_dir=tmp / name)
    for i in range(min(frames, len(seq))):
        pipe.push(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source="bench"))
    pipe.stage.loop.flush()
    t0 = time.perf_counter()
    _fingerprint(loaded.model)  # once per model, on a thread from the stream's start in a run (timed uncached here)
    fp_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    tree, tensors, meta = capture(pipe)
    cap_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    path = pipe.snapshots.store.write(tree, tensors, meta)
    write_ms = 1e3 * (time.perf_counter() - t0)
    total = sum(f.stat().st_size for f in path.iterdir())
    parts = {"model state": _bytes(tensors, ".engine"), "map": _bytes(tensors, ".pipeline.gmap"),
             "keyframe database": _bytes(tensors, ".stage.loop"), "tracker": _bytes(tensors, ".stage.tracker")}
    parts["rest (trajectory, frames buffered for a map swap, state.json)"] = total - sum(parts.values())
    fresh = build_pipeline(cfg, loaded, files=False)
    t0 = time.perf_counter()
    fresh.restore(read_snapshot(path))
    restore_ms = 1e3 * (time.perf_counter() - t0)
    ok = torch.equal(fresh.engine.state.tokens.cpu(), pipe.engine.state.tokens.cpu()) and len(fresh.gmap) == len(pipe.gmap)
    pipe.close()
    fresh.close()
    return {"model": name, "frames": pipe.processed, "state_tokens": tuple(pipe.engine.state.tokens.shape),
            "map_points": len(pipe.gmap), "keyframes": len(pipe.stage.loop.db), "bytes": total,
            "parts_mb": {k: round(v / 1e6, 2) for k, v in parts.items()}, "weights_sha256_ms": round(fp_ms, 1),
            "capture_ms": round(cap_ms, 1),
            "write_ms": round(write_ms, 1), "restore_ms": round(restore_ms, 1), "restored_equal": ok}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data")
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--frames-512", type=int, default=4)
    a = ap.parse_args()
    seq = [s for s in find_sequences(a.data) if "fragment-1" in s.name][0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(bench("bundled (streamrecon_small)", load_resolved(EngineSettings()), seq, a.frames, None, Path(tmp)))
        if a.frames_512:
            from streamrecon.config import preset
            from streamrecon.models import Cut3r

            torch.manual_seed(0)
            rows.append(bench("cut3r_512_dpt (random weights)", LoadedModel.wrap(Cut3r(preset("cut3r_512_dpt")).eval()),
                              seq, a.frames_512, "512", Path(tmp)))
    for r in rows:
        print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
