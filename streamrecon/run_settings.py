"""Settings of ``streamrecon run``: the source and run-only settings, plus the shared
:class:`~streamrecon.settings.PipelineConfig` (torch-free, so the CLI can build its flags anywhere)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from .probe import parse_probe
from .settings import PipelineConfig, SettingsError, from_flat, setting, to_flat

__all__ = ["RunConfig"]


@dataclass(frozen=True)
class RunConfig:
    """Settings of one run: the source and run-only settings, plus the shared :class:`PipelineConfig`.
    ``RunConfig.of(source=..., weights=..., voxel_size=...)`` builds one from flat names."""

    source: str = setting("", help="image folder, video file, camera (0, cam:0, /dev/video0) or live:VIDEO", cli=False)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    stride: int = setting(1, help="use every n-th frame of a file source")
    max_frames: int = setting(0, help="stop after this many processed frames (0 = all)")
    repeat: int = setting(1, help="loop a file source this many times (soak tests)")
    fps: float = setting(30.0, help="timestamps for image folders without time in their names")
    probe: list[str] = setting(help="raymap probe: orbit[:N] or cameras.json, optional @end|@every:N|@i,j,k (repeatable)",
                               factory=list, repeat=True)
    prefetch: Optional[bool] = setting(None, help="read and preprocess the next frames of a file source while the model "
                                                  "runs (default: on with a GPU; on a CPU the threads compete)")
    progress: Optional[bool] = setting(None, help="progress line (default: on a TTY)")
    snapshot: Optional[str] = setting(None, help="snapshot directory: the stream's whole state is saved there at the "
                                                 "end (and every --snapshot-every), for --resume / --relocalise")
    resume: Optional[str] = setting(None, help="continue a stream from a snapshot (a snapshot, or a --snapshot "
                                               "directory: its latest): same state, map and trajectory; a file source "
                                               "skips the frames the snapshot already took")
    overwrite: bool = setting(False, help="replace an earlier run's outputs in --output-dir (without it, or --resume, a "
                                          "run refuses a folder that holds them)")
    relocalise: Optional[str] = setting(None, help="start inside a saved snapshot's map: localise against its keyframes, "
                                                   "then extend the same map in its world frame (needs --backend slam)")
    revisit: bool = setting(False, help="files only: a first pass reads the whole sequence into the state; a second "
                                        "reads every frame again against that final state (no update) and writes the "
                                        "outputs (CUT3R's revisit evaluation; twice the model time)")

    @classmethod
    def of(cls, **values: Any) -> "RunConfig":
        """From flat setting names (pipeline settings go to their section)."""
        if isinstance(values.get("probe"), str):
            values["probe"] = [values["probe"]]
        return from_flat(cls, values)

    def flat(self) -> dict[str, Any]:
        return to_flat(self)

    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the first bad setting (before anything is loaded)."""
        if not self.source:
            raise SettingsError("no source given (a folder, a video file, or a camera such as 0)")
        for name in ("stride", "repeat"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name} must be >= 1")
        if self.max_frames < 0:
            raise SettingsError("--max-frames must be >= 0")
        if self.resume and self.overwrite:
            raise SettingsError("give --resume (continue the run in --output-dir) or --overwrite (replace it), not both")
        if self.resume and self.relocalise:
            raise SettingsError("give --resume (continue the same stream) or --relocalise (a new run in a saved map), not both")
        if self.relocalise and self.pipeline.slam.resolved_backend() != "slam":
            raise SettingsError("--relocalise needs --backend slam (or known intrinsics with --backend auto): it matches "
                                "frames against the snapshot's keyframes")
        if self.revisit and (self.resume or self.relocalise or self.pipeline.outputs.snapshot_every
                             or self.pipeline.engine.reset_every):
            raise SettingsError("--revisit reads a whole sequence twice: not with --resume, --relocalise, "
                                "--snapshot-every or --reset-every")
        if self.pipeline.engine.network_schedule() != 1 and (self.resume or self.relocalise or self.revisit):
            raise SettingsError("--network-every does not work with --resume, --relocalise or --revisit yet")
        self.pipeline.validate()
        for p in self.probe:
            try:
                parse_probe(p)
            except ValueError as e:
                raise SettingsError(str(e) if "--probe" in str(e) else f"--probe {p!r}: {e}") from None
