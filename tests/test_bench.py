"""Benchmark harness: analytic FLOPs against PyTorch's counter, the report, precision drift."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from streamrecon.bench import BenchConfig, format_bench, precision_drift, run_benchmark
from streamrecon.flops import step_flops
from streamrecon.layers import fused_attn
from streamrecon.models import Cut3r
from streamrecon.types import FrameInput

from .conftest import tiny_config


@pytest.mark.parametrize("head,hw", [("linear", (32, 48)), ("dpt", (48, 64)), ("dpt", (80, 96))])
def test_analytic_flops_match_pytorch_counter(head, hw):
    cfg = tiny_config(head, state_size=24, local_mem_size=16)
    model = Cut3r(cfg).eval()
    state = model.init_state(2)
    with torch.no_grad(), fused_attn(False):  # the counter does not see the CPU SDPA kernel; plain math it does
        _, state = model.step(FrameInput(img=torch.zeros(2, 3, *hw)), state)  # not the first frame
        with FlopCounterMode(display=False) as counter:
            model.step(FrameInput(img=torch.zeros(2, 3, *hw)), state)
    ours = step_flops(cfg, *hw, batch=2)["total"]
    assert ours == pytest.approx(counter.get_total_flops(), rel=0.03)


@pytest.mark.parametrize("name,hw", [("cut3r_512_dpt", (384, 512)), ("cut3r_224_linear", (224, 224))])
def test_official_preset_flops_match_pytorch_counter_on_meta(name, hw):
    from streamrecon.config import preset
    from streamrecon.types import StreamState

    model = Cut3r(preset(name), device="meta")  # shapes only: no memory, no compute
    s = model.init_state(1)
    state = StreamState(s.tokens, s.mem, s.init_tokens, s.init_mem, torch.zeros(1, dtype=torch.bool, device="meta"))
    with torch.no_grad(), fused_attn(False), FlopCounterMode(display=False) as counter:
        model.step(FrameInput(img=torch.zeros(1, 3, *hw, device="meta")), state)
    ours = step_flops(preset(name), *hw)
    assert ours["total"] == pytest.approx(counter.get_total_flops(), rel=1e-3)
    if name == "cut3r_512_dpt":
        assert 1.55e12 < ours["total"] < 1.62e12 and ours["heads"] > ours["decoders"]


def test_benchmark_report(shared, monkeypatch):
    import streamrecon.bench as bench

    frames, batch, warmup = 4, 2, 1
    calls: list[tuple[float, float]] = []  # (start, end) of every batched step, timed here

    def timed_process_batch(*args, **kw):
        t = time.perf_counter()
        try:
            return process_batch(*args, **kw)
        finally:
            calls.append((t, time.perf_counter()))

    process_batch = bench.process_batch
    monkeypatch.setattr(bench, "process_batch", timed_process_batch)
    rep = run_benchmark(BenchConfig(model=str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), size="48x64",
                                    batch=batch, frames=frames, warmup=warmup, memory_every=2))
    t_end = time.perf_counter()
    for stage in ("preprocess", "encoder", "decoders", "memory", "heads", "postprocess", "map", "total"):
        assert rep["stages_ms"][stage]["p99"] >= rep["stages_ms"][stage]["p50"] > 0, stage
    # fps against a clock independent of the report's: the timed window holds the `frames` timed
    # steps (so it lasts at least their summed duration) and lies after the last warm-up step
    # ended and before run_benchmark returned (strictly nested intervals: no scheduling can break it)
    assert len(calls) == warmup + frames
    lower_ms = 1e3 * sum(e - s for s, e in calls[warmup:])
    upper_ms = 1e3 * (t_end - calls[warmup - 1][1])
    for key, n in (("fps_per_stream", frames), ("fps_aggregate", frames * batch)):
        fps = rep[key]
        assert math.isfinite(fps) and fps > 0, key
        # the timed window the report implies; fps is rounded to 3 decimals, so it spans an interval
        longest, shortest = 1e3 * n / max(fps - 5e-4, 1e-9), 1e3 * n / (fps + 5e-4)
        assert lower_ms * 0.999 <= longest and shortest <= upper_ms * 1.001, (key, lower_ms, shortest, longest, upper_ms)
    assert [m["frame"] for m in rep["memory"]] == [2, 4] and rep["achieved_tflops"] > 0
    assert "aggregate" in format_bench(rep)


def test_low_precision_drift_is_measured_and_heads_stay_fp32(shared):
    import numpy as np

    from streamrecon.checkpoint import load_model

    model = load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 255, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    drift = precision_drift(model, frames, "bfloat16", size=64)
    assert 0 < drift["points_cam"] < 0.5 and drift["frames"] == 3
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model.step(FrameInput(img=torch.rand(1, 3, 48, 64)), model.init_state())
    assert out.points_cam.dtype == torch.float32 and out.pose.dtype == torch.float32
