"""Fixed-shape stepping: batch buckets (padding), graph replay of the step, ``torch.compile`` of the
encoder, and their settings.

CUDA graphs themselves need a GPU (``tools/gpu_checks.py`` measures them there). Here the replay
machinery -- static buffers, one capture per shape, copies out, padding rows dropped -- runs on the
CPU with a stand-in backend whose "graph" runs the captured function again and writes the results
into the captured output tensors, as a CUDA graph's replay writes into its own memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from streamrecon.engine import EngineConfig, StreamEngine
from streamrecon.engine.engine import process_batch
from streamrecon.engine.graphs import StepGraphs, bucket_for, graphs_for, pad_rows
from streamrecon.frames import Frame
from streamrecon.settings import EngineSettings, SettingsError


class ReplayInPlace:
    """A CPU stand-in for ``torch.cuda.graph``: capture runs ``fn`` once and keeps its outputs; replay
    runs ``fn`` again (reading the same static inputs) and copies into those same output tensors."""

    def __init__(self) -> None:
        self.captured, self.replayed = 0, 0

    def capture(self, fn):
        self.captured += 1
        return fn, fn()

    def replay(self, fn) -> None:
        self.replayed += 1
        # the graph's outputs live where capture put them: write the new values there
        self._copy_into(self._outputs_of[id(fn)], fn())

    def _copy_into(self, dst, src) -> None:
        if isinstance(dst, torch.Tensor):
            dst.copy_(src)
        elif isinstance(dst, dict):
            for k in dst:
                self._copy_into(dst[k], src[k])
        elif isinstance(dst, (list, tuple)):
            for a, b in zip(dst, src):
                self._copy_into(a, b)
        elif dataclasses.is_dataclass(dst):
            for f in dataclasses.fields(dst):
                self._copy_into(getattr(dst, f.name), getattr(src, f.name))


class RecordingGraphs(StepGraphs):
    """StepGraphs whose backend learns where each capture's outputs are (for :class:`ReplayInPlace`)."""

    def _capture(self, *args):
        c = super()._capture(*args)
        self.backend._outputs_of = getattr(self.backend, "_outputs_of", {})
        self.backend._outputs_of[id(c.graph)] = c.outputs
        return c


def _frames(n: int, seed: int = 0, hw=(48, 64)) -> list[Frame]:
    rng = np.random.default_rng(seed)
    return [Frame(image=rng.integers(0, 256, (*hw, 3), dtype=np.uint8), seq=i, stamp=i / 10, source=f"s{seed}")
            for i in range(n)]


def test_buckets_and_padding_rows():
    assert [bucket_for(n, (1, 2, 4, 8)) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 9]
    assert bucket_for(3, ()) == 3
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    from streamrecon.types import StreamState

    st = StreamState(tokens=torch.rand(2, 5, 3), mem=torch.rand(2, 4, 6), init_tokens=torch.rand(1, 5, 3),
                     init_mem=torch.rand(1, 4, 6), fresh=torch.tensor([True, False]))
    px, ps = pad_rows(x, st, 4)
    assert px.shape[0] == 4 and ps.batch_size == 4
    assert torch.equal(px[:2], x) and torch.equal(px[2], x[1]) and torch.equal(px[3], x[1])
    assert torch.equal(ps.tokens[3], st.tokens[1]) and ps.fresh.tolist() == [True, False, False, False]
    assert pad_rows(x, st, 2)[0] is x


