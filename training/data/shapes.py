"""A procedural 3D shape set: chairs, tables, airplanes, lamps, cars, sofas, mugs and bottles from primitives.

No real point-cloud set can be fetched from a package registry, so the shipped point-cloud default trains on
shapes assembled from boxes, cylinders, cones, ellipsoids and tori with random proportions (seat height, leg
style, wing sweep, shade shape, ...). Each shape is sampled uniformly over its surface (points per part in
proportion to its area), centred on its bounding box and scaled to a unit bounding-box diagonal, which is how
ShapeNetCore.v2 models are normalised; y is up, as in ShapeNet.

Everything is a pure function of seeds: shape ``i`` of class ``c`` in split ``s`` has its structure drawn from
``default_rng([seed, s, c, i])`` and its points from ``default_rng([seed, s, c, i, epoch])``, so the train,
val and test splits are disjoint, a dataset is the same on every machine, and a resumed training run sees the
same points as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS = {"train": 0, "val": 1, "test": 2}


# ---------------------------------------------------------------------------------------------- primitives


def rotation(axis: str, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=np.float64)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=np.float64)


@dataclass
class Part:
    """One primitive in its local frame (centred at the origin, axis along y), then rotated and moved."""

    kind: str  # box | cylinder | frustum | ellipsoid | torus
    params: tuple
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rot: np.ndarray | None = None

    def area(self) -> float:
        return _AREA[self.kind](*self.params)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        pts = _SAMPLE[self.kind](n, rng, *self.params)
        if self.rot is not None:
            pts = pts @ self.rot.T
        return pts + np.asarray(self.center)


def _box_area(sx: float, sy: float, sz: float) -> float:
    return 2 * (sx * sy + sy * sz + sx * sz)


def _box_sample(n: int, rng: np.random.Generator, sx: float, sy: float, sz: float) -> np.ndarray:
    areas = np.array([sy * sz, sy * sz, sx * sz, sx * sz, sx * sy, sx * sy])
    face = rng.choice(6, size=n, p=areas / areas.sum())
    uv = rng.random((n, 2)) - 0.5
    half = np.array([sx, sy, sz]) / 2
    pts = np.empty((n, 3))
    for f in range(6):
        m = face == f
        axis, sign = f // 2, 1.0 if f % 2 else -1.0
        others = [a for a in range(3) if a != axis]
        pts[m, axis] = sign * half[axis]
        pts[m, others[0]] = uv[m, 0] * 2 * half[others[0]]
        pts[m, others[1]] = uv[m, 1] * 2 * half[others[1]]
    return pts


def _frustum_area(r0: float, r1: float, h: float, cap0: bool = True, cap1: bool = True) -> float:
    lateral = math.pi * (r0 + r1) * math.hypot(r0 - r1, h)
    return lateral + cap0 * math.pi * r0 * r0 + cap1 * math.pi * r1 * r1


def _disk(n: int, rng: np.random.Generator, r: float, y: float) -> np.ndarray:
    rad = r * np.sqrt(rng.random(n))
    th = rng.random(n) * 2 * math.pi
    return np.stack([rad * np.cos(th), np.full(n, y), rad * np.sin(th)], axis=1)


def _frustum_sample(
    n: int, rng: np.random.Generator, r0: float, r1: float, h: float, cap0: bool = True, cap1: bool = True
) -> np.ndarray:
    """Side from y=-h/2 (radius r0) to y=+h/2 (radius r1), optional caps; uniform in area."""
    parts = np.array([math.pi * (r0 + r1) * math.hypot(r0 - r1, h), cap0 * math.pi * r0 * r0, cap1 * math.pi * r1 * r1])
    which = rng.choice(3, size=n, p=parts / parts.sum())
    out = np.empty((n, 3))
    m = which == 0
    k = int(m.sum())
    u = rng.random(k)
    # Height fraction s with density proportional to the radius r0 + (r1 - r0) s (inverse CDF of a trapezoid).
    if abs(r1 - r0) < 1e-9:
        s = u
    else:
        a, b = (r1 - r0) / 2, r0
        s = (-b + np.sqrt(b * b + 4 * a * u * (r0 + r1) / 2)) / (2 * a)
    rad = r0 + (r1 - r0) * s
    th = rng.random(k) * 2 * math.pi
    out[m] = np.stack([rad * np.cos(th), (s - 0.5) * h, rad * np.sin(th)], axis=1)
    out[which == 1] = _disk(int((which == 1).sum()), rng, r0, -h / 2)
    out[which == 2] = _disk(int((which == 2).sum()), rng, r1, h / 2)
    return out


def _cylinder_area(r: float, h: float, cap0: bool = True, cap1: bool = True) -> float:
    return _frustum_area(r, r, h, cap0, cap1)


def _cylinder_sample(n: int, rng: np.random.Generator, r: float, h: float, cap0: bool = True, cap1: bool = True):
    return _frustum_sample(n, rng, r, r, h, cap0, cap1)


def _ellipsoid_area(a: float, b: float, c: float) -> float:
    p = 1.6075  # Knud Thomsen's approximation (error < 1.1 %)
    return 4 * math.pi * (((a * b) ** p + (a * c) ** p + (b * c) ** p) / 3) ** (1 / p)


def _ellipsoid_sample(n: int, rng: np.random.Generator, a: float, b: float, c: float) -> np.ndarray:
    """Uniform on the surface: directions scaled to the ellipsoid, accepted in proportion to the area element."""
    out = np.empty((0, 3))
    g = min(a * b, a * c, b * c)
    while len(out) < n:
        d = rng.normal(size=(2 * n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        p = d * np.array([a, b, c])
        # Area element of (x/a)² + ... = 1 relative to the unit sphere: ‖(bc·x/a, ac·y/b, ab·z/c)‖ on the sphere.
        w = np.linalg.norm(d * np.array([b * c, a * c, a * b]), axis=1)
        keep = rng.random(2 * n) < g / w
        out = np.concatenate([out, p[keep]])
    return out[:n]


def _torus_area(big: float, small: float, arc: float = 2 * math.pi) -> float:
    return arc * big * 2 * math.pi * small


def _torus_sample(n: int, rng: np.random.Generator, big: float, small: float, arc: float = 2 * math.pi):
    """A torus (or an arc of one, from angle 0 to ``arc``) around the z axis, uniform in area."""
    out = np.empty((0, 3))
    while len(out) < n:
        u = rng.random(2 * n) * arc
        v = rng.random(2 * n) * 2 * math.pi
        keep = rng.random(2 * n) * (big + small) < big + small * np.cos(v)
        u, v = u[keep], v[keep]
        ring = big + small * np.cos(v)
        out = np.concatenate([out, np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], axis=1)])
    return out[:n]


_AREA: dict[str, Callable[..., float]] = {
    "box": _box_area,
    "cylinder": _cylinder_area,
    "frustum": _frustum_area,
    "ellipsoid": _ellipsoid_area,
    "torus": _torus_area,
}
_SAMPLE: dict[str, Callable[..., np.ndarray]] = {
    "box": _box_sample,
    "cylinder": _cylinder_sample,
    "frustum": _frustum_sample,
    "ellipsoid": _ellipsoid_sample,
    "torus": _torus_sample,
}


def box(sx: float, sy: float, sz: float, center=(0.0, 0.0, 0.0), rot: np.ndarray | None = None) -> Part:
    return Part("box", (sx, sy, sz), tuple(center), rot)


def cyl(r: float, h: float, center=(0.0, 0.0, 0.0), axis: str = "y", caps=(True, True), rot=None) -> Part:
    base = {"y": None, "x": rotation("z", math.pi / 2), "z": rotation("x", math.pi / 2)}[axis]
    return Part("cylinder", (r, h, *caps), tuple(center), _compose(rot, base))


def frustum(r0: float, r1: float, h: float, center=(0.0, 0.0, 0.0), axis: str = "y", caps=(True, True), rot=None):
    base = {"y": None, "x": rotation("z", -math.pi / 2), "z": rotation("x", math.pi / 2)}[axis]
    return Part("frustum", (r0, r1, h, *caps), tuple(center), _compose(rot, base))


def _compose(a: np.ndarray | None, b: np.ndarray | None) -> np.ndarray | None:
    if a is None:
        return b
    return a if b is None else a @ b


def beam(p0: Sequence[float], p1: Sequence[float], r: float, square: bool = False) -> Part:
    """A cylinder (or square bar) of radius/half-width ``r`` from point p0 to p1."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    d = p1 - p0
    length = float(np.linalg.norm(d))
    y = np.array([0.0, 1.0, 0.0])
    u = d / max(length, 1e-9)
    v = np.cross(y, u)
    s, c = np.linalg.norm(v), float(np.dot(y, u))
    if s < 1e-9:
        rot = np.eye(3) if c > 0 else rotation("x", math.pi)
    else:
        k = v / s
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        rot = np.eye(3) + s * kx + (1 - c) * kx @ kx
    center = tuple((p0 + p1) / 2)
    if square:
        return Part("box", (2 * r, length, 2 * r), center, rot)
    return Part("cylinder", (r, length, True, True), center, rot)


