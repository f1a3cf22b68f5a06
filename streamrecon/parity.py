"""Golden-vector parity: replay a reference run recorded in a golden set and compare every array.

A *model set* is a directory with ``manifest.json``, ``checkpoint.pth`` (official container) and
``vectors.npz``. The view schedule is read from the arrays: for view ``i``, ``in.img.{i}`` /
``in.ray_map.{i}`` (used when ``in.img_mask.{i}`` / ``in.ray_mask.{i}`` is 1), ``in.update.{i}``,
``in.reset.{i}``; raymap queries ``query.*.{q}`` answer ``query.view_index.{q}`` from the state held
before that view. Every ``stream.*``, ``query.*`` and ``post.*`` array of the file is compared with
the normalised error ``max|a - b| / max|b|``; an array we cannot produce counts as a failure.

A *preprocess set* (``preprocess.npz``) checks the image loader against the reference's on real
photos; it is handled by :func:`run_preprocess_set`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["ParityReport", "ParityError", "normalised_error", "discover_sets", "run_set", "run_model_set",
           "run_preprocess_set"]


class ParityError(ValueError):
    """A folder that is not a usable golden set; the message names the folder and what is wrong."""


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """A golden set's arrays (plain numbers only: never unpickled)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return dict(z)
    except (OSError, ValueError, EOFError) as e:  # not an .npz, truncated, or holding pickled objects
        raise ParityError(f"{path}: not a readable golden array file ({type(e).__name__}: {e})") from None

DEFAULT_TOLERANCE = 1e-4
EXTRA_ENV = "STREAMRECON_GOLDEN_EXTRA"


def normalised_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """``max|a - b| / max|b|`` (``max|a - b|`` when ``b`` is all zero); ``inf`` on shape mismatch or NaN."""
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if ours.shape != ref.shape:
        return float("inf")
    if ref.size == 0:
        return 0.0
    diff = np.abs(ours - ref)
    if not np.isfinite(diff).all():
        return float("inf")
    scale = np.abs(ref).max()
    return float(diff.max() / scale) if scale > 0 else float(diff.max())


@dataclass
class ParityReport:
    """Result of one golden set.

    Attributes:
        name: set directory name.
        errors: array name -> normalised error.
        tolerance: the bound each error must meet.
        not_produced: reference arrays the replay did not produce (each is a failure).
    """

    name: str
    errors: dict[str, float] = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE
    not_produced: list[str] = field(default_factory=list)
    conditioned: dict[str, str] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        bad = [f"{k}: normalised error {v:.3g} > {self.tolerance:g}" for k, v in sorted(self.errors.items())
               if not v <= self.tolerance and k not in self.conditioned]
        return bad + [f"{k}: not produced by the replay" for k in self.not_produced]

    @property
    def worst(self) -> tuple[str, float]:
        """Worst error over the arrays held to the tolerance (ill-conditioned ones excluded)."""
        held = {k: v for k, v in self.errors.items() if k not in self.conditioned}
        if not held:
            return ("-", float("nan"))
        k = max(held, key=lambda n: held[n])
        return k, held[k]

    def summary(self) -> str:
        k, v = self.worst
        text = (f"{self.name}: {len(self.errors)} arrays compared, worst {k} = {v:.3g} "
                f"(tolerance {self.tolerance:g}), {len(self.failures)} failures")
        for key, note in sorted(self.conditioned.items()):
            text += f"\n  {key}: {note}"
        return text


def discover_sets(root: Optional[Path], extra: Optional[str] = None) -> list[Path]:
    """Golden set directories: those under ``root`` with a ``manifest.json`` plus every directory in
    ``extra`` (``os.pathsep``-separated; defaults to ``$STREAMRECON_GOLDEN_EXTRA``)."""
    found: list[Path] = []
    if root is not None and root.is_dir():
        found += sorted(p.parent for p in root.rglob("manifest.json"))
    extra = os.environ.get(EXTRA_ENV, "") if extra is None else extra
    found += [Path(p) for p in extra.split(os.pathsep) if p.strip()]
    unique: list[Path] = []
    for p in found:
        if p.resolve() not in [u.resolve() for u in unique]:
            unique.append(p)
    return unique


