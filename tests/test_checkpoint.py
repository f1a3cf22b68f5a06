"""Checkpoint loading: no code runs from the file, omegaconf is not needed, strict key checks,
model-string parsing as data, safetensors conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import OrderedDict

import pytest
import torch

from streamrecon.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    alias_groups,
    convert_checkpoint,
    load_model,
    load_state_dict_strict,
    read_checkpoint,
)
from streamrecon.config import ConfigError, ModelConfig, config_from_model_kwargs, parse_model_string
from streamrecon.models import Cut3r
from streamrecon.types import FrameInput

from .conftest import tiny_config


class _RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("where", ["args", "model", "top"])
def test_pickle_that_runs_a_shell_command_is_refused(tmp_path, where):
    marker = tmp_path / "pwned"
    sd = OrderedDict(w=torch.zeros(2))
    payload = {"model": sd, "args": {"model": "x"}, "epoch": 0}
    if where == "args":
        payload["args"] = _RunsShell(marker)
    elif where == "model":
        sd["evil"] = _RunsShell(marker)
    else:
        payload["extra"] = _RunsShell(marker)
    path = tmp_path / "evil.pth"
    torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError, match="system"):
        read_checkpoint(path)
    assert not marker.exists(), "the command in the pickle ran"
    # ... and the same file does run the command under plain pickle (the test is real)
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_eval_in_pickle_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": _Evals()}, path)
    with pytest.raises(UnsafeCheckpointError, match="builtins.eval"):
        read_checkpoint(path)


def test_official_container_loads_without_omegaconf(shared, monkeypatch):
    monkeypatch.setitem(sys.modules, "omegaconf", None)  # any import of omegaconf would now fail
    ck = read_checkpoint(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    assert ck.config.dpt_feature_dim == 16 and ck.config.dpt_layer_dims == (8, 12, 16, 24)
    assert ck.config.state_dec_num_heads == 6 and ck.meta["epoch"] == 0
    assert "ManyAR_PatchEmbed" in ck.meta["model_string"]


def test_strict_load_names_missing_unexpected_and_mismatched():
    model = Cut3r(tiny_config())
    sd = dict(model.state_dict())
    sd.pop("pose_token")
    sd["decoder_embed.extra"] = torch.zeros(1)
    sd["enc_norm.weight"] = torch.zeros(5)
    with pytest.raises(CheckpointMismatchError) as e:
        load_state_dict_strict(model, sd)
    msg = str(e.value)
    assert "pose_token" in msg and "decoder_embed.extra" in msg and "enc_norm.weight (checkpoint (5,)" in msg
    assert e.value.missing == ["pose_token"] and e.value.unexpected == ["decoder_embed.extra"]


def test_module_prefix_is_stripped_and_aliases_accepted(tmp_path):
    model = Cut3r(tiny_config())
    sd = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    args = {"model": model.cfg.to_model_string(), "dpt_feature_dim": 8, "dpt_last_dim": 8, "dpt_layer_dims": [4, 8, 8, 16]}
    torch.save({"model": sd, "args": args, "epoch": 3}, tmp_path / "ddp.pth")
    loaded = load_model(tmp_path / "ddp.pth")
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert alias_groups(loaded), "DPT aliases should still share one parameter"


def test_bad_model_strings_are_rejected():
    with pytest.raises(ConfigError, match="non-literal"):
        parse_model_string("ARCroco3DStereo(ARCroco3DStereoConfig(state_size=__import__('os').system('x')))")
    with pytest.raises(ConfigError):
        parse_model_string("os.system('rm -rf /')")
    with pytest.raises(ConfigError, match="unsupported model config field"):
        config_from_model_kwargs({"output_mode": "pts3d+pose", "pose_head": True, "pos_embed": "RoPE100",
                                  "mystery": 1})
    with pytest.raises(ConfigError, match="pose_head"):
        config_from_model_kwargs({"output_mode": "pts3d+pose", "pos_embed": "RoPE100"})


def test_model_string_is_parsed_as_data_whatever_the_layout(shared):
    text = (shared / "golden" / "keys_cut3r_224_linear.txt").read_text().splitlines()[1].lstrip("# ")
    cfg = config_from_model_kwargs(parse_model_string(text))
    assert cfg.head_type == "linear" and cfg.enc_embed_dim == 1024 and cfg.state_size == 768
    assert cfg.depth_mode == ("exp", float("-inf"), float("inf")) and cfg.conf_mode[1] == 1
    relaid = text.replace(", ", ",\n    ").replace("freeze='encoder', ", "")
    assert config_from_model_kwargs(parse_model_string(relaid)) == cfg
    assert cfg == ModelConfig.from_dict(json.loads(cfg.to_json()))


def test_convert_to_safetensors_gives_identical_outputs(tmp_path, shared):
    src = shared / "golden" / "tiny_dpt" / "checkpoint.pth"
    dst = convert_checkpoint(src, tmp_path / "tiny.safetensors")
    side = json.loads(dst.with_suffix(".json").read_text())
    assert side["config"]["dpt_feature_dim"] == 16 and side["weights"] == "tiny.safetensors"
    a, b = load_model(src), load_model(dst)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        w = sb[k]
        assert torch.equal(w, v), k
        # same layout as the .pth path: the CPU kernels choose their blocking by stride and alignment
        assert w.stride() == v.stride() and w.dtype == v.dtype, k
        assert w.data_ptr() % 64 == 0, f"{k}: safetensors weight not 64-byte aligned"
    torch.manual_seed(0)
    frames = [torch.rand(1, 3, 48, 64) * 2 - 1 for _ in range(2)]  # the second step reads the carried state
    with torch.no_grad():
        state_a, state_b = a.init_state(), b.init_state()
        for img in frames:
            oa, state_a = a.step(FrameInput(img=img), state_a)
            ob, state_b = b.step(FrameInput(img=img), state_b)
            for name in ("points_cam", "conf_cam", "points_world", "conf_world", "pose", "rgb"):
                ta, tb = getattr(oa, name), getattr(ob, name)
                if ta is None:
                    assert tb is None, name
                    continue
                diff = (ta - tb).abs().max().item()
                assert torch.equal(ta, tb), f"{name}: max abs diff {diff:.3g} (must be bit-identical)"
            assert torch.equal(state_a.tokens, state_b.tokens) and torch.equal(state_a.mem, state_b.mem)


def test_sidecar_that_disagrees_is_an_error(tmp_path, shared):
    dst = convert_checkpoint(shared / "golden" / "tiny_linear" / "checkpoint.pth", tmp_path / "t.safetensors")
    side = json.loads(dst.with_suffix(".json").read_text())
    side["config"]["state_size"] = 99
    dst.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(CheckpointError, match="disagree"):
        read_checkpoint(dst)


def test_convert_cli(tmp_path, shared):
    out = tmp_path / "m.safetensors"
    r = subprocess.run([sys.executable, "-m", "streamrecon", "convert",
                        str(shared / "golden" / "tiny_linear" / "checkpoint.pth"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists() and out.with_suffix(".json").exists()
    r = subprocess.run([sys.executable, "-m", "streamrecon", "convert", str(tmp_path / "none.pth"), str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "checkpoint not found" in r.stderr and "Traceback" not in r.stderr
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    r = subprocess.run([sys.executable, "-m", "streamrecon", "convert", str(bad), str(out)], capture_output=True, text=True)
    assert r.returncode == 2 and "not a readable torch checkpoint" in r.stderr