def test_a_batch_padded_to_its_bucket_gives_the_unpadded_results(tiny_model, monkeypatch):
    seen: list[int] = []  # the batch sizes the model is stepped with
    step = tiny_model.step

    def recording_step(inp, state, **kw):
        seen.append(inp.img.shape[0])
        return step(inp, state, **kw)

    monkeypatch.setattr(tiny_model, "step", recording_step)
    streams = [_frames(3, seed=k) for k in range(3)]
    plain = [StreamEngine(tiny_model, EngineConfig(size=64)) for _ in range(3)]
    padded = [StreamEngine(tiny_model, EngineConfig(size=64, batch_buckets=(1, 4))) for _ in range(3)]
    for i in range(3):
        a = process_batch(plain, [s[i] for s in streams])
        b = process_batch(padded, [s[i] for s in streams])
        assert len(b) == 3 and not any(isinstance(r, Exception) for r in a + b)
        for ra, rb in zip(a, b):
            assert np.allclose(ra.T_wc, rb.T_wc, atol=1e-4) and np.allclose(ra.points_cam, rb.points_cam, atol=1e-4)
    assert seen == [3, 4] * 3  # unpadded, then padded to the bucket of 4
    for ea, eb in zip(plain, padded):  # each stream's own state, one row, the same
        assert eb.state.batch_size == 1 and torch.allclose(ea.state.tokens, eb.state.tokens, atol=1e-4)
    # one stream alone with buckets (2, 4): padded to 2, its result and state are row 0
    solo, ref = StreamEngine(tiny_model, EngineConfig(size=64, batch_buckets=(2, 4))), StreamEngine(tiny_model,
                                                                                                    EngineConfig(size=64))
    for f in _frames(2, seed=7):
        rs, rr = solo.process(f), ref.process(f)
        assert np.allclose(rs.T_wc, rr.T_wc, atol=1e-4)
    assert solo.state.batch_size == 1 and torch.allclose(solo.state.mem, ref.state.mem, atol=1e-4)
    assert seen[-4:] == [2, 1, 2, 1]


def test_graph_replay_equals_eager_stepping_with_one_capture_per_shape(tiny_model):
    backend = ReplayInPlace()
    graphs = RecordingGraphs(tiny_model, backend)
    object.__setattr__(tiny_model, "_step_graphs", graphs)  # what graphs_for finds for this model
    assert graphs_for(tiny_model) is graphs
    cfg = EngineConfig(size=64, cuda_graphs=True)  # buckets 1, 2, 4, 8
    eager_cfg = EngineConfig(size=64)
    solo, solo_ref = StreamEngine(tiny_model, cfg), StreamEngine(tiny_model, eager_cfg)
    trio = [StreamEngine(tiny_model, cfg) for _ in range(3)]
    trio_ref = [StreamEngine(tiny_model, eager_cfg) for _ in range(3)]
    first = kept = None
    for i, f in enumerate(_frames(4, seed=11)):
        if i == 2:  # a state kept by someone (a probe, a snapshot) must survive the next replay
            kept = (solo.state, solo.state.tokens.clone(), solo.state.mem.clone())
        r, e = solo.process(f), solo_ref.process(f)
        assert np.allclose(r.T_wc, e.T_wc, atol=1e-5) and np.allclose(r.points_cam, e.points_cam, atol=1e-5), i
        if first is None:
            first, first_pts = r, r.points_cam.copy()
    streams = [_frames(3, seed=20 + k) for k in range(3)]
    for i in range(3):  # three streams go in the bucket of 4
        got = process_batch(trio, [s[i] for s in streams])
        ref = process_batch(trio_ref, [s[i] for s in streams])
        for a, b in zip(got, ref):
            assert np.allclose(a.T_wc, b.T_wc, atol=1e-4) and np.allclose(a.conf_cam, b.conf_cam, atol=1e-4)
    assert np.array_equal(first.points_cam, first_pts)  # later replays did not write into an earlier result
    assert torch.equal(kept[0].tokens, kept[1]) and torch.equal(kept[0].mem, kept[2])
    # one capture for batch 1 (the solo stream's shape) and one for batch 4; every other step a replay
    assert backend.captured == 2 and graphs.stats()["graphs"] == 2 and graphs.stats()["batches"] == [1, 4]
    assert backend.replayed == 4 + 3 and graphs.stats()["replays"] == 7
    assert all(e.state.batch_size == 1 for e in trio)


