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
import reprlib
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import ConfigError, ModelConfig, config_from_checkpoint_args
from ..fileio import atomic_write_bytes
from .errors import CheckpointError
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
#: largest ``<name>.json`` sidecar read next to a ``.safetensors`` file (a config is a few kB)
MAX_SIDECAR_BYTES = 1 * 2**20


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
                              f"got {type(obj).__name__} with keys {reprlib.repr(list(obj)) if isinstance(obj, dict) else '-'}")
    sd = obj["model"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in sd.items()):
        raise CheckpointError(f"{path}: 'model' is not a state dict of named tensors")
    _check_tensor_sizes(path, sd)
    try:
        args = to_plain(obj.get("args"))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: 'args': {e}") from None
    if not isinstance(args, dict):
        raise CheckpointError(f"{path}: 'args' holds no readable config (got {type(args).__name__})")
    try:
        config = config_from_checkpoint_args(args)
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from e
    epoch = obj.get("epoch")
    meta = {"format": "pth", "path": str(path), "epoch": epoch if type(epoch) is int else None,
            "model_string": args.get("model")}
    return Checkpoint(_strip_prefix(sd), config, meta)


def _check_tensor_sizes(path: Path, sd: Mapping[str, Tensor]) -> None:
    """Refuse tensors that would materialise more bytes than the file holds.

    A view whose storage is smaller than its extent (``torch.zeros(1).expand(10**9)``: stride 0)
    costs a few bytes in the file and its full size when made contiguous (conversion) or used.
    Every tensor must fit in its storage, and the distinct views together in the file.

    Raises:
        CheckpointError: naming the tensor.
    """
    seen: set[tuple] = set()
    total = 0
    for k, v in sd.items():
        if v.layout != torch.strided:
            raise CheckpointError(f"{path}: tensor {reprlib.repr(k)} has layout {v.layout}; only dense tensors are supported")
        nbytes = v.numel() * v.element_size()
        storage = v.untyped_storage().nbytes()
        if nbytes > storage:
            raise CheckpointError(f"{path}: tensor {reprlib.repr(k)} of shape {tuple(v.shape)} "
                                  f"(stride {tuple(v.stride())}) needs {nbytes} bytes but its storage holds {storage}: "
                                  "an expanded or overlapping view, refused rather than materialised")
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if ident not in seen:
            seen.add(ident)
            total += nbytes
    size = path.stat().st_size
    if total > size:
        raise CheckpointError(f"{path}: its tensors would take {total} bytes, more than the {size}-byte file holds "
                              "(views overlapping one storage)")


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
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, Tensor] = {}
    try:  # the library checks the header (size, JSON, dtypes, offsets) against the file
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            for k in f.keys():
                tensors[k] = _owned_copy(f.get_tensor(k))  # copied one at a time
    except (SafetensorError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file: {e}") from e
    embedded = metadata.get(_META_KEY)
    sidecar = path.with_suffix(".json")
    side = _read_sidecar(sidecar)
    if embedded is None and side is None:
        raise CheckpointError(f"{path}: no model config (neither '{_META_KEY}' metadata nor {sidecar.name})")
    cfg_embedded = _parse_config(embedded, f"{path} ('{_META_KEY}' metadata)") if embedded is not None else None
    cfg_side = None
    if side is not None:
        data = _parse_json(side, str(sidecar))
        if not isinstance(data, dict) or "config" not in data:
            raise CheckpointError(f"{sidecar}: expected a JSON object with a 'config' mapping")
        cfg_side = _config_from_mapping(data["config"], str(sidecar))
    if cfg_embedded is not None and cfg_side is not None and cfg_embedded != cfg_side:
        raise CheckpointError(f"{path}: the config in the file and {sidecar.name} disagree; fix or delete the sidecar")
    meta = {"format": "safetensors", "path": str(path), **{k: v for k, v in metadata.items() if k != _META_KEY}}
    return Checkpoint(_strip_prefix(tensors), cfg_side or cfg_embedded, meta)


def _read_sidecar(sidecar: Path) -> Optional[str]:
    """The sidecar's text, ``None`` when there is none; bounded by :data:`MAX_SIDECAR_BYTES`."""
    if not sidecar.exists():
        return None
    if not sidecar.is_file():
        raise CheckpointError(f"{sidecar} is not a regular file")
    with open(sidecar, "rb") as f:
        data = f.read(MAX_SIDECAR_BYTES + 1)
    if len(data) > MAX_SIDECAR_BYTES:
        raise CheckpointError(f"{sidecar}: larger than {MAX_SIDECAR_BYTES} bytes; a model config is a few kB")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{sidecar}: not UTF-8 text ({e})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{where}: unreadable JSON ({type(e).__name__}: {str(e)[:200]})") from None


def _config_from_mapping(data: Any, where: str) -> ModelConfig:
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: the model config must be a JSON object of fields, got {type(data).__name__}")
    try:
        return ModelConfig.from_dict(data)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: unreadable model config: {e}") from e


def _parse_config(text: str, where: str) -> ModelConfig:
    return _config_from_mapping(_parse_json(text, where), where)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read an official ``.pth`` or our ``.safetensors`` (chosen by extension).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a regular file, unreadable, hostile or inconsistent (one-line message).
        UnsafeCheckpointError: a ``.pth`` pickle that references code.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if not path.is_file():  # a FIFO or device would block the reader
        raise CheckpointError(f"{path} is not a regular file")
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
    """Official ``.pth`` -> ``.safetensors`` + JSON.

    The pair is written under temporary names in ``dst``'s folder; with ``verify`` it is read back,
    loaded strictly into a model built from its config (on the meta device) and compared with the
    source tensors; only then are both files renamed into place. A failed conversion leaves any
    existing ``dst`` pair untouched and no temporary files behind.
    """
    dst = Path(dst)
    if dst.suffix != ".safetensors":
        raise ValueError(f"output must end in .safetensors, got {dst}")
    ck = read_checkpoint(src)
    extra = {"source": Path(src).name}
    if ck.meta.get("model_string"):
        extra["model_string"] = str(ck.meta["model_string"])
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.stem}.", suffix=".convert"))
    try:
        tmp = write_safetensors(ck.state_dict, ck.config, staging / dst.name, extra_meta=extra, dtype=dtype)
        if verify:
            _verify_written(tmp, ck.state_dict, dtype, name=dst)
        # weights first: until the sidecar follows, readers see the new weights with the old sidecar
        # (a config mismatch they report) rather than a sidecar naming weights not yet there
        os.replace(tmp, dst)
        os.replace(tmp.with_suffix(".json"), dst.with_suffix(".json"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dst


def _verify_written(path: Path, source: Mapping[str, Tensor], dtype: Optional[torch.dtype], name: Path) -> None:
    """Read ``path`` back, load it strictly and compare every tensor with ``source`` (``name``: the
    final output, for messages).

    Raises:
        CheckpointError: a tensor differs (or a mismatch error from the strict load).
    """
    from ..models import Cut3r

    back = read_checkpoint(path)
    load_state_dict_strict(Cut3r(back.config, device="meta"), back.state_dict, assign=True)
    for k, v in _strip_prefix(source).items():
        if k not in back.state_dict:
            continue  # an alias written once (the strict load restored it)
        expected = v.to(dtype) if dtype is not None and v.is_floating_point() else v
        if not _same_bits(back.state_dict[k], expected):
            raise CheckpointError(f"{name}: tensor {reprlib.repr(k)} reads back different from the source; "
                                  "nothing was written")


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Equal shape, dtype and bytes (NaNs compare equal to themselves, unlike ``torch.equal``)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    flat = lambda t: t.detach().contiguous().reshape(-1).view(torch.uint8)  # noqa: E731
    return a.numel() == 0 or torch.equal(flat(a), flat(b))
