"""Analytic ray casting of a :class:`~streamrecon.synth.scene.Scene` in torch (CPU or GPU).

Rays go through pixel centres ``(u, v)`` (``u`` column, ``v`` row, no half-pixel offset, the
reference convention) with direction ``R K^-1 [u, v, 1]``, so the ray parameter at the hit *is* the
camera z-depth. Colour is rendered with ``supersample x supersample`` sub-pixel rays and averaged
(anti-aliased like a downscaled photo); depth comes from the centre ray.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .scene import Scene, rot_y
from .textures import sample_texture

__all__ = ["render", "pixel_rays"]

_EPS = 1e-4
_INF = float("inf")


def pixel_rays(T_wc: Tensor, K: Tensor, h: int, w: int, offsets: Tensor) -> tuple[Tensor, Tensor]:
    """World ray origin ``(3,)`` and directions ``(S, H*W, 3)`` for sub-pixel ``offsets`` ``(S, 2)``."""
    dtype = T_wc.dtype
    v, u = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    uv = torch.stack([u.reshape(-1), v.reshape(-1)], -1)  # (HW, 2)
    uv = uv[None] + offsets[:, None].to(dtype)  # (S, HW, 2)
    Kinv = torch.linalg.inv(K.to(dtype))
    cam = torch.cat([uv, torch.ones_like(uv[..., :1])], -1) @ Kinv.T  # z = 1
    return T_wc[:3, 3], cam @ T_wc[:3, :3].T


def _value_noise(p: Tensor, seed: float) -> Tensor:
    """Smooth pseudo-random field in [0, 1] (trilinear interpolation of hashed lattice values)."""
    i = torch.floor(p)
    f = p - i
    f = f * f * (3 - 2 * f)

    def h(c: Tensor) -> Tensor:
        x = torch.sin((c * torch.tensor([12.9898, 78.233, 37.719], dtype=p.dtype)).sum(-1) + seed) * 43758.5453
        return x - torch.floor(x)

    out = 0.0
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                corner = i + torch.tensor([dx, dy, dz], dtype=p.dtype)
                wgt = (f[..., 0] if dx else 1 - f[..., 0]) * (f[..., 1] if dy else 1 - f[..., 1]) * \
                      (f[..., 2] if dz else 1 - f[..., 2])
                out = out + wgt * h(corner)
    return out


def _pattern(kind: str, p: Tensor, scale: float, seed: float) -> Tensor:
    q = p * scale
    if kind == "checker":
        return (torch.floor(q).sum(-1) % 2).to(p.dtype)
    if kind == "stripes":
        return (torch.sin(2 * math.pi * (q[..., 0] + 0.5 * q[..., 2])) > 0).to(p.dtype)
    if kind == "noise":
        return 0.65 * _value_noise(q, seed) + 0.35 * _value_noise(2.7 * q, seed + 1)
    if kind == "marble":
        return 0.5 + 0.5 * torch.sin(q[..., 0] + q[..., 1] + 5 * _value_noise(0.5 * q, seed))
    if kind == "grid":
        fr = q - torch.floor(q)
        line = torch.minimum(torch.minimum(fr[..., 0], fr[..., 2]), fr[..., 1])
        return (line > 0.08).to(p.dtype)
    raise ValueError(f"unknown pattern {kind!r}")


def _hit_room(o: Tensor, d: Tensor, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """Exit distance from inside the room box and the face index (0..5: -x, +x, -y, +y, -z, +z)."""
    with torch.no_grad():
        safe = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
        t_hi, t_lo = (hi - o) / safe, (lo - o) / safe
        t_axis = torch.where(d > 0, t_hi, t_lo)
        t_axis = torch.where(t_axis > _EPS, t_axis, torch.full_like(t_axis, _INF))
        t, axis = t_axis.min(-1)
        face = axis * 2 + (torch.gather(d, -1, axis[..., None])[..., 0] > 0).long()
    return t, face


def _hit_box(o: Tensor, d: Tensor, center: Tensor, half: Tensor, yaw: float) -> tuple[Tensor, Tensor]:
    R = rot_y(yaw, d.dtype)
    ol, dl = (o - center) @ R, d @ R  # into the box frame
    safe = torch.where(dl.abs() < 1e-12, torch.full_like(dl, 1e-12), dl)
    t1, t2 = (-half - ol) / safe, (half - ol) / safe
    tmin, tmax = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = tmin.max(-1)
    t_far = tmax.min(-1).values
    hit = (t_far >= t_near) & (t_near > _EPS)
    t = torch.where(hit, t_near, torch.full_like(t_near, _INF))
    sign = -torch.sign(torch.gather(dl, -1, axis[..., None])[..., 0])
    n_local = torch.nn.functional.one_hot(axis, 3).to(d.dtype) * sign[..., None]
    return t, n_local @ R.T


def _hit_sphere(o: Tensor, d: Tensor, center: Tensor, r: float) -> tuple[Tensor, Tensor]:
    oc = o - center
    a = (d * d).sum(-1)
    b = 2 * (d * oc).sum(-1)
    c = (oc * oc).sum(-1) - r * r
    disc = b * b - 4 * a * c
    t = (-b - torch.sqrt(disc.clamp(min=0))) / (2 * a)
    t = torch.where((disc >= 0) & (t > _EPS), t, torch.full_like(t, _INF))
    n = (o + t[..., None].clamp(max=1e6) * d - center) / r
    return t, n


def _hit_cylinder(o: Tensor, d: Tensor, center: Tensor, r: float, hh: float) -> tuple[Tensor, Tensor]:
    oc = o - center
    a = d[..., 0] ** 2 + d[..., 2] ** 2
    b = 2 * (d[..., 0] * oc[..., 0] + d[..., 2] * oc[..., 2])
    c = oc[..., 0] ** 2 + oc[..., 2] ** 2 - r * r
    disc = b * b - 4 * a * c
    t_side = (-b - torch.sqrt(disc.clamp(min=0))) / (2 * a.clamp(min=1e-12))
    y_side = oc[..., 1] + t_side * d[..., 1]
    side_ok = (disc >= 0) & (t_side > _EPS) & (y_side.abs() <= hh)
    t_side = torch.where(side_ok, t_side, torch.full_like(t_side, _INF))
    safe_dy = torch.where(d[..., 1].abs() < 1e-12, torch.full_like(d[..., 1], 1e-12), d[..., 1])
    t_caps = []
    for cap in (-hh, hh):
        tc = (cap - oc[..., 1]) / safe_dy
        x, z = oc[..., 0] + tc * d[..., 0], oc[..., 2] + tc * d[..., 2]
        t_caps.append(torch.where((tc > _EPS) & (x * x + z * z <= r * r), tc, torch.full_like(tc, _INF)))
    t_cap = torch.minimum(*t_caps)
    t = torch.minimum(t_side, t_cap)
    p = oc + t[..., None].clamp(max=1e6) * d
    n_side = torch.stack([p[..., 0], torch.zeros_like(p[..., 1]), p[..., 2]], -1) / r
    n_cap = torch.zeros_like(p)
    n_cap[..., 1] = torch.sign(p[..., 1])
    return t, torch.where((t_side <= t_cap)[..., None], n_side, n_cap)


def _hit_object(prim, o: Tensor, d: Tensor, frame: int) -> tuple[Tensor, Tensor]:
    """Hit distance and normal of rays (origins ``(3,)`` or ``(N, 3)``, directions ``(N, 3)``) on one primitive."""
    c = (prim.center + frame * prim.velocity).to(d.dtype)
    if prim.kind == "box":
        return _hit_box(o, d, c, prim.size.to(d.dtype), prim.yaw)
    if prim.kind == "sphere":
        return _hit_sphere(o, d, c, float(prim.size[0]))
    return _hit_cylinder(o, d, c, float(prim.size[0]), float(prim.size[1]))


def _lit(scene: Scene, p: Tensor, n: Tensor, frame: int, light_offset: Tensor) -> Tensor:
    """Fraction of each light that reaches points ``p`` ``(N, 3)`` past the objects: ``(L, N)`` in {0, 1}.

    ``light_offset`` ``(N, 3)`` moves each point's light sample across the light's area (soft shadows once
    the sub-pixel samples are averaged). Room faces never shadow: the lights hang inside the room.
    """
    o = p + 1e-3 * n
    out = []
    for lp in scene.lights.to(p.dtype):
        to_l = lp + light_offset - o
        dist = to_l.norm(dim=-1)
        d = to_l / dist[..., None]
        blocked = torch.zeros_like(dist, dtype=torch.bool)
        for prim in scene.objects:
            blocked |= _hit_object(prim, o, d, frame)[0] < dist
        out.append((~blocked).to(p.dtype))
    return torch.stack(out) if out else p.new_zeros(0, p.shape[0])


def _light_samples(k: int, n: int, radius: float, dtype: torch.dtype) -> Tensor:
    """Points on a horizontal light disc ``(k * n, 3)`` (sample-major like the sub-pixel rays): each of the
    ``n`` pixels takes ``k`` stratified points (a spiral), turned by its own fixed pseudo-random angle so
    that neighbouring pixels sample the light differently and a penumbra averages out smooth."""
    i = torch.arange(n, dtype=torch.float64)
    turn = torch.frac(torch.sin(i * 12.9898 + 78.233) * 43758.5453) * (2 * math.pi)  # (n,)
    j = torch.arange(k, dtype=torch.float64)[:, None]
    ang = turn[None] + j * (2 * math.pi / k)
    r = radius * torch.sqrt((j + 0.5) / k)
    off = torch.stack([r * torch.cos(ang), torch.zeros_like(ang), r * torch.sin(ang)], -1)
    return off.reshape(k * n, 3).to(dtype)


def _corner_occlusion(scene: Scene, p: Tensor, obj: Tensor) -> Tensor:
    """Ambient occlusion of room faces ``(N,)`` in (0, 1]: darker within ~0.3 m of another face (corners,
    wall-floor edges), as indirect light is there; objects keep 1 (their contact shows as shadow)."""
    lo, hi = (b.to(p.dtype) for b in scene.bounds())
    gap = torch.stack([p - lo, hi - p], -1).reshape(-1, 6).clamp(min=0)  # (N, 6): to faces -x, +x, -y, +y, -z, +z
    face = (-obj - 1).clamp(min=0)
    gap = gap.scatter(-1, face[:, None], _INF)  # not the face the point lies on
    ao = 1.0 - 0.6 * torch.exp(-gap.min(-1).values / 0.3)
    return torch.where(obj < 0, ao, torch.ones_like(ao))


def _cast(scene: Scene, o: Tensor, d: Tensor, frame: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Closest hit of rays ``(N, 3)``: depth ``t``, hit point, normal, object index (-1..-6 room faces)."""
    lo, hi = (b.to(d.dtype) for b in scene.bounds())
    t, face = _hit_room(o, d, lo, hi)
    normal = torch.zeros_like(d)
    axis = face // 2
    normal.scatter_(-1, axis[..., None], torch.where(face % 2 == 0, 1.0, -1.0).to(d.dtype)[..., None])
    obj = -(face + 1)
    for k, prim in enumerate(scene.objects):
        tk, nk = _hit_object(prim, o, d, frame)
        closer = tk < t
        t = torch.where(closer, tk, t)
        normal = torch.where(closer[..., None], nk, normal)
        obj = torch.where(closer, torch.full_like(obj, k), obj)
    return t, o + t[..., None] * d, normal, obj


