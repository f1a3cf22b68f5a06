"""State policies for long runs: which update rule the model uses.

* ``cut3r`` -- the reference rule: an image view replaces the whole state with its candidate.
* ``ttt3r`` -- TTT3R's training-free rule (Chen et al., 2025): for every view after the first of a
  sequence, state token ``s`` takes the candidate with weight ``w_s = sigmoid(m_s)``, where ``m_s`` is
  the mean pre-softmax scaled cross-attention logit from ``s`` (as query) to all image-branch tokens
  (pose token included), averaged over all state-decoder layers and heads:
  ``new = w * candidate + (1 - w) * old`` (times the update mask). LocalMemory keeps the plain masked
  update. The first view of a sequence, and the view after a reset, update fully and use the learned
  pose token (a reset restarts the sequence).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..models.state_update import CUT3R_RULE, UpdateRule

__all__ = ["TTT3RRule", "TTT3R_RULE", "POLICIES", "get_policy"]


@dataclass(frozen=True)
class TTT3RRule(UpdateRule):
    name: str = "ttt3r"
    wants_state_attention: bool = True
    restart_on_reset: bool = True

    def token_weights(self, state_attention: Optional[Tensor], fresh: Tensor) -> Optional[Tensor]:
        if state_attention is None:
            raise ValueError("the TTT3R rule needs the state cross-attention logits")
        w = torch.sigmoid(state_attention)
        return torch.where(fresh.view(-1, 1), torch.ones_like(w), w)


TTT3R_RULE = TTT3RRule()
POLICIES: dict[str, UpdateRule] = {"cut3r": CUT3R_RULE, "ttt3r": TTT3R_RULE}


def get_policy(name: str) -> UpdateRule:
    """The update rule named ``cut3r`` or ``ttt3r``."""
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown state policy {name!r}; choose from {sorted(POLICIES)}") from None
