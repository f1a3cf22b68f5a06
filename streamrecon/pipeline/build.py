"""Build a :class:`StreamPipeline` (engine, map, sinks) from a :class:`PipelineConfig`: the one place
where settings become objects, for ``run`` and for every stream of ``serve``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from ..engine import EngineConfig, StreamEngine, default_size
from ..mapping import GlobalMap, MapConfig
from ..settings import EngineSettings, MapSettings, PipelineConfig
from ..sinks.base import BackgroundSink, Sink
from ..sinks.files import FileSink
from .pipeline import PipelineOptions, StreamPipeline
from .resolve import LoadedModel, resolve_conf_thresh

if TYPE_CHECKING:
    from ..sinks.rerun_sink import RerunRecording

__all__ = ["engine_config", "map_config", "build_pipeline", "rerun_config"]


def engine_config(es: EngineSettings, model, ms: Optional[MapSettings] = None) -> EngineConfig:
    return EngineConfig(size=es.model_size() or default_size(model), policy=es.state_policy,
                        reset_every=es.reset_every, fast_preprocess=es.fast_preprocess, precision=es.precision,
                        token_attention=ms is not None and ms.dynamic_mask == "attention", heads=es.heads,
                        batch_buckets=es.buckets(), cuda_graphs=es.cuda_graphs, torch_compile=es.torch_compile)


def map_config(ms: MapSettings, loaded: Optional[LoadedModel]) -> MapConfig:
    return MapConfig(voxel_size=ms.voxel_size, max_points=ms.max_points, budget_policy=ms.budget_policy,
                     pixel_stride=ms.pixel_stride,
                     conf_thresh=resolve_conf_thresh(loaded.info if loaded else None, ms.conf_thresh))


def rerun_config(cfg: PipelineConfig, application_id: str = "streamrecon"):
    from ..sinks.rerun_sink import RerunConfig

    o = cfg.outputs
    return RerunConfig(viewer=o.viewer, save_path=o.save_rrd, consolidate_every=o.consolidate_every,
                       application_id=application_id)


def build_pipeline(cfg: PipelineConfig, loaded: LoadedModel, stream_id: str = "", output_dir: Optional[str | Path] = None,
                   extra_sinks: Sequence[Sink] = (), recording: Optional["RerunRecording"] = None, prefix: str = "",
                   describe: Optional[dict] = None, on_result: Optional[Callable] = None,
                   engine: Optional[StreamEngine] = None, files: bool = True,
                   snapshot_dir: Optional[str | Path] = None,
                   snapshot_context: Optional[Callable[[], dict]] = None,
                   snapshot_at_close: bool = True, root: Optional[str | Path] = None,
                   single_image: bool = False) -> StreamPipeline:
    """Engine + map + sinks for one stream.

    Args:
        output_dir: where this stream's files go (default ``cfg.outputs.output_dir``).
        extra_sinks: sinks that run on the caller's thread (``serve``: the result publisher).
        recording: a shared Rerun recording (``serve``); else one is made when a view is asked for.
        prefix: entity subtree of this stream in the recording.
        files: write the output files (``False``: no file sink, e.g. evaluation in memory).
        snapshot_dir: this stream's snapshot root (``--snapshot-every`` / at close); ``None``: no snapshots.
        snapshot_context: ``() -> dict`` added to each snapshot's manifest (``run``: the source position).
        snapshot_at_close: write a last snapshot when the stream closes.
        root: the directory no file of this stream may leave (``serve``: the node's output directory;
            default: the stream's own output directory).
        single_image: the source is one photo: its frame file (pointmap, depth, focal, confidence) is
            always written, and ``pointmap.ply`` with every pixel.
    """
    o = cfg.outputs
    engine = engine or StreamEngine(loaded.model, engine_config(cfg.engine, loaded.model, cfg.map))
    gmap = GlobalMap(map_config(cfg.map, loaded))
    sinks: list[Sink] = list(extra_sinks)
    if files:
        sink = FileSink(output_dir if output_dir is not None else o.output_dir, save_frames=o.save_frames or single_image,
                        flush_every=o.flush_every, root=root, dense_ply=single_image)
        sinks.append(BackgroundSink(sink, maxsize=o.sink_queue, drop=False))
        if "colmap" in o.export:
            from ..sinks.colmap_export import ColmapSink

            sinks.append(BackgroundSink(ColmapSink(output_dir if output_dir is not None else o.output_dir, root=root),
                                        maxsize=o.sink_queue, drop=False))
    if recording is not None or o.viewer != "none" or o.save_rrd:
        from ..sinks.rerun_sink import RerunSink

        sinks.append(BackgroundSink(RerunSink(rerun_config(cfg), recording=recording, prefix=prefix),
                                    maxsize=o.sink_queue, drop=True))
    options = PipelineOptions(stream_id=stream_id, map_points=cfg.map.map_points, consolidate_every=o.consolidate_every,
                              flush_every=o.flush_every, flush_every_s=o.flush_every_s, map_every_s=o.map_every_s,
                              describe=describe or {})
    stage = None
    if cfg.slam.resolved_backend() != "none" or cfg.slam.intrinsics or cfg.slam.calib:
        from ..slam import GeometryStage

        map_cfg = gmap.cfg
        slam = replace(cfg.slam, backend=cfg.slam.resolved_backend(),
                       ba_worker=cfg.slam.resolved_ba_worker(network_async=cfg.engine.network_schedule() != 1))
        stage = GeometryStage(slam,
                              map_factory=lambda: GlobalMap(map_cfg))
    masker = None
    if cfg.map.dynamic_mask != "off":
        from ..dynamic import DynamicMasker, DynamicOptions

        masker = DynamicMasker(DynamicOptions(cfg.map.dynamic_mask, cfg.map.dynamic_thresh))
    pipe = StreamPipeline(engine, gmap, sinks, options, on_result=on_result, stage=stage, masker=masker)
    every = cfg.engine.network_schedule()
    if every != 1:
        pipe.start_network(every, inline=cfg.slam.deterministic)
    if snapshot_dir is not None:
        from ..snapshot.state import prefetch_fingerprint
        from ..snapshot.writer import SnapshotPolicy, Snapshotter

        prefetch_fingerprint(loaded.model)
        pipe.snapshots = Snapshotter(replace(SnapshotPolicy.of(snapshot_dir, o.snapshot_every, o.snapshot_keep, boundary=root),
                                             at_close=snapshot_at_close), context=snapshot_context)
    return pipe
