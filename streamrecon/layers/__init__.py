"""Reusable transformer layers (attention, RoPE, MLP, blocks, patch embedding)."""

from .attention import Attention, CrossAttention, fused_attn, set_fused_attn, use_fused_attn
from .blocks import Block, DecoderBlock, ModulationBlock
from .mlp import Mlp
from .onednn import linear, set_onednn_linear, use_onednn_linear
from .patch_embed import PatchEmbed
from .rope import RopeTables, apply_rope, grid_positions, rope_tables, state_positions

__all__ = [
    "Attention", "CrossAttention", "fused_attn", "set_fused_attn", "use_fused_attn",
    "Block", "DecoderBlock", "ModulationBlock", "Mlp", "PatchEmbed", "linear", "set_onednn_linear", "use_onednn_linear",
    "RopeTables", "apply_rope", "grid_positions", "rope_tables", "state_positions",
]
