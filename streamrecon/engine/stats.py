"""Bounded latency statistics (percentiles over the most recent samples) and memory probes."""

from __future__ import annotations

import resource
from collections import defaultdict, deque
from typing import Optional

import numpy as np

__all__ = ["LatencyStats", "rss_mb", "peak_rss_mb", "device_peak_mb"]


class LatencyStats:
    """Per-stage millisecond samples; keeps the last ``window`` of each stage (memory stays bounded)."""

    def __init__(self, window: int = 10_000) -> None:
        self._samples: dict[str, deque] = defaultdict(lambda: deque(maxlen=window))
        self._count: dict[str, int] = defaultdict(int)

    def add(self, timings_ms: dict[str, float]) -> None:
        for stage, ms in timings_ms.items():
            self._samples[stage].append(float(ms))
            self._count[stage] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for stage, values in self._samples.items():
            a = np.asarray(values)
            out[stage] = {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
                          "mean": round(float(a.mean()), 3), "n": self._count[stage]}
        return out


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def device_peak_mb(device) -> Optional[float]:
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
