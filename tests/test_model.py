"""The streaming step: batching, raymap queries, update/reset semantics, constant memory."""

from __future__ import annotations

import gc
import warnings

import pytest
import torch

from streamrecon.geometry import pose_encoding_to_matrix, pseudo_intrinsics, raymap
from streamrecon.models import Cut3r, UpdateRule
from streamrecon.types import FrameInput, StreamState

from .conftest import tiny_config

H, W = 32, 48


def _img(seed, b=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, H, W, generator=g) * 2 - 1


def _ray(b=1, shift=0.1):
    T = pose_encoding_to_matrix(torch.tensor([[shift, 0.0, 0.1, 1.0, 0.05, 0.0, 0.0]] * b))
    return raymap(T, pseudo_intrinsics(H, W)[None].expand(b, 3, 3), H, W)


def _close(a, b, tol=1e-5):
    return torch.allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("head", ["dpt", "linear"])
def test_output_shapes_and_ranges(head):
    torch.manual_seed(0)
    model = Cut3r(tiny_config(head)).eval()
    with torch.no_grad():
        out, state = model.step(FrameInput(img=_img(0, 2)), model.init_state(2))
    assert out.points_cam.shape == (2, H, W, 3) and out.points_world.shape == (2, H, W, 3)
    assert out.conf_cam.shape == (2, H, W) and (out.conf_cam > 1).all() and (out.conf_world > 1).all()
    assert out.rgb.shape == (2, H, W, 3) and out.rgb.abs().max() < 1
    assert out.pose.shape == (2, 7) and (out.pose[:, 3] >= 0).all()
    assert torch.allclose(out.pose[:, 3:].norm(dim=-1), torch.ones(2))
    T = out.T_wc()
    assert torch.allclose(T[:, :3, :3] @ T[:, :3, :3].transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-5)
    assert state.tokens.shape == (2, 12, 32) and state.mem.shape == (2, 8, 64) and not state.fresh.any()
    if head == "linear":
        assert (out.points_cam[..., 2] >= 0).all()  # pos_z


def test_batched_streams_equal_one_by_one(tiny_model):
    """Three streams with different histories and flags, stepped together == stepped alone."""
    model = tiny_model
    states = []
    with torch.no_grad():
        for n in (0, 1, 3):  # different history lengths
            s = model.init_state(1)
            for t in range(n):
                _, s = model.step(FrameInput(img=_img(100 + 10 * n + t)), s)
            states.append(s)
        update, reset = torch.tensor([True, False, True]), torch.tensor([False, False, True])
        imgs = torch.cat([_img(i) for i in range(3)])
        batched_out, batched_state = model.step(FrameInput(img=imgs, update=update, reset=reset),
                                                StreamState.stack(states))
        for i in range(3):
            o, s = model.step(FrameInput(img=imgs[i:i + 1], update=update[i:i + 1], reset=reset[i:i + 1]), states[i])
            for name in ("points_cam", "points_world", "conf_cam", "conf_world", "pose", "rgb"):
                assert _close(getattr(batched_out, name)[i:i + 1], getattr(o, name)), (i, name)
            split = batched_state.split()[i]
            assert _close(split.tokens, s.tokens) and _close(split.mem, s.mem) and torch.equal(split.fresh, s.fresh)


def test_raymap_query_leaves_the_state_alone(tiny_model):
    model = tiny_model
    with torch.no_grad():
        _, state = model.step(FrameInput(img=_img(0)), model.init_state())
        _, state = model.step(FrameInput(img=_img(1)), state)
        before = [t.clone() for t in (state.tokens, state.mem, state.fresh)]
        q1 = model.query_raymap(_ray(), state)
        q2 = model.query_raymap(_ray(), state)
        assert all(torch.equal(a, b) for a, b in zip(before, (state.tokens, state.mem, state.fresh)))
        assert torch.equal(q1.points_cam, q2.points_cam) and q1.rgb.shape == (1, H, W, 3)
        # a raymap-only step predicts the same as the query and changes nothing either
        o, s2 = model.step(FrameInput(ray_map=_ray()), state)
        assert _close(o.points_cam, q1.points_cam) and torch.equal(s2.tokens, state.tokens)
        assert torch.equal(s2.mem, state.mem)