# ---------------------------------------------------------------------------------------------- shapes


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def chair(rng: np.random.Generator) -> list[Part]:
    w, d, t = _u(rng, 0.4, 0.6), _u(rng, 0.4, 0.6), _u(rng, 0.03, 0.08)
    h = _u(rng, 0.38, 0.52)
    parts = [box(w, t, d, (0, h, 0))]
    if rng.random() < 0.2:  # office chair: column and a five-spoke base
        parts.append(cyl(_u(rng, 0.025, 0.04), h - 0.06, (0, h / 2, 0)))
        spoke = _u(rng, 0.22, 0.32)
        for k in range(5):
            a = 2 * math.pi * k / 5 + rng.uniform(-0.1, 0.1)
            parts.append(beam((0, 0.05, 0), (spoke * math.cos(a), 0.02, spoke * math.sin(a)), 0.02, square=True))
    else:
        r = _u(rng, 0.015, 0.035)
        inset = _u(rng, 0.0, 0.04) + r
        square = rng.random() < 0.5
        splay = _u(rng, 0.0, 0.05)
        for sx in (-1, 1):
            for sz in (-1, 1):
                top = (sx * (w / 2 - inset), h - t / 2, sz * (d / 2 - inset))
                foot = (sx * (w / 2 - inset + splay), 0.0, sz * (d / 2 - inset + splay))
                parts.append(beam(foot, top, r, square))
        if rng.random() < 0.3:  # stretchers
            for sz in (-1, 1):
                y = _u(rng, 0.08, 0.2)
                parts.append(
                    beam((-(w / 2 - inset), y, sz * (d / 2 - inset)), (w / 2 - inset, y, sz * (d / 2 - inset)), r * 0.6)
                )
    bh, bt = _u(rng, 0.3, 0.6), _u(rng, 0.025, 0.06)
    tilt = rotation("x", -_u(rng, 0.0, 0.3))
    back_center = np.array([0, h + t / 2 + bh / 2, -d / 2 + bt / 2])
    pivot = np.array([0, h + t / 2, -d / 2 + bt / 2])
    if rng.random() < 0.3:  # two posts and rails instead of a panel
        for sx in (-1, 1):
            c = pivot + tilt @ (np.array([sx * (w / 2 - 0.03), bh / 2, 0]))
            parts.append(box(0.04, bh, bt, c, tilt))
        for k in range(int(rng.integers(2, 4))):
            y = bh * (1 - 0.3 * k) - 0.04
            c = pivot + tilt @ np.array([0, y, 0])
            parts.append(box(w - 0.06, 0.05, bt * 0.8, c, tilt))
    else:
        parts.append(box(w * _u(rng, 0.85, 1.0), bh, bt, pivot + tilt @ (back_center - pivot), tilt))
    if rng.random() < 0.35:  # arm rests
        ah = _u(rng, 0.15, 0.25)
        for sx in (-1, 1):
            x = sx * (w / 2 - 0.02)
            parts.append(box(0.05, 0.03, d * 0.85, (x, h + ah, 0.0)))
            parts.append(beam((x, h, d * 0.3), (x, h + ah, d * 0.3), 0.018))
    return parts


