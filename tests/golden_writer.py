"""Write a golden set in the reference format from *our* model (tests of the parity harness only).

The checkpoint goes into the official container (``{'model', 'args', 'epoch'}``, args holding the
model string and the ``dpt_*`` widths); ``vectors.npz`` follows the reference naming. Used to show
the harness reads everything from the files (sizes, schedules, queries) and that it fails loudly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from streamrecon.config import ModelConfig
from streamrecon.geometry import pose_encoding_to_matrix, pseudo_intrinsics, raymap
from streamrecon.models import Cut3r
from streamrecon.parity import post_process
from streamrecon.types import FrameInput


def write_golden_set(out: Path, cfg: ModelConfig, schedule: list[dict], hw: tuple[int, int], seed: int = 0) -> Path:
    """``schedule``: one dict per view with keys ``img``, ``ray``, ``update``, ``reset`` (bools)."""
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = Cut3r(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # keep activations tame for random weights
            p.mul_(0.5)
    args = {"model": cfg.to_model_string(), "dpt_feature_dim": cfg.dpt_feature_dim, "dpt_last_dim": cfg.dpt_last_dim,
            "dpt_layer_dims": list(cfg.dpt_layer_dims)}
    torch.save({"model": model.state_dict(), "args": args, "epoch": 0}, out / "checkpoint.pth")

    h, w = hw
    rng = np.random.default_rng(seed)
    arrays: dict[str, np.ndarray] = {}
    state = model.init_state(1)
    arrays["stream.state_init"] = state.init_tokens.detach().numpy()
    arrays["stream.mem_init"] = state.init_mem.detach().numpy()
    states, q = [], 0
    with torch.no_grad():
        for i, v in enumerate(schedule):
            states.append(state)
            arrays[f"stream.state.{i}"] = state.tokens.numpy()
            arrays[f"stream.mem.{i}"] = state.mem.numpy()
            img = torch.from_numpy(rng.uniform(-1, 1, (1, 3, h, w)).astype(np.float32))
            T = pose_encoding_to_matrix(torch.tensor([[0.1 * i, 0.0, 0.05, 1.0, 0.02 * i, 0.0, 0.0]], dtype=torch.float64))
            ray = raymap(T, pseudo_intrinsics(h, w, torch.float64)[None], h, w).float()
            arrays[f"in.img.{i}"] = img.numpy() if v["img"] else np.full((1, 3, h, w), np.nan, np.float32)
            arrays[f"in.ray_map.{i}"] = ray.numpy() if v["ray"] else np.full((1, h, w, 6), np.nan, np.float32)
            for flag in ("img", "ray"):
                arrays[f"in.{flag}_mask.{i}"] = np.array([int(v[flag])], np.int32)
            arrays[f"in.update.{i}"] = np.array([int(v.get("update", True))], np.int32)
            arrays[f"in.reset.{i}"] = np.array([int(v.get("reset", False))], np.int32)
            inp = FrameInput(img=img if v["img"] else None, ray_map=ray if v["ray"] else None,
                             update=torch.tensor([bool(v.get("update", True))]),
                             reset=torch.tensor([bool(v.get("reset", False))]))
            o, state = model.step(inp, state, intermediates=True)
            for k, t in o.reference_dict().items():
                arrays[f"stream.{k}.{i}"] = t.numpy()
            for k in ("enc_feat", "global_feat", "pose_in", "new_mem"):
                arrays[f"stream.{k}.{i}"] = o.intermediates[k].numpy()
            for level, t in enumerate(o.intermediates["dec_state"]):
                arrays[f"stream.dec_state.{i}.{level}"] = t.numpy()
            if v["img"]:
                for k, t in post_process(o.points_cam, o.pose).items():
                    arrays[f"post.{k}.{i}"] = t.numpy()
        arrays[f"stream.state.{len(schedule)}"] = state.tokens.numpy()
        for i, v in enumerate(schedule):
            if v["ray"] and not v["img"]:
                o = model.query_raymap(torch.from_numpy(arrays[f"in.ray_map.{i}"]), states[i])
                arrays[f"query.view_index.{q}"] = np.array([i], np.int32)
                for k, t in o.reference_dict().items():
                    arrays[f"query.{k}.{q}"] = t.numpy()
                q += 1
    np.savez(out / "vectors.npz", **arrays)
    (out / "manifest.json").write_text(json.dumps({"info": {"name": out.name}, "arrays": {
        k: [list(a.shape), str(a.dtype)] for k, a in arrays.items()}}))
    return out
