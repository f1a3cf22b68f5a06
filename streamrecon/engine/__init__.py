"""The streaming engine: per-stream state, update policies, frame results."""

from ..frames import Frame, FrameResult, ProbeResult
from .engine import EngineConfig, StreamEngine, default_size, process_batch
from .policies import POLICIES, TTT3R_RULE, TTT3RRule, get_policy

__all__ = ["EngineConfig", "StreamEngine", "default_size", "process_batch", "Frame", "FrameResult", "ProbeResult", "POLICIES",
           "TTT3R_RULE", "TTT3RRule", "get_policy"]
