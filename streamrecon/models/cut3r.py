"""CUT3R: a recurrent transformer with a persistent state (Wang et al., CVPR 2025).

Re-implemented from the reference facts (``CUT3R_FACTS.md``) with the reference's state-dict names,
so the official ``cut3r_512_dpt_4_64.pth`` / ``cut3r_224_linear_4.pth`` load strictly and give the
same numbers. One per-view function, :meth:`Cut3r.step`, maps ``(FrameInput, StreamState)`` to
``(StepOutput, StreamState)``; a sequence is a loop over it. :meth:`Cut3r.query_raymap` answers a
raymap-only (virtual) view from a state without changing it.

Per view (B streams, ``N`` image tokens, ``S`` state tokens):

1. encode the image (ViT, float16 q/k rounding around RoPE) and/or the raymap; sum if both;
2. pose query: the learned ``pose_token`` for a fresh stream, else a LocalMemory read keyed by
   the mean encoder token;
3. two interleaved decoders (state branch, image branch), each block reading the previous level of
   the other branch; the normalised state-branch output is the candidate state;
4. heads: pose from the pose token, pointmaps in the camera and world frames, confidences, colours;
5. LocalMemory write of ``[key, pose token]``; the update rule blends the candidates in.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Callable, ContextManager, Iterable, Optional

import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..layers import Block, DecoderBlock, PatchEmbed
from ..layers.blocks import layer_norm
from ..layers.onednn import linear
from ..layers.rope import RopeTables, grid_positions, rope_tables, state_positions
from ..types import FrameInput, StepOutput, StreamState
from .heads import build_head
from .memory import LocalMemory
from .state_update import CUT3R_RULE, UpdateRule, advance_state

__all__ = ["Cut3r"]

_logger = logging.getLogger(__name__)
_MISSING = object()
_ROPE_CACHE_SIZE = 64


def _token_attention(state_reads: Tensor, reads_state: Tensor, self_attn: Tensor) -> dict[str, Tensor]:
    """Per-image-token statistics of one decoder level (the pose token, position 0, left out).

    Args:
        state_reads: ``(B, h, S, 1+N)`` scaled logits of the state branch's cross-attention (state
            tokens read the image).
        reads_state: ``(B, h, 1+N, S)`` ... of the image branch's cross-attention (image tokens read the state).
        self_attn: ``(B, h, 1+N, 1+N)`` ... of the image branch's self-attention.

    Returns ``(B, N)`` each: ``state_logit`` (mean pre-softmax score the state tokens give the token,
    as Easi3R records), ``state_logit_std`` (its spread over heads), ``state_reads`` (mean attention
    probability the state tokens pay it), ``reads_state_entropy`` (entropy of the token's attention
    over the state, over ``log S``), ``self_received`` (mean attention the other image tokens pay it)
    and ``pose_reads`` (the pose token's attention to it).
    """
    logit = state_reads[..., 1:].mean(dim=2)  # (B, h, N)
    recv = state_reads.softmax(-1)[..., 1:].mean(dim=2)
    p = reads_state[:, :, 1:].softmax(-1)
    ent = -(p * p.clamp_min(1e-12).log()).sum(-1).mean(1) / math.log(p.shape[-1])
    sa = self_attn.softmax(-1)
    return {"state_logit": logit.mean(1), "state_logit_std": logit.std(1, unbiased=False), "state_reads": recv.mean(1),
            "reads_state_entropy": ent, "self_received": sa[:, :, 1:, 1:].mean(dim=2).mean(1),
            "pose_reads": sa[:, :, 0, 1:].mean(1)}


def _no_autocast(device_type: str) -> ContextManager:
    """A region that runs in the inputs' dtype even inside an autocast region (meta has no autocast)."""
    if device_type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class Cut3r(nn.Module):
    """The CUT3R model.

    Args:
        cfg: architecture (see :mod:`streamrecon.config` for presets).
        device: where to allocate parameters (``"meta"`` builds without memory).
        dtype: parameter dtype (float32 for checkpoint-exact numerics).
    """

    def __init__(self, cfg: ModelConfig, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.cfg = cfg
        ed, dim = cfg.enc_embed_dim, cfg.dec_embed_dim
        # Registration order = the reference state-dict order.
        self.pose_token = nn.Parameter(torch.zeros(1, 1, dim, **dd))
        self.masked_img_token = nn.Parameter(torch.zeros(1, ed, **dd))  # offline path only; kept for the keys
        self.masked_ray_map_token = nn.Parameter(torch.zeros(1, ed, **dd))  # offline path only
        self.patch_embed = PatchEmbed(3, ed, cfg.patch_size, **dd)
        self.patch_embed_ray_map = PatchEmbed(6, ed, cfg.patch_size, **dd)
        self.enc_blocks = nn.ModuleList(
            [Block(ed, cfg.enc_num_heads, cfg.mlp_ratio, qk_fp16=True, **dd) for _ in range(cfg.enc_depth)]
        )
        self.enc_norm = layer_norm(ed, **dd)
        self.decoder_embed = nn.Linear(ed, dim, **dd)
        self.dec_blocks = nn.ModuleList(
            [DecoderBlock(dim, cfg.dec_num_heads, cfg.mlp_ratio, **dd) for _ in range(cfg.dec_depth)]
        )
        self.dec_norm = layer_norm(dim, **dd)
        self.enc_blocks_ray_map = nn.ModuleList(
            [Block(ed, cfg.ray_enc_num_heads, 4.0, **dd) for _ in range(cfg.ray_enc_depth)]
        )
        self.enc_norm_ray_map = layer_norm(ed, **dd)
        self.pose_retriever = LocalMemory(ed, dim, cfg.local_mem_size, cfg.dec_num_heads, **dd)
        self.register_tokens = nn.Embedding(cfg.state_size, ed, **dd)
        self.decoder_embed_state = nn.Linear(ed, dim, **dd)
        self.dec_blocks_state = nn.ModuleList(
            [DecoderBlock(dim, cfg.state_dec_num_heads, cfg.mlp_ratio, **dd) for _ in range(cfg.dec_depth)]
        )
        self.dec_norm_state = layer_norm(dim, **dd)
        self.downstream_head = build_head(cfg, **dd)
        self._rope_cache: dict[tuple, Optional[RopeTables]] = {}
        # Benchmarks set a callable name -> context manager to time the stages of a step (None: no cost).
        self.stage_timer: Optional[Callable[[str], ContextManager]] = None

    def optimize_memory_format(self) -> "Cut3r":
        """Put the DPT heads' convolution weights in channels-last layout (faster convolutions; measured
        ~13% on a 512x384 DPT adapter on CPU; numerically equal up to rounding). Call after loading."""
        if self.cfg.head_type == "dpt" and self.pose_token.device.type != "meta":
            self.downstream_head.to(memory_format=torch.channels_last)
        return self

    def _stage(self, name: str) -> ContextManager:
        return self.stage_timer(name) if self.stage_timer is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------------------------------
    # small helpers

    @property
    def dtype(self) -> torch.dtype:
        return self.pose_token.dtype

    @property
    def device(self) -> torch.device:
        return self.pose_token.device

    def _rope(self, kind: str, grid_hw: tuple[int, int], head_dim: int, device: torch.device) -> Optional[RopeTables]:
        """Cached RoPE tables: ``kind`` is ``grid`` (patches), ``dec`` (pose token + patches) or ``state``."""
        key = (kind, grid_hw, head_dim, str(device))
        # read once: a probe in the node's control thread may add to (or clear) the cache meanwhile
        cached = self._rope_cache.get(key, _MISSING)
        if cached is _MISSING:
            if kind == "grid":
                pos = grid_positions(*grid_hw, device=device)
            elif kind == "dec":
                pos = torch.cat([torch.full((1, 2), -1, device=device, dtype=torch.long),
                                 grid_positions(*grid_hw, device=device)])
            else:
                pos = state_positions(self.cfg.state_size, self.cfg.state_pe, device=device)
            if len(self._rope_cache) >= _ROPE_CACHE_SIZE:
                self._rope_cache.clear()
            cached = None if pos is None else rope_tables(pos, head_dim, self.cfg.rope_freq)
            self._rope_cache[key] = cached
        return cached

    def _grid(self, hw: tuple[int, int]) -> tuple[int, int]:
        p = self.cfg.patch_size
        if hw[0] % p or hw[1] % p:
            raise ValueError(f"input size {hw[0]}x{hw[1]} is not a multiple of the patch size {p}")
        return hw[0] // p, hw[1] // p

    # ------------------------------------------------------------------------------------------
    # state

    def init_state(self, batch_size: int = 1) -> StreamState:
        """Fresh state for ``batch_size`` streams (the image plays no part in it).

        Returns:
            :class:`StreamState` with tokens ``(B, S, dd)`` = ``decoder_embed_state(register_tokens)``
            and memory ``(B, M, 2dd)`` = the learned initial memory.
        """
        init_tokens = self.decoder_embed_state(self.register_tokens.weight).unsqueeze(0)
        init_mem = self.pose_retriever.mem
        return StreamState(
            tokens=init_tokens.expand(batch_size, -1, -1),
            mem=init_mem.expand(batch_size, -1, -1),
            init_tokens=init_tokens,
            init_mem=init_mem,
            fresh=torch.ones(batch_size, dtype=torch.bool, device=init_tokens.device),
        )

    # ------------------------------------------------------------------------------------------
    # the per-view computation

    def encode(self, img: Optional[Tensor], ray_map: Optional[Tensor]) -> Tensor:
        """Encoder tokens ``(B, N, ed)`` of an image ``(B, 3, H, W)`` and/or a raymap ``(B, H, W, 6)``."""
        cfg = self.cfg
        feat = None
        if img is not None:
            grid = self._grid(img.shape[-2:])
            rope = self._rope("grid", grid, cfg.enc_embed_dim // cfg.enc_num_heads, img.device)
            x = self.patch_embed(img.to(self.dtype))
            for blk in self.enc_blocks:
                x = blk(x, rope)
            feat = self.enc_norm(x)
        if ray_map is not None:
            grid = self._grid(ray_map.shape[1:3])
            rope = self._rope("grid", grid, cfg.enc_embed_dim // cfg.ray_enc_num_heads, ray_map.device)
            r = self.patch_embed_ray_map(ray_map.to(self.dtype).permute(0, 3, 1, 2))
            for blk in self.enc_blocks_ray_map:
                r = blk(r, rope)
            r = self.enc_norm_ray_map(r)
            feat = r if feat is None else feat + r
        if feat is None:
            raise ValueError("encode needs an image or a raymap")
        return feat

    def _decode(self, feat: Tensor, pose_in: Tensor, state_tokens: Tensor, grid: tuple[int, int],
                want_attention: bool, keep: Optional[dict], tokens: Optional[dict] = None
                ) -> tuple[list[Tensor], Tensor, Optional[Tensor]]:
        """Run both decoder branches (``tokens``: a dict to fill with :func:`_token_attention`'s
        per-layer statistics of the image tokens).

        Returns:
            ``(head_layers, candidate_state (B,S,dd), state_attention (B,S) or None)``.
        """
        cfg, dev = self.cfg, feat.device
        depth = cfg.dec_depth
        hd_img, hd_state = cfg.dec_embed_dim // cfg.dec_num_heads, cfg.dec_embed_dim // cfg.state_dec_num_heads
        rope_img_i, rope_img_s = self._rope("dec", grid, hd_img, dev), self._rope("dec", grid, hd_state, dev)
        rope_state_i, rope_state_s = self._rope("state", (0, 0), hd_img, dev), self._rope("state", (0, 0), hd_state, dev)

        x = torch.cat([pose_in.to(feat.dtype), linear(self.decoder_embed, feat)], dim=1)
        s = state_tokens.to(feat.dtype)
        img_layers, attn_sum = [], None
        if keep is not None:
            keep["dec_state"], keep["dec_img"] = [s], [x]
        for layer, (blk_s, blk_i) in enumerate(zip(self.dec_blocks_state, self.dec_blocks), start=1):
            probs_s, probs_i = ({"cross": []}, {"self": [], "cross": []}) if tokens is not None else (None, None)
            s_next, mean_logits = blk_s(s, x, rope_state_s, rope_img_s, logit_mean=want_attention, probs=probs_s)
            x_next, _ = blk_i(x, s, rope_img_i, rope_state_i, probs=probs_i)
            if tokens is not None:
                for name, value in _token_attention(probs_s["cross"][0], probs_i["cross"][0], probs_i["self"][0]).items():
                    tokens.setdefault(name, []).append(value)
            s, x = s_next, x_next
            if mean_logits is not None:
                attn_sum = mean_logits.mean(dim=1) if attn_sum is None else attn_sum + mean_logits.mean(dim=1)
            img_layers.append(x)
            if keep is not None and layer < depth:
                keep["dec_state"].append(s)
                keep["dec_img"].append(x)
        s, x = self.dec_norm_state(s), self.dec_norm(x)
        if keep is not None:  # level D is after the final norms
            keep["dec_state"].append(s)
            keep["dec_img"].append(x)
        head_layers = [feat, img_layers[depth * 2 // 4 - 1][:, 1:], img_layers[depth * 3 // 4 - 1][:, 1:], x]
        state_attention = None if attn_sum is None else attn_sum / depth
        return head_layers, s, state_attention

    def _predict(self, inp: FrameInput, state: StreamState, memory_pose_only: bool, want_attention: bool,
                 intermediates: bool, token_attention: bool = False,
                 minimal_heads: bool = False) -> tuple[StepOutput, Tensor, Tensor, Tensor]:
        """Shared body of :meth:`step` and :meth:`query_raymap`.

        Returns:
            ``(output, candidate_state, pose_token_out (B,1,dd), memory_key (B,1,dd))``.
        """
        grid = self._grid(inp.image_size)
        keep: Optional[dict] = {} if intermediates else None
        with self._stage("encoder"):
            feat = self.encode(inp.img, inp.ray_map)
        with self._stage("memory"):
            global_feat = feat.mean(dim=1, keepdim=True)
            key = self.pose_retriever.key(global_feat)
            pose_in = self.pose_retriever.read(key, state.mem.to(feat.dtype))
            if not memory_pose_only:
                token = self.pose_token.expand(feat.shape[0], -1, -1)
                pose_in = torch.where(state.fresh.view(-1, 1, 1), token, pose_in)
        tokens: Optional[dict] = {} if token_attention else None
        with self._stage("decoders"):
            head_layers, cand_tokens, state_attention = self._decode(
                feat, pose_in, state.tokens, grid, want_attention, keep, tokens
            )
        # Heads and pose arithmetic always run in float32, also under a bf16/fp16 autocast of the trunk.
        with self._stage("heads"), _no_autocast(feat.device.type):
            heads = self.downstream_head(
                [t.float() for t in head_layers], grid,
                self._rope("grid", grid, self.cfg.dec_embed_dim // self.cfg.dec_num_heads, feat.device),
                **({"minimal": True} if minimal_heads else {}),
            )
        if keep is not None:
            keep.update(enc_feat=feat, enc_pos=grid_positions(*grid, device=feat.device).unsqueeze(0),
                        global_feat=global_feat, pose_in=pose_in)
        out = StepOutput(**heads, state_attention=state_attention, intermediates=keep or {},
                         global_feat=global_feat[:, 0],
                         token_attention=None if tokens is None else {k: torch.stack(v, 1) for k, v in tokens.items()})
        return out, cand_tokens, head_layers[-1][:, :1], key

    def step(self, inp: FrameInput, state: StreamState, rule: UpdateRule = CUT3R_RULE,
             intermediates: bool = False, token_attention: bool = False,
             heads: str = "full") -> tuple[StepOutput, StreamState]:
        """Process one view per stream and return its outputs and the next state.

        Args:
            inp: the view (image and/or raymap, update and reset flags).
            state: state before the view (not modified).
            rule: state update rule (default: the reference CUT3R rule).
            intermediates: also return the reference intermediates in ``StepOutput.intermediates``:
                ``enc_feat`` (B,N,ed), ``enc_pos`` (1,N,2), ``global_feat`` (B,1,ed), ``pose_in``
                (B,1,dd), ``dec_state`` / ``dec_img`` (lists over levels 0..D: input, after each
                block, level D after the final norm), ``new_state`` and ``new_mem`` (candidates).
            token_attention: also return :attr:`StepOutput.token_attention`, per-layer attention
                statistics of the image tokens (dynamic-object masks); the outputs are unchanged by it.
            heads: ``full`` (every head), or ``minimal``: the pose and the self-view pointmap only
                (``points_world``, ``conf_world`` and ``rgb`` are ``None``); the state update and what is
                computed are the same (the world and colour heads feed nothing else).

        Returns:
            ``(StepOutput, StreamState)``. Outputs are computed with the state *before* the view;
            the update (image views with ``update``) and then the reset follow.
        """
        if inp.batch_size != state.batch_size:
            raise ValueError(f"input batch {inp.batch_size} != state batch {state.batch_size}")
        want_attention = rule.wants_state_attention or intermediates
        if heads not in ("full", "minimal"):
            raise ValueError(f"heads must be 'full' or 'minimal', got {heads!r}")
        out, cand_tokens, pose_token_out, key = self._predict(inp, state, False, want_attention, intermediates,
                                                              token_attention, heads == "minimal")
        has_img = inp.img is not None
        cand_mem = None
        if has_img or intermediates:
            with self._stage("memory"):
                cand_mem = self.pose_retriever.write(state.mem.to(key.dtype), key, pose_token_out)
            if intermediates:
                out.intermediates.update(new_mem=cand_mem, new_state=cand_tokens)
        write = torch.full((inp.batch_size,), has_img, dtype=torch.bool, device=cand_tokens.device)
        if inp.update is not None:
            write = write & inp.update.to(device=write.device, dtype=torch.bool)
        weights = rule.token_weights(out.state_attention, state.fresh) if has_img else None
        reset = None if inp.reset is None else inp.reset.to(device=write.device, dtype=torch.bool)
        new_state = advance_state(state, cand_tokens, cand_mem if has_img else None, write, reset, weights,
                                  rule.restart_on_reset)
        return out, new_state

    forward = step

    def query_raymap(self, ray_map: Tensor, state: StreamState, intermediates: bool = False) -> StepOutput:
        """Predict what a virtual camera would see, given the current state; the state is untouched.

        Args:
            ray_map: ``(B, H, W, 6)`` raymap of the virtual camera in the model's world frame
                (:func:`streamrecon.geometry.camera.raymap`).
            state: the streams' current state.

        Returns:
            :class:`StepOutput`: ``points_cam`` is the geometry seen from the query camera,
            ``rgb`` its predicted colours, ``pose`` the model's own estimate of the query pose.
            The pose query always comes from LocalMemory (never the learned pose token).
        """
        inp = FrameInput(ray_map=ray_map)
        if inp.batch_size != state.batch_size:
            raise ValueError(f"raymap batch {inp.batch_size} != state batch {state.batch_size}")
        out, *_ = self._predict(inp, state, True, False, intermediates)
        return out

    def run_sequence(self, views: Iterable[FrameInput], state: Optional[StreamState] = None,
                     rule: UpdateRule = CUT3R_RULE) -> tuple[list[StepOutput], StreamState]:
        """Loop :meth:`step` over ``views`` (a convenience for offline use and tests)."""
        outputs = []
        for inp in views:
            if state is None:
                state = self.init_state(inp.batch_size)
            out, state = self.step(inp, state, rule)
            outputs.append(out)
        if state is None:
            raise ValueError("run_sequence needs at least one view")
        return outputs, state