def table(rng: np.random.Generator) -> list[Part]:
    h, t = _u(rng, 0.6, 0.8), _u(rng, 0.025, 0.07)
    parts: list[Part] = []
    if rng.random() < 0.3:  # round top on a pedestal or three/four legs
        r = _u(rng, 0.35, 0.65)
        parts.append(cyl(r, t, (0, h - t / 2, 0)))
        if rng.random() < 0.5:
            parts.append(cyl(_u(rng, 0.03, 0.07), h - t, (0, (h - t) / 2, 0)))
            parts.append(cyl(_u(rng, 0.2, 0.35) * r / 0.5, 0.03, (0, 0.015, 0)))
        else:
            n_legs = int(rng.integers(3, 5))
            for k in range(n_legs):
                a = 2 * math.pi * k / n_legs
                rr = r * _u(rng, 0.6, 0.8)
                parts.append(
                    beam((rr * math.cos(a), 0, rr * math.sin(a)), (rr * math.cos(a), h - t, rr * math.sin(a)), 0.025)
                )
        return parts
    w, d = _u(rng, 0.8, 1.6), _u(rng, 0.5, 1.0)
    parts.append(box(w, t, d, (0, h - t / 2, 0)))
    r = _u(rng, 0.02, 0.045)
    inset = _u(rng, 0.0, 0.06) + r
    square = rng.random() < 0.6
    for sx in (-1, 1):
        for sz in (-1, 1):
            x, z = sx * (w / 2 - inset), sz * (d / 2 - inset)
            parts.append(beam((x, 0, z), (x, h - t, z), r, square))
    if rng.random() < 0.4:  # apron
        ah = _u(rng, 0.05, 0.12)
        for sz in (-1, 1):
            parts.append(box(w - 2 * inset, ah, 0.02, (0, h - t - ah / 2, sz * (d / 2 - inset))))
        for sx in (-1, 1):
            parts.append(box(0.02, ah, d - 2 * inset, (sx * (w / 2 - inset), h - t - ah / 2, 0)))
    if rng.random() < 0.25:  # lower shelf
        parts.append(box(w - 2 * inset, 0.02, d - 2 * inset, (0, _u(rng, 0.1, 0.25), 0)))
    return parts