def _photo(tex: Tensor, local: Tensor, n_local: Tensor, scale: float, tint: Tensor) -> Tensor:
    """Triplanar mapping: each point takes the texture on the plane across its normal's largest axis."""
    axis = n_local.abs().argmax(-1)
    u = torch.where(axis == 0, local[:, 2], local[:, 0])
    v = torch.where(axis == 1, local[:, 2], local[:, 1])
    rgb = sample_texture(tex, torch.stack([u, v], -1) * scale)
    return (rgb * tint).clamp(0, 1)


def _shade(scene: Scene, p: Tensor, n: Tensor, obj: Tensor, frame: int,
           light_offset: Tensor | None = None) -> Tensor:
    """Colour ``(N, 3)`` in [0, 1] of hit points: texture x (ambient + Lambert light / (dist^2 + 1)); with
    ``light_offset`` (``(N, 3)``, see :func:`_lit`) also cast shadows and corner occlusion."""
    color = torch.zeros_like(p)
    for idx in torch.unique(obj).tolist():
        m = obj == idx
        if idx < 0:
            face = -idx - 1
            colors, pattern, scale, local = scene.room_colors[face], scene.room_patterns[face], \
                float(scene.room_scales[face]), p[m]
            tex, tex_scale, n_local = scene.room_textures[face], scene.room_tex_scales[face], n[m]
        else:
            prim = scene.objects[idx]
            colors, pattern, scale = prim.color, prim.pattern, prim.scale
            R = rot_y(prim.yaw, p.dtype)
            local = (p[m] - (prim.center + frame * prim.velocity).to(p.dtype)) @ R
            tex, tex_scale, n_local = prim.texture, prim.tex_scale, n[m] @ R
        cols = colors.to(p.dtype)
        if 0 <= tex < len(scene.textures):
            tint = 0.6 + 0.4 * cols[1] / cols[1].max().clamp(min=1e-6)  # a mild colour cast per surface
            color[m] = _photo(scene.textures[tex].to(p.dtype), local, n_local, tex_scale, tint)
            continue
        f = _pattern(pattern, local, scale, float(scene.seed % 1000 + idx))[..., None]
        color[m] = cols[0] * (1 - f) + cols[1] * f
    light = torch.full(p.shape[:-1], scene.ambient, dtype=p.dtype)
    visible = None
    if light_offset is not None:
        light = light * _corner_occlusion(scene, p, obj)
        visible = _lit(scene, p, n, frame, light_offset)
    for j, (lp, power) in enumerate(zip(scene.lights.to(p.dtype), scene.light_power.tolist())):
        to_l = lp - p
        dist2 = (to_l * to_l).sum(-1)
        lam = ((to_l / dist2.sqrt()[..., None]) * n).sum(-1).clamp(min=0)
        light = light + power * lam / (dist2 + 1.0) * (1.0 if visible is None else visible[j])
    return (color * light[..., None]).clamp(0, 1)


