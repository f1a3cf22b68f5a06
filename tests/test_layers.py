"""RoPE against its closed form (negative positions included); fused vs plain attention; oneDNN vs MKL linear."""

from __future__ import annotations

import math

import pytest
import torch

from streamrecon.layers import Attention, CrossAttention, DecoderBlock, fused_attn
from streamrecon.layers import onednn as linear_mod
from streamrecon.layers.rope import apply_rope, grid_positions, rope_tables, state_positions
from streamrecon.models import Cut3r
from streamrecon.types import FrameInput

from .conftest import tiny_config


def _rope_closed_form(x, pos, base=100.0):
    """Per-pair rotation, written literally in float64: x (B,h,N,D), pos (N,2)."""
    out = x.clone().double()
    d = x.shape[-1]
    q = d // 4
    for axis, start in ((0, 0), (1, d // 2)):  # rows rotate the first half, cols the second
        for j in range(q):
            theta = pos[:, axis].double() * base ** (-j / q)
            u, v = x[..., start + j].double(), x[..., start + j + q].double()
            out[..., start + j] = u * torch.cos(theta) - v * torch.sin(theta)
            out[..., start + j + q] = v * torch.cos(theta) + u * torch.sin(theta)
    return out


@pytest.mark.parametrize("head_dim", [8, 16, 48, 64])
def test_rope_matches_closed_form_with_negative_positions(head_dim):
    torch.manual_seed(0)
    pos = torch.cat([torch.tensor([[-1, -1], [-7, 3]]), grid_positions(3, 5)])
    x = torch.randn(2, 3, pos.shape[0], head_dim)
    got = apply_rope(x, rope_tables(pos, head_dim))
    assert torch.allclose(got.double(), _rope_closed_form(x, pos), atol=2e-5, rtol=1e-5)
    # a rotation: norms of each (u, v) pair are preserved
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)


def test_rope_relative_property():
    """q.k after RoPE depends only on the position difference (here along both axes)."""
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)

    def score(pq, pk):
        tq, tk = rope_tables(torch.tensor([pq]), 16), rope_tables(torch.tensor([pk]), 16)
        return (apply_rope(q, tq) * apply_rope(k, tk)).sum().item()

    assert math.isclose(score([2, 3], [0, 1]), score([-1, 5], [-3, 3]), rel_tol=1e-5)


def test_rope_rejects_bad_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_tables(grid_positions(2, 2), 6)


def test_state_positions():
    p = state_positions(768, "2d")
    assert p.shape == (768, 2) and p[:, 1].max() == 27 and p[:, 0].max() == 27  # width 28 (27 bumped to even)
    p = state_positions(27, "2d")
    assert p[:, 1].max() == 5 and p[-1].tolist() == [4, 2]
    assert state_positions(5, "1d").tolist() == [[i, i] for i in range(5)]
    assert state_positions(5, "none") is None


def test_fused_and_plain_attention_agree():
    torch.manual_seed(0)
    tables = rope_tables(grid_positions(3, 4), 16)
    attn, cross = Attention(64, 4, qk_fp16=True), CrossAttention(64, 4)
    x, y = torch.randn(2, 12, 64), torch.randn(2, 7, 64)
    with fused_attn(True):
        a1, (c1, m1) = attn(x, tables), cross(x, y, tables, None, logit_mean=True)
    with fused_attn(False):
        a2, (c2, m2) = attn(x, tables), cross(x, y, tables, None, logit_mean=True)
    assert torch.allclose(a1, a2, atol=1e-5) and torch.allclose(c1, c2, atol=1e-5) and torch.equal(m1, m2)


def test_cross_attention_logit_mean_is_mean_of_scaled_logits():
    torch.manual_seed(0)
    blk = DecoderBlock(32, 4)
    x, y = torch.randn(1, 5, 32), torch.randn(1, 9, 32)
    ca = blk.cross_attn
    _, mean_logits = ca(x, y, logit_mean=True)
    q = ca.projq(x).view(1, 5, 4, 8).transpose(1, 2)
    k = ca.projk(y).view(1, 9, 4, 8).transpose(1, 2)
    explicit = (q @ k.transpose(-1, -2) * 8**-0.5).mean(-1)
    assert torch.allclose(mean_logits, explicit, atol=1e-6)


