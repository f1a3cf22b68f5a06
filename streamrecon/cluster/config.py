"""Settings of ``streamrecon serve --ray``: how many worker actors, what each reserves, how streams move."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Optional

from ..settings import SettingsError, setting

__all__ = ["ClusterSettings", "DEFAULT_SNAPSHOT_EVERY"]

#: ``--snapshot-every`` under ``--ray`` when none is given: a stream survives its worker from its latest snapshot
DEFAULT_SNAPSHOT_EVERY = "30"


@dataclass(frozen=True)
class ClusterSettings:
    """Ray scale-out (``--ray [ADDRESS]``): worker actors that each step many streams."""

    ray: Optional[str] = setting(None, cli=False, help="Ray cluster address ('local': start one on this machine)")
    ray_workers: int = setting(0, help="worker actors (0 = one per GPU of the cluster, or 1 without GPUs)")
    ray_gpus_per_worker: Optional[float] = setting(None, help="GPUs each worker reserves (default 1 when the cluster "
                                                                "has GPUs, else 0: CPU workers)")
    ray_cpus_per_worker: float = setting(1.0, help="CPUs each worker reserves (also its torch threads, rounded up)")
    ray_streams_per_worker: int = setting(8, help="streams one worker may hold (placement: least loaded under this cap)")
    ray_replace: bool = setting(True, help="start a new worker in place of one that dies (its streams move at once "
                                           "to the others, or wait for it)")
    ray_replay_frames: int = setting(256, help="lossless frames kept per stream at the gateway since the stream's "
                                               "latest snapshot, replayed on a new worker if its worker dies")
    ray_local_cpus: Optional[int] = setting(None, help="with --ray local: CPUs of the Ray instance started here "
                                                       "(default: this machine's)")

    @classmethod
    def pop_from(cls, values: dict[str, Any]) -> "ClusterSettings":
        """Take this class's names out of flat ``values`` (the rest are :class:`ServeConfig`'s)."""
        return cls(**{f.name: values.pop(f.name) for f in fields(cls) if f.name in values})

    def validate(self) -> None:
        if self.ray_workers < 0:
            raise SettingsError("--ray-workers must be >= 0")
        if self.ray_gpus_per_worker is not None and self.ray_gpus_per_worker < 0:
            raise SettingsError("--ray-gpus-per-worker must be >= 0")
        if not self.ray_cpus_per_worker > 0:
            raise SettingsError("--ray-cpus-per-worker must be > 0")
        if self.ray_streams_per_worker < 1:
            raise SettingsError("--ray-streams-per-worker must be >= 1")
        if self.ray_replay_frames < 0:
            raise SettingsError("--ray-replay-frames must be >= 0")
        if self.ray_local_cpus is not None and self.ray_local_cpus < 1:
            raise SettingsError("--ray-local-cpus must be >= 1")
