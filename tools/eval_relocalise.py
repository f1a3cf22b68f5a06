"""Relocalisation on the development set: map the first half of a sequence, save a snapshot, then
start new runs inside it (``--relocalise``) and measure how often, how soon and how well they localise.

    python tools/eval_relocalise.py ../shared/data/sun3d_studyroom ../shared/data/kitti06_f0000_0050 [--weights W]

Per sequence (frames 0..n-1, known intrinsics, ``--backend slam --deterministic``): the first half
``0..n/2-1`` is mapped and snapshotted; the saved world is tied to the ground truth by the Sim(3)
that aligns the first half's trajectory to it (the only alignment: the relocalised runs are *not*
aligned again). Scenarios, each a fresh run in the saved map:

* ``second half``: frames ``n/2..n-1`` (the camera goes on from where the map ends);
* ``second half reversed``: ``n-1..n/2`` (starts farthest from the map, comes back to it);
* ``first half /3 reversed``: every third frame of the first half, backwards (a revisit).

Reported: localised or not, frames until localised, the pose error of the frame at relocalisation
(translation in metres and % of the first half's path, rotation in degrees) beside two baselines --
the pose *without* relocalisation (the new run's own world, its first camera at the origin) and the
matched saved keyframe's own pose (place recognition alone) -- and the whole run's ATE in the saved
world (no re-alignment) against the run without relocalisation.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

from streamrecon.engine import Frame
from streamrecon.eval.datasets import find_sequences
from streamrecon.eval.metrics import path_length, rotation_angle_deg
from streamrecon.pipeline import build_pipeline, load_resolved
from streamrecon.settings import EngineSettings, OutputSettings, PipelineConfig, SlamSettings
from streamrecon.slam.sim3 import correct_pose, sim3_apply, umeyama
from streamrecon.snapshot import read_snapshot


def _cfg(seq, weights, size, out) -> PipelineConfig:
    K = seq.K
    return PipelineConfig(engine=EngineSettings(weights=weights, size=size),
                          outputs=OutputSettings(output_dir=str(out)),
                          slam=SlamSettings(backend="slam", intrinsics=",".join(str(float(v)) for v in
                                                                                (K[0, 0], K[1, 1], K[0, 2], K[1, 2])),
                                            deterministic=True))


def _stream(pipe, seq, idx) -> list:
    return [pipe.push(Frame(image=seq.rgb(i), seq=i, stamp=float(seq.stamps[i]), source=seq.name)) for i in idx]


def _err(T: np.ndarray, G: np.ndarray) -> tuple[float, float]:
    return float(np.linalg.norm(T[:3, 3] - G[:3, 3])), float(rotation_angle_deg(T[:3, :3].T @ G[:3, :3]))


def _to_gt(A: np.ndarray, T: np.ndarray) -> np.ndarray:
    """A saved-world pose in the ground-truth world (``A`` the Sim(3) saved -> GT), as a rigid pose."""
    return correct_pose(A, T)


def evaluate(seq, loaded, weights, size, work: Path) -> dict:
    n = len(seq)
    h = n // 2
    first = list(range(h))
    pipe = build_pipeline(_cfg(seq, weights, size, work / "map"), loaded, stream_id=seq.name, files=False,
                          snapshot_dir=work / "snap")
    res = _stream(pipe, seq, first)
    pipe.close()
    T1 = np.stack([r.T_wc for r in res])
    A = _align(T1, seq.T_wc[first])  # saved world -> GT
    first_len = path_length(seq.T_wc[first])
    own = np.array([_err(_to_gt(A, T), G) for T, G in zip(T1, seq.T_wc[first])])  # the saved map's own error
    snap = read_snapshot(work / "snap")
    out = {"frames": n, "saved_keyframes": len(pipe.stage.loop.db), "first_half_path_m": round(first_len, 3),
           "saved_map_pose_error_median": {"t_m": round(float(np.median(own[:, 0])), 4),
                                           "rot_deg": round(float(np.median(own[:, 1])), 3)},
           "snapshot_bytes": sum(f["bytes"] for f in snap.manifest["files"].values()), "scenarios": {}}
    kf_pose = {k: e.S_wk for k, e in pipe.stage.loop.db.items()}
    scenarios = {"second half": list(range(h, n)), "second half reversed": list(range(n - 1, h - 1, -1)),
                 "first half /3 reversed": first[::-1][::3]}
    for name, idx in scenarios.items():
        rp = build_pipeline(_cfg(seq, weights, size, work / "reloc"), loaded, stream_id=seq.name, files=False)
        rp.relocalise_in(snap)
        rr = _stream(rp, seq, idx)
        rp.close()
        info = rp.stage.reloc_info
        row = {"localised": bool(info.get("localised")), "frames": len(idx), "attempts": info.get("attempts")}
        base = build_pipeline(_cfg(seq, weights, size, work / "base"), loaded, stream_id=seq.name, files=False)
        rb = _stream(base, seq, idx)
        base.close()
        Tb = np.stack([r.T_wc for r in rb])
        G = seq.T_wc[idx]
        if row["localised"]:
            k = next(n for n, r in enumerate(rr) if r.tracking is not None and r.tracking.localised)
            row["frames_to_localise"] = k + 1
            row["keyframe"] = info.get("keyframe")
            row["inliers"] = info.get("inliers")
            e_t, e_r = _err(_to_gt(A, rr[k].T_wc), G[k])
            b_t, b_r = _err(_to_gt(A, Tb[k]), G[k])
            kf_t, kf_r = _err(_to_gt(A, _rigid(kf_pose[info["keyframe"]])), G[k])
            row["pose_error"] = {"t_m": round(e_t, 4), "t_pct_first_path": round(100 * e_t / first_len, 2),
                                 "rot_deg": round(e_r, 3)}
            row["baseline_not_relocalised"] = {"t_m": round(b_t, 4), "rot_deg": round(b_r, 3)}
            row["baseline_matched_keyframe_pose"] = {"t_m": round(kf_t, 4), "rot_deg": round(kf_r, 3)}
            T_opt = rp.final_poses.get("optimized")
            if T_opt is not None:
                P = sim3_apply(A, T_opt[:, :3, 3])
                row["ate_saved_world_m"] = round(float(np.sqrt(np.mean(np.sum((P - G[:, :3, 3]) ** 2, 1)))), 4)
        Pb = sim3_apply(A, Tb[:, :3, 3])
        row["ate_not_relocalised_m"] = round(float(np.sqrt(np.mean(np.sum((Pb - G[:, :3, 3]) ** 2, 1)))), 4)
        out["scenarios"][name] = row
    return out


def _align(T: np.ndarray, G: np.ndarray, arm_m: float = 0.3) -> np.ndarray:
    """The Sim(3) saved world -> GT that best maps the cameras (centres and points ``arm_m`` along each
    axis: orientation counts, which camera centres alone on a short path cannot fix)."""
    s = np.cbrt(np.linalg.det(umeyama(T[:, :3, 3], G[:, :3, 3])[:3, :3]))
    arms = np.vstack([np.zeros(3), np.eye(3)])

    def pts(P, d):
        return np.concatenate([P[:, :3, 3][:, None] + d * np.einsum("nij,kj->nki", P[:, :3, :3], arms[1:]),
                               P[:, :3, 3][:, None]], 1).reshape(-1, 3)

    return umeyama(pts(T, arm_m / s), pts(G, arm_m))


def _rigid(S: np.ndarray) -> np.ndarray:
    T = np.array(S, np.float64, copy=True)
    T[:3, :3] /= np.cbrt(np.linalg.det(T[:3, :3]))
    return T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data", nargs="+", help="dataset folders (sequences are found inside)")
    ap.add_argument("--weights", default=None, help="checkpoint (default: the bundled model)")
    ap.add_argument("--size", default=None)
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    loaded = load_resolved(EngineSettings(weights=a.weights, size=a.size))
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for root in a.data:
            for seq in find_sequences(root):
                work = Path(tmp) / seq.name.replace("/", "_")
                report[seq.name] = r = evaluate(seq, loaded, a.weights, a.size, work)
                print(f"\n{seq.name}: {r['frames']} frames, first half {r['first_half_path_m']} m mapped, "
                      f"{r['saved_keyframes']} keyframes, snapshot {r['snapshot_bytes'] / 1e6:.1f} MB; the saved poses' own "
                      f"error (median) {r['saved_map_pose_error_median']['t_m']:.3f} m "
                      f"{r['saved_map_pose_error_median']['rot_deg']:.2f} deg")
                for name, row in r["scenarios"].items():
                    if not row["localised"]:
                        print(f"  {name:24s} NOT localised in {row['frames']} frames; "
                              f"ATE without {row['ate_not_relocalised_m']} m")
                        continue
                    e, b, kf = row["pose_error"], row["baseline_not_relocalised"], row["baseline_matched_keyframe_pose"]
                    print(f"  {name:24s} localised after {row['frames_to_localise']:2d}/{row['frames']} frames "
                          f"({row['inliers']} inliers): error {e['t_m']:.3f} m {e['rot_deg']:.2f} deg "
                          f"| not relocalised {b['t_m']:.3f} m {b['rot_deg']:.2f} deg | keyframe pose {kf['t_m']:.3f} m "
                          f"{kf['rot_deg']:.2f} deg; run ATE {row.get('ate_saved_world_m')} m "
                          f"vs {row['ate_not_relocalised_m']} m")
    ok = [r for s in report.values() for r in s["scenarios"].values()]
    print(f"\nlocalised {sum(r['localised'] for r in ok)}/{len(ok)} runs")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
