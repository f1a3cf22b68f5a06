"""Child process of the SIGKILL trials (tests/test_snapshot.py, tools/snapshot_kill_trials.py): writes
snapshot after snapshot into a root until it is killed; snapshot ``i`` holds ``i`` everywhere."""

from __future__ import annotations

import sys

import torch

from streamrecon.snapshot.store import SnapshotStore

if __name__ == "__main__":
    root, mb = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 2.0
    store = SnapshotStore(root, keep=2)
    n = int(mb * 2**20 / 4)
    i = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    while True:
        i += 1
        store.write({"i": i, "n": n}, {"a": torch.full((n,), float(i)), "b": torch.arange(i, i + 1000)}, {"frames": i})
        sys.stdout.write(f"{i}\n")
        sys.stdout.flush()
