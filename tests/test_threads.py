"""``--threads``: one setting for every command; safe defaults beside other processes; reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from streamrecon.threads import DEFAULT_THREADS, DEFAULT_WAIT_POLICY, resolve


def test_resolve_prefers_the_flag_then_the_environment_then_the_default():
    s = resolve(None, environ={}, cores=8)
    assert (s.intra_op, s.inter_op, s.wait_policy, s.chosen_by) == (DEFAULT_THREADS, 1, DEFAULT_WAIT_POLICY, "default")
    assert DEFAULT_WAIT_POLICY == "PASSIVE"  # idle threads never spin on cores other processes need
    env = {"OMP_NUM_THREADS": "3", "OMP_WAIT_POLICY": "active"}
    s = resolve(None, environ=env, cores=8)
    assert (s.intra_op, s.wait_policy, s.chosen_by) == (3, "ACTIVE", "environment")  # the user's choice is kept
    s = resolve(2, environ=env, cores=8)
    assert (s.intra_op, s.wait_policy, s.chosen_by) == (2, "ACTIVE", "--threads")
    assert resolve(0, environ={}, cores=8).intra_op == 8  # 0: one per core
    assert resolve(None, environ={}, cores=1).intra_op == 1


@pytest.mark.parametrize("requested,env,match", [(-1, {}, "--threads -1"),
                                                  (None, {"OMP_WAIT_POLICY": "sometimes"}, "PASSIVE or ACTIVE"),
                                                  (None, {"OMP_NUM_THREADS": "many"}, "not a thread count")])
def test_bad_thread_settings_are_named(requested, env, match):
    with pytest.raises(ValueError, match=match):
        resolve(requested, environ=env, cores=2)


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "OPENBLAS_"))}


def test_every_command_takes_threads_and_run_reports_them(tmp_path, shared):
    from streamrecon.cli import NODE_COMMANDS, build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in NODE_COMMANDS:
        assert "--threads" in sub.choices[name]._option_string_actions, name
    out = tmp_path / "o"
    r = subprocess.run([sys.executable, "-m", "streamrecon", "run", str(shared / "data" / "cut3r_examples" / "003"),
                        "--weights", str(shared / "golden" / "tiny_dpt" / "checkpoint.pth"), "--size", "64",
                        "--output-dir", str(out), "--no-progress", "--threads", "2"],
                       capture_output=True, text=True, timeout=300, env=_clean_env())
    assert r.returncode == 0, r.stderr
    t = json.loads((out / "summary.json").read_text())["threads"]
    assert (t["intra_op"], t["torch_intra_op"], t["torch_inter_op"], t["chosen_by"]) == (2, 2, 1, "--threads")
    assert t["omp_wait_policy"] == "PASSIVE" and "2 threads (--threads)" in r.stderr
    assert t["blas_threads"] == 2  # numpy's OpenBLAS too, though numpy was imported before the flag was read


def test_numpys_blas_loaded_before_configure_gets_the_thread_count(tmp_path):
    """The CLI imports numpy before it parses --threads: its OpenBLAS has one thread per core by then."""
    code = ("import numpy, threadpoolctl; from streamrecon.threads import configure; "
            "before = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']; "
            "configure(None, import_torch=False); "
            "after = [i['num_threads'] for i in threadpoolctl.threadpool_info() if i['user_api'] == 'blas']; "
            "print(before[0], max(after))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr
    before, after = (int(v) for v in r.stdout.split())
    assert after == DEFAULT_THREADS and (before > 1 or (os.cpu_count() or 1) == 1), (before, after)


def test_the_wait_policy_is_in_place_before_torch_starts(tmp_path):
    """libgomp reads OMP_WAIT_POLICY once, when torch is imported: the CLI sets it first."""
    code = ("import sys, streamrecon.cli as c; from streamrecon.threads import configure; "
            "assert 'torch' not in sys.modules; s = configure(None); import os, torch; "
            "print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads(), s.chosen_by)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=_clean_env())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["PASSIVE", str(DEFAULT_THREADS), "default"]


def test_a_bad_threads_flag_is_one_line_and_exit_2(capsys):
    from streamrecon.cli import main

    assert main(["bench", "--threads", "-2", "--frames", "1"]) == 2
    err = capsys.readouterr().err
    assert "--threads -2" in err and "Traceback" not in err


def test_configure_twice_starts_from_what_the_user_set(monkeypatch):
    """Our own writes to the environment are not read back as the user's choice."""
    import streamrecon.threads as threads

    monkeypatch.setattr(threads, "_user_env", None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert threads.configure(3).intra_op == 3 and os.environ["OMP_NUM_THREADS"] == "3"
    again = threads.configure(None)
    assert (again.intra_op, again.chosen_by) == (DEFAULT_THREADS, "default")


def test_a_training_config_sets_the_threads_like_the_flag(tmp_path, monkeypatch):
    import torch

    import streamrecon.threads as threads
    from streamrecon.cli import main

    monkeypatch.setattr(threads, "_user_env", {})
    seen = {}

    def fake_train(cfg, resume=True, bars=None):
        seen["threads"], seen["torch"] = threads.current(), torch.get_num_threads()
        return {}

    monkeypatch.setattr("streamrecon.train.trainer.train", fake_train)
    cfg = tmp_path / "t.yaml"
    cfg.write_text("threads: 2\nsteps: 1\n")
    assert main(["train", "--config", str(cfg), "--out-dir", str(tmp_path / "o")]) == 0
    assert (seen["threads"].intra_op, seen["threads"].chosen_by, seen["torch"]) == (2, "--threads", 2)
    assert main(["train", "--config", str(cfg), "--out-dir", str(tmp_path / "o"), "--threads", "1"]) == 0
    assert seen["torch"] == 1  # the flag wins over the config
