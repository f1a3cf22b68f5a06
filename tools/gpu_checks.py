#!/usr/bin/env python3
"""The GPU half of the speed work, in one command (needs CUDA; writes one JSON report).

    python tools/gpu_checks.py --out gpu_report.json [--frames 200] [--long 10000]

1. no host synchronisation inside ``Cut3r.step`` (``torch.cuda.set_sync_debug_mode("error")``);
2. ``cut3r_512_dpt`` (random weights) at 512x384: fps and device memory for fp32 / bf16 / fp16,
   1 and 8 streams, with and without ``torch.compile`` of the encoder;
3. numerical drift of bf16 / fp16 autocast against fp32 on real frames (pointmaps, poses);
4. constant memory over ``--long`` frames (device and host), 512 preset, bf16;
5. CUDA graphs (``--cuda-graphs``, batch buckets 1,2,4,8): the same results as eager stepping on real
   frames (1 stream, and 3 streams padded to the bucket of 4; fp32 and bf16), and fps with and without
   graphs at batch 1 and 8.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from streamrecon import FrameInput, create_model  # noqa: E402
from streamrecon.bench import BenchConfig, precision_drift, run_benchmark  # noqa: E402
from streamrecon.engine import EngineConfig, StreamEngine, process_batch  # noqa: E402
from streamrecon.frames import Frame  # noqa: E402

CLIP = REPO.parent / "shared" / "data" / "cut3r_examples" / "lady-running.mp4"


def sync_check(model) -> dict:
    """No host synchronisation inside the step, for each update rule, precision and head setting."""
    from streamrecon.engine.policies import get_policy

    img = torch.rand(1, 3, 384, 512, device="cuda") * 2 - 1
    out = {}
    for policy in ("cut3r", "ttt3r"):
        for dtype in (None, torch.bfloat16):
            for kw in ({}, {"heads": "minimal"}, {"token_attention": True}):
                name = f"{policy}/{'fp32' if dtype is None else 'bf16'}/{','.join(kw) or 'full'}"
                rule = get_policy(policy)
                state = model.init_state()
                try:
                    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                        _, state = model.step(FrameInput(img=img), state, rule=rule, **kw)  # builds caches
                        torch.cuda.synchronize()
                        torch.cuda.set_sync_debug_mode("error")
                        try:
                            for _ in range(3):
                                _, state = model.step(FrameInput(img=img), state, rule=rule, **kw)
                        finally:
                            torch.cuda.set_sync_debug_mode("default")
                    out[name] = "no synchronisation"
                except RuntimeError as e:
                    out[name] = f"SYNCHRONISES: {str(e)[:200]}"
                print(json.dumps({"sync": name, "result": out[name]}), flush=True)
    return out


def graph_equality(frames: list) -> dict:
    """Eager vs CUDA-graph stepping of the same frames: largest pose and pointmap differences."""
    import numpy as np

    model = create_model("cut3r_512_dpt", device="cuda", seed=0)
    out = {}
    for precision in ("fp32", "bf16"):
        for n in (1, 3):
            eager = [StreamEngine(model, EngineConfig(size=512, precision=precision)) for _ in range(n)]
            graph = [StreamEngine(model, EngineConfig(size=512, precision=precision, cuda_graphs=True))
                     for _ in range(n)]
            dT = dP = 0.0
            for i in range(12):
                batch = [Frame(image=frames[(i + 7 * k) % len(frames)], seq=i, stamp=i / 30, source=f"s{k}")
                         for k in range(n)]
                for a, b in zip(process_batch(eager, batch), process_batch(graph, batch)):
                    dT = max(dT, float(np.abs(a.T_wc - b.T_wc).max()))
                    dP = max(dP, float(np.abs(a.points_cam - b.points_cam).max() / (np.abs(a.points_cam).max() + 1e-9)))
            limit = 1e-4 if precision == "fp32" else 5e-2  # graphs replay the same kernels: only bf16 rounding order
            out[f"{precision}_streams{n}"] = {"max_T_wc_diff": dT, "max_points_rel_diff": dP,
                                              "ok": dT <= limit and dP <= limit}
            print(json.dumps({"graphs_vs_eager": precision, "streams": n, **out[f"{precision}_streams{n}"]}), flush=True)
    from streamrecon.engine.graphs import graphs_for

    out["graphs"] = graphs_for(model).stats()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("gpu_report.json"))
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--long", type=int, default=10000)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    model = create_model("cut3r_512_dpt", device="cuda", seed=0)
    report["sync"] = sync_check(model)
    del model
    runs = []
    for dtype in ("float32", "bfloat16", "float16"):
        for batch in (1, 8):
            for compile_ in (False, True):
                cfg = BenchConfig(model="cut3r_512_dpt", size="384x512", batch=batch, dtype=dtype, device="cuda",
                                  frames=args.frames, warmup=20, images=str(CLIP), compile=compile_, with_map=False,
                                  stage_timing=False)
                rep = run_benchmark(cfg)
                runs.append({"dtype": dtype, "batch": batch, "compile": compile_, **{k: rep[k] for k in (
                    "fps_per_stream", "fps_aggregate", "peak_device_mb", "achieved_tflops", "stages_ms")}})
                print(json.dumps(runs[-1]), flush=True)
                torch.cuda.empty_cache()
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            cfg = BenchConfig(model="cut3r_512_dpt", size="384x512", batch=batch, dtype=dtype, device="cuda",
                              frames=args.frames, warmup=20, images=str(CLIP), cuda_graphs=True, with_map=False,
                              stage_timing=False)
            rep = run_benchmark(cfg)
            runs.append({"dtype": dtype, "batch": batch, "compile": False, "cuda_graphs": True, **{k: rep[k] for k in (
                "fps_per_stream", "fps_aggregate", "peak_device_mb", "cuda_graphs")}})
            print(json.dumps(runs[-1]), flush=True)
            torch.cuda.empty_cache()
    report["bench"] = runs
    from streamrecon.sources import open_source

    frames = []
    for f in open_source(str(CLIP)):
        frames.append(f.image)
        if len(frames) == 30:
            break
    model = create_model("cut3r_512_dpt", device="cuda", seed=0)
    report["drift"] = {d: precision_drift(model, frames, d, size=512) for d in ("bfloat16", "float16")}
    del model
    report["cuda_graphs_vs_eager"] = graph_equality(frames)
    long = run_benchmark(BenchConfig(model="cut3r_512_dpt", size="384x512", dtype="bfloat16", device="cuda",
                                     frames=args.long, warmup=10, images=str(CLIP), memory_every=1000))
    report["constant_memory"] = long["memory"]
    args.out.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    graphs_ok = all(v["ok"] for k, v in report["cuda_graphs_vs_eager"].items() if k != "graphs")
    sync_ok = all(v == "no synchronisation" for v in report["sync"].values())
    if not (graphs_ok and sync_ok):
        print(f"FAILED: {'graph replay differs from eager stepping' if not graphs_ok else ''} "
              f"{'the step synchronises with the host' if not sync_ok else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
