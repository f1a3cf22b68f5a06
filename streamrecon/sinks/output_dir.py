"""One run's outputs per folder: a run refuses a folder that holds an earlier run's outputs, unless
it continues that run (``--resume``) or replaces it (``--overwrite``), so a trajectory never sits
beside another run's ``frames/`` or ``probes/``.

Only the names a run writes count (:data:`RUN_OUTPUTS`); anything else in the folder is the user's
and is left alone. ``snapshots/`` is kept by ``--overwrite`` too: snapshots are there to outlive runs.
A run checks the folder first (:func:`claim_output_dir` with ``dry_run``) and removes anything only
once its source is open and its model loaded, so a typo never costs the earlier run.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

from ..settings import SettingsError

__all__ = ["RUN_OUTPUTS", "earlier_outputs", "claim_output_dir"]

_logger = logging.getLogger(__name__)

#: what a run writes into its output folder (folders end in ``/``)
RUN_OUTPUTS = ("trajectory.txt", "trajectory_optimized.txt", "trajectory_refined.txt", "keyframes.txt",
               "map.ply", "map.glb", "map_refined.ply", "summary.json", "recording.rrd", "frames/", "probes/",
               "pointmap.ply", "colmap/")
#: what a resumed run rewrites in full; the rest of an earlier run's outputs is removed or trimmed
_REWRITTEN_ON_RESUME = {"trajectory.txt", "map.ply", "map.glb", "summary.json", "recording.rrd"}
_INDEX = re.compile(r"(\d{6,})$")


def earlier_outputs(folder: str | Path) -> list[str]:
    """The names of :data:`RUN_OUTPUTS` already in ``folder`` (sorted; empty when there is none)."""
    d = Path(folder)
    if not d.is_dir():
        return []

    def present(name: str) -> bool:
        return (d / name[:-1]).is_dir() if name.endswith("/") else (d / name).is_file()

    return sorted(name for name in RUN_OUTPUTS if present(name))


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


def _trim(folder: Path, frames: int) -> int:
    """Remove the per-frame files (``NNNNNN`` in their name) of frames ``>= frames``; how many."""
    n = 0
    if folder.is_dir():
        for p in folder.iterdir():
            m = _INDEX.search(p.name.rsplit(".", 1)[0])
            if m and int(m.group(1)) >= frames:
                p.unlink()
                n += 1
    return n


def claim_output_dir(folder: str | Path, overwrite: bool = False, resume_frames: Optional[int] = None,
                     keep: Iterable[str | Path] = (), dry_run: bool = False) -> list[str]:
    """Make ``folder`` this run's, given the earlier run's outputs found there:

    * neither flag: refuse;
    * ``overwrite``: remove them;
    * ``resume_frames`` (``--resume`` of a snapshot taken after that many frames): keep what the
      resumed run rewrites, remove the optional end-of-run files (``keyframes.txt``, refined / optimised
      trajectories and map), and the ``frames/`` / ``probes/`` files of frames the snapshot never saw.

    Args:
        keep: paths this run reads (its source, a snapshot): removing anything that holds one is refused.
        dry_run: check only (create nothing, remove nothing).

    Returns:
        the earlier outputs found.

    Raises:
        SettingsError: earlier outputs and neither flag; the path is a file; a path in ``keep`` lies in
            something that would be removed.
    """
    d = Path(folder)
    if d.exists() and not d.is_dir():
        raise SettingsError(f"--output-dir {d}: is a file, not a folder")
    found = earlier_outputs(d)
    resume = resume_frames is not None
    if found and not (overwrite or resume):
        raise SettingsError(f"--output-dir {d} holds an earlier run's outputs ({', '.join(found)}): pass --overwrite to "
                            "replace them, --resume to continue that run, or another --output-dir")
    doomed = [n for n in found if not resume or n not in _REWRITTEN_ON_RESUME | {"frames/", "probes/"}]
    for name in doomed:
        for p in keep:
            if _inside(Path(p), d / name.rstrip("/")):
                raise SettingsError(f"--overwrite would remove {d / name.rstrip('/')}, which this run reads ({p}): "
                                    "use another --output-dir")
    if dry_run:
        return found
    for name in doomed:
        _remove(d / name.rstrip("/"))
    trimmed = sum(_trim(d / sub, resume_frames) for sub in ("frames", "probes")) if resume else 0
    if doomed or trimmed:
        _logger.warning("%s: removed the earlier run's %s%s from %s", "--resume" if resume else "--overwrite",
                        ", ".join(doomed) or "nothing else",
                        f" and {trimmed} frames/probes files after frame {resume_frames}" if trimmed else "", d)
    d.mkdir(parents=True, exist_ok=True)
    return found
