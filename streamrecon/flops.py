"""Analytic FLOP count of one streaming step (an image view), by stage.

Counts multiply-adds as 2 FLOPs for every matrix product, attention product and convolution; norms,
activations and element-wise work are ignored (they are a few percent). ``tests/test_bench.py``
checks the total against PyTorch's ``FlopCounterMode``.
"""

from __future__ import annotations

from .config import ModelConfig

__all__ = ["step_flops"]


def _block(n: int, d: int, mlp: float) -> float:
    """Self-attention block on ``n`` tokens of width ``d``."""
    return 2 * n * (4 + 2 * mlp) * d * d + 4 * n * n * d


def _decoder_block(nx: int, ny: int, d: int, mlp: float) -> float:
    """DecoderBlock: ``nx`` query tokens reading ``ny`` tokens."""
    linear = 2 * ((4 + 1 + 1 + 2 * mlp) * d * d * nx + 2 * d * d * ny)
    return linear + 4 * nx * nx * d + 4 * nx * ny * d


def _conv(cin: int, cout: int, k: int, h: int, w: int) -> float:
    return 2.0 * cin * cout * k * k * h * w


def _dpt(cfg: ModelConfig, hp: int, wp: int, out_ch: int) -> float:
    ed, dd, f, last = cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.dpt_feature_dim, cfg.dpt_last_dim
    d0, d1, d2, d3 = cfg.dpt_layer_dims
    h4, w4 = -(-hp // 2), -(-wp // 2)
    total = _conv(ed, d0, 1, hp, wp) + _conv(d0, d0, 4, hp, wp)  # convT k4 s4: per input pixel
    total += _conv(dd, d1, 1, hp, wp) + _conv(d1, d1, 2, hp, wp)
    total += _conv(dd, d2, 1, hp, wp)
    total += _conv(dd, d3, 1, hp, wp) + _conv(d3, d3, 3, h4, w4)
    sizes = [(4 * hp, 4 * wp), (2 * hp, 2 * wp), (hp, wp), (h4, w4)]
    total += sum(_conv(c, f, 3, h, w) for c, (h, w) in zip((d0, d1, d2, d3), sizes))
    rcu = lambda h, w: 2 * _conv(f, f, 3, h, w)  # noqa: E731
    # refinenet4 (one RCU) on the 1/32 map; refinenets 3..1 (two RCUs) on 1/16, 1/8, 1/4; out_conv after x2
    total += rcu(h4, w4) + _conv(f, f, 1, 2 * h4, 2 * w4)
    for h, w in ((hp, wp), (2 * hp, 2 * wp), (4 * hp, 4 * wp)):
        total += 2 * rcu(h, w) + _conv(f, f, 1, 2 * h, 2 * w)
    H, W = 16 * hp, 16 * wp
    total += _conv(f, f // 2, 3, H // 2, W // 2) + _conv(f // 2, last, 3, H, W) + _conv(last, out_ch, 1, H, W)
    return total


def step_flops(cfg: ModelConfig, h: int, w: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one image step at ``h x w`` for ``batch`` streams, per stage and ``total``."""
    p = cfg.patch_size
    hp, wp = h // p, w // p
    n = hp * wp
    ed, dd, mlp = cfg.enc_embed_dim, cfg.dec_embed_dim, cfg.mlp_ratio
    S, M, C = cfg.state_size, cfg.local_mem_size, 2 * cfg.dec_embed_dim
    enc = 2 * n * 3 * p * p * ed + cfg.enc_depth * _block(n, ed, mlp)
    memory = 2 * ed * dd + 2 * _decoder_block(1, M, C, 4.0) + 2 * _decoder_block(M, 1, C, 4.0)  # key, read, write
    dec = 2 * n * ed * dd + cfg.dec_depth * (_decoder_block(S, 1 + n, dd, mlp) + _decoder_block(1 + n, S, dd, mlp))
    heads = 2 * (2 * dd * 4 * dd + 2 * 4 * dd * 7)  # pose MLP
    heads += 2 * (_block(n, dd, 4.0) + 2 * 2 * dd * 2 * dd)  # two modulation blocks (+ their modulation MLPs)
    if cfg.head_type == "linear":
        outs = [4, 4] + ([3] if cfg.rgb_head else [])
        heads += sum(2 * n * (dd * 4 * dd + 4 * dd * c * p * p) for c in outs)
    else:
        outs = [4, 4] + ([3] if cfg.rgb_head else [])
        heads += sum(_dpt(cfg, hp, wp, c) for c in outs)
    stages = {"encoder": enc, "decoders": dec, "memory": memory, "heads": heads}
    stages = {k: v * batch for k, v in stages.items()}
    stages["total"] = sum(stages.values())
    return stages
