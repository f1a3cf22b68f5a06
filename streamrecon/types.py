"""Typed objects that flow through the model.

Shape legend (used in every docstring of the package):

* ``B`` batch = number of independent streams stepped together;
* ``H, W`` model input size in pixels (multiples of the 16-pixel patch);
* ``N = (H/16)(W/16)`` image tokens; ``S`` state tokens; ``M`` LocalMemory slots;
* ``ed`` encoder width, ``dd`` decoder width.

Frames and conventions: cameras use OpenCV axes (x right, y down, z forward). ``T_wc`` is
camera-to-world (``x_w = R x_c + t``). The model's world frame is the camera of the first frame
of the current sequence (the first frame after :meth:`Cut3r.init_state`, or after a reset).
Pose encodings are ``[tx, ty, tz, qw, qx, qy, qz]`` (camera-to-world, quaternion real part first,
sign-standardised so that ``qw >= 0``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch
from torch import Tensor

__all__ = ["FrameInput", "StreamState", "StepOutput", "REFERENCE_OUTPUT_NAMES"]


@dataclass(frozen=True)
class FrameInput:
    """One view for each of ``B`` streams.

    Attributes:
        img: ``(B, 3, H, W)`` RGB normalised to ``[-1, 1]`` (``(u8/255 - 0.5)/0.5``), or ``None``.
        ray_map: ``(B, H, W, 6)`` raymap ``[ox, oy, oz, dx, dy, dz]`` channels-last in the model's
            world frame, or ``None``. See :func:`streamrecon.geometry.camera.raymap`.
        update: ``(B,)`` bool, whether each stream may write its state with this view (``None`` =
            all True). Only views with an image ever write.
        reset: ``(B,)`` bool, reset that stream's state and memory *after* this view's outputs
            (``None`` = all False).

    At least one of ``img`` / ``ray_map`` must be given; all rows of the batch share that choice.
    """

    img: Optional[Tensor] = None
    ray_map: Optional[Tensor] = None
    update: Optional[Tensor] = None
    reset: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.img is None and self.ray_map is None:
            raise ValueError("FrameInput needs an image, a raymap or both")
        if self.img is not None and (self.img.ndim != 4 or self.img.shape[1] != 3):
            raise ValueError(f"img must be (B, 3, H, W), got {tuple(self.img.shape)}")
        if self.ray_map is not None and (self.ray_map.ndim != 4 or self.ray_map.shape[-1] != 6):
            raise ValueError(f"ray_map must be (B, H, W, 6), got {tuple(self.ray_map.shape)}")
        if self.img is not None and self.ray_map is not None:
            if self.img.shape[0] != self.ray_map.shape[0] or self.img.shape[2:] != self.ray_map.shape[1:3]:
                raise ValueError(
                    f"img {tuple(self.img.shape)} and ray_map {tuple(self.ray_map.shape)} disagree on batch or size"
                )
        for name in ("update", "reset"):
            flag = getattr(self, name)
            if flag is not None and (flag.ndim != 1 or flag.shape[0] != self.batch_size):
                raise ValueError(f"{name} must be ({self.batch_size},), got {tuple(flag.shape)}")

    @property
    def batch_size(self) -> int:
        return (self.img if self.img is not None else self.ray_map).shape[0]

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` of the view."""
        if self.img is not None:
            return int(self.img.shape[2]), int(self.img.shape[3])
        return int(self.ray_map.shape[1]), int(self.ray_map.shape[2])

    @property
    def device(self) -> torch.device:
        return (self.img if self.img is not None else self.ray_map).device


