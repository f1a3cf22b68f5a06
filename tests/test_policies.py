"""State policies: TTT3R against the fork's golden vectors, its semantics, and --reset-every chaining."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrecon.checkpoint import load_model
from streamrecon.engine import TTT3R_RULE, EngineConfig, Frame, StreamEngine, get_policy
from streamrecon.geometry import pose_encoding_to_matrix
from streamrecon.models import CUT3R_RULE, Cut3r
from streamrecon.parity import normalised_error
from streamrecon.types import FrameInput

from .conftest import tiny_config
from .stub_model import StubModel


@pytest.fixture(scope="module")
def ttt3r(shared):
    z = dict(np.load(shared / "golden" / "policies" / "ttt3r_tiny_dpt" / "vectors.npz"))
    return z, load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")


@pytest.mark.parametrize("run", ["stream", "noreset"])
def test_ttt3r_rule_matches_the_fork(ttt3r, run):
    z, model = ttt3r
    state, checked = model.init_state(), 0
    with torch.inference_mode():
        for i in range(8):
            reset_key = f"in.reset.{i}" if run == "stream" else f"noreset.reset.{i}"
            reset = torch.from_numpy(np.asarray(z[reset_key]).astype(bool).reshape(-1))
            assert normalised_error(state.tokens.numpy(), z[f"{run}.state.{i}"]) <= 1e-4, f"state {i}"
            assert normalised_error(state.mem.numpy(), z[f"{run}.mem.{i}"]) <= 1e-4, f"mem {i}"
            out, new_state = model.step(FrameInput(img=torch.from_numpy(z[f"in.img.{i}"]), reset=reset), state,
                                        rule=TTT3R_RULE, intermediates=True)
            w = TTT3R_RULE.token_weights(out.state_attention, state.fresh)
            assert np.abs(w.numpy() - z[f"{run}.ttt3r_weight.{i}"]).max() <= 1e-4, f"weight {i}"
            assert np.abs(out.state_attention.numpy() - z[f"{run}.ttt3r_logit_mean.{i}"]).max() <= 1e-4
            assert normalised_error(out.intermediates["new_state"].numpy(), z[f"{run}.new_state.{i}"]) <= 1e-4
            for ref, ours in (("pts3d_in_self_view", "points_cam"), ("camera_pose", "pose"),
                              ("pts3d_in_other_view", "points_world"), ("conf_self", "conf_cam")):
                assert normalised_error(getattr(out, ours).numpy(), z[f"{run}.{ref}.{i}"]) <= 1e-4, (ref, i)
                checked += 1
            state = new_state
        assert normalised_error(state.tokens.numpy(), z[f"{run}.state.8"]) <= 1e-4
    assert checked == 32
    applied = [int(np.asarray(z[f"{run}.ttt3r_applied.{i}"]).reshape(-1)[0]) for i in range(8)]
    assert applied == ([0, 1, 1, 1, 0, 1, 1, 1] if run == "stream" else [0] + [1] * 7)


def test_reset_every_matches_the_fork_demo(ttt3r):
    z, model = ttt3r
    engine = StreamEngine(model, EngineConfig(size=64, policy="ttt3r", reset_every=int(z["demo.reset_interval"][0])))
    results = [engine.process(Frame(image=z[f"in.img_u8.{i}"], seq=i, stamp=i / 30)) for i in range(8)]
    assert normalised_error(np.stack([r.T_wc for r in results]), z["demo.c2w"]) <= 1e-4
    assert normalised_error(np.stack([r.points_world_pose for r in results]), z["demo.pts3d_world"]) <= 1e-4
    assert normalised_error(np.stack([r.conf_cam for r in results]), z["demo.conf"]) <= 1e-4
    assert [r.segment for r in results] == [0, 0, 0, 1, 1, 1, 2, 2]


def test_ttt3r_semantics_on_a_tiny_model():
    torch.manual_seed(0)
    model = Cut3r(tiny_config()).eval()
    imgs = [torch.rand(1, 3, 32, 32) * 2 - 1 for _ in range(3)]
    with torch.no_grad():
        s0 = model.init_state()
        o0, s1 = model.step(FrameInput(img=imgs[0]), s0, rule=TTT3R_RULE, intermediates=True)
        assert torch.equal(s1.tokens, o0.intermediates["new_state"])  # first frame: full update
        o1, s2 = model.step(FrameInput(img=imgs[1]), s1, rule=TTT3R_RULE, intermediates=True)
        w = torch.sigmoid(o1.state_attention)[0, :, None]
        assert torch.allclose(s2.tokens[0], w * o1.intermediates["new_state"][0] + (1 - w) * s1.tokens[0], atol=1e-6)
        assert torch.equal(s2.mem, o1.intermediates["new_mem"])  # memory: plain update
        assert ((w > 0) & (w < 1)).all()
        # outputs do not depend on the rule, only the carried state does
        o1c, s2c = model.step(FrameInput(img=imgs[1]), s1, rule=CUT3R_RULE)
        assert torch.equal(o1c.points_world, o1.points_world) and not torch.equal(s2c.tokens, s2.tokens)
        # update=False: no write at all
        _, s_no = model.step(FrameInput(img=imgs[2], update=torch.tensor([False])), s2, rule=TTT3R_RULE)
        assert torch.equal(s_no.tokens, s2.tokens)
        # reset restarts: the next frame is a first frame again
        _, s_r = model.step(FrameInput(img=imgs[2], reset=torch.tensor([True])), s2, rule=TTT3R_RULE)
        assert s_r.fresh.all() and torch.equal(s_r.tokens, s0.tokens)
    with pytest.raises(ValueError, match="unknown state policy"):
        get_policy("bogus")


def _T(yaw_deg: float, t) -> torch.Tensor:
    a = math.radians(yaw_deg)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    T[:3, 3] = torch.tensor(t, dtype=torch.float64)
    return T


def test_pose_chaining_across_resets_with_controlled_poses():
    # segment-local poses returned by successive model steps (re-fed frames included)
    local = [_T(10 * i, [0.1 * i, 0.0, 0.2]) for i in range(12)]
    stub = StubModel(local)
    engine = StreamEngine(stub, EngineConfig(size=32, reset_every=2))
    frames = [Frame(image=np.full((32, 32, 3), 10 * k, np.uint8), seq=k, stamp=float(k)) for k in range(5)]
    results = [engine.process(f) for f in frames]
    # step calls: f0, f1(reset), f1 again (new segment, dropped), f2, f3(reset), f3 again, f4
    assert len(stub.step_inputs) == 7
    assert torch.equal(stub.step_inputs[1], stub.step_inputs[2]) and torch.equal(stub.step_inputs[4], stub.step_inputs[5])
    assert stub.fresh_at_step == [True, False, True, False, False, True, False]
    P = [t.numpy() for t in local]
    B1 = P[1]  # segment 1 is anchored at frame 1's pose in segment 0
    B2 = B1 @ P[4]  # segment 2 at frame 3's pose (step 4) chained
    expected = [P[0], P[1], B1 @ P[3], B1 @ P[4], B2 @ P[6]]
    for r, e in zip(results, expected):
        assert np.allclose(r.T_wc, e, atol=1e-5)
    assert [r.segment for r in results] == [0, 0, 1, 1, 2]
    # world points follow the chained pose; the world head is chained by the segment base
    r = results[4]
    assert np.allclose(r.points_world_pose, r.points_cam @ r.T_wc[:3, :3].T + r.T_wc[:3, 3], atol=1e-5)
    assert np.allclose(r.points_world_head, r.points_cam @ B2[:3, :3].T + B2[:3, 3], atol=1e-5)


def test_probe_pose_is_expressed_in_the_current_segment():
    local = [_T(15 * i, [0.3 * i, 0.1, 0.0]) for i in range(6)]
    stub = StubModel(local)
    engine = StreamEngine(stub, EngineConfig(size=32, reset_every=2))
    for k in range(3):
        engine.process(Frame(image=np.zeros((32, 32, 3), np.uint8), seq=k, stamp=float(k)))
    T_global = _T(30, [1.0, 0.5, -2.0]).numpy()
    state_before = engine.state
    probe = engine.probe(T_global)  # K and size default to the latest estimate
    ray = stub.queries[-1][0].double().numpy()
    T_seg = np.linalg.inv(engine.base) @ T_global
    assert np.allclose(ray[0, 0, :3], T_seg[:3, 3], atol=1e-5)  # raymap origin = camera centre in segment frame
    assert engine.state is state_before and probe.K.shape == (3, 3) and probe.points_cam.shape == (24, 32, 3)
    assert np.allclose(probe.K, engine.last_K)
    assert np.allclose(probe.points_world, probe.points_cam @ T_global[:3, :3].T + T_global[:3, 3], atol=1e-5)


def test_engine_probe_does_not_change_the_real_models_state(shared):
    model = load_model(shared / "golden" / "tiny_dpt" / "checkpoint.pth")
    engine = StreamEngine(model, EngineConfig(size=64))
    rng = np.random.default_rng(0)
    for k in range(2):
        engine.process(Frame(image=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), seq=k, stamp=k))
    tokens = engine.state.tokens.clone()
    p1 = engine.probe(pose_encoding_to_matrix(torch.tensor([[0.1, 0, 0, 1, 0, 0, 0.0]]))[0].numpy())
    p2 = engine.probe(p1.T_wc)
    assert torch.equal(engine.state.tokens, tokens) and np.array_equal(p1.points_cam, p2.points_cam)
    assert p1.rgb.dtype == np.uint8 and p1.conf.min() > 1
