"""Image-dependence scores of a model's depth (streamrecon.eval.depth_dependence) on constructed frames."""

from __future__ import annotations

import numpy as np

from streamrecon.eval.depth_dependence import DepthFrame, dependence_scores


def _scenes(n=8, seed=0):
    """Ground-truth depth maps that differ per frame: a tilted plane plus a box at a random place."""
    rng = np.random.default_rng(seed)
    v, u = np.mgrid[0:48, 0:64]
    out = []
    for _ in range(n):
        d = 2.0 + 0.03 * v * rng.uniform(0.5, 1.5) + rng.uniform(-0.5, 0.5)
        y, x = rng.integers(0, 30), rng.integers(0, 40)
        d[y:y + 15, x:x + 20] = rng.uniform(0.8, 1.5)
        out.append(d)
    return out


def test_a_perfect_model_beats_the_constant_and_its_own_average():
    gts = _scenes()
    s = dependence_scores(DepthFrame(pred=3.7 * g, gt=g) for g in gts)  # right up to scale
    assert s["abs_rel"] < 1e-9 and s["corr"] > 0.999
    assert s["abs_rel_constant"] > 0.1 and s["abs_rel_mean_map"] > 0.05
    assert s["gain_vs_constant"] > 0.99 and s["dependence"] > 0.05 and s["frames"] == len(gts)
    assert s["abs_rel_gt_mean"] > 0.05  # the frames differ: no single map fits them all
    same = dependence_scores(DepthFrame(pred=np.ones_like(gts[0]), gt=gts[0]) for _ in range(4))
    assert same["abs_rel_gt_mean"] < 1e-9  # four identical frames: the hindsight prior is exact


def test_an_image_independent_prior_is_caught_by_its_own_average():
    gts = _scenes()
    rng = np.random.default_rng(1)
    prior = 2.0 + 0.02 * np.mgrid[0:48, 0:64][0]  # the same pattern for every image, plus pixel noise
    frames = [DepthFrame(pred=prior * rng.uniform(0.5, 2.0) * (1 + 0.01 * rng.standard_normal(prior.shape)), gt=g)
              for g in gts]
    s = dependence_scores(frames)
    assert s["dependence"] < 0.02  # the same map every time (noise only)
    assert abs(s["abs_rel"] - s["abs_rel_mean_map"]) < 0.01  # its own average does as well
    # yet it beats the constant by a wide margin (the prior fits these scenes' floor gradient): the
    # constant baseline alone would call it image-conditioned
    assert s["gain_vs_constant"] > 0.2


def test_invalid_pixels_and_empty_frames_are_left_out():
    g = _scenes(2)
    holes = [x.copy() for x in g]
    holes[0][:, :32] = 0  # half the ground truth missing
    s = dependence_scores([DepthFrame(pred=h.copy() + (h == 0), gt=h) for h in holes]
                          + [DepthFrame(pred=np.ones((48, 64)), gt=np.zeros((48, 64)))])
    assert s["frames"] == 2 and s["abs_rel"] < 1e-9
    assert np.isnan(dependence_scores([])["abs_rel"])