def airplane(rng: np.random.Generator) -> list[Part]:
    length, rad = _u(rng, 1.0, 1.4), _u(rng, 0.05, 0.09)
    body = length * _u(rng, 0.55, 0.7)
    nose, tail = length * _u(rng, 0.08, 0.15), length - body - length * _u(rng, 0.08, 0.15)
    tail = max(tail, length * 0.15)
    x0 = -length / 2
    parts = [
        Part("ellipsoid", (nose, rad, rad), (x0 + nose, 0, 0)),
        cyl(rad, body, (x0 + nose + body / 2, 0, 0), axis="x", caps=(False, False)),
        frustum(rad, rad * 0.3, tail, (x0 + nose + body + tail / 2, rad * 0.3, 0), axis="x", caps=(False, True)),
    ]
    span, chord = _u(rng, 0.9, 1.4), _u(rng, 0.14, 0.28)
    sweep, dihedral = _u(rng, 0.0, 0.6), _u(rng, -0.05, 0.12)
    wx = x0 + length * _u(rng, 0.38, 0.52)
    wy = rad * _u(rng, -0.6, 0.6)
    for side in (-1, 1):
        rot = rotation("y", side * sweep) @ rotation("x", side * dihedral)
        offset = rot @ np.array([0, 0, side * span / 4])
        parts.append(box(chord, 0.02, span / 2, (wx + offset[0], wy + offset[1], offset[2]), rot))
    tx = length / 2 - tail * 0.35
    tspan, tchord = _u(rng, 0.3, 0.45), _u(rng, 0.08, 0.14)
    for side in (-1, 1):
        rot = rotation("y", side * sweep * 0.8)
        offset = rot @ np.array([0, 0, side * tspan / 4])
        parts.append(box(tchord, 0.015, tspan / 2, (tx + offset[0], rad * 0.4, offset[2]), rot))
    fin_h = _u(rng, 0.12, 0.25)
    fin_rot = rotation("z", -_u(rng, 0.2, 0.6))
    parts.append(box(tchord * 1.3, fin_h, 0.015, (tx, rad * 0.3 + fin_h / 2, 0), fin_rot))
    if rng.random() < 0.65:  # engines under the wings
        n = 1 if rng.random() < 0.7 else 2
        er, el = _u(rng, 0.03, 0.05), _u(rng, 0.12, 0.2)
        for side in (-1, 1):
            for k in range(n):
                z = side * span * (0.17 + 0.14 * k)
                x = wx - chord * 0.4 + abs(z) * math.tan(sweep) * 0.9
                parts.append(cyl(er, el, (x, wy - er - 0.02, z), axis="x"))
    return parts


