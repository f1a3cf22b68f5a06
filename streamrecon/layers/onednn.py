"""``nn.Linear`` layers evaluated through oneDNN on x86 CPUs for inference, with the bias (and GELU) fused.

PyTorch evaluates a CPU ``nn.Linear`` as ``addmm``: the bias is first broadcast-copied into the output,
then MKL's GEMM accumulates onto it; the GELU after ``fc1`` is one more pass over the hidden tensor.
oneDNN's inner product applies bias and GELU in its epilogue, while the block is still in cache. On
the 224-linear model this cut the whole step by x1.10, 512-DPT by x1.21 (docs/PERFORMANCE.md,
``tools/profile_step.py``), with outputs equal to ~3e-6 (the GEMM blocking differs; the golden parity sets pass unchanged).

:func:`linear` takes that path only where it is the same function: inference (no autograd: oneDNN's
kernel has no backward), float32 CPU tensors, no autocast region (bf16 keeps autocast's casts), a
plain ``nn.Linear`` (int8 modules and subclasses go through their own forward), an x86 machine with
oneDNN, a layer of at least :data:`MIN_MACS` multiply-adds. Everything else calls the module. The
switch is global (:func:`set_onednn_linear`, or ``STREAMRECON_ONEDNN_LINEAR=0`` in the environment);
module hooks on the ``Linear`` itself do not run on the fast path (none are registered by streamrecon;
hooks on the enclosing modules do).
"""

from __future__ import annotations

import os
import platform

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MIN_MACS", "linear", "onednn_linear_available", "use_onednn_linear", "set_onednn_linear"]


def onednn_linear_available() -> bool:
    """Whether this build and machine have oneDNN's fused inner product (x86-64 with MKL-DNN)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_AVAILABLE = onednn_linear_available()
_ENABLED = _AVAILABLE and os.environ.get("STREAMRECON_ONEDNN_LINEAR", "1") not in ("0", "false", "False")


def use_onednn_linear() -> bool:
    """Whether :func:`linear` currently takes the oneDNN path when it applies."""
    return _ENABLED


def set_onednn_linear(enable: bool) -> bool:
    """Switch the oneDNN path on or off; returns the previous setting. Ignored where it is unavailable."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = bool(enable) and _AVAILABLE
    return previous


def _autocast_check():
    try:
        torch.is_autocast_enabled("cpu")
        return lambda: torch.is_autocast_enabled("cpu")
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled


_autocast_on = _autocast_check()  # resolved once: it runs for every large layer


#: multiply-adds below which MKL's addmm stays: oneDNN's per-call cost loses on small layers (the bundled
#: model's largest, 70x192x768 = 10 M, ran 0.86x with it; 224-linear's smallest, 197x768x768 = 116 M, gains)
MIN_MACS = 1 << 25


def _fast(layer: nn.Module, x: Tensor) -> bool:
    # cheapest tests first: small layers (the bundled model's) leave after two
    return (_ENABLED and type(layer) is nn.Linear and x.numel() * layer.out_features >= MIN_MACS
            and x.dtype == torch.float32 and x.device.type == "cpu" and layer.weight.dtype == torch.float32
            and not torch.is_grad_enabled() and not _autocast_on())


def linear(layer: nn.Module, x: Tensor, gelu: bool = False) -> Tensor:
    """``layer(x)`` (then exact GELU when ``gelu``) for ``x`` ``(..., in_features)``.

    Args:
        layer: an ``nn.Linear`` (or any module mapping ``(..., in) -> (..., out)``, such as an int8 one).
        x: input; its last dim is ``in_features``.
        gelu: apply the exact (erf) GELU to the output, fused into the GEMM on the oneDNN path.

    Returns:
        ``(..., out_features)``, in the dtype the module gives.
    """
    if _fast(layer, x):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "gelu" if gelu else "none", [],
                                                  "none" if gelu else "")
    y = layer(x)
    return F.gelu(y) if gelu else y
