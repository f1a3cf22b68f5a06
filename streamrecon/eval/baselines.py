"""Trajectory baselines for ``streamrecon eval``: what a pose estimate has to beat.

* :func:`identity_trajectory`: the camera never moves. Under Sim(3) alignment its ATE is the spread
  of the ground truth around its centroid, the worst any Sim(3)-aligned estimate can do.
* :func:`random_walk_like`: a walk with exactly the step lengths and step rotation angles of a given
  trajectory but uniformly random directions and axes. It has the estimate's "amount of motion" and
  none of its direction information: an estimate that does not beat it (on average over
  :data:`RANDOM_WALK_SEEDS` seeds) has learnt nothing about where the camera went.

``T`` arrays are ``(N, 4, 4)`` camera-to-world.
"""

from __future__ import annotations

import numpy as np

from .metrics import rotation_angle_deg

__all__ = ["identity_trajectory", "random_walk_like", "step_lengths", "step_angles_deg", "RANDOM_WALK_SEEDS"]

#: baseline figures of the random walk are the mean over this many seeds (0 .. 9)
RANDOM_WALK_SEEDS = 10


def identity_trajectory(n: int) -> np.ndarray:
    """``(n, 4, 4)`` identity poses."""
    return np.tile(np.eye(4), (int(n), 1, 1))


def step_lengths(T_wc: np.ndarray) -> np.ndarray:
    """``(N-1,)`` distances between consecutive camera centres."""
    return np.linalg.norm(np.diff(np.asarray(T_wc)[:, :3, 3], axis=0), axis=1)


def step_angles_deg(T_wc: np.ndarray) -> np.ndarray:
    """``(N-1,)`` rotation angles (degrees) of consecutive relative rotations ``R_i^T R_{i+1}``."""
    R = np.asarray(T_wc)[:, :3, :3]
    return rotation_angle_deg(np.swapaxes(R[:-1], -1, -2) @ R[1:])


def _unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """``(n, 3)`` directions uniform on the sphere."""
    v = rng.normal(size=(n, 3))
    norm = np.linalg.norm(v, axis=1, keepdims=True)
    while (norm < 1e-12).any():  # practically never
        bad = norm[:, 0] < 1e-12
        v[bad] = rng.normal(size=(int(bad.sum()), 3))
        norm = np.linalg.norm(v, axis=1, keepdims=True)
    return v / norm


def _axis_angle(axis: np.ndarray, angle: np.ndarray) -> np.ndarray:
    """Rodrigues: ``(n, 3)`` unit axes and ``(n,)`` radians -> ``(n, 3, 3)``."""
    x, y, z = axis.T
    Kx = np.zeros((len(axis), 3, 3))
    Kx[:, 0, 1], Kx[:, 0, 2], Kx[:, 1, 2] = -z, y, -x
    Kx[:, 1, 0], Kx[:, 2, 0], Kx[:, 2, 1] = z, -y, x
    s, c = np.sin(angle)[:, None, None], np.cos(angle)[:, None, None]
    return np.eye(3) + s * Kx + (1 - c) * (Kx @ Kx)


def random_walk_like(T_wc: np.ndarray, seed: int = 0) -> np.ndarray:
    """A random walk with the same per-step translation length and rotation angle as ``T_wc``.

    Step ``i`` moves the camera centre by ``|c_{i+1} - c_i|`` of ``T_wc`` in a direction uniform on the
    sphere, and rotates it by the angle of ``R_i^T R_{i+1}`` of ``T_wc`` about an axis uniform on the
    sphere (seeded). Starts at the identity.

    Returns:
        ``(N, 4, 4)`` camera-to-world.
    """
    T_wc = np.asarray(T_wc, dtype=np.float64)
    if T_wc.ndim != 3 or T_wc.shape[1:] != (4, 4):
        raise ValueError(f"T_wc must be (N, 4, 4), got {T_wc.shape}")
    n = len(T_wc)
    out = identity_trajectory(n)
    if n < 2:
        return out
    rng = np.random.default_rng(seed)
    lengths, angles = step_lengths(T_wc), np.radians(step_angles_deg(T_wc))
    dirs, axes = _unit_vectors(rng, n - 1), _unit_vectors(rng, n - 1)
    out[1:, :3, 3] = np.cumsum(lengths[:, None] * dirs, axis=0)
    steps = _axis_angle(axes, angles)
    R = np.eye(3)
    for i in range(n - 1):
        R = R @ steps[i]
        out[i + 1, :3, :3] = R
    return out