def post_process(points_cam: torch.Tensor, pose: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference demo's per-view post-processing (``post.*`` arrays of a golden set)."""
    from .geometry import estimate_focal, pose_encoding_to_matrix, principal_point, transform_points

    b, h, w, _ = points_cam.shape
    T_wc = pose_encoding_to_matrix(pose)
    pp = principal_point(h, w, batch=b, dtype=points_cam.dtype)
    return {"c2w": T_wc, "pp": pp, "focal": estimate_focal(points_cam, pp),
            "pts3d_world_from_self": transform_points(T_wc, points_cam)}


def _post_check(key: str, ours_in: tuple, ref_in: tuple, ref_out: np.ndarray, tolerance: float,
                trials: int = 8) -> tuple[float, Optional[str]]:
    """Error of one ``post.*`` array, with a conditioning check when it exceeds ``tolerance``.

    Returns ``(end_to_end_error, note)``. The post-processing must reproduce the reference from the
    reference's own inputs (else ``inf``). An end-to-end error above tolerance is accepted (with a
    note) only when random input perturbations as large as our measured input error move the
    reference output by at least a tenth as much: the array is then ill-conditioned, not wrong.
    """
    name = key.split(".")[1]
    as64 = lambda t: torch.as_tensor(t).double()  # noqa: E731
    e2e = normalised_error(post_process(*[as64(t) for t in ours_in])[name].numpy(), ref_out)
    exact = normalised_error(post_process(*[as64(t) for t in ref_in])[name].numpy(), ref_out)
    if exact > tolerance:
        return float("inf"), f"post-processing of the reference's own outputs is off by {exact:.3g}"
    if e2e <= tolerance:
        return e2e, None
    gen = torch.Generator().manual_seed(0)
    sensitivity = 0.0
    for _ in range(trials):
        perturbed = []
        for o, r in zip(ours_in, ref_in):
            o, r = as64(o), as64(r)
            noise = torch.randn(r.shape, generator=gen, dtype=torch.float64)
            perturbed.append(r + noise / noise.abs().max() * (o - r).abs().max())
        sensitivity = max(sensitivity, normalised_error(post_process(*perturbed)[name].numpy(), ref_out))
    if e2e <= 10 * sensitivity:
        return e2e, (f"ill-conditioned: inputs perturbed by our input error move it by {sensitivity:.3g} "
                     f"(ours {e2e:.3g}); exact on the reference's own outputs ({exact:.3g})")
    return e2e, None


def _view_count(arrays: dict) -> int:
    n = 0
    while f"in.img_mask.{n}" in arrays or f"in.ray_mask.{n}" in arrays:
        n += 1
    return n


def _flag(arrays: dict, name: str, i: int, default: bool) -> torch.Tensor | None:
    key = f"in.{name}.{i}"
    if key not in arrays:
        return None if default is None else torch.tensor([default])
    return torch.from_numpy(np.asarray(arrays[key]).astype(bool).reshape(-1))


def run_model_set(set_dir: Path, tolerance: float = DEFAULT_TOLERANCE) -> ParityReport:
    """Replay a model set through our loader and :meth:`Cut3r.step` / :meth:`Cut3r.query_raymap`."""
    from .checkpoint import load_model
    from .layers.rope import state_positions
    from .types import FrameInput

    arrays = _arrays(set_dir / "vectors.npz")
    model = load_model(set_dir / "checkpoint.pth")
    produced: dict[str, torch.Tensor] = {}
    post_inputs: dict[int, tuple] = {}
    with torch.inference_mode():
        state = model.init_state(batch_size=int(np.asarray(arrays["in.img_mask.0"]).reshape(-1).shape[0]))
        produced["stream.state_init"] = state.init_tokens
        produced["stream.mem_init"] = state.init_mem
        pos = state_positions(model.cfg.state_size, model.cfg.state_pe)
        if pos is not None:
            produced["stream.state_pos"] = pos.unsqueeze(0)
        states = []
        n_views = _view_count(arrays)
        for i in range(n_views):
            states.append(state)
            produced[f"stream.state.{i}"], produced[f"stream.mem.{i}"] = state.tokens, state.mem
            has_img = bool(np.asarray(arrays.get(f"in.img_mask.{i}", 0)).any())
            has_ray = bool(np.asarray(arrays.get(f"in.ray_mask.{i}", 0)).any())
            inp = FrameInput(
                img=torch.from_numpy(arrays[f"in.img.{i}"]) if has_img else None,
                ray_map=torch.from_numpy(arrays[f"in.ray_map.{i}"]) if has_ray else None,
                update=_flag(arrays, "update", i, True),
                reset=_flag(arrays, "reset", i, False),
            )
            out, state = model.step(inp, state, intermediates=True)
            for ref_name, value in out.reference_dict().items():
                produced[f"stream.{ref_name}.{i}"] = value
            for name, value in out.intermediates.items():
                if isinstance(value, list):  # per decoder level
                    for level, v in enumerate(value):
                        produced[f"stream.{name}.{i}.{level}"] = v
                else:
                    produced[f"stream.{name}.{i}"] = value
            if has_img:
                post_inputs[i] = (out.points_cam, out.pose)
                for name, value in post_process(out.points_cam, out.pose).items():
                    produced[f"post.{name}.{i}"] = value
        produced[f"stream.state.{n_views}"], produced[f"stream.mem.{n_views}"] = state.tokens, state.mem
        q = 0
        while f"query.view_index.{q}" in arrays:
            r = int(np.asarray(arrays[f"query.view_index.{q}"]).reshape(-1)[0])
            out = model.query_raymap(torch.from_numpy(arrays[f"in.ray_map.{r}"]), states[r])
            produced[f"query.view_index.{q}"] = torch.tensor([r])
            for ref_name, value in out.reference_dict().items():
                produced[f"query.{ref_name}.{q}"] = value
            q += 1

    report = ParityReport(name=set_dir.name, tolerance=tolerance)
    for key in sorted(arrays):
        if not key.startswith(("stream.", "query.", "post.")):
            continue
        if key not in produced:
            report.not_produced.append(key)
            continue
        if key.startswith("post."):
            i = int(key.rsplit(".", 1)[1])
            ref_in = (arrays[f"stream.pts3d_in_self_view.{i}"], arrays[f"stream.camera_pose.{i}"])
            err, note = _post_check(key, post_inputs[i], ref_in, arrays[key], tolerance)
            report.errors[key] = err
            if note is not None and err != float("inf"):
                report.conditioned[key] = note
            elif note is not None:
                report.not_produced.append(f"{key} ({note})")
            continue
        report.errors[key] = normalised_error(produced[key].detach().float().numpy(), arrays[key])
    return report


def run_preprocess_set(set_dir: Path, tolerance: float = 0.0) -> ParityReport:
    """Compare our image loader with the reference's uint8 output on real photos.

    The error of an entry is the fraction of pixel values that differ by more than one grey level
    (the resampler is Pillow's, as in the reference; 0 means exact within rounding).
    """
    from .preprocess import load_image_reference

    try:
        manifest = json.loads((set_dir / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise ParityError(f"{set_dir}: no readable manifest.json ({e})") from None
    arrays = _arrays(set_dir / "preprocess.npz")
    shared_root = set_dir.parent.parent
    report = ParityReport(name=set_dir.name, tolerance=tolerance)
    for entry, info in manifest.items():
        size = int(entry.rsplit(".", 1)[1])
        src = shared_root / info["source"]
        ref = arrays[f"{entry}.u8"]
        ours = load_image_reference(src, size)
        if ours.shape != ref.shape:
            report.errors[f"{entry}.u8"] = float("inf")
            continue
        report.errors[f"{entry}.u8"] = float((np.abs(ours.astype(int) - ref.astype(int)) > 1).mean())
        report.errors[f"{entry}.true_shape"] = normalised_error(np.array([ours.shape[:2]]), arrays[f"{entry}.true_shape"])
    return report


_RUNNERS: dict[str, Callable[[Path], ParityReport]] = {
    "vectors.npz": run_model_set,
    "preprocess.npz": run_preprocess_set,
}


def run_set(set_dir: Path) -> ParityReport:
    """Run a golden set of any known kind (chosen by the data file it holds)."""
    set_dir = Path(set_dir)
    if not set_dir.is_dir():
        raise ParityError(f"{set_dir}: no such golden set folder")
    if (set_dir / "policy.json").exists():
        raise ParityError(f"{set_dir}: a state-update policy set; it is checked by tests/test_policies.py, not by parity")
    for data_file, runner in _RUNNERS.items():
        if (set_dir / data_file).exists():
            try:
                return runner(set_dir)
            except KeyError as e:  # an array the set must have is missing
                raise ParityError(f"{set_dir}: not a complete golden set: {data_file} has no {e}") from None
    raise ParityError(f"{set_dir}: not a golden set (it holds none of {', '.join(_RUNNERS)})")
