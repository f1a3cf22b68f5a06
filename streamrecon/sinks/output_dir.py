"""One run's outputs per folder: a run refuses a folder that holds an earlier run's outputs, unless
it continues that run (``--resume``) or replaces it (``--overwrite``), so a trajectory never sits
beside another run's ``frames/`` or ``probes/``.

Only the names a run writes count (:data:`RUN_OUTPUTS`); anything else in the folder is the user's
and is left alone. ``snapshots/`` is kept by ``--overwrite`` too: snapshots are there to outlive runs.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..settings import SettingsError

__all__ = ["RUN_OUTPUTS", "earlier_outputs", "claim_output_dir"]

_logger = logging.getLogger(__name__)

#: what a run writes into its output folder (folders end in ``/``)
RUN_OUTPUTS = ("trajectory.txt", "trajectory_optimized.txt", "trajectory_refined.txt", "keyframes.txt",
               "map.ply", "map.glb", "map_refined.ply", "summary.json", "recording.rrd", "frames/", "probes/")


def earlier_outputs(folder: str | Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` already in ``folder`` (sorted; empty when there is none)."""
    d = Path(folder)
    if not d.is_dir():
        return []
    def present(name: str) -> bool:
        return (d / name[:-1]).is_dir() if name.endswith("/") else (d / name).is_file()

    return sorted(name for name in RUN_OUTPUTS if present(name))


def claim_output_dir(folder: str | Path, overwrite: bool = False, resume: bool = False) -> list[str]:
    """Make ``folder`` this run's: create it; with earlier outputs there, refuse, or remove them
    (``overwrite``), or keep them (``resume``: the resumed run rewrites each one).

    Returns:
        the earlier outputs removed (``overwrite``) or continued (``resume``).

    Raises:
        SettingsError: earlier outputs and neither flag; or the path is a file.
    """
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise SettingsError(f"--output-dir {d}: is a file, not a folder")
    found = earlier_outputs(d)
    if found and not (overwrite or resume):
        raise SettingsError(f"--output-dir {d} holds an earlier run's outputs ({', '.join(found)}): pass --overwrite to "
                            "replace them, --resume to continue that run, or another --output-dir")
    if found and overwrite and not resume:
        for name in found:
            p = d / name.rstrip("/")
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
        _logger.warning("--overwrite: removed the earlier run's %s from %s", ", ".join(found), d)
    d.mkdir(parents=True, exist_ok=True)
    return found