def test_fused_and_plain_paths_agree_for_a_whole_step():
    torch.manual_seed(0)
    model = Cut3r(tiny_config()).eval()
    img = torch.rand(2, 3, 32, 48) * 2 - 1
    with torch.no_grad(), fused_attn(True):
        o1, s1 = model.step(FrameInput(img=img), model.init_state(2))
    with torch.no_grad(), fused_attn(False):
        o2, s2 = model.step(FrameInput(img=img), model.init_state(2))
    for a, b in ((o1.points_cam, o2.points_cam), (o1.pose, o2.pose), (s1.tokens, s2.tokens)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


# --- oneDNN linear (streamrecon.layers.linear) ---------------------------------------------------

def _big_linear(seed=0):
    """A layer above MIN_MACS for a (1, 196, 1024) input: 196 x 1024 x 1024 multiply-adds."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(1024, 1024)
    assert 196 * 1024 * 1024 >= linear_mod.MIN_MACS
    return layer.eval(), torch.randn(1, 196, 1024)


def test_onednn_linear_is_available_on_x86():
    """CI runs on x86-64: the fast path must be there (elsewhere it reports itself absent)."""
    import platform
    assert linear_mod.onednn_linear_available() == (platform.machine().lower() in ("x86_64", "amd64")
                                                    and torch.backends.mkldnn.is_available())


@pytest.mark.parametrize("gelu", [False, True])
def test_onednn_linear_equals_the_module_and_takes_the_path_only_in_inference(gelu):
    layer, x = _big_linear()
    want = torch.nn.functional.gelu(layer(x)) if gelu else layer(x)
    with torch.inference_mode():
        assert linear_mod._fast(layer, x) == linear_mod.onednn_linear_available()
        got = linear_mod.linear(layer, x, gelu=gelu)
        strided = linear_mod.linear(layer, torch.cat([x, x], -1)[..., ::2], gelu=gelu)  # non-contiguous input
        ref_strided = layer(torch.cat([x, x], -1)[..., ::2])
    assert got.shape == want.shape == (1, 196, 1024)
    assert torch.allclose(got, want.detach(), atol=2e-5, rtol=1e-5)
    assert torch.allclose(strided, torch.nn.functional.gelu(ref_strided) if gelu else ref_strided, atol=2e-5, rtol=1e-5)
    # with autograd on, the module itself runs (oneDNN's kernel has no backward): gradients are exact
    assert not linear_mod._fast(layer, x)
    xg = x.clone().requires_grad_(True)
    linear_mod.linear(layer, xg, gelu=gelu).sum().backward()
    xr = x.clone().requires_grad_(True)
    (torch.nn.functional.gelu(layer(xr)) if gelu else layer(xr)).sum().backward()
    assert torch.equal(xg.grad, xr.grad)


def test_onednn_linear_leaves_small_int8_autocast_and_switched_off_layers_to_the_module():
    layer, x = _big_linear()
    small = torch.nn.Linear(16, 16)
    q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(_big_linear()[0]), {torch.nn.Linear},
                                               dtype=torch.qint8)[0]
    with torch.inference_mode():
        assert not linear_mod._fast(small, torch.randn(4, 16))
        assert not linear_mod._fast(q, x)  # an int8 module: its own forward
        assert torch.equal(linear_mod.linear(q, x), q(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear_mod._fast(layer, x)
            assert linear_mod.linear(layer, x).dtype == torch.bfloat16  # autocast's cast is kept
        previous = linear_mod.set_onednn_linear(False)
        try:
            assert not linear_mod._fast(layer, x)
            assert torch.equal(linear_mod.linear(layer, x), layer(x))
        finally:
            linear_mod.set_onednn_linear(previous)


def test_onednn_and_mkl_paths_agree_for_full_width_blocks():
    """An encoder block and a decoder block at the official 224 widths (1024 / 768, 196 / 768 tokens):
    the oneDNN path is the same function to float32 rounding."""
    from streamrecon.layers import Block
    torch.manual_seed(1)
    enc = Block(1024, 16, qk_fp16=True).eval()
    dec = DecoderBlock(768, 12).eval()
    x, s, y = torch.randn(1, 196, 1024), torch.randn(1, 768, 768), torch.randn(1, 197, 768)
    pos = grid_positions(14, 14)
    rope_enc, rope_dec = rope_tables(pos, 64), rope_tables(state_positions(768, "2d"), 64)
    outs = {}
    with torch.inference_mode():
        for on in (False, True):
            previous = linear_mod.set_onednn_linear(on)
            try:
                outs[on] = (enc(x, rope_enc), dec(s, y, rope_dec, None)[0])
            finally:
                linear_mod.set_onednn_linear(previous)
    for a, b in zip(outs[False], outs[True]):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()
        assert not torch.equal(a, b) or not linear_mod.onednn_linear_available()  # the paths really differ
