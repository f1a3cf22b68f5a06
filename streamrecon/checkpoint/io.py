"""Checkpoint reading, strict loading and conversion.

Two formats:

* official ``.pth`` (``{'model': state_dict, 'args': omegaconf config, 'epoch': int}``), read with
  the allow-list unpickler of :mod:`.safe_pickle`; the architecture comes from ``args.model``
  (parsed as data) plus the optional ``args.dpt_*`` width overrides;
* ``.safetensors`` (the fast path): weights plus our JSON config, both in the file's metadata and
  in a sidecar ``<name>.json`` written by :func:`write_safetensors` / ``streamrecon convert``.

Loading is strict: any missing key, unexpected key or shape mismatch raises
:class:`CheckpointMismatchError` naming them. The only adaptation is the DDP ``module.`` prefix.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, config_from_checkpoint_args
from ..fileio import atomic_write_bytes
from .info import CheckpointInfo
from .safe_pickle import load_pth, to_plain

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointMismatchError",
    "read_checkpoint",
    "load_state_dict_strict",
    "load_model",
    "load_model_info",
    "write_safetensors",
    "convert_checkpoint",
    "alias_groups",
]

_logger = logging.getLogger(__name__)
_META_KEY = "streamrecon_config"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (unreadable, no config, wrong format)."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes differ from the model's."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[tuple[str, tuple, tuple]]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {_preview(unexpected)}")
        if mismatched:
            shown = [f"{k} (checkpoint {tuple(a)} vs model {tuple(b)})" for k, a, b in mismatched]
            parts.append(f"{len(mismatched)} shape mismatches: {_preview(shown)}")
        super().__init__("checkpoint does not match the model: " + "; ".join(parts))


def _preview(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


@dataclass
class Checkpoint:
    """A checkpoint read into memory.

    Attributes:
        state_dict: parameter name -> tensor (reference names, no ``module.`` prefix).
        config: the architecture.
        meta: other plain fields (``epoch``, ``format``, ``path``, the training ``args``...).
    """

    state_dict: dict[str, Tensor]
    config: ModelConfig
    meta: dict[str, Any] = field(default_factory=dict)


def _strip_prefix(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _read_pth(path: Path) -> Checkpoint:
    obj = load_pth(path)
    if not isinstance(obj, dict) or "model" not in obj:
        raise CheckpointError(f"{path}: expected a dict with 'model' and 'args' (the official container), "
                              f"got {type(obj).__name__} with keys {list(obj)[:8] if isinstance(obj, dict) else '-'}")
    sd = obj["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of tensors")
    args = to_plain(obj.get("args"))
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: 'args' holds no readable config (got {type(args).__name__})")
    try:
        config = config_from_checkpoint_args(args)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    meta = {"format": "pth", "path": str(path), "epoch": obj.get("epoch"), "model_string": args.get("model")}
    return Checkpoint(_strip_prefix(sd), config, meta)


def _owned_copy(t: Tensor) -> Tensor:
    """``t`` copied into its own freshly allocated, contiguous CPU storage.

    ``safe_open(...).get_tensor`` returns tensors over the file's buffer at the offsets the format
    dictates, which are generally not 64-byte aligned. Vectorised CPU kernels can take a different
    path (so a different rounding) for unaligned operands: a model loaded that way gave outputs
    that differed from the ``.pth`` path by ~1e-5 with identical strides. ``torch.load`` gives
    every tensor its own allocation from the CPU allocator (64-byte aligned, contiguous); this
    reproduces that layout, and both formats then give bit-identical outputs.
    """
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", memory_format=torch.contiguous_format)
    return out.copy_(t)


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import safe_open

    tensors: dict[str, Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        metadata = f.metadata() or {}
        for k in f.keys():
            tensors[k] = _owned_copy(f.get_tensor(k))  # copied one at a time
    embedded = metadata.get(_META_KEY)
    sidecar = path.with_suffix(".json")
    side = sidecar.read_text() if sidecar.exists() else None
    if embedded is None and side is None:
        raise CheckpointError(f"{path}: no model config (neither '{_META_KEY}' metadata nor {sidecar.name})")
    try:
        cfg_embedded = ModelConfig.from_dict(json.loads(embedded)) if embedded is not None else None
        cfg_side = ModelConfig.from_dict(json.loads(side)["config"]) if side is not None else None
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable model config: {e}") from e
    if cfg_embedded is not None and cfg_side is not None and cfg_embedded != cfg_side:
        raise CheckpointError(f"{path}: the config in the file and {sidecar.name} disagree; fix or delete the sidecar")
    meta = {"format": "safetensors", "path": str(path), **{k: v for k, v in metadata.items() if k != _META_KEY}}
    return Checkpoint(_strip_prefix(tensors), cfg_side or cfg_embedded, meta)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an official ``.pth`` or our ``.safetensors`` (chosen by extension)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    return _read_pth(path)


def alias_groups(model: nn.Module) -> list[list[str]]:
    """State-dict names that refer to one parameter (e.g. DPT ``layer1_rn`` / ``layer_rn.0``)."""
    groups: dict[int, list[str]] = defaultdict(list)
    for name, p in model.named_parameters(remove_duplicate=False):
        groups[id(p)].append(name)
    return [names for names in groups.values() if len(names) > 1]


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, Tensor], assign: bool = False) -> None:
    """Load with exact key and shape checks; aliased names may be given once or every time.

    Raises:
        CheckpointMismatchError: naming every missing key, unexpected key and shape mismatch.
    """
    sd = dict(state_dict)
    for group in alias_groups(model):  # fill an alias from whichever name is present
        present = [n for n in group if n in sd]
        for n in group:
            if n not in sd and present:
                sd[n] = sd[present[0]]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = [(k, tuple(sd[k].shape), expected[k]) for k in expected if k in sd and tuple(sd[k].shape) != expected[k]]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    model.load_state_dict(sd, strict=True, assign=assign)


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               eval_mode: bool = True) -> "nn.Module":
    """Build a :class:`~streamrecon.models.Cut3r` from a checkpoint file and load it strictly.

    The model is built on the ``meta`` device and the checkpoint tensors are assigned directly
    (no second copy of the weights), then moved to ``device`` / ``dtype``.
    """

    return load_model_info(path, device=device, dtype=dtype, eval_mode=eval_mode)[0]


def load_model_info(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    eval_mode: bool = True, bundled: bool = False) -> "tuple[nn.Module, CheckpointInfo]":
    """:func:`load_model` plus the checkpoint's :class:`CheckpointInfo` (metadata such as the
    recommended map threshold travel in it, never as attributes of the model)."""
    from ..models import Cut3r

    ck = read_checkpoint(path)
    model = Cut3r(ck.config, device="meta")
    load_state_dict_strict(model, ck.state_dict, assign=True)
    model = model.to(device=device, dtype=dtype).optimize_memory_format()
    _logger.info("loaded %s (%s, %d tensors)", path, ck.meta.get("format"), len(ck.state_dict))
    info = CheckpointInfo(path=str(path), format=str(ck.meta.get("format", "")), bundled=bundled,
                          meta={k: v for k, v in ck.meta.items() if k not in ("path", "format")})
    return (model.eval() if eval_mode else model), info


def write_safetensors(state_dict: Mapping[str, Tensor], config: ModelConfig, path: str | os.PathLike,
                      extra_meta: Optional[Mapping[str, str]] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write weights as ``.safetensors`` plus a sidecar ``<name>.json`` holding the config.

    Tensors that share storage (the DPT aliases) are written once under their first name; the
    loader restores the other names. Both files are written atomically.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {path}")
    tensors: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}
    for k, v in state_dict.items():
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if ident in seen and v.numel() > 0:
            continue
        seen[ident] = k
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        tensors[k] = t.contiguous()
    meta = {_META_KEY: json.dumps(config.to_dict(), sort_keys=True), **(extra_meta or {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata=meta))
    sidecar = {"config": config.to_dict(), "weights": path.name, **(extra_meta or {})}
    atomic_write_bytes(path.with_suffix(".json"), (json.dumps(sidecar, indent=1, sort_keys=True) + "\n").encode())
    return path


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                       verify: bool = True) -> Path:
    """Official ``.pth`` -> ``.safetensors`` + JSON. With ``verify``, the result is loaded strictly
    into a model built from its config (on the meta device) before returning."""
    ck = read_checkpoint(src)
    extra = {"source": Path(src).name}
    if ck.meta.get("model_string"):
        extra["model_string"] = str(ck.meta["model_string"])
    out = write_safetensors(ck.state_dict, ck.config, dst, extra_meta=extra, dtype=dtype)
    if verify:
        from ..models import Cut3r

        back = read_checkpoint(out)
        load_state_dict_strict(Cut3r(back.config, device="meta"), back.state_dict, assign=True)
    return out
