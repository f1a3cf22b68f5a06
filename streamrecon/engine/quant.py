"""``--precision int8``: dynamic int8 quantisation of the trunk's Linear layers (CPU).

PyTorch's own dynamic quantisation (``torch.ao.quantization.quantize_dynamic``, the fbgemm kernels on
x86, qnnpack on ARM): weights are stored as int8 with one scale per tensor (one per output channel
was measured too: 1.72x instead of 1.96x on ``cut3r_224_linear``, depth drift 0.93 % instead of 0.96 %
on the bundled model -- not worth it), activations are quantised per
call from their observed range, and the products accumulate in int32. Quantised: every ``nn.Linear``
of the image encoder, the raymap encoder, the two decoders and their input projections, and the
LocalMemory (pose retriever). The heads, the patch embeddings (convolutions), the norms and the
state tokens stay fp32. Not checkpoint-exact: the drift against fp32 is measured in
docs/PERFORMANCE.md. CPU only (the quantised kernels have no CUDA implementation).

One quantised copy is made per model and shared by every stream that asks for it (the original
fp32 model is not changed); :func:`quantize_int8_` converts a model in place (a node that loads
weights only for int8 keeps one copy in memory).
"""

from __future__ import annotations

import copy
import logging
import platform
import threading
import warnings
import weakref

import torch
from torch import nn

__all__ = ["INT8_MODULES", "int8_model", "quantize_int8_", "is_int8"]

_logger = logging.getLogger(__name__)

#: the model's attributes whose Linear layers are quantised (everything but the heads)
INT8_MODULES = ("enc_blocks", "enc_blocks_ray_map", "decoder_embed", "dec_blocks", "decoder_embed_state",
                "dec_blocks_state", "pose_retriever")

_copies: "weakref.WeakKeyDictionary[nn.Module, nn.Module]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def is_int8(model: nn.Module) -> bool:
    return bool(getattr(model, "int8", False))


def _engine() -> str:
    engines = torch.backends.quantized.supported_engines
    want = "qnnpack" if platform.machine().lower() in ("arm64", "aarch64") else "fbgemm"
    if want not in engines:
        want = "x86" if "x86" in engines else next((e for e in engines if e != "none"), "none")
    if want == "none":
        raise ValueError("--precision int8: this PyTorch build has no quantised CPU kernels")
    return want


def quantize_int8_(model: nn.Module) -> nn.Module:
    """Quantise ``model``'s trunk in place (see the module docstring) and return it."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:  # a PyTorch without eager-mode quantisation
        raise ValueError("--precision int8 needs torch.ao.quantization, which this PyTorch no longer has") from None

    if is_int8(model):
        return model
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        raise ValueError("--precision int8 runs on the CPU only (use bf16 or fp16 on a GPU)")
    torch.backends.quantized.engine = _engine()
    with warnings.catch_warnings():  # torch.ao.quantization announces its move to torchao; it still works here
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
        for name in INT8_MODULES:
            sub = getattr(model, name, None)
            if sub is None:
                continue
            if isinstance(sub, nn.Linear):  # quantize_dynamic converts children: wrap a bare Linear
                holder = nn.Sequential(sub)
                quantize_dynamic(holder, {nn.Linear}, dtype=torch.qint8, inplace=True)
                setattr(model, name, holder[0])
            else:
                quantize_dynamic(sub, {nn.Linear}, dtype=torch.qint8, inplace=True)
    model.int8 = True
    n = sum(1 for m in model.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic"))
    _logger.info("int8: %d Linear layers of the trunk quantised (%s); heads stay fp32", n,
                 torch.backends.quantized.engine)
    return model


def int8_model(model: nn.Module) -> nn.Module:
    """The int8 version of ``model``: itself when already quantised, else one shared quantised copy."""
    if is_int8(model):
        return model
    with _lock:
        q = _copies.get(model)
        if q is None:
            q = quantize_int8_(copy.deepcopy(model).eval())
            _copies[model] = q
    return q
