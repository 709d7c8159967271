"""Exact inside tests, penetration-free two-hand ground truth and occupancy labels.

Inside tests are those of :mod:`im2hands_model.metrics` (libigl's fast generalised winding
numbers: a point is inside a closed mesh when its winding number exceeds 0.5), exact for
watertight meshes and robust near skinning folds; nothing here loops over points in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from im2hands_model.hands import BOX_HALF, from_normalized, to_normalized
from im2hands_model.metrics import inside_mesh as inside
from im2hands_model.metrics import sample_surface_points

NEAR_SURFACE_SIGMA_M = 0.004  # σ of the Gaussian offset of near-surface samples (metres)


def _c(a: np.ndarray, dtype=np.float64) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)


def surface_distance(
    vertices: np.ndarray, faces: np.ndarray, points: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Unsigned distance of points to a mesh surface and the closest surface points."""
    import igl

    if len(points) == 0:
        return np.zeros(0), np.zeros((0, 3))
    sq, _, closest = igl.point_mesh_squared_distance(_c(points), _c(vertices), _c(faces, np.int64))
    return np.sqrt(sq), closest


def hands_overlap(va: np.ndarray, fa: np.ndarray, vb: np.ndarray, fb: np.ndarray) -> bool:
    """True when a vertex of either hand lies inside the other hand."""
    return bool(inside(vb, fb, va).any() or inside(va, fa, vb).any())


@dataclass
class SplitResult:
    """Meshes after :func:`split_overlap` and what it changed."""

    vertices_a: np.ndarray
    vertices_b: np.ndarray
    max_depth_m: float  # deepest vertex of one hand inside the other, before the split
    moved_vertices: int


def split_overlap(va: np.ndarray, fa: np.ndarray, vb: np.ndarray, fb: np.ndarray) -> SplitResult:
    """Make two touching hands penetration-free by splitting their overlap.

    Every vertex of one hand inside the other moves half way to the other hand's nearest surface
    point. Where the two surfaces overlap, both sides meet near the middle surface of the overlap,
    so the shared volume is divided between the hands by which surface is nearer (what soft
    tissue does when hands press together). Any residue left by the discretisation is resolved
    in the occupancy labels (:func:`label_points`).
    """
    in_b = np.flatnonzero(inside(vb, fb, va))
    in_a = np.flatnonzero(inside(va, fa, vb))
    da, ca = surface_distance(vb, fb, va[in_b])
    db, cb = surface_distance(va, fa, vb[in_a])
    new_a, new_b = va.copy(), vb.copy()
    new_a[in_b] += 0.5 * (ca - va[in_b])
    new_b[in_a] += 0.5 * (cb - vb[in_a])
    depth = float(max(da.max(initial=0.0), db.max(initial=0.0)))
    return SplitResult(new_a, new_b, depth, int(in_a.size + in_b.size))


def sample_query_points(
    vertices: np.ndarray,
    faces: np.ndarray,
    rot: np.ndarray,
    origin: np.ndarray,
    n: int,
    rng: np.random.Generator,
    uniform_fraction: float = 0.5,
) -> np.ndarray:
    """Occupancy query points of one hand in its normalised space, rounded to float16.

    Half (``uniform_fraction``) are uniform in the box ``[-BOX_HALF, BOX_HALF]^3``; the rest lie
    near the surface (surface samples plus a Gaussian offset of σ = 4 mm), clipped to the box.
    Points are returned as float16, the precision they are stored at (0.1 mm), so labels computed
    from them are exact for what is stored.
    """
    n_uniform = int(round(n * uniform_fraction))
    uniform = rng.uniform(-BOX_HALF, BOX_HALF, size=(n_uniform, 3))
    near = sample_surface_points(vertices, faces, n - n_uniform, rng)
    near = near + rng.normal(0.0, NEAR_SURFACE_SIGMA_M, size=near.shape)
    near = np.clip(to_normalized(near, rot, origin), -BOX_HALF, BOX_HALF)
    points = np.concatenate([uniform, near])
    return points[rng.permutation(n)].astype(np.float16)


def label_points(
    points_cam: np.ndarray,
    own: tuple[np.ndarray, np.ndarray],
    other: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, int]:
    """Occupancy labels of camera-frame points for one hand of a (possibly) two-hand scene.

    A point inside both hands (only possible in a residue of :func:`split_overlap`) belongs to
    the hand it is deeper inside, so no point is ever labelled inside both hands.

    Returns:
        ``(labels [N] bool, number of points reassigned to the other hand)``.
    """
    occ = inside(*own, points_cam)
    if other is None or not occ.any():
        return occ, 0
    idx = np.flatnonzero(occ)
    both = idx[inside(*other, points_cam[idx])]
    if both.size == 0:
        return occ, 0
    d_own, _ = surface_distance(*own, points_cam[both])
    d_other, _ = surface_distance(*other, points_cam[both])
    # Deeper inside the other hand than inside this one: the point is the other hand's.
    lost = both[d_other > d_own]
    occ[lost] = False
    return occ, int(lost.size)


def hand_occupancy(
    vertices: np.ndarray,
    faces: np.ndarray,
    rot: np.ndarray,
    origin: np.ndarray,
    other: tuple[np.ndarray, np.ndarray] | None,
    n: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Query points (normalised, float16) and labels for one hand; see :func:`label_points`."""
    points = sample_query_points(vertices, faces, rot, origin, n, rng)
    cam = from_normalized(points.astype(np.float64), rot, origin)
    labels, reassigned = label_points(cam, (vertices, faces), other)
    return points, labels, reassigned
