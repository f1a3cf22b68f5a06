"""Property-based tests of the global voxel map's invariants (hypothesis), plus regressions.

The reference model below is written independently of the implementation: plain Python floats and
ints, one point at a time. A point is classified as low-confidence (``not conf > thresh``),
non-finite, out of range (some ``|floor(p / voxel)| >= 2**20 - 1``, computed in float64 on exact
Python ints, no wrap-around possible) or kept in the voxel ``floor(p / voxel)``.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from streamrecon.mapping import GlobalMap, MapConfig

BITS = 21
LIMIT = (1 << (BITS - 1)) - 1  # |voxel index| must be < LIMIT
THRESH = 1.5
LOW, NONFINITE, OOR = "low", "nonfinite", "oor"

PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------
# reference model and invariant checks


def classify(p, c, voxel):
    """LOW / NONFINITE / OOR or the voxel index tuple of one point (Python floats)."""
    if not c > THRESH:
        return LOW
    if not all(math.isfinite(x) for x in p):
        return NONFINITE
    ijk = []
    for x in p:
        q = x / voxel
        if not math.isfinite(q):
            return OOR
        i = math.floor(q)
        if abs(i) >= LIMIT:
            return OOR
        ijk.append(i)
    return tuple(ijk)


class Reference:
    """The map without a budget: voxel index -> count, sums, max confidence; plus the counters."""

    def __init__(self):
        self.kept = []  # (point, colour, conf) of every kept point, in order
        self.counts = {LOW: 0, NONFINITE: 0, OOR: 0}

    def add(self, pts, col, conf, voxel):
        frame = {}
        for p, rgb, c in zip(pts.tolist(), col.tolist(), conf.tolist()):
            k = classify(p, c, voxel)
            if isinstance(k, str):
                self.counts[k] += 1
            else:
                self.kept.append((p, rgb, c))
                frame.setdefault(k, 0)
                frame[k] += 1
        return frame  # voxel index -> count, for this frame

    def voxels(self, voxel):
        """All kept points binned at ``voxel``: index -> (count, xyz sum, rgb sum, max conf)."""
        out = {}
        for p, rgb, c in self.kept:
            k = tuple(math.floor(x / voxel) for x in p)
            n, s, r, m = out.get(k, (0, (0.0,) * 3, (0,) * 3, -math.inf))
            out[k] = (n + 1, tuple(a + b for a, b in zip(s, p)), tuple(a + b for a, b in zip(r, rgb)), max(m, c))
        return out


def decode(keys):
    keys = np.asarray(keys, np.int64)
    m = (1 << BITS) - 1
    return np.stack([(keys >> (2 * BITS)) & m, (keys >> BITS) & m, keys & m], axis=1) - (1 << (BITS - 1))


def map_voxels(g):
    """The map read back through its sorted index: index tuple -> (count, centroid, rgb, conf)."""
    t = g._t
    xyz, rgb, conf = g.points()
    ijk = decode(t.keys)
    return {tuple(int(v) for v in ijk[i]): (int(t.count[r]), xyz[r], rgb[r], float(conf[r]))
            for i, r in enumerate(t.rows.tolist())}


def check_index(g):
    """Keys unique and sorted, the index covers every row once, the stored key column agrees with
    it, and every voxel's centroid lies in the voxel its key names (at the current voxel size)."""
    t = g._t
    n = len(g)
    assert len(t.keys) == len(t.rows) == n == t.n
    assert np.all(np.diff(t.keys) > 0), "index keys not strictly increasing (duplicates or unsorted)"
    assert np.array_equal(np.sort(t.rows), np.arange(n))
    assert np.array_equal(t.key[t.rows], t.keys), "stored key column out of sync with the index"
    assert np.all(t.count[:n] >= 1)
    if n:
        v = g.voxel_size
        ijk = decode(t.keys).astype(np.float64)
        c = t.xyz[t.rows] / t.count[t.rows][:, None]
        tol = 1e-9 * (np.abs(c) + v)
        assert np.all(c >= ijk * v - tol) and np.all(c <= (ijk + 1) * v + tol), "centroid outside its voxel"