def lamp(rng: np.random.Generator) -> list[Part]:
    parts: list[Part] = []
    base_r, base_h = _u(rng, 0.1, 0.2), _u(rng, 0.02, 0.05)
    if rng.random() < 0.7:
        parts.append(cyl(base_r, base_h, (0, base_h / 2, 0)))
    else:
        parts.append(box(base_r * 1.8, base_h, base_r * 1.8, (0, base_h / 2, 0)))
    pole_r = _u(rng, 0.01, 0.02)
    if rng.random() < 0.35:  # desk lamp: two arm segments and a tilted cone shade
        a1 = _u(rng, 0.3, 0.5)
        ang1 = _u(rng, -0.5, 0.2)
        p1 = np.array([math.sin(ang1) * a1, base_h + math.cos(ang1) * a1, 0])
        ang2 = _u(rng, 0.6, 1.4)
        a2 = _u(rng, 0.25, 0.45)
        p2 = p1 + np.array([math.sin(ang2) * a2, math.cos(ang2) * a2, 0])
        parts += [beam((0, base_h, 0), p1, pole_r), beam(p1, p2, pole_r)]
        sh = _u(rng, 0.1, 0.18)
        shade_rot = rotation("z", _u(rng, 2.2, 2.9))
        parts.append(
            frustum(
                _u(rng, 0.02, 0.04),
                _u(rng, 0.07, 0.12),
                sh,
                tuple(p2 + shade_rot @ np.array([0, sh / 2, 0])),
                caps=(True, False),
                rot=shade_rot,
            )
        )
        return parts
    pole_h = _u(rng, 0.35, 1.1)
    parts.append(cyl(pole_r, pole_h, (0, base_h + pole_h / 2, 0)))
    top = base_h + pole_h
    sh = _u(rng, 0.12, 0.28)
    r_bottom, r_top = _u(rng, 0.12, 0.26), _u(rng, 0.05, 0.14)
    if rng.random() < 0.2:  # globe
        parts.append(Part("ellipsoid", (r_bottom * 0.8,) * 3, (0, top + r_bottom * 0.6, 0)))
    else:
        parts.append(frustum(r_bottom, r_top, sh, (0, top - sh * _u(rng, 0.1, 0.5), 0), caps=(False, False)))
    return parts


def car(rng: np.random.Generator) -> list[Part]:
    length, width = _u(rng, 0.9, 1.25), _u(rng, 0.4, 0.52)
    wheel_r, wheel_w = _u(rng, 0.08, 0.12), _u(rng, 0.05, 0.09)
    body_h = _u(rng, 0.14, 0.24)
    y0 = wheel_r * _u(rng, 0.6, 0.9)
    parts = [box(length, body_h, width, (0, y0 + body_h / 2, 0))]
    cab_l, cab_h = length * _u(rng, 0.35, 0.6), _u(rng, 0.1, 0.2)
    cab_x = length * _u(rng, -0.15, 0.1)
    parts.append(box(cab_l, cab_h, width * _u(rng, 0.82, 0.95), (cab_x, y0 + body_h + cab_h / 2, 0)))
    for sx in (-1, 1):
        for sz in (-1, 1):
            x = sx * length * _u(rng, 0.3, 0.38)
            parts.append(cyl(wheel_r, wheel_w, (x, wheel_r, sz * (width / 2 - wheel_w / 4)), axis="z"))
    return parts


def sofa(rng: np.random.Generator) -> list[Part]:
    w, d = _u(rng, 1.4, 2.2), _u(rng, 0.7, 0.95)
    leg_h = _u(rng, 0.03, 0.1)
    seat_h = _u(rng, 0.35, 0.45)
    parts = [box(w, seat_h - leg_h, d, (0, leg_h + (seat_h - leg_h) / 2, 0))]
    bh, bt = _u(rng, 0.3, 0.5), _u(rng, 0.15, 0.25)
    parts.append(box(w, bh, bt, (0, seat_h + bh / 2, -d / 2 + bt / 2)))
    aw, ah = _u(rng, 0.1, 0.2), _u(rng, 0.12, 0.28)
    for sx in (-1, 1):
        parts.append(box(aw, ah, d, (sx * (w / 2 - aw / 2), seat_h + ah / 2, 0)))
    if rng.random() < 0.2:  # chaise
        side = 1 if rng.random() < 0.5 else -1
        cw = w * _u(rng, 0.3, 0.4)
        ext = _u(rng, 0.5, 0.7)
        parts.append(
            box(cw, seat_h - leg_h, ext, (side * (w / 2 - cw / 2), leg_h + (seat_h - leg_h) / 2, d / 2 + ext / 2))
        )
    for sx in (-1, 1):
        for sz in (-1, 1):
            parts.append(cyl(0.025, leg_h, (sx * (w / 2 - 0.06), leg_h / 2, sz * (d / 2 - 0.06))))
    return parts


