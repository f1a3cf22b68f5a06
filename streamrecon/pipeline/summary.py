"""``RunSummary``: what one stream did (``summary.json``, the end-of-run screen, ``serve`` status)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["RunSummary", "SourceCounts", "format_summary"]


@dataclass(frozen=True)
class SourceCounts:
    """What the source reported: frames read, dropped (live sources), undecodable, the last error."""

    read: int = 0
    dropped: int = 0
    errors: int = 0
    last_error: str = ""


@dataclass(frozen=True)
class RunSummary:
    """Attributes (``summary.json`` has the same keys; ``extra`` is merged at the top level):
        stream_id: the stream (``run``: the source).
        frames_in, processed, dropped, errors, error_messages: counters (errors = unusable frames).
        fps, wall_s: processed frames per second of wall time since the pipeline started.
        latency_ms: stage -> ``{p50, p99, mean, n}`` (source, preprocess, model, postprocess, geometry,
            map, sinks, and frame = the sum of all but the source, per frame).
        latency_ms_per_frame_mean: mean of ``frame``.
        memory_mb: peak and current RSS, samples every 50 frames, device peak.
        map: the global map's statistics.
        segments: reset segments seen.
        frames_with_K_given: frames that came with intrinsics.
        sinks: per background sink: frames, dropped, errors, busy time, queue high-water mark.
        slam: the geometry stage: backend, intrinsics, tracking state counts, keyframes, timing.
        in_progress: ``True`` in the periodic summaries written while the stream runs.
        interrupted, stop_reason, fatal_error: how it ended.
        network: ``--network-every``: network frames, their rate and the pose rate (empty when every
            frame goes through the network in the frame loop).
        extra: settings, model and command-specific facts (``config``, ``model``, ``source``, ...).
    """

    stream_id: str
    frames_in: int
    processed: int
    dropped: int
    errors: int
    error_messages: list[str]
    fps: float
    wall_s: float
    latency_ms: dict[str, dict[str, float]]
    latency_ms_per_frame_mean: float
    memory_mb: dict[str, Any]
    map: dict[str, Any]
    segments: int
    frames_with_K_given: int
    sinks: dict[str, Any]
    slam: dict[str, Any]
    in_progress: bool
    interrupted: bool
    stop_reason: str
    fatal_error: Optional[str] = None
    network: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        extra = d.pop("extra")
        return {**d, **extra}

    def __getitem__(self, key: str) -> Any:
        """Read-only, dict-style access to the ``summary.json`` keys (``s["processed"]``)."""
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def format_summary(s: dict) -> str:
    """The one-screen end-of-run summary (of ``RunSummary.to_dict()`` plus ``outputs``)."""
    lines = [
        f"source      {s.get('source', s.get('stream_id', ''))}",
        f"frames      in {s['frames_in']}  processed {s['processed']}  dropped {s['dropped']}  errors {s['errors']}",
        f"speed       {s['fps']:.2f} fps over {s['wall_s']:.1f} s ({s['stop_reason']})",
        "latency ms  " + "  ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in s["latency_ms"].items())
        + "  (p50/p99)",
        f"memory      peak RSS {s['memory_mb']['peak_rss']:.0f} MiB",
        f"map         {s['map']['points']} points, voxel {s['map']['voxel_size']:.4g}, segments {s['segments']}",
    ]
    net = s.get("network") or {}
    if net:
        lines.insert(3, f"rates       poses {net['poses_per_s']:.2f}/s, network {net['network_fps']:.2f}/s "
                        f"({net['frames']} of {s['processed']} frames, every {net['every']}; "
                        f"{net['skipped_busy']} skipped while it was busy)")
    t = s.get("threads") or {}
    if t.get("intra_op"):
        lines[2] += f"; {t['intra_op']} thread{'s' if t['intra_op'] > 1 else ''} ({t.get('chosen_by', '')})"
    if s.get("outputs"):
        out_dir = s.get("output_dir", "")
        lines.append(f"outputs     {out_dir}: {', '.join(_output_text(out_dir, n) for n in s['outputs'])}")
    rrd = (s.get("config") or {}).get("save_rrd")
    if rrd:
        lines.append(f"recording   {rrd}")
    snaps = s.get("snapshots") or {}
    if snaps.get("written"):
        lines.append(f"snapshots   {snaps.get('root')}: {snaps['written']} written, latest {snaps.get('last')}")
    if s.get("error_messages"):
        lines.append("errors      " + "; ".join(s["error_messages"][:3]))
    if s.get("fatal_error"):
        lines.append(f"STOPPED     {s['fatal_error']}")
    return "\n".join(lines)


def _output_text(out_dir: str, name: str) -> str:
    """``frames/ (65 files)`` for a folder of outputs, the name for a file."""
    if not name.endswith("/") or not out_dir:
        return name
    from pathlib import Path

    d = Path(out_dir) / name
    n = sum(1 for p in d.iterdir() if p.is_file()) if d.is_dir() else 0
    return f"{name} ({n} files)"
