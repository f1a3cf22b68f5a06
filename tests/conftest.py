"""Shared fixtures: the shared folder (golden sets, real data) and small random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from streamrecon.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("STREAMRECON_SHARED", REPO.parent / "shared")).resolve()

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.fixture(autouse=True)
def _restore_thread_settings():
    """A test that calls the CLI in-process applies ``--threads`` to this process (torch, the
    environment that later subprocesses inherit): put everything back after it."""
    import cv2

    import streamrecon.threads as threads

    n, env, applied, user_env = (torch.get_num_threads(), {k: os.environ.get(k) for k in _THREAD_VARS},
                                 threads._current, threads._user_env)
    n_cv = cv2.getNumThreads()
    yield
    torch.set_num_threads(n)
    cv2.setNumThreads(n_cv)
    threads._user_env = user_env
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    threads._current = applied


def pytest_configure(config: pytest.Config) -> None:
    # also registered in pyproject.toml; registering twice is harmless
    config.addinivalue_line("markers", "slow: takes over ~20 s on a 2-core CPU machine (deselect with -m 'not slow')")


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "golden").is_dir():
        pytest.fail(f"the shared folder is missing: expected {SHARED} (set STREAMRECON_SHARED)")
    return SHARED


def tiny_config(head_type: str = "dpt", **kw) -> ModelConfig:
    """A few-hundred-kB model of the real architecture (random weights)."""
    base = dict(enc_embed_dim=64, enc_depth=2, enc_num_heads=4, dec_embed_dim=32, dec_depth=4, dec_num_heads=2,
                state_dec_num_heads=4, state_size=12, local_mem_size=8, head_type=head_type, dpt_feature_dim=8,
                dpt_last_dim=8, dpt_layer_dims=(4, 8, 8, 16), img_size=(64, 64))
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture
def tiny_model():
    from streamrecon.models import Cut3r

    torch.manual_seed(0)
    return Cut3r(tiny_config()).eval()