def check_counters(g, ref):
    st_ = g.stats()
    assert st_["non_finite"] == g.non_finite == ref.counts[NONFINITE]
    assert st_["out_of_range"] == g.out_of_range == ref.counts[OOR]
    assert st_["points_integrated"] == len(ref.kept)


# ------------------------------------------------------------------------------------------------
# strategies

VOXELS = [0.05, 0.1, 0.25, 0.5, 1.0, 3.0]


def specials(voxel):
    """Non-finite, huge and just-beyond/just-inside the representable range, for this voxel size."""
    edge = [(LIMIT - 1) * voxel, (LIMIT - 0.5) * voxel, LIMIT * voxel, (LIMIT + 1) * voxel, 2.0 ** 63 * voxel,
            2.0 ** 64 * voxel]
    return [math.nan, math.inf, -math.inf, 1e30, -1e30, 3e38, -3e38] + edge + [-e for e in edge]


@st.composite
def frames(draw, voxel, max_n=60, max_bad=20, dtype=None, min_n=0):
    """One frame: ordinary points (dense near the origin, spread over ~40 voxels, on voxel
    boundaries) with up to ``max_bad`` rows holding special values mixed in, and confidences
    below, at and above the threshold (and NaN)."""
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64]))
    coord = st.one_of(st.floats(-3, 3, width=32), st.floats(-20, 20, width=32).map(lambda x: x * voxel),
                      st.integers(-30, 30).map(lambda k: k * voxel))
    rows = draw(st.lists(st.tuples(coord, coord, coord), min_size=min_n, max_size=max_n))
    if max_bad:
        odd = st.one_of(st.sampled_from(specials(voxel)), coord)
        for _ in range(draw(st.integers(0, max_bad))):
            rows.insert(draw(st.integers(0, len(rows))), draw(st.tuples(odd, odd, odd)))
    n = len(rows)
    pts = np.array(rows, dtype).reshape(-1, 3)
    col = np.array(draw(st.lists(st.tuples(*[st.integers(0, 255)] * 3), min_size=n, max_size=n)), np.uint8)
    conf = np.array(draw(st.lists(st.sampled_from([2.0, 3.0, 2.0, 0.5, 1.5, math.nan]), min_size=n, max_size=n)),
                    np.float32)
    return pts, col.reshape(-1, 3), conf


def _map(voxel, **kw):
    return GlobalMap(MapConfig(voxel_size=voxel, conf_thresh=THRESH, pixel_stride=1, **kw))


# ------------------------------------------------------------------------------------------------
# properties


@PROPS
@given(st.data())
def test_no_budget_map_equals_the_reference(data):
    """Every finite in-range point above threshold lands in exactly one voxel (the reference's);
    centroids, colours and confidences are the reference's; the counters count the rest."""
    voxel = data.draw(st.sampled_from(VOXELS))
    g = _map(voxel)
    ref = Reference()
    created = 0
    for f in range(data.draw(st.integers(1, 4))):
        pts, col, conf = data.draw(frames(voxel))
        before = set(map_voxels(g))
        res = g.integrate(pts, col, conf, f)
        touched = ref.add(pts, col, conf, voxel)
        assert res.points_in == len(pts) and res.points_kept == sum(touched.values())
        assert len(res.new_points) == len(set(touched) - before)  # new voxels are exactly the new indices
        created += len(res.new_points)
        check_index(g)
        check_counters(g, ref)
        assert created == len(g)
    event(f"non_finite={g.non_finite > 0} out_of_range={g.out_of_range > 0}")
    got, want = map_voxels(g), ref.voxels(voxel)
    assert set(got) == set(want)
    assert sum(v[0] for v in got.values()) == len(ref.kept) == g.points_integrated
    for k, (n, s, r, m) in want.items():
        gn, gxyz, grgb, gconf = got[k]
        assert gn == n and gconf == m
        assert np.allclose(gxyz, np.array(s) / n, rtol=1e-6, atol=1e-6)
        assert grgb.tolist() == np.clip(np.array(r, np.float64) / n, 0, 255).round().astype(np.uint8).tolist()