def mug(rng: np.random.Generator) -> list[Part]:
    r, h = _u(rng, 0.3, 0.45), _u(rng, 0.6, 1.0)
    wall = _u(rng, 0.02, 0.05)
    parts = [
        cyl(r, h, (0, h / 2, 0), caps=(True, False)),
        cyl(r - wall, h - wall, (0, wall + (h - wall) / 2, 0), caps=(True, False)),
    ]
    big, small = _u(rng, 0.16, 0.28) * h / 0.8, _u(rng, 0.03, 0.06)
    rot = rotation("z", -math.pi / 2)
    parts.append(Part("torus", (big, small, math.pi), (r + small * 0.5, h / 2, 0), rot))
    return parts


def bottle(rng: np.random.Generator) -> list[Part]:
    r, h = _u(rng, 0.14, 0.26), _u(rng, 0.45, 0.8)
    neck_r, neck_h = _u(rng, 0.04, 0.08), _u(rng, 0.08, 0.25)
    shoulder = _u(rng, 0.08, 0.25)
    parts = [
        cyl(r, h, (0, h / 2, 0), caps=(True, False)),
        frustum(r, neck_r, shoulder, (0, h + shoulder / 2, 0), caps=(False, False)),
        cyl(neck_r, neck_h, (0, h + shoulder + neck_h / 2, 0), caps=(False, False)),
    ]
    cap_h = _u(rng, 0.03, 0.07)
    parts.append(cyl(neck_r * _u(rng, 1.05, 1.25), cap_h, (0, h + shoulder + neck_h + cap_h / 2, 0)))
    return parts


SHAPES: dict[str, Callable[[np.random.Generator], list[Part]]] = {
    "chair": chair,
    "table": table,
    "airplane": airplane,
    "lamp": lamp,
    "car": car,
    "sofa": sofa,
    "mug": mug,
    "bottle": bottle,
}
CLASS_NAMES: list[str] = list(SHAPES)


def sample_parts(parts: Sequence[Part], num_points: int, rng: np.random.Generator) -> np.ndarray:
    """``num_points`` points uniform over the union of the parts' surfaces (counts drawn by area)."""
    areas = np.array([p.area() for p in parts])
    counts = rng.multinomial(num_points, areas / areas.sum())
    pts = np.concatenate([p.sample(int(k), rng) for p, k in zip(parts, counts) if k > 0])
    return pts[rng.permutation(len(pts))]


def normalize_unit_diagonal(points: np.ndarray) -> np.ndarray:
    """Centre on the bounding box and scale to a unit bounding-box diagonal (ShapeNetCore.v2's normalisation)."""
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (points - (lo + hi) / 2) / max(float(np.linalg.norm(hi - lo)), 1e-9)


def shape_parts(name: str, seed: Sequence[int] | int) -> list[Part]:
    """The primitives of one shape of class ``name`` (structure and proportions from ``seed``)."""
    if name not in SHAPES:
        raise ValueError(f"unknown procedural shape class {name!r}; classes: {', '.join(CLASS_NAMES)}")
    return SHAPES[name](np.random.default_rng(seed))


def shape_extent(parts: Sequence[Part], seed: Sequence[int] | int) -> tuple[np.ndarray, np.ndarray]:
    """Bounding box of a shape, from a dense (4096-point) sample drawn with the shape's own seed."""
    extent = sample_parts(parts, 4096, np.random.default_rng(seed))
    return extent.min(axis=0), extent.max(axis=0)


