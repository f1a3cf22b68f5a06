"""One settings model for every command: ``PipelineConfig(engine, map, outputs, slam)``.

Each setting is declared once, as a dataclass field with its help text in ``metadata``; the CLI flags
(:mod:`streamrecon.cli.flags`), the YAML sections (``engine:`` / ``map:`` / ``outputs:`` / ``slam:``) and the
validation all come from these declarations. ``RunConfig`` and ``ServeConfig`` add the settings that
belong to one command only (the source, the sockets) and share the same ``PipelineConfig``.

One name per concept across commands: ``--output-dir``, ``--precision``, ``--state-policy``,
``--size`` (``N`` = long side, ``HxW`` = read as its long side, ``224``/``224x224`` = the square crop).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

__all__ = ["SettingsError", "setting", "parse_size", "EngineSettings", "MapSettings", "OutputSettings", "SlamSettings",
           "PipelineConfig", "section_fields", "from_flat", "to_flat", "load_yaml", "DEPRECATED_NAMES"]

_logger = logging.getLogger(__name__)


class SettingsError(ValueError):
    """A setting that cannot work; the message names the setting as its flag."""


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Optional[tuple] = None,
            factory: Any = None, repeat: bool = False, cli: bool = True, short: Optional[str] = None) -> Any:
    """A dataclass field that is also a flag: ``help`` (its documentation), ``choices``, ``repeat``
    (a list flag given several times), ``cli=False`` (YAML and Python only)."""
    meta = {"help": help, "choices": choices, "repeat": repeat, "cli": cli, "short": short}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def parse_size(value: Any) -> Optional[int]:
    """``None``/``""`` -> ``None`` (the model's own); ``512``/``"512"`` -> 512; ``"384x512"`` -> 512
    (the long side: the reference crops keep the image's aspect); ``"224x224"`` -> 224 (square crop)."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise SettingsError(f"--size must be N or HxW, got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        text = str(value).strip().lower()
        try:
            parts = [int(p) for p in text.split("x")] if "x" in text else [int(text)]
        except ValueError:
            raise SettingsError(f"--size must be N or HxW (e.g. 512 or 384x512), got {value!r}") from None
        if len(parts) not in (1, 2):
            raise SettingsError(f"--size must be N or HxW, got {value!r}")
        n = max(parts)
    if n < 16 or n > 4096:
        raise SettingsError(f"--size must be between 16 and 4096 pixels, got {value!r}")
    return n


@dataclass(frozen=True)
class EngineSettings:
    """How frames become results: which model, where it runs, and how the state is updated."""

    weights: Optional[str] = setting(None, help="checkpoint (.pth official container or .safetensors); "
                                               "omitted: the bundled model")
    device: str = setting("auto", help="auto, cpu, cuda or cuda:N")
    size: Optional[str] = setting(None, help="model input: N = long side (512 for DPT models), 224 = the square "
                                             "crop (linear models), HxW = read as its long side")
    state_policy: str = setting("cut3r", choices=("cut3r", "ttt3r"), help="state update rule")
    reset_every: int = setting(0, help="reset the state every N frames, chaining the poses (0 = never)")
    precision: str = setting("fp32", choices=("fp32", "bf16", "fp16", "int8"),
                             help="fp32 (checkpoint-exact), bf16/fp16 autocast of the trunk, or int8 (CPU: the "
                                  "trunk's Linear layers quantised); the heads stay fp32")
    fast_preprocess: bool = setting(False, help="resize on the model's device with torch (faster on a GPU; "
                                                "not bit-exact with the reference loader)")
    network_every: str = setting("1", help="1 = the network sees every frame, in the frame loop; N or auto = the "
                                         "network runs on a worker thread on every N-th frame (auto: keyframes, and "
                                         "at least every 10th) while tracking gives every frame its pose (needs "
                                         "--backend track or slam; a live source never waits for the network)")
    heads: str = setting("full", choices=("full", "minimal"),
                         help="minimal: frames skip the world-frame and colour heads (the map uses T_wc x the "
                              "camera pointmap; probes still run every head); what is computed is identical")
    batch_buckets: str = setting("", help="pad batched steps to the next of these batch sizes, e.g. 1,2,4,8 (few "
                                          "shapes: one CUDA graph each); empty: no padding, or 1,2,4,8 with "
                                          "--cuda-graphs")
    cuda_graphs: bool = setting(False, help="replay each step shape from a captured CUDA graph (CUDA only; "
                                            "elsewhere the step runs as usual)")
    torch_compile: bool = setting(False, help="torch.compile the image encoder (the first frames of each shape "
                                              "are slow while it compiles)")

    def model_size(self) -> Optional[int]:
        return parse_size(self.size)

    def buckets(self) -> tuple[int, ...]:
        """``--batch-buckets`` as sorted whole numbers (``()``: none given)."""
        text = str(self.batch_buckets or "").replace(" ", "")
        if not text:
            return ()
        try:
            values = sorted({int(v) for v in text.split(",")})
        except ValueError:
            values = [0]
        if not values or values[0] < 1:
            raise SettingsError(f"--batch-buckets must be whole numbers >= 1 separated by commas, got "
                                f"{self.batch_buckets!r}")
        return tuple(values)

    def network_schedule(self) -> "int | str":
        """``--network-every`` as ``1`` (every frame, in the loop), ``N`` or ``"auto"``."""
        v = str(self.network_every).strip().lower()
        if v == "auto":
            return "auto"
        try:
            n = int(v)
        except ValueError:
            n = 0
        if n < 1:
            raise SettingsError(f"--network-every must be auto or a whole number >= 1, got {self.network_every!r}")
        return n

    def validate(self) -> None:
        parse_size(self.size)
        self.network_schedule()
        self.buckets()
        if self.reset_every < 0:
            raise SettingsError("--reset-every must be >= 0")
        if self.heads not in ("full", "minimal"):
            raise SettingsError(f"--heads must be full or minimal, got {self.heads!r}")
        if not (self.device in ("auto", "cpu") or self.device.startswith(("cuda", "mps"))):
            raise SettingsError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.precision == "int8" and self.device not in ("auto", "cpu"):
            raise SettingsError(f"--precision int8 runs on the CPU only (--device {self.device}: use bf16 or fp16)")


@dataclass(frozen=True)
class MapSettings:
    """How results become the global map."""

    conf_thresh: Optional[float] = setting(None, help="keep map points with confidence above this "
                                                      "(default: the checkpoint's recommendation, else 1.5)")
    voxel_size: float = setting(0.02, help="map voxel edge in world units (metres)")
    max_points: int = setting(2_000_000, help="hard budget of map points")
    budget_policy: str = setting("coarsen", choices=("coarsen", "evict"),
                                 help="at the budget: coarsen (double the voxel) or evict (drop the oldest voxels)")
    map_points: str = setting("pose", choices=("pose", "head"),
                              help="pose = T_wc x camera pointmap (the reference demo), head = the model's world head")
    pixel_stride: int = setting(2, help="integrate every n-th pixel into the map")
    dynamic_mask: str = setting("off", choices=("off", "attention", "flow", "residual"),
                                help="keep moving objects out of the map (and of tracking): attention = the network's "
                                     "own attention (training-free), flow = dense optical flow the camera's motion "
                                     "cannot explain (any weights), residual = depth in front of what the map holds "
                                     "(map only); the score and mask are saved per frame (docs/ACCURACY.md)")
    dynamic_thresh: float = setting(0.5, help="--dynamic-mask: score (0..1) above which a pixel is masked")

    def __post_init__(self) -> None:
        if self.dynamic_mask is False:  # YAML reads a bare ``off`` as false
            object.__setattr__(self, "dynamic_mask", "off")

    def validate(self) -> None:
        if self.dynamic_mask not in ("off", "attention", "flow", "residual"):
            raise SettingsError(f"--dynamic-mask must be off, attention, flow or residual, got {self.dynamic_mask!r}")
        if not self.voxel_size > 0:
            raise SettingsError("--voxel-size must be > 0")
        if self.max_points < 1:
            raise SettingsError("--max-points must be >= 1")
        if self.pixel_stride < 1:
            raise SettingsError("--pixel-stride must be >= 1")
        if not (isinstance(self.dynamic_thresh, (int, float)) and 0.0 < self.dynamic_thresh < 1.0):
            raise SettingsError(f"--dynamic-thresh must be between 0 and 1 (exclusive), got {self.dynamic_thresh!r}")
        if self.conf_thresh is not None and not math.isfinite(self.conf_thresh):
            raise SettingsError(f"--conf-thresh must be a finite number, got {self.conf_thresh!r}")


@dataclass(frozen=True)
class OutputSettings:
    """Where results go: files, the Rerun view."""

    output_dir: str = setting("outputs/run", help="where the outputs go")
    save_frames: bool = setting(False, help="also write frames/NNNNNN.npz per frame")
    viewer: str = setting("none", choices=("spawn", "web", "none"),
                          help="live Rerun viewer: spawn (native, needs a display) or web; bound to 127.0.0.1")
    save_rrd: Optional[str] = setting(None, help="record the Rerun view to this .rrd file")
    consolidate_every: int = setting(200, help="Rerun: re-log the whole map every N frames")
    flush_every: int = setting(100, help="flush trajectory.txt and summary.json every N frames")
    flush_every_s: float = setting(5.0, help="... and at least every this many seconds (0 = by frames only), so a "
                                             "killed process leaves its outputs up to then")
    map_every_s: float = setting(60.0, help="rewrite map.ply/map.glb every this many seconds while running (0 = only "
                                            "at the end); summary.json says in_progress until the end")
    sink_queue: int = setting(64, help="frames a background sink may have waiting (files wait, the viewer drops)")
    snapshot_every: Optional[str] = setting(None, help="snapshot the stream's whole state every N frames or Ns seconds "
                                                       "(run: into --snapshot, default OUTPUT_DIR/snapshots; serve: "
                                                       "OUTPUT_DIR/snapshots/<stream>); one is also written at the end")
    export: list[str] = setting(help="also write the run in another format (repeatable): colmap = a COLMAP model "
                                     "(binary + text), its images and a nerfstudio transforms.json in OUTPUT_DIR/colmap/",
                                choices=("colmap",), factory=list, repeat=True)
    snapshot_keep: int = setting(2, help="automatic snapshots kept per stream (the newest; named ones are never pruned)")

    def validate(self) -> None:
        for name in ("consolidate_every", "flush_every", "flush_every_s", "map_every_s"):
            if not getattr(self, name) >= 0:
                raise SettingsError(f"{flag_name(name)} must be >= 0")
        if self.sink_queue < 1:
            raise SettingsError("--sink-queue must be >= 1")
        if self.snapshot_keep < 1:
            raise SettingsError("--snapshot-keep must be >= 1")
        from .snapshot.writer import parse_every

        try:
            parse_every(self.snapshot_every)
        except ValueError as e:
            raise SettingsError(str(e)) from None


@dataclass(frozen=True)
class SlamSettings:
    """The geometric backend between the network and the map: poses from multi-view geometry."""

    backend: str = setting("auto", choices=("auto", "none", "track", "slam"),
                           help="none = poses from the network alone; track = feature tracking with PnP / two-view "
                                "geometry, keyframes and local bundle adjustment, the network's depth as the prior; "
                                "slam = track plus loop closure (place recognition, Sim(3) pose graph, the map "
                                "re-anchored to the corrected keyframes); auto = slam when the intrinsics are known "
                                "(--intrinsics / --calib), else none (see docs/ACCURACY.md)")
    intrinsics: Optional[str] = setting(None, help="known intrinsics fx,fy,cx,cy[,k1,k2,p1,p2[,k3]] in original "
                                                   "pixels (distortion: frames are undistorted at the source)")
    calib: Optional[str] = setting(None, help="calibration file: OpenCV YAML (camera_matrix/distortion_coefficients), "
                                              "Kalibr camchain YAML or ROS camera_info YAML")
    track_width: int = setting(640, help="tracking works on frames resized to at most this width")
    place: str = setting("bow", choices=("bow", "tokens"),
                         help="loop-closure place recognition: bow = bag of ORB words learnt from the stream; "
                              "tokens = the network's pooled encoder tokens (measured: docs/ACCURACY.md)")
    refine: bool = setting(False, help="after the stream ends: a global bundle adjustment of every keyframe with the "
                                       "loop edges, writing trajectory_refined.txt and map_refined.ply (files only; "
                                       "needs --backend track or slam)")
    ba_worker: str = setting("auto", choices=("auto", "thread", "process"),
                             help="where the local bundle adjustment runs: thread = a background thread (gtsam holds "
                                  "Python's GIL while it computes, so the frame loop waits for each iteration); "
                                  "process = a child process (no GIL; it competes for the cores instead); auto = "
                                  "process when the network runs beside the frame loop (--network-every), else "
                                  "thread (measured: docs/PERFORMANCE.md)")
    depth_fit: str = setting("grid", choices=("scale", "grid"),
                             help="how the network's depth is fitted to the tracked landmarks (track / slam): scale = "
                                  "one factor per frame (the median ratio); grid = a smooth per-pixel correction "
                                  "field fitted to every landmark's depth, so the map takes its layout from the "
                                  "tracked geometry and its detail from the network (measured: docs/ACCURACY.md)")
    deterministic: bool = setting(False, help="run the local bundle adjustment and loop closure in the frame loop "
                                              "instead of background threads: the same frames always give the same "
                                              "poses (exact --resume), at the cost of latency spikes")

    def resolved_backend(self) -> str:
        """``auto`` -> ``slam`` with known intrinsics, else ``none`` (measured: docs/ACCURACY.md)."""
        if self.backend == "auto":
            return "slam" if (self.intrinsics or self.calib) else "none"
        return self.backend

    def resolved_ba_worker(self, network_async: bool) -> str:
        """``auto`` -> ``process`` when the network runs in its own thread beside the frame loop
        (``network_async``; the GIL is then shared by three), else ``thread``."""
        if self.ba_worker == "auto":
            return "process" if network_async and not self.deterministic else "thread"
        return self.ba_worker

    def validate(self) -> None:
        if self.intrinsics and self.calib:
            raise SettingsError("give --intrinsics or --calib, not both")
        if self.track_width < 64:
            raise SettingsError("--track-width must be >= 64")
        if self.refine and self.resolved_backend() == "none":
            raise SettingsError("--refine needs the geometric backend: --backend track or slam (or known intrinsics "
                                "with --backend auto)")


@dataclass(frozen=True)
class PipelineConfig:
    """Everything between a frame and the outside world, shared by ``run`` and ``serve``."""

    engine: EngineSettings = field(default_factory=EngineSettings)
    map: MapSettings = field(default_factory=MapSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    slam: SlamSettings = field(default_factory=SlamSettings)

    def validate(self) -> None:
        self.engine.validate()
        self.map.validate()
        self.outputs.validate()
        self.slam.validate()
        if self.engine.network_schedule() != 1:
            if self.slam.resolved_backend() not in ("track", "slam"):
                raise SettingsError("--network-every needs the tracking backend for the frames the network skips: "
                                    "add --backend track or slam")
            for bad, flag in ((self.map.dynamic_mask != "off", "--dynamic-mask"),
                              (bool(self.outputs.snapshot_every), "--snapshot-every")):
                if bad:
                    raise SettingsError(f"--network-every does not work with {flag} yet: use one or the other")
        if self.engine.heads == "minimal" and self.map.map_points == "head":
            raise SettingsError("--heads minimal does not compute the world-frame head that --map-points head "
                                "uses: use --map-points pose or --heads full")


SECTIONS: dict[str, type] = {"engine": EngineSettings, "map": MapSettings, "outputs": OutputSettings,
                             "slam": SlamSettings}

#: old spellings -> the one name (accepted for one release with a warning)
DEPRECATED_NAMES: dict[str, str] = {"out_dir": "output_dir", "dtype": "precision", "policy": "state_policy",
                                    "rule": "state_policy"}
_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def section_fields() -> dict[str, str]:
    """Setting name -> its section (names are unique across sections)."""
    return {f.name: sec for sec, cls in SECTIONS.items() for f in fields(cls)}


def canonical(name: str, value: Any, where: str = "flag") -> tuple[str, Any]:
    """Map a deprecated spelling to the current one (with a warning)."""
    if name in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[name]
        _logger.warning("%s %s is deprecated; use %s", where, flag_name(name) if where == "flag" else name,
                        flag_name(new) if where == "flag" else new)
        if new == "precision":
            value = _DTYPE_NAMES.get(value, value)
        return new, value
    return name, value


def from_flat(cls: type, values: Mapping[str, Any]) -> Any:
    """Build ``cls`` (a config with a ``pipeline: PipelineConfig`` field) from flat ``name -> value``
    pairs: pipeline settings go to their section, the rest to ``cls`` itself."""
    where = section_fields()
    own = {f.name for f in fields(cls)} - {"pipeline"}
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    top: dict[str, Any] = {}
    for k, v in values.items():
        k, v = canonical(k, v, where="setting")
        if k in where:
            parts[where[k]][k] = v
        elif k in own:
            top[k] = v
        else:
            raise SettingsError(f"unknown setting {k!r}")
    pipeline = PipelineConfig(**{s: SECTIONS[s](**kv) for s, kv in parts.items()})
    return cls(pipeline=pipeline, **top)


def to_flat(cfg: Any) -> dict[str, Any]:
    """The inverse of :func:`from_flat` (for ``summary.json``)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name != "pipeline"}
    for sec in SECTIONS:
        out.update(dataclasses.asdict(getattr(cfg.pipeline, sec)))
    return out


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML file that must hold a mapping (clear errors for a missing file, bad YAML, a non-mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise SettingsError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings")
    return data


def load_yaml(path: str | Path, cls: type) -> dict[str, Any]:
    """A YAML settings file as flat ``name -> value`` pairs for :func:`from_flat`.

    The file has sections ``engine:``, ``map:``, ``outputs:`` and the command's own keys at the top
    level; ``-`` in keys reads as ``_``. Top-level pipeline keys (the old flat layout) still work with
    a warning. Unknown keys are an error naming them."""
    path = Path(path)
    data = read_yaml_mapping(path)
    where = section_fields()
    own = {f.name for f in fields(cls)} - {"pipeline"}
    flat: dict[str, Any] = {}
    unknown: list[str] = []
    flat_pipeline: list[str] = []
    for key, value in data.items():
        key = str(key).replace("-", "_")
        if key in SECTIONS:
            if value is None:
                continue
            if not isinstance(value, dict):
                raise SettingsError(f"{path}: section {key!r} must be a mapping")
            for k, v in value.items():
                k, v = canonical(str(k).replace("-", "_"), v, where="setting")
                if where.get(k) != key:
                    unknown.append(f"{key}.{k}")
                else:
                    flat[k] = v
            continue
        key, value = canonical(key, value, where="setting")
        if key in own:
            flat[key] = value
        elif key in where:
            flat_pipeline.append(key)
            flat[key] = value
        else:
            unknown.append(key)
    if unknown:
        raise SettingsError(f"{path}: unknown settings {sorted(unknown)}")
    if flat_pipeline:
        _logger.warning("%s: top-level %s are deprecated; put them under engine:/map:/outputs:", path,
                        ", ".join(sorted(flat_pipeline)))
    return flat
