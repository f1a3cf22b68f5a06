"""Keeping the confidence heads alive during training from scratch.

CUT3R's confidence is ``c = 1 + exp(x)`` and ConfLoss pushes ``x`` down wherever the normalised point
error exceeds ``alpha / c`` (about 0.2). Early in training from scratch every pixel is that bad, so
``x`` runs to very negative values; there ``d c / d x = exp(x)`` vanishes and the head never recovers
(confidence 1.000 everywhere, so every confidence filter empties the map). The reference never meets
this because it starts from pretrained DUSt3R/MASt3R heads.

Two remedies, both training-only (the model and its checkpoints are unchanged):

* :class:`ConfidenceTaps` reads the raw logits through forward hooks on the heads and
  :func:`floor_penalty` adds ``mean(relu(floor - x))``, a hinge that keeps ``x`` above ``floor``
  where ConfLoss's own gradient would have died;
* :func:`reinit_confidence` resets the confidence output channel of both heads (bias 0, small
  weights: ``c`` about 2 everywhere) to revive a model whose heads have already collapsed.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["ConfidenceTaps", "floor_penalty", "reinit_confidence", "confidence_layers", "output_layer"]


def confidence_layers(model: nn.Module) -> list[tuple[nn.Module, slice, int]]:
    """``(module whose output holds the raw maps, confidence slice of its last dim, channel dim)``.

    Linear head: the ``proj`` / ``cross_proj`` MLPs output ``(B, N, 4 p^2)`` with the confidence in the
    last ``p^2`` channels. DPT head: ``dpt_self`` / ``dpt_cross`` output ``(B, H, W, 4)``, channel 3.
    """
    head = model.downstream_head
    if hasattr(head, "cross_proj"):
        p2 = model.cfg.patch_size**2
        return [(head.proj, slice(3 * p2, 4 * p2), p2), (head.cross_proj, slice(3 * p2, 4 * p2), p2)]
    return [(head.dpt_self, slice(3, 4), 1), (head.dpt_cross, slice(3, 4), 1)]


class ConfidenceTaps:
    """Collects the raw confidence logits of every forward pass with autograd on, until :meth:`pop`."""

    def __init__(self, model: nn.Module) -> None:
        self._logits: list[Tensor] = []
        self._handles = []
        for module, sl, _ in confidence_layers(model):
            self._handles.append(module.register_forward_hook(self._hook(sl)))

    def _hook(self, sl: slice):
        def fn(_module, _inputs, output: Tensor) -> None:
            if torch.is_grad_enabled():  # training passes only (validation runs under inference mode)
                self._logits.append(output[..., sl].float())
        return fn

    def pop(self) -> list[Tensor]:
        """The logits captured since the last call (and forget them)."""
        out, self._logits = self._logits, []
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def floor_penalty(logits: list[Tensor], floor: float) -> Tensor:
    """Mean over all captured logits of ``relu(floor - x)`` (0 when none were captured)."""
    if not logits:
        return torch.zeros(())
    total = sum(torch.relu(floor - x).sum() for x in logits)
    return total / sum(x.numel() for x in logits)


def output_layer(module: nn.Module) -> nn.Module:
    """The layer that writes the raw maps of a head branch (``fc2`` of an MLP, the last conv of a DPT)."""
    return module.fc2 if hasattr(module, "fc2") else module.head[-1]


@torch.no_grad()
def reinit_confidence(model: nn.Module, std: float = 1e-3, generator: Optional[torch.Generator] = None) -> None:
    """Reset the confidence output channel of both heads: bias 0, weights ~ N(0, std)."""
    for module, sl, _ in confidence_layers(model):
        last = output_layer(module)
        rows = range(last.weight.shape[0])[sl]
        noise = torch.randn(last.weight[rows.start:rows.stop].shape, generator=generator) * std
        last.weight[rows.start:rows.stop] = noise.to(last.weight)
        if last.bias is not None:
            last.bias[rows.start:rows.stop] = 0.0
