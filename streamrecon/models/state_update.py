"""How a view's candidate state replaces the carried one (the state update rule).

The model computes, for every view, a candidate state (the ``dec_norm_state`` output) and a
candidate memory (after the LocalMemory write). An :class:`UpdateRule` decides how much of the
candidate each state token takes and what a reset means; :func:`advance_state` applies it:

1. ``u = has_image AND update`` per stream;
2. tokens: ``alpha = u * w`` per token (``w = 1`` for the CUT3R rule), ``new = alpha * cand +
   (1 - alpha) * old``; memory: ``u ? cand_mem : old_mem``;
3. reset (after the view's outputs): tokens and memory go back to their initial values; the stream
   becomes *fresh* again only if the rule restarts sequences on reset.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from ..types import StreamState

__all__ = ["UpdateRule", "CUT3R_RULE", "advance_state"]


@dataclass(frozen=True)
class UpdateRule:
    """The reference CUT3R rule; subclass to weight tokens (e.g. TTT3R).

    Attributes:
        name: short identifier.
        wants_state_attention: the model must compute :attr:`StepOutput.state_attention`.
        restart_on_reset: after a reset the next view uses the learned pose token and a full
            update, like a new sequence (TTT3R's path); CUT3R's ``forward_recurrent`` instead reads
            the re-initialised memory.
    """

    name: str = "cut3r"
    wants_state_attention: bool = False
    restart_on_reset: bool = False

    def token_weights(self, state_attention: Optional[Tensor], fresh: Tensor) -> Optional[Tensor]:
        """``(B, S)`` blend weights in ``[0, 1]`` for the candidate tokens, or ``None`` for 1."""
        return None


CUT3R_RULE = UpdateRule()


def advance_state(
    state: StreamState,
    cand_tokens: Tensor,
    cand_mem: Optional[Tensor],
    write: Tensor,
    reset: Optional[Tensor],
    weights: Optional[Tensor],
    restart_on_reset: bool,
) -> StreamState:
    """Apply one view's update to ``state`` (see module docstring).

    Args:
        state: state before the view.
        cand_tokens: ``(B, S, dd)`` candidate tokens.
        cand_mem: ``(B, M, 2dd)`` candidate memory, or ``None`` when no stream writes.
        write: ``(B,)`` bool, streams allowed to write (image present and update set).
        reset: ``(B,)`` bool or ``None``.
        weights: ``(B, S)`` per-token weights or ``None`` (full update).
        restart_on_reset: whether a reset makes the stream fresh again.
    """
    w = write.view(-1, 1, 1)
    if weights is None:
        tokens = torch.where(w, cand_tokens, state.tokens)
    else:
        alpha = w.to(cand_tokens.dtype) * weights.unsqueeze(-1).to(cand_tokens.dtype)
        tokens = cand_tokens * alpha + state.tokens * (1 - alpha)
    mem = state.mem if cand_mem is None else torch.where(w, cand_mem, state.mem)
    fresh = torch.zeros_like(state.fresh)
    if reset is not None:
        r = reset.view(-1, 1, 1)
        tokens = torch.where(r, state.init_tokens.to(tokens.dtype), tokens)
        mem = torch.where(r, state.init_mem.to(mem.dtype), mem)
        if restart_on_reset:
            fresh = reset.clone()
    return replace(state, tokens=tokens, mem=mem, fresh=fresh)
