"""Progress bars (tqdm) for the long phases of ``demo``, ``eval`` and ``train``: rendering, streaming,
training steps. Shown on a terminal (stderr a TTY) unless told otherwise; a bar that is not shown
costs nothing. ``streamrecon run`` keeps its own one-line display (fps, drops, ETA) in ``runner.py``.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

__all__ = ["bar", "shown"]


def shown(enabled: Optional[bool], stream: Optional[TextIO] = None) -> bool:
    """``enabled`` if given, else whether ``stream`` (stderr) is a terminal."""
    if enabled is not None:
        return bool(enabled)
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or odd stream
        return False


def bar(total: Optional[int], desc: str, enabled: Optional[bool] = None, unit: str = "frame",
        stream: Optional[TextIO] = None, initial: int = 0):
    """A tqdm bar on ``stream`` (stderr); disabled (a no-op with the same methods) when not :func:`shown`."""
    from tqdm import tqdm

    stream = stream or sys.stderr
    width = _columns(stream)  # a terminal that reports no size (some ptys, CI shells) gets 100 columns
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not shown(enabled, stream),
                dynamic_ncols=width > 0, ncols=None if width > 0 else 100, mininterval=0.25, leave=True,
                initial=initial)


def _columns(stream: TextIO) -> int:
    import os

    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0
