"""Fixed-shape stepping for GPUs: batch-size buckets (``--batch-buckets``) and CUDA-graph replay of
``Cut3r.step`` (``--cuda-graphs``).

A server steps a varying number of streams together; every new batch size would be a new shape (a new
graph, a new autotuning, a new allocation). With buckets a batch of ``n`` is padded to the next bucket
``b >= n`` (the padding rows repeat the last stream; their outputs are dropped), so only a handful of
shapes ever occur. With CUDA graphs each ``(batch, height, width, rule, precision, heads)`` is captured
once -- the whole step, encoder to state update, as one graph launch -- and replayed: the inputs are
copied into the graph's own buffers, the outputs copied out of them (so no two results share memory).

The step is free of host synchronisation (``tools/gpu_checks.py`` checks it with
``torch.cuda.set_sync_debug_mode("error")``), which is what makes it capturable: nothing in it
branches on tensor values on the host. Frozen frames (``--revisit``'s second pass, an ``update`` mask)
and batches larger than every bucket run eagerly.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from ..types import FrameInput, StreamState

__all__ = ["bucket_for", "pad_rows", "StepGraphs", "CudaGraphBackend", "graphs_for", "DEFAULT_BUCKETS"]

_logger = logging.getLogger(__name__)
#: the buckets ``--cuda-graphs`` uses when ``--batch-buckets`` is not given
DEFAULT_BUCKETS = (1, 2, 4, 8)
#: graphs kept per model at most (the least recently used one goes, with its buffers)
MAX_GRAPHS = 16
#: failed captures of one shape before it steps eagerly for good
MAX_CAPTURE_FAILURES = 3


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= n`` (``n`` itself when there are no buckets or all are smaller)."""
    fit = [b for b in buckets if b >= n]
    return min(fit) if fit else n


def pad_rows(x: Tensor, state: StreamState, size: int) -> tuple[Tensor, StreamState]:
    """``(n, 3, H, W)`` inputs and their ``n``-row state -> ``size`` rows, the last row repeated."""
    n = x.shape[0]
    if size <= n:
        return x, state
    extra = size - n
    x = torch.cat([x, x[-1:].expand(extra, *x.shape[1:])])
    return x, StreamState.stack([state] + [state.select(n - 1)] * extra)


def _copy_out(obj: Any) -> Any:
    """A copy of every tensor in ``obj`` (dataclasses, dicts, lists, tuples), the rest as is."""
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _copy_out(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_out(v) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _copy_out(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                                           if f.init})
    return obj


class CudaGraphBackend:
    """Capture with ``torch.cuda.graph`` (after warm-up runs on a side stream; one memory pool shared
    by every graph of a model) and replay."""

    def __init__(self, device, warmup: int = 2) -> None:
        self.device, self.warmup = torch.device(device), warmup
        with torch.cuda.device(self.device):
            self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        with torch.cuda.device(self.device):
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # caches (RoPE tables, cuBLAS workspaces) are built outside the graph
                for _ in range(self.warmup):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads (a prefetcher uploading the next frame, probes) may go on meanwhile
            with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
        return graph, out

    def replay(self, graph) -> None:
        with torch.cuda.device(self.device):
            graph.replay()


@dataclasses.dataclass
class _Captured:
    graph: Any
    inputs: tuple  # static x, tokens, mem, init_tokens, init_mem, fresh
    outputs: tuple  # (StepOutput, StreamState) living in the graph's memory
    keepalive: list  # tensors made before the capture that the graph reads (RoPE tables): never freed under it
    replays: int = 0


