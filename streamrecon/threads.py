"""CPU threads for the model's maths: how many, and how an idle one waits. One setting, ``--threads``.

torch runs its CPU kernels on an OpenMP pool (``intra_op`` threads) and independent operators on a
second pool (``inter_op``). libgomp, torch's OpenMP, lets a thread that finished its share spin for a
while before it sleeps: on an otherwise idle machine that saves a wake-up, but on a robot's computer,
where other processes always run, the spinning threads take the cores the others need and every
operator waits for its slowest thread (docs/PERFORMANCE.md has the measured table: up to 30x slower).

:func:`configure` sets the counts and ``OMP_WAIT_POLICY`` in the environment, then imports torch and
sets its pools. libgomp reads the wait policy once, when torch is first imported, so it must run
before that: the CLI calls it first thing for every command. An ``OMP_WAIT_POLICY`` or
``OMP_NUM_THREADS`` already in the environment is the user's choice and is kept (when ``--threads``
is not given).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import asdict, dataclass
from typing import Mapping, Optional

__all__ = ["ThreadSettings", "resolve", "configure", "current", "report", "DEFAULT_THREADS", "DEFAULT_WAIT_POLICY"]

_logger = logging.getLogger(__name__)

#: intra-op threads when nothing is asked for: measured best beside other CPU load, and within a few
#: percent of the best on an idle machine (docs/PERFORMANCE.md, tools/bench_threads.py)
DEFAULT_THREADS = 1
#: idle OpenMP threads sleep at once instead of spinning on cores other processes need
DEFAULT_WAIT_POLICY = "PASSIVE"
_WAIT_POLICIES = ("PASSIVE", "ACTIVE")


@dataclass(frozen=True)
class ThreadSettings:
    """The process's CPU thread settings.

    Attributes:
        intra_op: threads one operator uses (``torch.set_num_threads``, ``OMP_NUM_THREADS``).
        inter_op: threads that run independent operators (``torch.set_num_interop_threads``).
        wait_policy: ``OMP_WAIT_POLICY``: ``PASSIVE`` (an idle thread sleeps at once) or ``ACTIVE`` (it spins).
        chosen_by: ``--threads``, ``environment`` (``OMP_NUM_THREADS`` was set) or ``default``.
        cores: CPU cores this process may run on.
    """

    intra_op: int
    inter_op: int
    wait_policy: str
    chosen_by: str
    cores: int


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve(requested: Optional[int], environ: Mapping[str, str] = os.environ,
            cores: Optional[int] = None) -> ThreadSettings:
    """The settings for ``--threads requested`` (None: not given; 0: one per core).

    Raises:
        ValueError: a negative count, or an ``OMP_WAIT_POLICY`` that is neither PASSIVE nor ACTIVE.
    """
    cores = cores or _cores()
    if requested is not None and requested < 0:
        raise ValueError(f"--threads {requested}: give a thread count >= 1, or 0 for one per core ({cores})")
    policy = environ.get("OMP_WAIT_POLICY", "").strip().upper() or DEFAULT_WAIT_POLICY
    if policy not in _WAIT_POLICIES:
        raise ValueError(f"OMP_WAIT_POLICY={environ['OMP_WAIT_POLICY']!r}: use PASSIVE or ACTIVE")
    if requested is not None:
        return ThreadSettings(requested or cores, 1, policy, "--threads", cores)
    env = environ.get("OMP_NUM_THREADS", "").strip()
    if env:
        try:
            n = int(env.split(",")[0])
        except ValueError:
            raise ValueError(f"OMP_NUM_THREADS={env!r} is not a thread count") from None
        if n >= 1:
            return ThreadSettings(n, 1, policy, "environment", cores)
    return ThreadSettings(min(DEFAULT_THREADS, cores), 1, policy, "default", cores)


_current: Optional[ThreadSettings] = None
_user_env: Optional[dict[str, str]] = None


def configure(requested: Optional[int] = None, import_torch: bool = True) -> ThreadSettings:
    """Apply :func:`resolve`'s settings to this process (environment, then torch and OpenCV).

    Call it before torch is first imported (else the wait policy cannot change any more: logged).
    """
    global _current, _user_env
    if _user_env is None:  # what the user set, before any configure() of ours wrote to the environment
        _user_env = {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY") if k in os.environ}
    s = resolve(requested, environ=_user_env)
    if "torch" in sys.modules and os.environ.get("OMP_WAIT_POLICY", "").upper() != s.wait_policy:
        _logger.info("threads: torch was imported before the thread settings; OMP_WAIT_POLICY=%s has no effect",
                        s.wait_policy)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(s.intra_op)
    os.environ["OMP_WAIT_POLICY"] = s.wait_policy
    _limit_loaded_blas(s.intra_op)
    if import_torch or "torch" in sys.modules:
        import torch

        torch.set_num_threads(s.intra_op)
        try:
            torch.set_num_interop_threads(s.inter_op)
        except RuntimeError:  # already set, or inter-op work already ran: keep what is there
            _logger.debug("threads: the inter-op pool is already running; left as it is")
    if "cv2" in sys.modules or import_torch:
        try:
            import cv2

            cv2.setNumThreads(s.intra_op)
        except ImportError:
            pass
    _current = s
    _logger.info("threads: %d intra-op, %d inter-op, OMP_WAIT_POLICY=%s (%s; %d cores)",
                 s.intra_op, s.inter_op, s.wait_policy, s.chosen_by, s.cores)
    return s


def _limit_loaded_blas(n: int) -> None:
    """numpy's OpenBLAS reads ``OPENBLAS_NUM_THREADS`` once, when numpy is imported -- the CLI has
    imported it by the time :func:`configure` runs -- and then starts one thread per core, whose
    spinning after every small product (the tracker's and the depth fit's 88 x 88 systems) took a
    core from the network: measured +38 % CPU time for no gain in speed (docs/PERFORMANCE.md).
    So the BLAS libraries already loaded get the same thread count now (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an install without it: the environment variable still covers later imports
        _logger.debug("threads: threadpoolctl not installed; numpy's BLAS keeps its own thread count")
        return
    threadpool_limits(n, user_api="blas")


def _blas_threads() -> Optional[int]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [i.get("num_threads") for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def current() -> Optional[ThreadSettings]:
    """The settings :func:`configure` applied in this process (None: never called, e.g. the library API)."""
    return _current


def report() -> dict:
    """What ``summary.json`` records: the settings applied, and what torch really runs with."""
    out: dict = asdict(_current) if _current is not None else {"chosen_by": "not configured (library use)"}
    if "torch" in sys.modules:
        import torch

        out["torch_intra_op"] = torch.get_num_threads()
        out["torch_inter_op"] = torch.get_num_interop_threads()
    out["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
    out["blas_threads"] = _blas_threads()  # numpy's (and any other loaded) BLAS library's threads
    return out
