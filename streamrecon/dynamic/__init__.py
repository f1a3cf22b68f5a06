"""Dynamic-object masks (``--dynamic-mask``): moving pixels found without training and kept out of
the map (and of tracking), still returned with every frame.

Cues: :mod:`.attention` (the network's own attention), :mod:`.flow` (dense flow the camera's motion
cannot explain), :mod:`.residual` (depth in front of what the map holds). :mod:`.masker` applies them
per stream; :mod:`.masks` turns scores into masks and scores masks against the ground truth.
"""

from .masker import METHODS, DynamicMasker, DynamicOptions
from .masks import mask_metrics, ratios, score_to_mask

__all__ = ["METHODS", "DynamicMasker", "DynamicOptions", "mask_metrics", "ratios", "score_to_mask"]
