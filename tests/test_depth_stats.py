"""``tools/depth_diagnosis.py depthstats``: the per-frame spread of ground-truth depth, on a known answer."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from streamrecon.eval.datasets import EvalSequence


def _tool():
    path = Path(__file__).parents[1] / "tools" / "depth_diagnosis.py"
    spec = importlib.util.spec_from_file_location("depth_diagnosis", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_depth_stats_of_frames_with_known_depth(monkeypatch):
    """Rows of 0.5 m (15 %), 2 m (70 %) and 5 m (15 %), and an invalid row that must be ignored."""
    h, w, n = 21, 8, 3
    depth = np.full((n, h, w), 2.0, np.float32)
    depth[:, :3], depth[:, 3:6] = 0.5, 5.0
    depth = np.concatenate([depth, np.zeros((n, 1, w), np.float32)], 1)  # no depth there
    seq = EvalSequence.from_arrays("known", np.zeros((n, h + 1, w, 3), np.uint8), depth,
                                   np.tile(np.eye(4), (n, 1, 1)), np.array([[8.0, 0, 4], [0, 8, 10], [0, 0, 1]]))
    mod = _tool()
    monkeypatch.setattr(mod, "_sets", lambda args: [("known", [seq])])
    rep = mod.depth_stats(argparse.Namespace(stride=1))["known"]
    assert rep["frames"] == n
    assert rep["median_m"]["median"] == pytest.approx(2.0)
    assert rep["p90_over_p10"]["median"] == pytest.approx(10.0)
    assert rep["near_share"]["median"] == pytest.approx(3 / 21)
    assert rep["far_share"]["median"] == pytest.approx(3 / 21)
