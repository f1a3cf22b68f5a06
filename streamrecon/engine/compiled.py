"""``--torch-compile``: the image encoder's blocks through ``torch.compile`` (the heaviest part whose
shapes stay fixed for a stream; the first frames of each new shape are slow while it compiles)."""

from __future__ import annotations

import logging

__all__ = ["compile_encoder"]

_logger = logging.getLogger(__name__)


def compile_encoder(model, backend: str = "inductor") -> int:
    """Compile ``model.enc_blocks`` in place (``Module.compile``; ``backend``: ``torch.compile``'s), once
    per model -- every stream of the model then runs the compiled encoder; returns how many blocks it
    compiled (0: done before)."""
    if getattr(model, "_encoder_compiled", False):
        return 0
    for blk in model.enc_blocks:  # in place: the parameters keep their names (checkpoints, snapshot fingerprints)
        blk.compile(dynamic=False, backend=backend)
    object.__setattr__(model, "_encoder_compiled", True)
    _logger.info("torch.compile: %d encoder blocks (compiled on first use of each shape)", len(model.enc_blocks))
    return len(model.enc_blocks)
