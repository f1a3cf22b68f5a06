#!/usr/bin/env python3
"""Where a model step's time goes, operator by operator, against the FLOPs and this machine's GEMM ceiling.

Examples:
    python tools/profile_step.py --preset cut3r_224_linear --size 224x224 --threads 2
    python tools/profile_step.py --preset cut3r_224_linear --size 224x224 --ab onednn --rounds 4
    python tools/profile_step.py --model streamrecon/weights/streamrecon_small.safetensors --size 112x160 --ab onednn
    python tools/profile_step.py --preset cut3r_224_linear --size 224x224 --precision int8

Default mode: one warm-up step, then ``--frames`` steps under ``torch.profiler``; operators are grouped
(GEMM, attention, elementwise, copies, norms, other) with their share of the time, and the GEMMs'
achieved GFLOP/s (from their input shapes) beside the ceiling of a 768x768x3072 GEMM measured in the
same run. Per-stage times (encoder, memory, decoders, heads) come from the model's stage hooks.
``--precision int8`` profiles the node's int8 model (its quantised Linear layers are the "int8 gemm"
group; their FLOPs are not counted).

``--ab onednn``: the same frames stepped with the oneDNN linear path off and on, alternating which goes
first in every round, from the same state: per-stage medians of both, their ratio from that one run,
and the largest difference of the outputs (the machine's load changes between runs, not within one).
``--ab fused-attn`` does the same for SDPA against the explicit softmax.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import time

import torch

from streamrecon import FrameInput, create_model, load_model
from streamrecon.layers import set_fused_attn, set_onednn_linear

GROUPS = {
    "gemm": ("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "mkldnn::_linear_pointwise", "aten::linear"),
    "int8 gemm": ("quantized::linear_dynamic",),  # --precision int8: quantise the input, int8 GEMM, dequantise
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_softmax", "aten::softmax"),
    "copies": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::flip", "aten::_to_copy"),
    "norms": ("aten::native_layer_norm",),
    "elementwise": ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::gelu", "aten::silu", "aten::exp",
                    "aten::sigmoid", "aten::where", "aten::sign", "aten::add_", "aten::mul_"),
}
SWITCHES = {"onednn": set_onednn_linear, "fused-attn": set_fused_attn}


def gemm_ceiling(threads: int) -> float:
    """GFLOP/s of a 768x768x3072 fp32 GEMM on this machine now (best of 5)."""
    a, b = torch.randn(768, 768), torch.randn(768, 3072)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(5))
    return 2 * 768 * 768 * 3072 / best / 1e9


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _gemm_flops(name: str, shapes) -> float:
    try:
        if name == "aten::addmm":  # bias, (M,K), (K,N)
            (m, k), (_, n) = shapes[1], shapes[2]
            return 2.0 * m * k * n
        if name == "mkldnn::_linear_pointwise":  # x (..., K), w (N, K)
            x, w = shapes[0], shapes[1]
            rows = 1
            for d in x[:-1]:
                rows *= d
            return 2.0 * rows * x[-1] * w[0]
        if name in ("aten::mm", "aten::bmm"):
            a, b = shapes[0], shapes[1]
            batch = a[0] if name == "aten::bmm" else 1
            return 2.0 * batch * a[-2] * a[-1] * b[-1]
    except (IndexError, TypeError, ValueError):
        pass
    return 0.0


def _model(args):
    model = load_model(args.model, device="cpu") if args.model else create_model(args.preset, device="cpu", seed=0)
    if args.precision == "int8":
        from streamrecon.engine.quant import quantize_int8_

        model = quantize_int8_(model.eval())
    return model


def _stage_hook(store: dict, key: list):
    @contextlib.contextmanager
    def timer(name: str):
        t = time.perf_counter()
        yield
        store[key[0]][name].append(time.perf_counter() - t)
    return timer


def profile(args, model, img) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stages: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    key = ["run"]
    with torch.inference_mode():
        state = model.init_state(1)
        _, state = model.step(FrameInput(img=img), state)
        model.stage_timer = _stage_hook(stages, key)
        with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(args.frames):
                _, state = model.step(FrameInput(img=img), state)
        model.stage_timer = None
    ceiling = gemm_ceiling(args.threads)
    groups: dict[str, float] = collections.Counter()
    gemm_flops = 0.0
    total = 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        us = ev.self_cpu_time_total
        total += us
        group = next((g for g, names in GROUPS.items() if ev.key in names), "other")
        groups[group] += us
        if group == "gemm":
            gemm_flops += _gemm_flops(ev.key, ev.input_shapes) * ev.count
    gemm_s = groups["gemm"] / 1e6
    return {
        "frames": args.frames,
        "ms_per_frame": {g: round(us / 1e3 / args.frames, 1) for g, us in groups.most_common()},
        "share": {g: round(us / total, 3) for g, us in groups.most_common()},
        "gemm_gflops_achieved": round(gemm_flops / gemm_s / 1e9, 1) if gemm_s else None,
        "gemm_ceiling_gflops": round(ceiling, 1),
        "stage_ms": {k: round(statistics.median(v) * 1e3, 1) for k, v in stages["run"].items()},
        "top_ops": [(ev.key, round(ev.self_cpu_time_total / 1e3 / args.frames, 1), ev.count // args.frames)
                    for ev in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:12]],
    }


def ab(args, model, img) -> dict:
    switch = SWITCHES[args.ab]
    stages: dict = collections.defaultdict(lambda: collections.defaultdict(list))
    key = ["off"]
    outputs = {}
    with torch.inference_mode():
        state = model.init_state(1)
        _, state = model.step(FrameInput(img=img), state)
        model.stage_timer = _stage_hook(stages, key)
        for r in range(args.rounds):
            nxt = None
            for setting in ((False, True) if r % 2 == 0 else (True, False)):
                switch(setting)
                key[0] = "on" if setting else "off"
                t = time.perf_counter()
                out, st = model.step(FrameInput(img=img), state)
                stages[key[0]]["step"].append(time.perf_counter() - t)
                outputs[key[0]] = out
                nxt = st if nxt is None else nxt
            state = nxt
        model.stage_timer = None
    switch(True)
    med = {k: {s: round(statistics.median(v) * 1e3, 1) for s, v in d.items()} for k, d in stages.items()}
    diff = {f: float((getattr(outputs["on"], f) - getattr(outputs["off"], f)).abs().max())
            for f in ("points_cam", "conf_cam", "pose") if getattr(outputs["on"], f) is not None}
    return {"switch": args.ab, "rounds": args.rounds, "off_ms": med["off"], "on_ms": med["on"],
            "speedup": {s: round(med["off"][s] / med["on"][s], 3) for s in med["off"] if med["on"].get(s)},
            "max_abs_diff": diff}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cut3r_224_linear", help="preset with random weights (seed 0)")
    ap.add_argument("--model", default="", help="a checkpoint instead of a preset")
    ap.add_argument("--size", default="224x224", help="HxW of the model input")
    ap.add_argument("--frames", type=int, default=2, help="profiled steps (default mode)")
    ap.add_argument("--rounds", type=int, default=4, help="A/B rounds (--ab)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                    help="int8: the trunk's Linear layers dynamically quantised (--precision int8 of the node)")
    ap.add_argument("--ab", choices=sorted(SWITCHES), default="", help="A/B one implementation switch")
    ap.add_argument("--json", default="", help="also write the report here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, w = (int(v) for v in args.size.lower().split("x"))
    model = _model(args).eval()
    img = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = ab(args, model, img) if args.ab else profile(args, model, img)
    report.update(model=args.model or args.preset, size=args.size, threads=args.threads, precision=args.precision)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
