"""StreamEngine: owns one stream's model state and turns frames into :class:`FrameResult`.

Per frame: preprocess (reference resize/crop, normalise) -> ``Cut3r.step`` under inference mode with
the chosen update rule -> post-process (poses into the global frame, world pointmaps, focal and
intrinsics, colours). Only the engine changes the state.

``reset_every = N``: after every N-th frame (processed index ``k`` with ``(k + 1) % N == 0``) the state
is reset and that same frame is fed again as the first view of a new segment (its outputs are
dropped). Segments are chained: the new segment's world frame is that frame's camera, placed at the
frame's pose in the previous segment, so ``T_wc = B @ P`` with ``B`` the product of the reset
frames' segment-local poses (TTT3R's ``reset_interval`` convention). No scale alignment is done.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from typing import Callable, Optional

import numpy as np
import torch

from ..frames import Frame, FrameResult, ProbeResult
from ..geometry import estimate_focal, intrinsics_matrix, principal_point, raymap
from ..geometry.pose import pose_encoding_to_matrix
from ..models import Cut3r
from ..preprocess import preprocess_rgb, preprocess_torch, to_model_tensor
from ..types import FrameInput, StepOutput, StreamState
from .graphs import DEFAULT_BUCKETS, bucket_for, graphs_for, pad_rows
from .policies import get_policy

__all__ = ["EngineConfig", "StreamEngine", "default_size", "process_batch"]

_logger = logging.getLogger(__name__)


def default_size(model: Cut3r) -> int:
    """The model's training resolution: the long side of ``cfg.img_size`` (512 for the official DPT
    model, 224 = the square crop for the 224 linear one, 160 for ``streamrecon_small``)."""
    return max(model.cfg.img_size)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "int8": None}  # int8: quantised layers, no autocast


def _autocast(device: torch.device, precision: str):
    dtype = _AUTOCAST[precision]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _attention_kw(cfg: "EngineConfig") -> dict:
    """``step`` keywords for the attention statistics and the minimal heads, only when asked (model
    stand-ins need not know them)."""
    return {**({"token_attention": True} if cfg.token_attention else {}),
            **({"heads": "minimal"} if cfg.heads == "minimal" else {})}


def validate_frame(frame: Frame) -> None:
    """Raise ``ValueError`` naming what is wrong with a frame the model cannot take."""
    img = frame.image
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"frame {frame.seq}: expected an (H, W, 3) uint8 RGB image, got "
                         f"{getattr(img, 'shape', None)} {getattr(img, 'dtype', type(img).__name__)}")
    if min(img.shape[:2]) < 16:
        raise ValueError(f"frame {frame.seq}: image {img.shape[1]}x{img.shape[0]} is too small")
    if frame.K is not None:
        K = np.asarray(frame.K, dtype=np.float64)
        if K.shape != (3, 3) or not np.isfinite(K).all() or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise ValueError(f"frame {frame.seq}: K must be a finite 3x3 matrix with positive focal lengths")


@dataclass
class _Prepared:
    frame: Frame
    x: torch.Tensor  # (1, 3, H, W) model input
    u8: np.ndarray
    crop: object
    ms: float


@dataclass(frozen=True)
class EngineConfig:
    """Args:
        size: model input size: 224 = square crop, anything else = long side (multiple of 16 crops).
        policy: state update policy, ``cut3r`` or ``ttt3r``.
        reset_every: reset and re-anchor after every N frames (0 = never).
        fast_preprocess: resize on the model's device with torch instead of the reference Pillow
            LANCZOS (faster on GPU; not bit-exact).
        precision: ``fp32`` (checkpoint-exact), ``bf16`` / ``fp16`` autocast of the trunk (heads and
            pose stay float32), or ``int8`` (CPU: the trunk's Linear layers dynamically quantised,
            :mod:`streamrecon.engine.quant`); see docs/PERFORMANCE.md for the measured drift.
        token_attention: also compute the decoder's attention statistics of the image tokens and, from
            them, ``FrameResult.dynamic`` (``--dynamic-mask attention``; the outputs are unchanged).
        heads: ``full``, or ``minimal`` (``--heads minimal``): frames skip the world-frame and colour
            heads; ``points_world_head`` / ``conf_world`` are then the pose-based points and ``conf_cam``
            (probes still run every head).
        batch_buckets: pad a batched step of ``n`` streams to the smallest of these ``>= n`` (padding
            rows repeat the last stream, their outputs are dropped); ``()``: no padding, or
            :data:`~streamrecon.engine.graphs.DEFAULT_BUCKETS` with ``cuda_graphs``.
        cuda_graphs: replay each step shape from a captured CUDA graph (:mod:`streamrecon.engine.graphs`;
            CUDA only -- elsewhere the step runs eagerly).
        torch_compile: ``torch.compile`` the image encoder's blocks (:mod:`streamrecon.engine.compiled`).
    """

    size: int = 512
    policy: str = "cut3r"
    reset_every: int = 0
    fast_preprocess: bool = False
    precision: str = "fp32"
    token_attention: bool = False
    heads: str = "full"
    batch_buckets: tuple = ()
    cuda_graphs: bool = False
    torch_compile: bool = False

    @property
    def buckets(self) -> tuple:
        return tuple(self.batch_buckets) or (DEFAULT_BUCKETS if self.cuda_graphs else ())

    def __post_init__(self) -> None:
        if any(not isinstance(b, int) or b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be whole numbers >= 1, got {self.batch_buckets!r}")
        if self.heads not in ("full", "minimal"):
            raise ValueError(f"heads must be 'full' or 'minimal', got {self.heads!r}")
        get_policy(self.policy)
        if self.precision not in _AUTOCAST:
            raise ValueError(f"precision must be one of {sorted(_AUTOCAST)}, got {self.precision!r}")
        if self.reset_every < 0:
            raise ValueError(f"reset_every must be >= 0, got {self.reset_every}")
        if self.size < 16:
            raise ValueError(f"size must be >= 16, got {self.size}")


class StreamEngine:
    """Args:
        model: a loaded :class:`Cut3r` (its device and dtype are used).
        config: engine settings.
    """

    def __init__(self, model: Cut3r, config: EngineConfig = EngineConfig()) -> None:
        if config.precision == "int8":  # one quantised copy per model, shared by its streams
            from .quant import int8_model

            model = int8_model(model)
        if config.torch_compile:
            from .compiled import compile_encoder

            compile_encoder(model)
        self.model = model.eval()
        self.cfg = config
        self.rule = get_policy(config.policy)
        self.device = model.device
        self.state: StreamState = self._fresh_state()
        self.base = np.eye(4)  # T_global_segment: current segment's world -> global world
        self.segment = 0
        self.processed = 0
        self.frozen = False  # True: frames are read against the state without writing it (revisit pass)
        self.last_K: Optional[np.ndarray] = None
        self.last_hw: Optional[tuple[int, int]] = None
        self.last_T_wc: Optional[np.ndarray] = None
        self._last_input: Optional[torch.Tensor] = None

    def _fresh_state(self) -> StreamState:
        with torch.inference_mode():
            return self.model.init_state(1)

    # --------------------------------------------------------------------------------------

    def prepare(self, frame: Frame) -> "_Prepared":
        """Validate and preprocess a frame (no model call)."""
        validate_frame(frame)
        img = frame.image
        t0 = time.perf_counter()
        if self.cfg.fast_preprocess:
            x, u8, crop = preprocess_torch(img, self.cfg.size, self.device)
        else:
            u8, crop = preprocess_rgb(img, self.cfg.size)
            x = to_model_tensor(u8, self.device)
        return _Prepared(frame, x, u8, crop, 1e3 * (time.perf_counter() - t0))

    def finish(self, p: "_Prepared", out: StepOutput, new_state: StreamState, model_ms: float) -> FrameResult:
        """Adopt the new state and turn the model output into a :class:`FrameResult`."""
        was_fresh = bool(self.state.fresh[0])  # the state held nothing of this segment yet
        self.state = new_state
        t2 = time.perf_counter()
        result = self._postprocess(p.frame, out, p.u8, p.crop)
        if out.token_attention is not None and not was_fresh:
            from ..dynamic.attention import attention_score

            grid = (p.u8.shape[0] // self.model.cfg.patch_size, p.u8.shape[1] // self.model.cfg.patch_size)
            rows = {k: v[0].float().cpu().numpy() for k, v in out.token_attention.items()}
            result = replace(result, dynamic=attention_score(rows, grid, p.u8.shape[:2]))
        t3 = time.perf_counter()
        self._last_input = p.x
        if self.cfg.reset_every and not self.frozen and (self.processed + 1) % self.cfg.reset_every == 0:
            self._restart_segment(result.T_wc)
        t4 = time.perf_counter()
        self.processed += 1
        return replace(result, timings_ms={"preprocess": p.ms, "model": model_ms + 1e3 * (t4 - t3),
                                           "postprocess": 1e3 * (t3 - t2)})

    def process(self, frame: "Frame | _Prepared") -> FrameResult:
        """Run one frame (or one already :meth:`prepare` d) through the model; the state advances."""
        p = frame if isinstance(frame, _Prepared) else self.prepare(frame)
        t1 = time.perf_counter()
        # frozen (--revisit's second pass): read against the state, never write it
        with torch.inference_mode():
            out, state = _step(self, p.x, self.state)
            if state.batch_size > 1:  # padded to a bucket above 1
                out, state = out.select(0), state.select(0)
        return self.finish(p, out, state, 1e3 * (time.perf_counter() - t1))

    def _postprocess(self, frame: Frame, out: StepOutput, u8: np.ndarray, crop) -> FrameResult:
        h, w = u8.shape[:2]
        P = pose_encoding_to_matrix(out.pose.double())[0].cpu().numpy()  # segment-local T_wc
        T_wc = self.base @ P
        pts_cam = out.points_cam[0].float().cpu()
        focal = float(estimate_focal(pts_cam[None], principal_point(h, w))[0])
        K = intrinsics_matrix(torch.tensor([focal], dtype=torch.float64), principal_point(h, w, dtype=torch.float64))[0].numpy()
        pts_cam = pts_cam.numpy()
        R, t = T_wc[:3, :3].astype(np.float32), T_wc[:3, 3].astype(np.float32)
        Rb, tb = self.base[:3, :3].astype(np.float32), self.base[:3, 3].astype(np.float32)
        conf_cam = out.conf_cam[0].float().cpu().numpy()
        pts_pose = pts_cam @ R.T + t
        if out.points_world is None:  # --heads minimal: the world head was not computed
            pts_head, conf_world = pts_pose, conf_cam
        else:
            pts_head = out.points_world[0].float().cpu().numpy() @ Rb.T + tb
            conf_world = out.conf_world[0].float().cpu().numpy()
        self.last_K, self.last_hw, self.last_T_wc = K, (h, w), T_wc
        return FrameResult(
            seq=frame.seq, stamp=frame.stamp, source=frame.source, index=self.processed, segment=self.segment,
            T_wc=T_wc, points_cam=pts_cam, points_world_pose=pts_pose, points_world_head=pts_head,
            conf_cam=conf_cam, conf_world=conf_world,
            depth=pts_cam[..., 2].copy(), K=K, K_original=crop.K_to_original(K), colors=u8, crop=crop,
            K_given=None if frame.K is None else np.array(frame.K, dtype=np.float64).reshape(3, 3),
            descriptor=None if out.global_feat is None else out.global_feat[0].float().cpu().numpy(),
        )

    def _restart_segment(self, T_wc_global: np.ndarray) -> None:
        """Reset the state and feed the last frame again as the first view of a new segment."""
        self.base = T_wc_global.copy()
        self.segment += 1
        self.state = self._fresh_state()
        with torch.inference_mode(), _autocast(self.device, self.cfg.precision):
            _, self.state = self.model.step(FrameInput(img=self._last_input), self.state, rule=self.rule)

    def revisit(self) -> None:
        """After a first pass over a whole sequence: from now on every frame is read against the final
        state without updating it (CUT3R's revisit evaluation), numbered from 0 again."""
        self.frozen, self.processed = True, 0

    def reset(self, keep_trajectory: bool = True) -> None:
        """Start a new segment now.

        Args:
            keep_trajectory: chain the new segment to the old one (the last frame is fed again as
                its first view, anchored at that frame's pose); ``False`` starts over at the origin.
        """
        if keep_trajectory and self._last_input is not None and self.last_T_wc is not None:
            self._restart_segment(self.last_T_wc)
        else:
            self.state = self._fresh_state()
            self.base = np.eye(4)
            self.segment += 1
            self.last_T_wc = None
        _logger.info("state reset (segment %d, trajectory %s)", self.segment, "kept" if keep_trajectory else "restarted")

    # --------------------------------------------------------------------------------------

    def probe(self, T_wc: np.ndarray, K: Optional[np.ndarray] = None, hw: Optional[tuple[int, int]] = None,
              name: str = "probe") -> ProbeResult:
        """Ask the current state what a virtual camera would see; the state is not changed.

        Args:
            T_wc: ``(4, 4)`` virtual camera-to-world in the global frame.
            K: ``(3, 3)`` intrinsics at model resolution (default: the last frame's estimate).
            hw: ``(H, W)`` of the virtual image (default: the last frame's model size).
        """
        return self.probe_later(T_wc, K, hw, name)()

    def probe_later(self, T_wc: np.ndarray, K: Optional[np.ndarray] = None, hw: Optional[tuple[int, int]] = None,
                    name: str = "probe") -> Callable[[], ProbeResult]:
        """:meth:`probe` in two halves: the state, segment origin and defaults are taken *now*; the
        returned function does the work and may run in another thread while this engine goes on
        stepping (the state is never modified in place: a step replaces it)."""
        if K is None or hw is None:
            if self.last_K is None:
                raise RuntimeError("probe needs intrinsics and a size before the first frame")
            K = self.last_K if K is None else K
            hw = self.last_hw if hw is None else hw
        state, base, index = self.state, self.base.copy(), self.processed - 1
        T_wc, K = np.asarray(T_wc, dtype=np.float64).copy(), np.asarray(K, dtype=np.float64).copy()
        h, w = hw

        def run() -> ProbeResult:
            T_seg = np.linalg.inv(base) @ T_wc
            ray = raymap(torch.from_numpy(T_seg)[None], torch.from_numpy(K)[None], h, w)
            with torch.inference_mode(), _autocast(self.device, self.cfg.precision):
                out = self.model.query_raymap(ray.float().to(self.device), state)
            pts = out.points_cam[0].float().cpu().numpy()
            R, t = T_wc[:3, :3].astype(np.float32), T_wc[:3, 3].astype(np.float32)
            rgb = out.rgb[0].float().cpu().numpy() if out.rgb is not None else np.zeros((h, w, 3), np.float32)
            return ProbeResult(
                name=name, frame_index=index, T_wc=T_wc, K=K,
                points_cam=pts, points_world=pts @ R.T + t, conf=out.conf_cam[0].float().cpu().numpy(),
                rgb=np.clip((rgb + 1) * 127.5, 0, 255).round().astype(np.uint8),
                pose_estimate=base @ pose_encoding_to_matrix(out.pose.double())[0].cpu().numpy(),
            )

        return run


def _step(lead: StreamEngine, x: torch.Tensor, state: StreamState) -> tuple[StepOutput, StreamState]:
    """One (batched) step with ``lead``'s settings: ``(B, 3, H, W)`` inputs padded to the next batch
    bucket, replayed from a CUDA graph when there is one for the model; the outputs keep the padding
    rows (rows ``>= B`` are to be dropped). Frozen engines (``--revisit``'s second pass) read against
    the state without writing it, eagerly."""
    cfg = lead.cfg
    if lead.frozen:
        update = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        with _autocast(lead.device, cfg.precision):
            return lead.model.step(FrameInput(img=x, update=update), state, rule=lead.rule, **_attention_kw(cfg))
    size = bucket_for(x.shape[0], cfg.buckets)
    x, state = pad_rows(x, state, size)
    kw = _attention_kw(cfg)
    graphs = graphs_for(lead.model) if cfg.cuda_graphs and size in cfg.buckets else None
    if graphs is not None:
        return graphs.step(x, state, lead.rule, cfg.precision, lambda: _autocast(lead.device, cfg.precision), **kw)
    with _autocast(lead.device, cfg.precision):
        return lead.model.step(FrameInput(img=x), state, rule=lead.rule, **kw)


def process_batch(engines: list[StreamEngine], frames: list[Frame]) -> list["FrameResult | Exception"]:
    """One frame for each of several streams, stepped together where possible.

    Streams whose inputs have the same size and that share a model and an update rule go through
    one batched ``Cut3r.step`` (each keeps its own state and flags); the results equal stepping
    them one by one. A frame that fails comes back as its exception, in its place.
    """
    results: list = [None] * len(engines)
    groups: dict[tuple, list[tuple[int, _Prepared]]] = {}
    for i, (engine, frame) in enumerate(zip(engines, frames)):
        try:
            p = engine.prepare(frame)
        except Exception as e:  # one bad frame must not sink the others
            results[i] = e
            continue
        key = (id(engine.model), engine.rule, engine.cfg.precision, engine.cfg.token_attention, engine.cfg.heads,
               engine.cfg.buckets, engine.cfg.cuda_graphs, engine.frozen, tuple(p.x.shape))
        groups.setdefault(key, []).append((i, p))
    for members in groups.values():
        idx = [i for i, _ in members]
        lead = engines[idx[0]]
        t1 = time.perf_counter()
        try:
            with torch.inference_mode():
                x = torch.cat([p.x for _, p in members])
                out, state = _step(lead, x, StreamState.stack([engines[i].state for i in idx]))
        except Exception as e:
            for i in idx:
                results[i] = e
            continue
        model_ms = 1e3 * (time.perf_counter() - t1) / len(idx)
        for row, ((i, p), st) in enumerate(zip(members, state.split())):
            try:
                results[i] = engines[i].finish(p, out.select(row), st, model_ms)
            except Exception as e:
                results[i] = e
    return results
