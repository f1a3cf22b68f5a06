"""The pipeline between the engine and the outside world (one per stream), its settings resolver,
trajectory store and summary."""

from .build import build_pipeline, engine_config, map_config
from .pipeline import PipelineOptions, StreamPipeline
from .resolve import DEFAULT_CONF_THRESH, LoadedModel, load_resolved, resolve_conf_thresh, resolve_device, resolve_weights
from .summary import RunSummary, SourceCounts, format_summary
from .trajectory import Trajectory

__all__ = ["StreamPipeline", "PipelineOptions", "build_pipeline", "engine_config", "map_config", "LoadedModel",
           "load_resolved", "resolve_conf_thresh", "resolve_device", "resolve_weights", "DEFAULT_CONF_THRESH",
           "RunSummary", "SourceCounts", "format_summary", "Trajectory"]
