"""``tools/average_weights.py``: the element-wise mean of checkpoints of one architecture, refused
across architectures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from streamrecon.checkpoint import load_model
from streamrecon.checkpoint.io import write_safetensors
from streamrecon.models import Cut3r

from .conftest import tiny_config


def _tool():
    spec = importlib.util.spec_from_file_location("average_weights", Path(__file__).parents[1] / "tools" / "average_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(tmp_path, name, seed, **kw):
    torch.manual_seed(seed)
    m = Cut3r(tiny_config("linear", **kw))
    return m, write_safetensors(m.state_dict(), m.cfg, tmp_path / f"{name}.safetensors")


def test_mean_of_two_checkpoints(tmp_path):
    a, pa = _write(tmp_path, "a", 0)
    b, pb = _write(tmp_path, "b", 1)
    mean, cfg = _tool().average([str(pa), str(pb)])
    sa, sb = a.state_dict(), b.state_dict()
    key = next(k for k, v in sa.items() if v.is_floating_point() and not torch.equal(v, sb[k]))  # a learnt weight
    assert torch.allclose(mean[key], (sa[key] + sb[key]) / 2, atol=1e-6)
    out = write_safetensors(mean, cfg, tmp_path / "mean.safetensors")
    assert torch.allclose(load_model(out).state_dict()[key], mean[key])


def test_different_architectures_are_refused(tmp_path):
    _, pa = _write(tmp_path, "a", 0)
    _, pb = _write(tmp_path, "b", 0, state_size=16)
    with pytest.raises(ValueError, match="a different model config"):
        _tool().average([str(pa), str(pb)])