@dataclass(frozen=True)
class StreamState:
    """Recurrent state of ``B`` streams: everything the model carries from one view to the next.

    Attributes:
        tokens: ``(B, S, dd)`` state tokens (the ``dec_norm_state`` output of the last update).
        mem: ``(B, M, 2*dd)`` LocalMemory slots ``[key | value]``.
        init_tokens: ``(1, S, dd)`` initial state, restored by a reset (shared by all rows).
        init_mem: ``(1, M, 2*dd)`` initial memory, restored by a reset.
        fresh: ``(B,)`` bool; a fresh stream takes the learned pose token as its pose query for the
            next view instead of reading LocalMemory (true for a new stream, and after a reset
            when the update rule restarts sequences).
    """

    tokens: Tensor
    mem: Tensor
    init_tokens: Tensor
    init_mem: Tensor
    fresh: Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: int | slice | Tensor) -> "StreamState":
        """Rows of the batch (a view for int/slice, keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, tokens=self.tokens[index], mem=self.mem[index], fresh=self.fresh[index])

    @staticmethod
    def stack(states: "list[StreamState]") -> "StreamState":
        """Concatenate streams of the same model along the batch dimension."""
        if not states:
            raise ValueError("stack needs at least one state")
        first = states[0]
        return StreamState(
            tokens=torch.cat([s.tokens for s in states]),
            mem=torch.cat([s.mem for s in states]),
            init_tokens=first.init_tokens,
            init_mem=first.init_mem,
            fresh=torch.cat([s.fresh for s in states]),
        )

    def split(self) -> "list[StreamState]":
        """One single-row state per stream (inverse of :meth:`stack`)."""
        return [self.select(i) for i in range(self.batch_size)]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "StreamState":
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return StreamState(cast(self.tokens), cast(self.mem), cast(self.init_tokens), cast(self.init_mem),
                           self.fresh.to(device=device))

    def nbytes(self) -> int:
        """Bytes held by this state (initial tensors counted once)."""
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.mem, self.init_tokens,
                                                            self.init_mem, self.fresh))


@dataclass(frozen=True)
class StepOutput:
    """Per-view predictions for ``B`` streams.

    Attributes:
        points_cam: ``(B, H, W, 3)`` pointmap in the view's own camera frame (OpenCV axes, metric
            up to the model's scale).
        conf_cam: ``(B, H, W)`` confidence of ``points_cam`` (``> 1``).
        points_world: ``(B, H, W, 3)`` pointmap in the world frame, predicted directly by the
            model's world head (not ``T_wc @ points_cam``); ``None`` with ``heads="minimal"``.
        conf_world: ``(B, H, W)`` confidence of ``points_world`` (``None`` likewise).
        pose: ``(B, 7)`` camera-to-world pose encoding ``[tx, ty, tz, qw, qx, qy, qz]``.
        rgb: ``(B, H, W, 3)`` predicted colour in ``(-1, 1)``, or ``None`` for models without it.
        state_attention: ``(B, S)`` mean pre-softmax cross-attention logit of each state token
            over all image-branch tokens, layers and heads (only when the update rule asks).
        intermediates: reference intermediates (``enc_feat``, ``dec_state.l``, ...) when requested.
        global_feat: ``(B, ed)`` the mean of the view's encoder tokens (what the pose memory is
            keyed by; the SLAM backend's place-recognition descriptor).
        token_attention: ``name -> (B, D, N)`` attention statistics of the image tokens at each of the
            ``D`` decoder levels (only when asked: ``Cut3r.step(token_attention=True)``; names in
            :func:`streamrecon.models.cut3r._token_attention`), for dynamic-object masks.
    """

    points_cam: Tensor
    conf_cam: Tensor
    points_world: Optional[Tensor]
    conf_world: Optional[Tensor]
    pose: Tensor
    rgb: Optional[Tensor] = None
    state_attention: Optional[Tensor] = None
    intermediates: dict = field(default_factory=dict)
    global_feat: Optional[Tensor] = None
    token_attention: Optional[dict] = None

    def select(self, i: int) -> "StepOutput":
        """Row ``i`` of the batch (keeps the batch dimension; intermediates are dropped)."""
        def row(t: Optional[Tensor]) -> Optional[Tensor]:
            return None if t is None else t[i:i + 1]

        return StepOutput(points_cam=row(self.points_cam), conf_cam=row(self.conf_cam), points_world=row(self.points_world),
                          conf_world=row(self.conf_world), pose=row(self.pose), rgb=row(self.rgb),
                          state_attention=row(self.state_attention), global_feat=row(self.global_feat),
                          token_attention=None if self.token_attention is None else
                          {k: row(v) for k, v in self.token_attention.items()})

    def T_wc(self) -> Tensor:
        """``(B, 4, 4)`` camera-to-world matrices from :attr:`pose`."""
        from .geometry.pose import pose_encoding_to_matrix

        return pose_encoding_to_matrix(self.pose)

    def reference_dict(self) -> dict[str, Tensor]:
        """The outputs under the reference implementation's names (``pts3d_in_self_view``, ...)."""
        out = {ref: getattr(self, ours) for ref, ours in REFERENCE_OUTPUT_NAMES.items()}
        return {k: v for k, v in out.items() if v is not None}


# reference output key -> StepOutput attribute
REFERENCE_OUTPUT_NAMES = {
    "pts3d_in_self_view": "points_cam",
    "conf_self": "conf_cam",
    "rgb": "rgb",
    "camera_pose": "pose",
    "pts3d_in_other_view": "points_world",
    "conf": "conf_world",
}