def test_without_cuda_the_graph_setting_steps_eagerly(tiny_model):
    assert graphs_for(tiny_model) is None  # CPU, nothing registered: no graphs
    eng, ref = StreamEngine(tiny_model, EngineConfig(size=64, cuda_graphs=True)), StreamEngine(tiny_model,
                                                                                               EngineConfig(size=64))
    for f in _frames(2, seed=3):
        assert np.allclose(eng.process(f).T_wc, ref.process(f).T_wc, atol=1e-6)
    assert getattr(tiny_model, "_step_graphs", None) is None


def test_compiled_encoder_gives_the_same_results(tiny_model):
    from streamrecon.engine.compiled import compile_encoder

    ref = StreamEngine(tiny_model, EngineConfig(size=64))
    frames = _frames(2, seed=5)
    before = [ref.process(f).T_wc for f in frames]
    keys = list(tiny_model.state_dict())
    assert compile_encoder(tiny_model, backend="eager") == len(tiny_model.enc_blocks)
    assert compile_encoder(tiny_model, backend="eager") == 0  # once per model
    assert all(b._compiled_call_impl is not None for b in tiny_model.enc_blocks)
    assert list(tiny_model.state_dict()) == keys  # compiled in place: checkpoints and fingerprints unchanged
    eng = StreamEngine(tiny_model, EngineConfig(size=64))
    after = [eng.process(f).T_wc for f in frames]
    assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(before, after))


def test_bucket_settings_are_checked():
    assert EngineSettings(batch_buckets="4, 1,2").buckets() == (1, 2, 4)
    assert EngineSettings().buckets() == ()
    for bad in ("0,2", "two", "1,,x"):
        with pytest.raises(SettingsError, match="--batch-buckets must be whole numbers"):
            EngineSettings(batch_buckets=bad).validate()
    with pytest.raises(ValueError, match="batch_buckets must be whole numbers"):
        EngineConfig(batch_buckets=(0,))
    assert EngineConfig(cuda_graphs=True).buckets == (1, 2, 4, 8) and EngineConfig(batch_buckets=(3,)).buckets == (3,)


def test_a_shape_that_cannot_be_captured_steps_eagerly(tiny_model, caplog):
    class Refuses:
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay(self, graph):  # never reached
            raise AssertionError("no graph to replay")

    graphs = graphs_for(tiny_model, Refuses())
    eng, ref = StreamEngine(tiny_model, EngineConfig(size=64, cuda_graphs=True)), StreamEngine(tiny_model,
                                                                                               EngineConfig(size=64))
    for f in _frames(3, seed=9):
        assert np.allclose(eng.process(f).T_wc, ref.process(f).T_wc, atol=1e-6)
    assert graphs.stats() == {"graphs": 0, "replays": 0, "batches": [], "failed": 1, "capture_failures": 3,
                              "evicted": 0}  # tried on three frames, then eager for good
    assert "cannot capture the step for batch 1 at 48x64" in caplog.text and "from now on" in caplog.text
    eng.process(_frames(1, seed=4)[0])
    assert graphs.stats()["capture_failures"] == 3  # not tried again


def test_the_least_recently_used_graph_goes_beyond_the_cap(tiny_model):
    backend = ReplayInPlace()
    graphs = RecordingGraphs(tiny_model, backend, max_graphs=1)
    object.__setattr__(tiny_model, "_step_graphs", graphs)
    wide, tall = StreamEngine(tiny_model, EngineConfig(size=64, cuda_graphs=True)), StreamEngine(
        tiny_model, EngineConfig(size=64, cuda_graphs=True))
    refs = StreamEngine(tiny_model, EngineConfig(size=64)), StreamEngine(tiny_model, EngineConfig(size=64))
    for i in range(2):  # two shapes in turn, room for one graph
        for eng, ref, hw in ((wide, refs[0], (48, 64)), (tall, refs[1], (64, 48))):
            f = _frames(1, seed=30 + i, hw=hw)[0]
            assert np.allclose(eng.process(f).T_wc, ref.process(f).T_wc, atol=1e-5)
    st = graphs.stats()
    assert st["graphs"] == 1 and backend.captured == 4 and st["evicted"] == 3