def make_shape(
    name: str,
    num_points: int,
    seed: Sequence[int] | int,
    point_seed: Sequence[int] | int | None = None,
    parts: Sequence[Part] | None = None,
    extent: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """(num_points, 3) float32 surface samples of one procedural shape, normalised to a unit diagonal.

    The normalisation uses the shape's extent (``shape_extent``), not the sample itself, so two point samples
    of one shape differ only by where the points fall, not by scale. ``parts``/``extent`` may be passed in
    when already known (they are functions of ``name`` and ``seed``).
    """
    parts = parts if parts is not None else shape_parts(name, seed)
    lo, hi = extent if extent is not None else shape_extent(parts, seed)
    pts = sample_parts(parts, num_points, np.random.default_rng(point_seed if point_seed is not None else seed))
    pts = (pts - (lo + hi) / 2) / max(float(np.linalg.norm(hi - lo)), 1e-9)
    return pts.astype(np.float32)


class ProceduralShapes:
    """A map-style dataset of procedural shapes: ``{"points": (N, 3) float32 tensor, "label": int}``.

    ``shapes_per_class`` shapes of each class in ``classes`` for ``split``; ``set_epoch`` redraws the points of
    every shape (structure stays), like the random 2048-of-10000 subsample of ShapeNet PC15k training.
    ``set_normalization(mean, std)`` applies DiT-3D's global normalisation ``(p - mean) / std``.
    """

    def __init__(
        self,
        classes: Sequence[str] | None = None,
        shapes_per_class: int = 100,
        num_points: int = 2048,
        split: str = "train",
        seed: int = 0,
        resample_each_epoch: bool = True,
    ):
        self.class_names = list(classes or CLASS_NAMES)
        unknown = [c for c in self.class_names if c not in SHAPES]
        if unknown:
            raise ValueError(f"unknown procedural shape classes {unknown}; available: {', '.join(CLASS_NAMES)}")
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        if shapes_per_class < 1 or num_points < 1:
            raise ValueError("shapes_per_class and num_points must be positive")
        self.shapes_per_class = int(shapes_per_class)
        self.num_points = int(num_points)
        self.split = split
        self.seed = int(seed)
        self.resample_each_epoch = resample_each_epoch
        self.epoch = 0
        self.mean = np.zeros((1, 3), dtype=np.float32)
        self.std = np.ones((1, 1), dtype=np.float32)
        self.labels = [c for c in range(len(self.class_names)) for _ in range(self.shapes_per_class)]
        self._cache: dict[int, tuple[list[Part], tuple[np.ndarray, np.ndarray]]] = {}

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch) if self.resample_each_epoch else 0

    def set_normalization(self, mean: Sequence[float] | np.ndarray, std: float | np.ndarray) -> None:
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 3)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1)

    def shape_seed(self, index: int) -> list[int]:
        c, i = divmod(index, self.shapes_per_class)
        name_id = CLASS_NAMES.index(self.class_names[c])
        return [self.seed, SPLITS[self.split], name_id, i]

    def raw_points(self, index: int, epoch: int | None = None) -> np.ndarray:
        """Un-normalised (N, 3) points of shape ``index`` at ``epoch`` (default: the current one)."""
        seed = self.shape_seed(index)
        epoch = self.epoch if epoch is None else epoch
        name = self.class_names[self.labels[index]]
        if index not in self._cache:  # structure and extent are fixed per shape; only the points are redrawn
            parts = shape_parts(name, seed)
            self._cache[index] = (parts, shape_extent(parts, seed))
        parts, extent = self._cache[index]
        return make_shape(name, self.num_points, seed, [*seed, 1 + epoch], parts, extent)

    def __getitem__(self, index: int) -> dict:
        import torch

        pts = (self.raw_points(index) - self.mean) / self.std
        return {"points": torch.from_numpy(pts.astype(np.float32)), "label": self.labels[index]}

    def all_raw_points(self) -> np.ndarray:
        """(len, N, 3) un-normalised points of every shape at the current epoch (for statistics and metrics)."""
        return np.stack([self.raw_points(i) for i in range(len(self))])


def global_stats(points: np.ndarray) -> tuple[np.ndarray, float]:
    """DiT-3D's (PointFlow's) dataset normalisation: the mean of all points per axis, one std over all coordinates."""
    flat = points.reshape(-1, 3).astype(np.float64)
    # As PointFlow's ``all_points.reshape(-1).std()``: one scalar over every coordinate, about their common mean.
    return flat.mean(axis=0).astype(np.float32), float(flat.reshape(-1).std())
