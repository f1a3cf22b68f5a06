"""``streamrecon train``: train a CUT3R-architecture model on synthetic sequences.

Each step renders (or draws from a pool) ``batch_size`` sequences of ``views`` frames, runs the
recurrent model over them view by view -- view 0 always an image; later views image-only with
probability 0.8, raymap-only 0.15, image + raymap 0.05, as in CUT3R's training data -- and minimises
:class:`~streamrecon.train.losses.Cut3rLoss`. AdamW, linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA. ``out_dir/last.pt`` holds everything to resume (plain tensors and
numbers: it loads with ``weights_only=True``); ``out_dir/model.safetensors`` (+ ``.json``) is the
exported model, ``out_dir/best.safetensors`` the best by validation AbsRel, ``out_dir/log.jsonl``
the history.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np
import torch

from ..config import ModelConfig, preset
from ..geometry import raymap
from ..models import Cut3r
from ..progress import bar, shown
from ..synth.dataset import SynthConfig, SyntheticStream, render_sequence
from ..threads import current as threads_current
from ..types import FrameInput
from .camera_effects import CameraEffects, apply_camera_effects
from .conf_guard import ConfidenceTaps, floor_penalty, reinit_confidence
from .losses import Cut3rLoss, relative_poses

__all__ = ["TrainConfig", "train", "validate"]

_logger = logging.getLogger(__name__)
VAL_SEED0 = 90_000_000  # validation / held-out sequences never overlap the training seeds (< 1e6 per stream seed)


@dataclass
class TrainConfig:
    """Settings of a training run (the keys of ``configs/train_small.yaml``)."""

    model: Any = "streamrecon_small"  # preset name or a dict of ModelConfig fields
    init: Optional[str] = None  # start from these weights
    out_dir: str = "outputs/train"
    steps: int = 2000
    batch_size: int = 4
    views: int = 4
    strides: list = field(default_factory=lambda: [1, 2, 3])
    lr: float = 3e-4
    weight_decay: float = 0.05
    warmup: int = 100
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    ray_prob: float = 0.15
    both_prob: float = 0.05
    data: dict = field(default_factory=dict)  # SynthConfig overrides (height, width, moving, ...)
    pool: int = 0  # >0: render this many sequences once and sample from them
    pool_refresh_every: int = 0  # replace one pool sequence every N steps
    val_every: int = 200
    val_sequences: int = 4
    val_frames: int = 16
    save_every: int = 200
    log_every: int = 10
    seed: int = 0
    threads: int = 0
    device: str = "auto"
    bf16: bool = True
    export_dtype: str = "float16"
    conf_floor: float = -3.0  # hinge keeping the raw confidence logits above this (see conf_guard)
    conf_floor_weight: float = 0.05  # 0 disables the hinge
    reinit_conf: bool = False  # reset the confidence channels of the heads when a run starts (not on resume)
    loss_norm: str = "metric"  # "metric" (the reference's) or "scale_invariant" (streamrecon.train.losses)
    scale_weight: float = 0.1  # the metric-scale term of loss_norm: scale_invariant
    camera_effects: Optional[dict] = None  # None: clean renders; {} or overrides: CameraEffects (exposure, blur, noise, JPEG)
    ema: float = 0.0  # >0: decay of an exponential moving average of the weights, what is validated and exported

    def model_config(self) -> ModelConfig:
        return preset(self.model) if isinstance(self.model, str) else ModelConfig.from_dict(self.model)

    def effects(self) -> Optional[CameraEffects]:
        """The camera effects on training images (None: clean renders); a bad key or range is a ValueError."""
        return None if self.camera_effects is None else CameraEffects.from_dict(self.camera_effects)


def _lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _schedule(views: int, cfg: TrainConfig, g: torch.Generator) -> list[tuple[bool, bool]]:
    """Per view ``(has_image, has_raymap)``; view 0 is always an image."""
    out = [(True, False)]
    for _ in range(1, views):
        r = float(torch.rand(1, generator=g))
        out.append((False, True) if r < cfg.ray_prob else (True, True) if r < cfg.ray_prob + cfg.both_prob else (True, False))
    return out


def forward_sequence(model: Cut3r, batch: dict, schedule: list[tuple[bool, bool]]) -> list:
    """Run the model over the views of a batch (state carried, gradients through the whole sequence)."""
    img, K = batch["img"], batch["K"]
    rel = relative_poses(batch["T_wc"].double())
    h, w = img.shape[-2:]
    state = model.init_state(img.shape[0])
    outs = []
    for v, (has_img, has_ray) in enumerate(schedule):
        ray = raymap(rel[:, v], K[:, v].double(), h, w).float() if has_ray else None
        out, state = model.step(FrameInput(img=img[:, v] if has_img else None, ray_map=ray), state)
        outs.append(out)
    return outs


def validation_sequences(cfg: TrainConfig, progress: Optional[bool] = False,
                         stream: Optional[TextIO] = None) -> list[dict]:
    """The held-out validation sequences (seeds from ``VAL_SEED0``; the same for every step)."""
    from ..progress import bar

    synth = SynthConfig(**cfg.data)
    with bar(cfg.val_sequences * (cfg.val_frames + synth.virtual), "rendering validation sequences",
             enabled=progress, stream=stream) as b:
        return [render_sequence(VAL_SEED0 + i, synth, frames=cfg.val_frames, on_view=lambda: b.update(1))
                for i in range(cfg.val_sequences)]


@torch.no_grad()
def validate(model: Cut3r, cfg: TrainConfig, sequences: Optional[list] = None) -> dict:
    """Depth AbsRel (median-scaled, metric) and Sim(3) ATE on held-out synthetic sequences."""
    from ..eval.datasets import EvalSequence
    from ..eval.evaluate import EvalConfig, evaluate_sequence

    synth = SynthConfig(**cfg.data)
    seqs = sequences or validation_sequences(cfg)
    was_training = model.training
    model.eval()
    rows = [evaluate_sequence(model, EvalSequence.from_arrays(f"val{i}", s["rgb"], s["depth"], s["T_wc"], s["K"]),
                              EvalConfig(size=max(synth.height, synth.width)))
            for i, s in enumerate(seqs)]
    model.train(was_training)
    keys = ("abs_rel", "abs_rel_metric", "delta1", "ate_sim3_pct", "ate_se3", "rpe_rot_deg")
    # nanmean: ATE as % of the path is undefined for pure rotations (no path)
    return {k: float(np.nanmean([r[k] for r in rows])) for k in keys}


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _save(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig, progress: Optional[TextIO] = sys.stderr, resume: bool = True,
          bars: Optional[bool] = None) -> dict:
    """Train (resuming from ``out_dir/last.pt`` when present) and return the last validation metrics.

    ``progress``: where progress goes (None: nowhere); ``bars``: progress bars there (None: when it is
    a terminal), else a plain line every ``log_every`` steps.
    """
    from ..checkpoint import load_model, write_safetensors

    if cfg.threads and threads_current() is None:  # library use; the CLI has applied --threads / the config
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    mcfg = cfg.model_config()
    model = load_model(cfg.init, device=device, eval_mode=False) if cfg.init else Cut3r(mcfg).to(device)
    mcfg = model.cfg
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "token" not in n and "mem" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "token" not in n and "mem" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    start, best = 0, math.inf
    ckpt = out / "last.pt"
    state = torch.load(ckpt, map_location=device, weights_only=True) if resume and ckpt.exists() else None
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best = int(state["step"]), float(state["best"])
        _logger.info("resumed from %s at step %d", ckpt, start)
    elif cfg.reinit_conf:
        reinit_confidence(model, generator=torch.Generator().manual_seed(cfg.seed))
        _logger.info("confidence channels of the heads re-initialised")
    ema = _ema_model(model, cfg.ema, None if state is None else state.get("ema"))
    show = progress is not None and shown(bars, progress)
    stream = iter(SyntheticStream(batch_size=cfg.batch_size, views=cfg.views, strides=tuple(cfg.strides),
                                  seed=cfg.seed * 7919 + start, cfg=SynthConfig(**cfg.data), pool=cfg.pool,
                                  refresh_every=cfg.pool_refresh_every, progress=show,
                                  progress_stream=progress))
    val_seqs: list = []
    g = torch.Generator().manual_seed(cfg.seed + start)
    effects = cfg.effects()
    g_fx = torch.Generator().manual_seed(cfg.seed * 104_729 + start)
    criterion = Cut3rLoss(norm=cfg.loss_norm, scale_weight=cfg.scale_weight)
    use_bf16 = cfg.bf16 and device.type == "cuda"
    log_f = open(out / "log.jsonl", "a")
    val: dict = {}
    t_start, t_log, frames_done = time.monotonic(), time.monotonic(), 0
    running: dict[str, float] = {}

    served = model if ema is None else ema.module  # what is validated and exported

    def save(step: int) -> None:
        _save(ckpt, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "best": best,
                     "config": json.dumps(asdict(cfg)), **({} if ema is None else {"ema": ema.state_dict()})})
        meta = {"step": str(step)} | ({} if ema is None else {"ema": str(cfg.ema)})
        write_safetensors(served.state_dict(), mcfg, out / "model.safetensors", extra_meta=meta,
                          dtype=getattr(torch, cfg.export_dtype))

    taps = ConfidenceTaps(model) if cfg.conf_floor_weight > 0 else None
    if progress is not None and not show:
        progress.write(f"training {cfg.steps - start} steps ({cfg.batch_size} x {cfg.views} views); "
                       f"{'rendering a pool of ' + str(cfg.pool) + ' sequences first' if cfg.pool else ''}\n")
        progress.flush()
    batch = next(stream) if start < cfg.steps else None  # (renders the pool, with its own bar)
    steps = bar(cfg.steps, "train", enabled=show, unit="step", stream=progress, initial=start)
    try:
        for step in range(start, cfg.steps):
            if step > start:
                batch = next(stream)
            if effects is not None:  # (on the CPU, before the upload; validation stays clean)
                batch = batch | {"img": apply_camera_effects(batch["img"], effects, g_fx)}
            batch = {k: v.to(device) for k, v in batch.items()}
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                schedule = _schedule(cfg.views, cfg, g)
                outs = forward_sequence(model, batch, schedule)
            loss, logs = criterion([_fp32(o) for o in outs], batch, [has_ray and not has_img for has_img, has_ray in schedule])
            if taps is not None:
                floor = floor_penalty(taps.pop(), cfg.conf_floor).to(loss)
                loss = loss + cfg.conf_floor_weight * floor
                logs["conf_floor"] = floor.item()
                logs["loss"] = loss.item()
            if (step + 1) % cfg.log_every == 0:  # (a device sync: log steps only)
                logs["conf_gt_1.5"] = float(torch.stack([o.conf_cam for o in outs]).detach().gt(1.5).float().mean())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            logs["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            opt.step()
            if ema is not None:
                ema.update_parameters(model)
            frames_done += cfg.batch_size * cfg.views
            for k, v in logs.items():
                running[k] = 0.9 * running.get(k, v) + 0.1 * v
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                now = time.monotonic()
                rate = frames_done / max(now - t_log, 1e-9)
                frames_done, t_log = 0, now
                log_f.write(json.dumps({"step": step + 1, "lr": _lr_at(step, cfg), "frames_per_s": rate,
                                        "elapsed_s": now - t_start, **logs}) + "\n")
                log_f.flush()
                if show:
                    steps.set_postfix(loss=f"{running['loss']:.4f}", pose=f"{running['pose']:.4f}",
                                      err=f"{running['err_self']:.4f}", fps=f"{rate:.1f}")
                elif progress is not None:
                    progress.write(f"step {step + 1}/{cfg.steps} loss {running['loss']:.4f} pose {running['pose']:.4f} "
                                   f"err {running['err_self']:.4f} {rate:.1f} frames/s\n")
                    progress.flush()
            steps.update(1)
            if cfg.val_every and ((step + 1) % cfg.val_every == 0 or step + 1 == cfg.steps):
                if not val_seqs:
                    val_seqs = validation_sequences(cfg, progress=show, stream=progress)
                val = validate(served, cfg, val_seqs)
                log_f.write(json.dumps({"step": step + 1, "val": val, "elapsed_s": time.monotonic() - t_start}) + "\n")
                log_f.flush()
                if progress is not None:
                    line = f"val @ {step + 1}: " + ", ".join(f"{k} {v:.4f}" for k, v in val.items())
                    if show:
                        steps.write(line, file=progress)  # (tqdm's default is stdout: the command's JSON)
                    else:
                        progress.write(line + "\n")
                if val["abs_rel"] < best:
                    best = val["abs_rel"]
                    write_safetensors(served.state_dict(), mcfg, out / "best.safetensors",
                                      extra_meta={"step": str(step + 1), "val_abs_rel": f"{best:.5f}"},
                                      dtype=getattr(torch, cfg.export_dtype))
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save(step + 1)
    except KeyboardInterrupt:
        _logger.warning("interrupted: saving")
        save(step)
    finally:
        steps.close()
        log_f.close()
        if taps is not None:
            taps.remove()
    return val


def _ema_model(model: Cut3r, decay: float, state: Optional[dict]):
    """The weights' exponential moving average (``torch.optim.swa_utils.AveragedModel``; buffers too),
    restored from ``state`` on resume; ``None`` when ``decay`` is 0. Its first update copies the weights."""
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema must be 0 (off) or a decay in (0, 1), got {decay}")
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    if state is not None:
        ema.load_state_dict(state)
    return ema


def _fp32(o):
    """Loss in float32 whatever the autocast dtype."""
    from dataclasses import replace

    return replace(o, points_cam=o.points_cam.float(), points_world=o.points_world.float(), conf_cam=o.conf_cam.float(),
                   conf_world=o.conf_world.float(), pose=o.pose.float(), rgb=None if o.rgb is None else o.rgb.float())
