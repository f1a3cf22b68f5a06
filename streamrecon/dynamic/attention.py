"""Moving pixels from the network's own attention, without training (``--dynamic-mask attention``).

After Easi3R (DUSt3R; its dynamic map is ``(1 - mean) * std`` of the pre-softmax cross-attention
each token *receives*, over layers, heads and image pairs) and MUT3R (CUT3R: dynamic regions get
dispersed, low attention in the decoder): a token on a moving object disagrees with what the
recurrent state holds, so when the state branch reads the image it scores that token low, and the
heads disagree about it. Per frame, from :attr:`StepOutput.token_attention`
(``Cut3r.step(token_attention=True)``):

1. ``a`` = the mean pre-softmax score the state tokens give each image token (over state tokens and
   heads), averaged over the decoder levels; ``sd`` = its spread over the heads, averaged the same way;
2. both are standardised across the frame's tokens (z-scores), and the token score is the z-score of
   ``z(sd) - z(a)`` (low received attention, high spread: dynamic);
3. ``score = sigmoid(2 (z - 2))`` (0.5 at two standard deviations out: a frame always has outliers,
   only strong ones count), upsampled bilinearly from the token grid to the pixels.

What differs from Easi3R: one frame against the state instead of statistics over many image pairs
(the spread is over heads, not over pairs: a stream cannot wait for later frames), z-scores instead of
min-max normalisation, no k-means refinement on encoder features and a fixed threshold instead of
multi-Otsu over the sequence. The first frame of a stream (the state holds nothing yet) gets no
score. With the bundled model (trained on static synthetic scenes, 10x7 tokens) this cue is at chance
level; see docs/ACCURACY.md for the measured figures beside the flow and residual cues and a
position-prior baseline.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["attention_score", "Z_AT_HALF"]

Z_AT_HALF = 2.0  # token z-score where the score is 0.5 (a frame always has outliers: only strong ones)
_SLOPE = 2.0


def _z(v: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / (v.std() + 1e-9)


def attention_score(token_attention: Optional[dict], grid: tuple[int, int], hw: tuple[int, int]) -> Optional[np.ndarray]:
    """``(H, W)`` float32 score in ``[0, 1]`` from one stream's ``token_attention`` (``name -> (D, N)``
    arrays, one row of :attr:`StepOutput.token_attention`); ``grid`` = the ``(h, w)`` token grid,
    ``hw`` = the model input size. ``None`` without attention statistics."""
    import cv2

    if not token_attention or "state_logit" not in token_attention:
        return None
    a = np.asarray(token_attention["state_logit"], np.float64).mean(0)
    sd = np.asarray(token_attention.get("state_logit_std", np.zeros_like(a)), np.float64)
    sd = sd.mean(0) if sd.ndim == 2 else sd
    z = -_z(a) if not sd.any() else _z(_z(sd) - _z(a))  # standardised again: a z-score of the combination
    tok = (1.0 / (1.0 + np.exp(-_SLOPE * (z - Z_AT_HALF)))).reshape(grid).astype(np.float32)
    return cv2.resize(tok, (hw[1], hw[0]), interpolation=cv2.INTER_LINEAR)