class StepGraphs:
    """``Cut3r.step`` replayed from captured graphs, one per input shape and step settings.

    Args:
        model: the model (its graphs are only valid for its weights and device).
        backend: what captures and replays (default :class:`CudaGraphBackend`); anything with
            ``capture(fn) -> (graph, outputs)`` and ``replay(graph)`` (tests use a CPU stand-in).
    """

    def __init__(self, model, backend: Optional[Any] = None, max_graphs: int = MAX_GRAPHS) -> None:
        self._model = weakref.ref(model)  # the model holds this object: no cycle
        self.backend = backend if backend is not None else CudaGraphBackend(model.device)
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Captured] = OrderedDict()
        self.failures: dict[tuple, int] = {}
        self.failed: dict[tuple, str] = {}  # shapes that step eagerly for good
        self.captures = 0
        self.evicted = 0

    @property
    def model(self):
        return self._model()

    def step(self, x: Tensor, state: StreamState, rule, precision: str, autocast: Callable[[], Any],
             **kw) -> tuple[Any, StreamState]:
        """Like ``model.step(FrameInput(img=x), state, rule=rule, **kw)`` under ``autocast()`` (the
        context of ``precision``); the results are copies (the next replay does not change them)."""
        inputs = (x, state.tokens, state.mem, state.init_tokens, state.init_mem, state.fresh)
        key = (tuple((tuple(t.shape), t.dtype) for t in inputs), rule, tuple(sorted(kw.items())), precision,
               bool(getattr(self.model, "_encoder_compiled", False)), torch.backends.cuda.matmul.allow_tf32)
        if key in self.failed:  # this shape cannot be captured: eager, as without graphs
            with autocast():
                return self.model.step(FrameInput(img=x), state, rule=rule, **kw)
        c = self._graphs.get(key)
        if c is None:
            try:
                c = self._capture(x, state, rule, autocast, kw)
            except Exception as e:  # this step eagerly; after a few failures, this shape for good
                self.failures[key] = n = self.failures.get(key, 0) + 1
                reason = f"{type(e).__name__}: {e}"
                if n >= MAX_CAPTURE_FAILURES:
                    self.failed[key] = reason
                _logger.error("cannot capture the step for batch %d at %dx%d (%s); %s", x.shape[0], x.shape[2],
                              x.shape[3], reason, "it runs without a graph from now on" if n >= MAX_CAPTURE_FAILURES
                              else "this step runs without a graph")
                with autocast():
                    return self.model.step(FrameInput(img=x), state, rule=rule, **kw)
            self._graphs[key] = c
            while len(self._graphs) > self.max_graphs:  # the least recently used goes, with its buffers
                self._graphs.popitem(last=False)
                self.evicted += 1
        self._graphs.move_to_end(key)
        for dst, src in zip(c.inputs, inputs):
            dst.copy_(src)
        self.backend.replay(c.graph)
        c.replays += 1
        out, new_state = c.outputs
        return _copy_out(out), _copy_out(new_state)

    def _capture(self, x: Tensor, state: StreamState, rule, autocast, kw: dict) -> _Captured:
        inputs = tuple(t.clone() for t in (x, state.tokens, state.mem, state.init_tokens, state.init_mem, state.fresh))
        sx, tokens, mem, init_tokens, init_mem, fresh = inputs

        def run():
            with autocast():
                return self.model.step(FrameInput(img=sx), StreamState(tokens, mem, init_tokens, init_mem, fresh),
                                       rule=rule, **kw)

        model = self.model
        timer, model.stage_timer = model.stage_timer, None  # stage timers synchronise: not in a graph
        try:
            graph, outputs = self.backend.capture(run)
        finally:
            model.stage_timer = timer
        self.captures += 1
        _logger.info("captured a step graph for batch %d at %dx%d (%d graphs)", x.shape[0], x.shape[2], x.shape[3],
                     len(self._graphs) + 1)
        keepalive = [t for t in getattr(model, "_rope_cache", {}).values() if t is not None]
        return _Captured(graph, inputs, outputs, keepalive)

    def stats(self) -> dict[str, Any]:
        return {"graphs": len(self._graphs), "replays": sum(c.replays for c in self._graphs.values()),
                "batches": sorted({k[0][0][0][0] for k in self._graphs}), "failed": len(self.failed),
                "capture_failures": sum(self.failures.values()), "evicted": self.evicted}


def graphs_for(model, backend: Optional[Any] = None) -> Optional[StepGraphs]:
    """The model's :class:`StepGraphs` (one per model object, made on first use with ``backend``, by
    default CUDA graphs); ``None`` for a model off CUDA that has none (it steps eagerly)."""
    g = getattr(model, "_step_graphs", None)
    if g is None:
        if backend is None and model.device.type != "cuda":
            return None
        g = StepGraphs(model, backend)
        object.__setattr__(model, "_step_graphs", g)
    return g