def test_update_false_and_reset_semantics(tiny_model):
    model = tiny_model
    with torch.no_grad():
        s0 = model.init_state()
        _, s1 = model.step(FrameInput(img=_img(0)), s0)
        _, s_noupd = model.step(FrameInput(img=_img(1), update=torch.tensor([False])), s1)
        assert torch.equal(s_noupd.tokens, s1.tokens) and torch.equal(s_noupd.mem, s1.mem)
        # reset: this frame's outputs use the old state, the state after is the initial one
        o_reset, s_reset = model.step(FrameInput(img=_img(1), reset=torch.tensor([True])), s1)
        o_plain, _ = model.step(FrameInput(img=_img(1)), s1)
        assert torch.equal(o_reset.points_cam, o_plain.points_cam)
        assert torch.equal(s_reset.tokens, s0.tokens.expand_as(s_reset.tokens))
        assert torch.equal(s_reset.mem, s0.mem) and not s_reset.fresh.any()
        # CUT3R: the frame after a reset reads the (initial) memory, not the pose token
        o_after, _ = model.step(FrameInput(img=_img(2)), s_reset, intermediates=True)
        o_first, _ = model.step(FrameInput(img=_img(2)), s0, intermediates=True)
        assert not torch.equal(o_after.intermediates["pose_in"], o_first.intermediates["pose_in"])
        assert torch.equal(o_first.intermediates["pose_in"], model.pose_token)
        # a rule that restarts on reset makes the next frame a true first frame
        restart = UpdateRule(name="restart", restart_on_reset=True)
        _, s_r = model.step(FrameInput(img=_img(1), reset=torch.tensor([True])), s1, rule=restart)
        assert s_r.fresh.all()
        o_r, _ = model.step(FrameInput(img=_img(2)), s_r, rule=restart)
        assert torch.equal(o_r.points_world, o_first.points_world)


def test_sequence_is_a_loop_over_step(tiny_model):
    views = [FrameInput(img=_img(i)) for i in range(4)]
    with torch.no_grad():
        outs, last = tiny_model.run_sequence(views)
        s = tiny_model.init_state()
        for v, o in zip(views, outs):
            o2, s = tiny_model.step(v, s)
            assert torch.equal(o.points_world, o2.points_world)
    assert torch.equal(last.tokens, s.tokens)


def test_gradients_flow_for_training(tiny_model):
    tiny_model.train()
    out, state = tiny_model.step(FrameInput(img=_img(0)), tiny_model.init_state())
    out2, _ = tiny_model.step(FrameInput(img=_img(1)), state)
    (out2.points_world.mean() + out2.pose.sum()).backward()
    assert tiny_model.register_tokens.weight.grad is not None  # through the carried state
    assert tiny_model.pose_token.grad is not None and tiny_model.pose_retriever.mem.grad is not None


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="image, a raymap"):
        FrameInput()
    with pytest.raises(ValueError, match=r"img must be \(B, 3, H, W\)"):
        FrameInput(img=torch.zeros(1, 4, 32, 32))
    model = Cut3r(tiny_config())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model.step(FrameInput(img=torch.zeros(1, 3, 30, 32)), model.init_state())
    with pytest.raises(ValueError, match="batch"):
        model.step(FrameInput(img=torch.zeros(2, 3, 32, 32)), model.init_state(1))


def _live_tensor_bytes():
    gc.collect()
    total = count = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch aliases warns
        for obj in gc.get_objects():
            try:
                if isinstance(obj, torch.Tensor):
                    total += obj.untyped_storage().nbytes()
                    count += 1
            except Exception:  # some objects refuse inspection
                pass
    return count, total


def test_constant_memory_over_300_steps(tiny_model):
    model = tiny_model
    state = model.init_state()
    checkpoints = {}
    with torch.inference_mode():
        for t in range(300):
            img = _img(t % 7)
            inp = FrameInput(img=img, reset=torch.tensor([t % 97 == 96]))
            _, state = model.step(inp, state)
            if t % 50 == 0 and t % 7 == 0:
                _ = model.query_raymap(_ray(), state)
            if t in (20, 299):
                del inp, img
                checkpoints[t] = (state.nbytes(), len(model._rope_cache), _live_tensor_bytes(),
                                  sum(p.numel() for p in model.parameters()))
    early, late = checkpoints[20], checkpoints[299]
    assert early[0] == late[0], "state size grew"
    assert early[1] == late[1], "RoPE cache grew"
    assert early[3] == late[3]
    assert late[2][0] <= early[2][0] and late[2][1] <= early[2][1], f"live tensors grew: {early[2]} -> {late[2]}"


@pytest.mark.parametrize("head", ["dpt", "linear"])
def test_minimal_heads_compute_the_same_pose_pointmap_and_state(head):
    """--heads minimal skips the world-frame and colour heads; everything it computes is identical."""
    from streamrecon.models import Cut3r
    from streamrecon.types import FrameInput

    from .conftest import tiny_config

    torch.manual_seed(0)
    model = Cut3r(tiny_config(head)).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    st = model.init_state(2)
    with torch.inference_mode():
        full, s_full = model.step(FrameInput(img=x), st)
        full2, _ = model.step(FrameInput(img=x), s_full)
        mini, s_mini = model.step(FrameInput(img=x), st, heads="minimal")
        mini2, _ = model.step(FrameInput(img=x), s_mini, heads="minimal")
    for a, b in ((full, mini), (full2, mini2)):
        for name in ("points_cam", "conf_cam", "pose"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert b.points_world is None and b.conf_world is None and b.rgb is None
        assert a.points_world is not None
    assert torch.equal(s_full.tokens, s_mini.tokens) and torch.equal(s_full.mem, s_mini.mem)
    with pytest.raises(ValueError, match="heads"):
        model.step(FrameInput(img=x), st, heads="some")