@torch.no_grad()
def render(scene: Scene, T_wc: Tensor, K: Tensor, h: int, w: int, frame: int = 0, supersample: int = 2,
           dtype: torch.dtype = torch.float32, shadows: float = 0.0) -> dict:
    """Render one view.

    Args:
        scene: the scene.
        T_wc: ``(4, 4)`` camera-to-world (OpenCV camera axes).
        K: ``(3, 3)`` intrinsics.
        h, w: image size.
        frame: time index (moving objects).
        supersample: sub-pixel rays per axis for the colour.
        shadows: the lights' radius (metres) for cast shadows and corner occlusion; each sub-pixel ray
            takes its own point on the light disc, so shadows are soft with ``supersample > 1``. ``0``: the
            plain Lambert shading (no shadows, no occlusion).

    Returns:
        ``rgb`` ``(H, W, 3)`` uint8, ``depth`` ``(H, W)`` float32 camera z (metres), ``valid`` ``(H, W)`` bool,
        ``dynamic`` ``(H, W)`` bool: the pixel-centre ray hits an object that moves (non-zero velocity).
    """
    T = T_wc.to(dtype)
    Kd = K.to(dtype)
    s = max(1, supersample)
    grid = (torch.arange(s, dtype=dtype) + 0.5) / s - 0.5
    offsets = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), -1).reshape(-1, 2)
    o, centre = pixel_rays(T, Kd, h, w, torch.zeros(1, 2, dtype=dtype))
    t, _, _, hit = _cast(scene, o, centre[0], frame)  # depth and object: the pixel-centre ray
    movers = torch.tensor([k for k, prim in enumerate(scene.objects) if bool((prim.velocity != 0).any())],
                          dtype=hit.dtype)
    dynamic = torch.isin(hit, movers) if len(movers) else torch.zeros_like(hit, dtype=torch.bool)
    if s == 1:
        _, p, n, obj = _cast(scene, o, centre[0], frame)
        light_offset = torch.zeros_like(p) if shadows > 0 else None
        rgb = _shade(scene, p, n, obj, frame, light_offset)
    else:
        _, sub = pixel_rays(T, Kd, h, w, offsets)
        _, p, n, obj = _cast(scene, o, sub.reshape(-1, 3), frame)
        light_offset = None
        if shadows > 0:
            light_offset = _light_samples(s * s, h * w, shadows, dtype)
        rgb = _shade(scene, p, n, obj, frame, light_offset).reshape(s * s, h * w, 3).mean(0)
    depth = t.reshape(h, w)
    valid = torch.isfinite(depth) & (depth > 0)
    return {"rgb": (rgb.reshape(h, w, 3) * 255).round().to(torch.uint8), "depth": depth.float().nan_to_num(0.0, 0.0, 0.0),
            "valid": valid, "dynamic": dynamic.reshape(h, w) & valid}
