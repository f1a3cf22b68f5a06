"""Local bundle adjustment over a window of keyframes (gtsam), and a background worker that runs it.

:func:`local_bundle_adjust` refines the poses of a sliding window of keyframes and the 3D points they
observe by minimising the reprojection error (``GenericProjectionFactorCal3_S2``, Huber-robust
pixel noise) with Levenberg-Marquardt, a bounded number of iterations. The oldest ``n_fixed``
keyframes of the window are held by prior factors with tiny sigmas: with two of them the gauge
(rotation, translation) *and* the monocular scale are fixed, so the result stays in the tracker's
world and metric scale.

Robustness: observations behind the camera or with an initial reprojection error beyond
``max_init_px`` are left out; points seen by fewer than two keyframes are left out; keyframes that
keep fewer than ``min_kf_obs`` observations are left out (their pose would be undetermined); too
few points or a failure inside gtsam (an indeterminant system, a cheirality exception) returns
``None`` -- the caller keeps its own estimates.

:class:`BAWorker` runs it in a daemon thread with a queue of one: a new window request replaces an
older one that has not started yet, the caller polls for the newest result and never waits.
gtsam keeps Python's GIL while it computes (an iteration: a few ms), so a plain thread stalls the
caller whenever the caller needs the GIL back (after every OpenCV call). Two remedies:

* ``idle``: an event the caller sets while it is *not* tracking; the thread waits for it before
  building the graph and before each Levenberg-Marquardt iteration, so it computes in the gaps
  between frames (in the pipeline: while the network runs) and a ``track`` call waits for at most
  the one iteration in progress when it starts;
* ``process=True`` (:class:`ProcessBA`): the thread hands the window to a child Python process
  (this file run as a script, started on first use) and waits on the pipe with the GIL released;
  if the child cannot start or dies, that window's adjustment returns ``None``. No GIL at all, but
  the child competes for the CPU at the OS level, and the arrays are pickled both ways.
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np

__all__ = ["BAResult", "local_bundle_adjust", "BAWorker", "ProcessBA"]


@dataclass
class BAResult:
    """Attributes:
        kf_ids: the keyframes that took part (the caller's ids), in window order.
        poses: ``(n, 4, 4)`` their optimised ``T_wc`` (the fixed ones unchanged).
        point_ids: ``(m,)`` the points that took part.
        points: ``(m, 3)`` their optimised world positions.
        point_err_px: ``(m,)`` each point's RMS reprojection error after optimisation (pixels).
        point_angle_deg: ``(m,)`` the largest angle between two of its viewing rays (parallax).
        iterations, initial_error, final_error (gtsam graph error, robust), n_obs.
        ms: compute time (without the pauses); latency_ms: wall time.
        tag: whatever the caller attached to the request (returned unchanged).
    """

    kf_ids: list
    poses: np.ndarray
    point_ids: np.ndarray
    points: np.ndarray
    point_err_px: np.ndarray
    point_angle_deg: np.ndarray
    iterations: int
    initial_error: float
    final_error: float
    ms: float
    n_obs: int
    tag: Any = None
    build_ms: float = 0.0
    latency_ms: float = 0.0  # wall time, with the pauses


def _project(K: np.ndarray, T_wc: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pixels ``(N, 2)`` and depths ``(N,)`` of world points ``X`` in the camera ``T_wc``."""
    Xc = (X - T_wc[:3, 3]) @ T_wc[:3, :3]
    z = Xc[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        uv = (Xc @ K.T)[:, :2] / z[:, None]
    return uv, z


def local_bundle_adjust(
    K: np.ndarray,
    poses: Sequence[np.ndarray],
    observations: Sequence[tuple[np.ndarray, np.ndarray]],
    point_ids: np.ndarray,
    points: np.ndarray,
    *,
    kf_ids: Optional[Sequence] = None,
    n_fixed: int = 2,
    sigma_px: float = 1.0,
    huber_k: float = 1.345,
    iterations: int = 10,
    max_init_px: float = 8.0,
    min_points: int = 12,
    min_kf_obs: int = 8,
    tag: Any = None,
    pause: Optional[Callable[[], Any]] = None,
) -> Optional[BAResult]:
    """Bundle-adjust a window of keyframes.

    Args:
        K: ``(3, 3)`` intrinsics (pixels of the observations).
        poses: the window's keyframe poses ``T_wc`` ``(4, 4)``, oldest first.
        observations: per keyframe, ``(ids (k,) int, pixels (k, 2))``: which points it sees where.
        point_ids: ``(m,)`` int ids of the points with initial positions ``points`` ``(m, 3)``
            (observations of ids not listed here are ignored; non-finite points are ignored).
        kf_ids: the caller's keyframe ids (default ``0..n-1``), returned in the result.
        n_fixed: the oldest keyframes held (2: gauge and scale; 1: gauge only).
        sigma_px, huber_k: pixel noise and the Huber threshold (in sigmas).
        iterations: the most Levenberg-Marquardt iterations.
        max_init_px: observations with a larger initial reprojection error are left out.
        min_points, min_kf_obs: fewer usable points / observations of a free keyframe: see above.
        pause: called before building the graph and before each iteration (a background thread
            waits there until the tracking thread is idle); its time is not counted in ``ms``.

    Returns:
        :class:`BAResult`, or ``None`` when the problem is degenerate or gtsam fails.
    """
    t0 = time.perf_counter()
    waited = [0.0]

    def _pause() -> None:
        if pause is not None:
            tp = time.perf_counter()
            pause()
            waited[0] += time.perf_counter() - tp

    try:
        import gtsam
    except ImportError:  # pragma: no cover - gtsam is a dependency of the backend
        return None
    n = len(poses)
    if n < 2 or len(observations) != n:
        return None
    kf_ids = list(range(n)) if kf_ids is None else list(kf_ids)
    n_fixed = max(1, min(n_fixed, n))
    point_ids = np.asarray(point_ids, np.int64).reshape(-1)
    points = np.asarray(points, np.float64).reshape(-1, 3)
    finite = np.isfinite(points).all(1)
    point_ids, points = point_ids[finite], points[finite]
    if len(point_ids) < min_points:
        return None
    order = np.argsort(point_ids)
    sid, spts = point_ids[order], points[order]

    # the usable observations: known point, in front, near its initial projection
    obs: list[tuple[int, np.ndarray, np.ndarray]] = []  # (keyframe slot, point slot, pixels)
    for k in range(n):
        ids, px = observations[k]
        ids = np.asarray(ids, np.int64).reshape(-1)
        px = np.asarray(px, np.float64).reshape(-1, 2)
        if len(ids) == 0 or len(sid) == 0:
            obs.append((k, np.zeros(0, np.int64), np.zeros((0, 2))))
            continue
        j = np.clip(np.searchsorted(sid, ids), 0, len(sid) - 1)
        ok = sid[j] == ids
        j, px = j[ok], px[ok]
        uv, z = _project(K, np.asarray(poses[k], np.float64), spts[j])
        ok = (z > 1e-6) & np.isfinite(uv).all(1) & np.isfinite(px).all(1)
        ok &= np.linalg.norm(uv - px, axis=1) < max_init_px
        obs.append((k, j[ok], px[ok]))

    # points seen by >= 2 keyframes; free keyframes with too few of them are left out (twice: one
    # removal can take other points below two views)
    use_kf = np.ones(n, bool)
    for _ in range(2):
        count = np.zeros(len(sid), int)
        for k, j, _px in obs:
            if use_kf[k]:
                np.add.at(count, j, 1)
        use_pt = count >= 2
        changed = False
        for k, j, _px in obs:
            if k >= n_fixed and use_kf[k] and use_pt[j].sum() < min_kf_obs:
                use_kf[k], changed = False, True
        if not changed:
            break
    count = np.zeros(len(sid), int)
    for k, j, _px in obs:
        if use_kf[k]:
            np.add.at(count, j, 1)
    use_pt = count >= 2
    if use_pt.sum() < min_points or not use_kf[n_fixed:].any():  # too few points, or no free keyframe
        return None

    _pause()
    try:
        cal = gtsam.Cal3_S2(float(K[0, 0]), float(K[1, 1]), float(K[0, 1]), float(K[0, 2]), float(K[1, 2]))
        pix = gtsam.noiseModel.Robust.Create(gtsam.noiseModel.mEstimator.Huber.Create(huber_k),
                                             gtsam.noiseModel.Isotropic.Sigma(2, sigma_px))
        fixed = gtsam.noiseModel.Isotropic.Sigma(6, 1e-6)
        X = gtsam.symbol_shorthand.X
        L = gtsam.symbol_shorthand.L
        graph = gtsam.NonlinearFactorGraph()
        values = gtsam.Values()
        for k in range(n):
            if not use_kf[k]:
                continue
            pose = gtsam.Pose3(np.asarray(poses[k], np.float64))
            values.insert(X(k), pose)
            if k < n_fixed:
                graph.add(gtsam.PriorFactorPose3(X(k), pose, fixed))
        n_obs = 0
        for k, j, px in obs:
            if not use_kf[k]:
                continue
            keep = use_pt[j]
            for jj, p in zip(j[keep].tolist(), px[keep]):
                graph.add(gtsam.GenericProjectionFactorCal3_S2(p, pix, X(k), L(jj), cal))
            n_obs += int(keep.sum())
        slots = np.flatnonzero(use_pt)
        for jj in slots.tolist():
            values.insert(L(jj), spts[jj])
        params = gtsam.LevenbergMarquardtParams()
        params.setMaxIterations(int(iterations))
        opt = gtsam.LevenbergMarquardtOptimizer(graph, values, params)
        e0 = prev = float(opt.error())
        t_build = time.perf_counter()
        # one iteration per call (gtsam holds the GIL while it computes; a whole optimize() would
        # hold it for all of them), with a pause before each
        for _ in range(int(iterations)):
            _pause()
            opt.iterate()
            cur = float(opt.error())
            if not np.isfinite(cur) or gtsam.checkConvergence(1e-5, 1e-6, 0.0, prev, cur) or cur >= prev:
                prev = cur
                break
            prev = cur
        out = opt.values()
        e1 = float(graph.error(out))
        iters = int(opt.iterations())
    except Exception:  # gtsam: IndeterminantLinearSystemException, CheiralityException, ...
        return None
    if not (np.isfinite(e1) and e1 <= e0 * (1 + 1e-9)):
        return None

    kept = np.flatnonzero(use_kf)
    new_poses = np.stack([out.atPose3(X(int(k))).matrix() for k in kept])
    new_pts = np.stack([out.atPoint3(L(jj)) for jj in slots.tolist()])
    # per point RMS reprojection error after optimisation
    sq = np.zeros(len(sid))
    cnt = np.zeros(len(sid))
    remap = np.full(len(sid), -1)
    remap[slots] = np.arange(len(slots))
    rays = np.full((len(kept), len(slots), 3), np.nan)  # unit viewing rays, per keyframe and point
    for i, k in enumerate(kept):
        _k, j, px = obs[k]
        keep = use_pt[j]
        j, px = j[keep], px[keep]
        uv, z = _project(K, new_poses[i], new_pts[remap[j]])
        e = np.sum((uv - px) ** 2, 1)
        e[~(z > 0) | ~np.isfinite(e)] = 1e6
        np.add.at(sq, j, e)
        np.add.at(cnt, j, 1)
        r = new_pts[remap[j]] - new_poses[i][:3, 3]
        rays[i, remap[j]] = r / (np.linalg.norm(r, axis=1, keepdims=True) + 1e-12)
    err = np.sqrt(sq[slots] / np.maximum(cnt[slots], 1))
    # parallax: the widest pair of viewing rays
    rays = np.nan_to_num(rays, nan=0.0)  # a missing ray: cos 0 with every other, masked below
    seen = np.abs(rays).sum(2) > 0
    cos = np.einsum("kmi,lmi->klm", rays, rays)
    cos = np.where(seen[:, None, :] & seen[None, :, :], cos, 1.0)
    angle = np.degrees(np.arccos(np.clip(cos.min(axis=(0, 1)), -1.0, 1.0)))
    t1 = time.perf_counter()
    ms = 1e3 * (t1 - t0 - waited[0])
    return BAResult(kf_ids=[kf_ids[int(k)] for k in kept], poses=new_poses, point_ids=sid[slots].copy(),
                    points=new_pts, point_err_px=err, point_angle_deg=angle, iterations=iters, initial_error=e0, final_error=e1,
                    ms=ms, n_obs=n_obs, tag=tag, build_ms=1e3 * (t_build - t0), latency_ms=1e3 * (t1 - t0))


# ---------------------------------------------------------------------------------------------- child process

def _send(f, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(struct.pack("<Q", len(data)))
    f.write(data)
    f.flush()


def _recv(f):
    head = f.read(8)
    if len(head) < 8:
        raise EOFError
    n = struct.unpack("<Q", head)[0]
    data = f.read(n)
    if len(data) < n:
        raise EOFError
    return pickle.loads(data)


def _serve(nice: int = 0) -> None:
    """The child's loop: requests ``(args, kwargs)`` on stdin, results (a dict or None) on stdout."""
    fin, fout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr  # nothing else may write to the result pipe
    if nice:
        try:
            os.nice(nice)
        except OSError:
            pass
    import gtsam  # noqa: F401  (once, before the first request)

    while True:
        try:
            args, kwargs = _recv(fin)
        except (EOFError, OSError):
            return
        try:
            res = local_bundle_adjust(*args, **kwargs)
        except Exception:
            res = None
        _send(fout, None if res is None else res.__dict__)


class ProcessBA:
    """:func:`local_bundle_adjust` in a child process (call it from one thread at a time)."""

    def __init__(self, nice: int = 0) -> None:
        self._proc: Optional[subprocess.Popen] = None
        self.starts = 0
        self.nice = int(nice)

    def _start(self) -> subprocess.Popen:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        self.starts += 1
        cmd = [sys.executable, "-u", os.path.abspath(__file__), "--serve", str(self.nice)]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env,
                                close_fds=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Optional[BAResult]:
        for attempt in range(2):  # a dead child is restarted once
            if self._proc is None or self._proc.poll() is not None:
                if attempt == 0 and self.starts >= 3 and self._proc is not None:
                    return None  # keeps dying: give up on this window
                try:
                    self._proc = self._start()
                except OSError:
                    return None
            try:
                _send(self._proc.stdin, (args, kwargs))
                d = _recv(self._proc.stdout)
            except (EOFError, OSError, pickle.PickleError):
                self.close()
                continue
            return None if d is None else BAResult(**d)
        return None

    def close(self) -> None:
        p, self._proc = self._proc, None
        if p is None:
            return
        try:
            p.stdin.close()
            p.wait(timeout=2.0)
        except Exception:
            p.kill()
            try:
                p.wait(timeout=2.0)
            except Exception:
                pass


@dataclass
class _Request:
    args: tuple
    kwargs: dict = field(default_factory=dict)


class BAWorker:
    """A daemon thread running :func:`local_bundle_adjust` on the newest request (a queue of one).

    :meth:`submit` never blocks (a pending request that has not started is replaced);
    :meth:`poll` returns the newest finished result once (or ``None``). Failed runs (``None``
    from the adjustment) are counted in ``failed``.
    """

    def __init__(self, fn: Optional[Callable[..., Optional[BAResult]]] = None, process: bool = False,
                 nice: int = 0, idle: Optional[threading.Event] = None, max_wait_s: float = 0.1) -> None:
        self._fn = fn if fn is not None else (ProcessBA(nice) if process else local_bundle_adjust)
        # in-thread: between iterations, wait (up to max_wait_s) until the caller says it is idle
        self._pause = None
        if idle is not None and self._fn is local_bundle_adjust:
            self._pause = lambda: idle.wait(max_wait_s)
        self._cv = threading.Condition()
        self._pending: Optional[_Request] = None
        self._result: Optional[BAResult] = None
        self._busy = False
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.submitted = self.replaced = self.done = self.failed = 0

    def submit(self, *args: Any, **kwargs: Any) -> None:
        with self._cv:
            if self._pending is not None:
                self.replaced += 1
            self._pending = _Request(args, kwargs)
            self.submitted += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="local-ba", daemon=True)
                self._thread.start()
            self._cv.notify()

    def poll(self) -> Optional[BAResult]:
        with self._cv:
            r, self._result = self._result, None
            return r

    def discard(self) -> None:
        """Forget the pending request and any unread result (a running one still finishes: tag it)."""
        with self._cv:
            self._pending = None
            self._result = None

    def wait(self, timeout: float = 10.0) -> bool:
        """Block until nothing is pending or running (tests); whether it got there in ``timeout``."""
        end = time.monotonic() + timeout
        with self._cv:
            while self._pending is not None or self._busy:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    def stop(self) -> None:
        """Ask the thread to end (it finishes the adjustment in progress); does not wait."""
        with self._cv:
            self._stop = True
            self._pending = None
            self._cv.notify_all()

    def close(self) -> None:
        """Stop the thread and wait for it (and end the child process, if any)."""
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if isinstance(self._fn, ProcessBA):
            self._fn.close()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._pending is None and not self._stop:
                    self._cv.wait()
                if self._stop:
                    break
                req, self._pending = self._pending, None
                self._busy = True
            try:
                kw = req.kwargs if self._pause is None else dict(req.kwargs, pause=self._pause)
                res = self._fn(*req.args, **kw)
            except Exception:  # never let the thread die
                res = None
            with self._cv:
                self._busy = False
                if self._stop:
                    self._cv.notify_all()
                    break
                if res is None:
                    self.failed += 1
                else:
                    self.done += 1
                    self._result = res
                self._cv.notify_all()
        if isinstance(self._fn, ProcessBA):
            self._fn.close()


if __name__ == "__main__" and sys.argv[1:2] == ["--serve"]:
    _serve(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
