"""Durable streams: snapshots of a stream's whole state (save, resume, relocalise).

* :mod:`.codec` -- a pickle-free tree codec (JSON + safetensors);
* :mod:`.store` -- snapshot directories: versioned, checksummed, atomic, pruned;
* :mod:`.state` -- what a pipeline holds <-> a snapshot;
* :mod:`.writer` -- periodic snapshots with a background writer.
"""

from .store import (
                    SnapshotData,
                    SnapshotError,
                    SnapshotStore,
                    read_latest_good,
                    read_snapshot,
                    resolve_snapshot,
                    valid_name,
                    valid_user_name,
)

__all__ = ["SnapshotError", "SnapshotStore", "SnapshotData", "read_snapshot", "read_latest_good", "resolve_snapshot",
           "valid_name", "valid_user_name"]
