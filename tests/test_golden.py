"""Parity with the reference: every golden set under ../shared/golden (with a manifest.json) and
every directory in $STREAMRECON_GOLDEN_EXTRA is replayed and compared array by array."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from streamrecon.parity import discover_sets, run_model_set, run_set

from .conftest import SHARED, tiny_config
from .golden_writer import write_golden_set

SETS = discover_sets(SHARED / "golden")


def test_golden_sets_are_present():
    names = {p.name for p in SETS}
    assert {"tiny_dpt", "tiny_linear", "preprocess"} <= names, f"golden sets found: {sorted(names)} under {SHARED}"


@pytest.mark.parametrize("set_dir", SETS, ids=[p.name for p in SETS])
def test_golden_set(set_dir):
    report = run_set(set_dir)
    print(report.summary())
    assert report.errors, f"{set_dir}: nothing was compared"
    assert not report.failures, f"{set_dir.name}:\n" + "\n".join(report.failures)


def test_golden_harness_checks_every_output_kind(shared):
    report = run_model_set(shared / "golden" / "tiny_linear")
    kinds = {k.rsplit(".", 1)[0] for k in report.errors}
    for expected in ("stream.pts3d_in_self_view", "stream.conf_self", "stream.rgb", "stream.camera_pose",
                     "stream.pts3d_in_other_view", "stream.conf", "stream.state", "stream.mem", "stream.new_mem",
                     "stream.enc_feat", "query.pts3d_in_self_view", "query.rgb", "post.c2w", "post.focal"):
        assert expected in kinds, expected


def test_harness_reads_schedule_from_files(tmp_path):
    """Another size, more views, resets at other places, two queries: read from the files alone."""
    schedule = [dict(img=True, ray=False), dict(img=True, ray=False, reset=True), dict(img=False, ray=True),
                dict(img=True, ray=True, update=False), dict(img=True, ray=False), dict(img=False, ray=True),
                dict(img=True, ray=False, reset=True), dict(img=True, ray=False)]
    set_dir = write_golden_set(tmp_path / "own_linear", tiny_config("linear", dec_depth=3), schedule, hw=(32, 48))
    report = run_model_set(set_dir)
    assert not report.failures, report.failures
    assert "query.pts3d_in_self_view.1" in report.errors and "stream.state.8" in report.errors
    assert max(report.errors.values()) < 1e-6  # same implementation: identical up to rounding


def test_harness_names_the_tensor_that_drifts(tmp_path, shared):
    dst = tmp_path / "tiny_dpt_corrupt"
    shutil.copytree(shared / "golden" / "tiny_dpt", dst)
    arrays = dict(np.load(dst / "vectors.npz"))
    arrays["stream.conf.2"] = arrays["stream.conf.2"] * (1 + 3e-4)
    arrays.pop("stream.rgb.4")
    arrays["stream.fancy_new_output.0"] = np.zeros(3, np.float32)
    np.savez(dst / "vectors.npz", **arrays)
    report = run_model_set(dst)
    text = "\n".join(report.failures)
    assert "stream.conf.2: normalised error" in text
    assert "stream.fancy_new_output.0: not produced" in text
    assert "stream.rgb.4" not in report.errors
    assert len(report.failures) == 2


def test_extra_sets_come_from_the_environment(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.setenv("STREAMRECON_GOLDEN_EXTRA", f"{a}{__import__('os').pathsep}{b}")
    found = discover_sets(SHARED / "golden")
    assert found[-2:] == [a, b]