@PROPS
@given(st.data())
def test_invalid_points_are_counted_and_never_merged(data):
    """Adding non-finite / out-of-range points (confident ones) to a frame changes nothing in the map
    but the counters: in particular they never move a real voxel's centroid."""
    voxel = data.draw(st.sampled_from(VOXELS))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    pts, col, conf = data.draw(frames(voxel, max_bad=0, dtype=dtype))
    bad = np.array(data.draw(st.lists(st.tuples(*[st.sampled_from(specials(voxel)) | st.floats(-3, 3)] * 3),
                                      min_size=1, max_size=20)), dtype)
    bad = bad[[isinstance(classify(p, 2.0, voxel), str) for p in bad.tolist()]]  # keep the invalid rows only
    n_nonfinite = int((~np.isfinite(bad).all(axis=1)).sum())
    pos = data.draw(st.lists(st.integers(0, len(pts)), min_size=len(bad), max_size=len(bad)))
    mixed = np.insert(pts, pos, bad, axis=0) if len(bad) else pts
    mcol = np.insert(col, pos, 255, axis=0) if len(bad) else col
    mconf = np.insert(conf, pos, 2.0) if len(bad) else conf

    clean, dirty = _map(voxel), _map(voxel)
    clean.integrate(pts, col, conf, 0)
    res = dirty.integrate(mixed, mcol, mconf, 0)
    assert res.points_in == len(mixed) and res.points_kept == clean.points_integrated
    assert dirty.non_finite - clean.non_finite == n_nonfinite
    assert dirty.out_of_range - clean.out_of_range == len(bad) - n_nonfinite
    assert len(dirty) == len(clean)
    for a, b in zip(dirty.points(), clean.points()):
        assert np.array_equal(a, b)
    check_index(dirty)


@PROPS
@given(st.data())
def test_coarsen_budget_keeps_every_point_in_exactly_one_voxel(data):
    """Over budget the voxel size doubles; after every integrate the map holds <= max_points voxels,
    nothing is lost (counts sum to the points kept) and the map equals the reference binned at the
    final voxel size, exactly, as if every point had been integrated at that size."""
    voxel = data.draw(st.sampled_from(VOXELS))
    max_points = data.draw(st.integers(1, 30))
    g = _map(voxel, max_points=max_points, budget_policy="coarsen")
    ref = Reference()
    for f in range(data.draw(st.integers(1, 5))):
        pts, col, conf = data.draw(frames(voxel, min_n=10, max_n=80, max_bad=5))
        v_now = g.voxel_size
        g.integrate(pts, col, conf, f)
        ref.add(pts, col, conf, v_now)  # the range check uses the voxel size at integration time
        assert len(g) <= max_points
        assert math.isfinite(g.voxel_size)
        check_index(g)
        check_counters(g, ref)
        if g.evicted == 0:
            assert sum(int(c) for c in g._t.count[: len(g)]) == len(ref.kept)
    event(f"coarsenings={min(g.coarsenings, 3)} fallback_evicted={g.evicted > 0}")
    got, want = map_voxels(g), ref.voxels(g.voxel_size)
    if g.evicted == 0:
        assert set(got) == set(want)
        for k, (n, s, _, m) in want.items():
            assert got[k][0] == n and got[k][3] == m
            assert np.allclose(got[k][1], np.array(s) / n, rtol=1e-6, atol=1e-6)
    else:  # only when up to 8 voxels around the origin (one per octant) exceed a tiny budget
        assert max_points < 8 and set(got) <= set(want)


@PROPS
@given(st.data())
def test_evict_budget_keeps_keys_and_the_newest_voxels(data):
    """Eviction keeps <= max_points voxels with unique stored keys; every voxel created is either in
    the map or counted as evicted; the voxels of the latest frame survive when they fit the budget."""
    voxel = data.draw(st.sampled_from(VOXELS))
    max_points = data.draw(st.integers(1, 30))
    g = _map(voxel, max_points=max_points, budget_policy="evict")
    ref = Reference()
    created = 0
    for f in range(data.draw(st.integers(1, 6))):
        pts, col, conf = data.draw(frames(voxel, min_n=10, max_n=80, max_bad=5))
        res = g.integrate(pts, col, conf, f)
        touched = ref.add(pts, col, conf, voxel)
        created += len(res.new_points)
        assert len(g) <= max_points and g.voxel_size == voxel
        check_index(g)
        check_counters(g, ref)
        assert created == len(g) + g.evicted
        got = map_voxels(g)
        assert set(got) <= set(ref.voxels(voxel))
        if len(touched) <= max(1, int(max_points * 0.9)):
            assert set(touched) <= set(got)
            for k, n in touched.items():
                assert got[k][0] >= n
    event(f"evicted={g.evicted > 0}")


