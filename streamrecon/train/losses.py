"""CUT3R's training objective (paper §9, facts document): confidence-weighted 3D regression of the
self-view and world pointmaps, the camera pose loss, and the RGB loss on raymap query views.

* Targets: self points = the view's depth unprojected in its own camera; world ("cross") points =
  those points in the first camera's frame; pose = ``inv(T_0) T_i`` as ``[t, q]`` (w first, w >= 0).
* Normalisation ``?avg_dis``: a factor = mean distance (to the frame origin) of all valid self and
  cross GT points of a sample, weighted by ``log`` of the predicted confidences (detached, >= 1e-3).
  Ground truth is divided by it; for metric data the prediction is divided by the *same* GT factor,
  so metric scale is learned. Pose translations use it too.
* ``norm="scale_invariant"`` (not the reference; for small models trained from scratch): the prediction
  is divided by its *own* factor (the same weighted mean distance, of the predicted points), so the 3D
  terms score structure only, and a separate term ``scale_weight * |log f_pred - log f_gt|`` learns the
  metric scale. Measured on the bundled model: 45 % of its metric 3D error was scale, and after the best
  scale per view its structure was no better than a constant-depth plane (``tools/depth_diagnosis.py loss``).
* 3D term: per-pixel Euclidean distance ``l``; ConfLoss ``l * c - alpha * log c`` (alpha 0.2) averaged
  over valid pixels, self and cross terms summed.
* Pose term: mean ``|t_pred - t_gt| + |q_pred - q_gt|`` over views.
* RGB term: mean squared error in [-1, 1] units on views given to the model as raymaps only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..geometry.pose import matrix_to_quat_wxyz
from ..types import StepOutput

__all__ = ["unproject", "Cut3rLoss", "relative_poses"]


def unproject(depth: Tensor, K: Tensor) -> Tensor:
    """``(..., H, W)`` z-depth and ``(..., 3, 3)`` intrinsics -> ``(..., H, W, 3)`` camera points."""
    h, w = depth.shape[-2:]
    v, u = torch.meshgrid(torch.arange(h, dtype=depth.dtype, device=depth.device),
                          torch.arange(w, dtype=depth.dtype, device=depth.device), indexing="ij")
    uv1 = torch.stack([u, v, torch.ones_like(u)], -1)  # (H, W, 3)
    rays = uv1 @ torch.linalg.inv(K).transpose(-1, -2).unsqueeze(-3)  # (..., H, W, 3) with z = 1
    return rays * depth.unsqueeze(-1)


def relative_poses(T_wc: Tensor) -> Tensor:
    """``(B, V, 4, 4)`` world poses -> poses in the first camera's frame ``inv(T_0) T_i``."""
    return torch.linalg.inv(T_wc[:, :1]) @ T_wc


@dataclass
class Cut3rLoss:
    alpha: float = 0.2
    pose_weight: float = 1.0
    rgb_weight: float = 1.0
    norm: str = "metric"  # "metric" (the reference's) or "scale_invariant" (see the module docstring)
    scale_weight: float = 0.1  # the metric-scale term of "scale_invariant"

    def __post_init__(self) -> None:
        if self.norm not in ("metric", "scale_invariant"):
            raise ValueError(f"loss norm must be 'metric' or 'scale_invariant', got {self.norm!r}")

    def __call__(self, outputs: list[StepOutput], batch: dict, ray_only: list[bool]) -> tuple[Tensor, dict]:
        """Args:
            outputs: one :class:`StepOutput` per view (batch ``B``).
            batch: ``img`` (B,V,3,H,W), ``depth``, ``valid`` (B,V,H,W), ``T_wc`` (B,V,4,4), ``K`` (B,V,3,3).
            ray_only: per view, whether the model saw only its raymap.
        """
        depth, valid, K = batch["depth"], batch["valid"], batch["K"]
        rel = relative_poses(batch["T_wc"].double()).float()  # (B, V, 4, 4)
        gt_self = unproject(depth, K)  # (B, V, H, W, 3)
        gt_cross = gt_self @ rel[:, :, None, :3, :3].transpose(-1, -2) + rel[:, :, None, None, :3, 3]
        pred_self = torch.stack([o.points_cam for o in outputs], 1)
        pred_cross = torch.stack([o.points_world for o in outputs], 1)
        c_self = torch.stack([o.conf_cam for o in outputs], 1)
        c_cross = torch.stack([o.conf_world for o in outputs], 1)
        m = valid.float()
        # ?avg_dis, metric: one factor per sample from the GT, weighted by log(predicted confidence)
        w_self, w_cross = (c.detach().log().clamp(min=1e-3) * m for c in (c_self, c_cross))
        num = (w_self * gt_self.norm(dim=-1)).flatten(1).sum(1) + (w_cross * gt_cross.norm(dim=-1)).flatten(1).sum(1)
        den = w_self.flatten(1).sum(1) + w_cross.flatten(1).sum(1)
        factor = (num / den.clamp(min=1e-8)).clamp(min=1e-6).view(-1, 1, 1, 1, 1)
        p_factor = factor  # what the prediction is divided by
        l_scale = None
        if self.norm == "scale_invariant":
            p_num = (w_self * pred_self.norm(dim=-1)).flatten(1).sum(1) + (w_cross * pred_cross.norm(dim=-1)).flatten(1).sum(1)
            p_factor = (p_num / den.clamp(min=1e-8)).clamp(min=1e-6).view(-1, 1, 1, 1, 1)
            l_scale = (p_factor.log() - factor.log()).abs().mean()

        def conf_term(pred: Tensor, gt: Tensor, conf: Tensor) -> tuple[Tensor, Tensor]:
            err = (pred / p_factor - gt / factor).norm(dim=-1)
            per_pixel = err * conf - self.alpha * conf.log()
            n = m.sum().clamp(min=1)
            return (per_pixel * m).sum() / n, (err * m).sum() / n

        l_self, e_self = conf_term(pred_self, gt_self, c_self)
        l_cross, e_cross = conf_term(pred_cross, gt_cross, c_cross)
        pose = torch.stack([o.pose for o in outputs], 1)  # (B, V, 7)
        f, pf = factor.view(-1, 1), p_factor.view(-1, 1)
        t_gt = rel[..., :3, 3] / f[:, None, :]
        q_gt = matrix_to_quat_wxyz(rel[..., :3, :3])
        l_pose = (pose[..., :3] / pf[:, None, :] - t_gt).norm(dim=-1).mean() + (pose[..., 3:] - q_gt).norm(dim=-1).mean()
        loss = l_self + l_cross + self.pose_weight * l_pose
        logs = {"conf_self": l_self.item(), "conf_cross": l_cross.item(), "pose": l_pose.item(),
                "err_self": e_self.item(), "err_cross": e_cross.item()}
        if l_scale is not None:
            loss = loss + self.scale_weight * l_scale
            logs["scale"] = l_scale.item()
        rgb_views = [i for i, r in enumerate(ray_only) if r]
        if rgb_views and outputs[0].rgb is not None:
            pred_rgb = torch.stack([outputs[i].rgb for i in rgb_views], 1)  # (B, R, H, W, 3)
            gt_rgb = batch["img"][:, rgb_views].permute(0, 1, 3, 4, 2)
            l_rgb = (pred_rgb - gt_rgb).square().mean()
            loss = loss + self.rgb_weight * l_rgb
            logs["rgb"] = l_rgb.item()
        logs["loss"] = loss.item()
        return loss, logs
