"""A Cut3r stand-in whose poses and pointmaps the test controls (engine/runner geometry tests)."""

from __future__ import annotations

from dataclasses import replace

import torch

from streamrecon.geometry import matrix_to_pose_encoding
from streamrecon.types import StepOutput, StreamState

from .conftest import tiny_config


class StubModel:
    """``poses``: segment-local camera-to-world matrices returned by successive ``step`` calls.

    Each step's camera-frame pointmap is a fronto-parallel plane at depth ``1 + call index``.
    """

    def __init__(self, poses: list[torch.Tensor], head: str = "dpt") -> None:
        self.cfg = tiny_config(head)
        self.device = torch.device("cpu")
        self.poses = poses
        self.step_inputs: list[torch.Tensor] = []
        self.queries: list[torch.Tensor] = []
        self.fresh_at_step: list[bool] = []

    def eval(self):
        return self

    def init_state(self, batch_size: int = 1) -> StreamState:
        z = torch.zeros(1, 2, 4)
        return StreamState(tokens=z.expand(batch_size, -1, -1), mem=z.expand(batch_size, -1, -1), init_tokens=z,
                           init_mem=z, fresh=torch.ones(batch_size, dtype=torch.bool))

    def _output(self, h: int, w: int, pose: torch.Tensor, depth: float) -> StepOutput:
        v, u = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
        pts = torch.stack([(u - w // 2) / w * depth, (v - h // 2) / w * depth, torch.full_like(u, depth)], -1)[None]
        conf = torch.full((1, h, w), 3.0)
        return StepOutput(points_cam=pts, conf_cam=conf, points_world=pts.clone(), conf_world=conf,
                          pose=matrix_to_pose_encoding(pose[None].float()), rgb=torch.zeros(1, h, w, 3))

    def step(self, inp, state, rule=None, intermediates=False):
        i = len(self.step_inputs)
        self.step_inputs.append(inp.img.clone())
        self.fresh_at_step.append(bool(state.fresh[0]))
        h, w = inp.image_size
        return self._output(h, w, self.poses[i], 1.0 + i), replace(state, fresh=torch.zeros_like(state.fresh))

    def query_raymap(self, ray_map, state, intermediates=False):
        self.queries.append(ray_map.clone())
        h, w = ray_map.shape[1:3]
        return self._output(h, w, torch.eye(4), 2.0)