# ------------------------------------------------------------------------------------------------
# regressions (both failed on the code before the fix)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_huge_coordinates_do_not_wrap_into_a_real_voxel(dtype):
    """``floor(1e30).astype(int64)`` is INT64_MIN, which passed ``abs(ijk) < limit`` and packed into
    the key of voxel (0, 0, 0): the 1e30 point was averaged into the real point's voxel."""
    g = _map(1.0)
    pts = np.array([[0.5, 0.5, 0.5], [1e30, 0.5, 0.5], [-1e30, 0.5, 0.5], [-2.0 ** 63, 0.5, 0.5],
                    [2.0 ** 64, 0.5, 0.5], [0.5, np.inf, 0.5], [np.nan, 0.5, 0.5]], dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = g.integrate(pts, np.full((len(pts), 3), 9, np.uint8), np.full(len(pts), 2.0, np.float32), 0)
    xyz, rgb, _ = g.points()
    assert np.array_equal(xyz, [[0.5, 0.5, 0.5]]), "a huge point moved the real voxel's centroid"
    assert res.points_kept == 1 and len(g) == 1 and g._t.count[0] == 1
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]  # e.g. "invalid value in cast"
    assert g.out_of_range == 4 and g.non_finite == 2
    s = g.stats()
    assert s["out_of_range"] == 4 and s["non_finite"] == 2
    assert {"points", "voxel_size", "conf_thresh", "points_integrated", "coarsenings", "evicted", "out_of_range",
            "bytes"} <= set(s)
    check_index(g)
    g.clear()
    assert g.stats()["non_finite"] == 0 and g.stats()["out_of_range"] == 0 and len(g) == 0


def test_eviction_does_not_create_duplicate_keys():
    """Eviction used to recompute keys from float64 centroids; ``float32(0.7) / 0.1`` floors to 7 in
    float32 but 6 in float64, so the voxel moved onto an existing one: two rows, one key."""
    v = 0.1
    g = _map(v, max_points=10, budget_policy="evict")
    far = np.stack([np.arange(10) * 1.0 + 10.05, np.full(10, 0.05), np.full(10, 0.05)], 1).astype(np.float32)
    g.integrate(far, np.zeros((10, 3), np.uint8), np.full(10, 2.0, np.float32), 0)
    near = np.array([[0.7, 0.05, 0.05], [0.65, 0.05, 0.05]], np.float32)
    g.integrate(near, np.zeros((2, 3), np.uint8), np.full(2, 2.0, np.float32), 1)
    assert g.evicted > 0
    check_index(g)
    ijk = decode(g._t.keys)
    assert len({tuple(r) for r in ijk.tolist()}) == len(g)
    # a third point in the same voxel joins exactly one voxel (the reference puts all three together)
    n = len(g)
    g.integrate(np.array([[0.66, 0.05, 0.05]], np.float32), np.zeros((1, 3), np.uint8), np.full(1, 2.0, np.float32), 2)
    assert len(g) == n
    check_index(g)
    want = {k for k in (classify(p, 2.0, v) for p in np.array([[0.7, 0.05, 0.05], [0.65, 0.05, 0.05],
                                                                  [0.66, 0.05, 0.05]], np.float32).tolist())}
    assert len(want) == 1
    got = map_voxels(g)
    (k,) = want
    assert got[k][0] == 3


def test_coarsening_terminates_around_the_origin():
    """Points in all 8 octants can never merge below 8 voxels: the map must still honour a budget
    of 3 (by evicting the oldest) with a finite voxel size."""
    g = _map(0.5, max_points=3)
    pts = np.array([[x, y, z] for x in (-0.2, 0.2) for y in (-0.2, 0.2) for z in (-0.2, 0.2)], np.float32)
    g.integrate(pts, np.zeros((8, 3), np.uint8), np.full(8, 2.0, np.float32), 0)
    assert len(g) <= 3 and math.isfinite(g.voxel_size) and g.evicted == 5
    check_index(g)
