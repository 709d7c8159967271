"""Evaluation metrics for two-hand reconstruction (paper protocol, SPEC §5).

All geometric inputs are in **metres**; every function says the unit of its output. Meshes may be
given as any object with ``vertices`` and ``faces`` attributes (e.g. :class:`trimesh.Trimesh`) or as
a ``(vertices, faces)`` tuple of arrays. Everything is numpy in, plain Python ``float`` (or small
dataclasses of numpy arrays) out.

Inside tests use libigl's generalised winding number (``igl.fast_winding_number`` by default,
``igl.winding_number`` with ``exact=True``): a point is inside when ``|w| > 0.5``. Taking the
absolute value makes the test independent of face orientation, so a mirrored hand whose winding was
not fixed is still measured correctly. Meshes should be closed (seal the wrist first).

Overview
--------
- :func:`iou`, :func:`mesh_iou`, :func:`iou_from_meshes` -- volumetric IoU (fraction in [0, 1]).
- :func:`chamfer_l1_mm` -- Chamfer-L1 in millimetres, optionally after mid-joint alignment.
- :func:`mpjpe_mm` -- mean per-joint position error in millimetres after joint-9 alignment.
- :func:`penetration_volume` (m³), :func:`penetration_volume_cm3` (cm³) -- volume inside both hands.
- :func:`contact_area` -- per-hand contact area in m² (:class:`ContactArea`).
- :func:`contacts` -- per-vertex penetration / contact sets for both hands (:class:`Contacts`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import igl
import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.spatial import cKDTree

from im2hands_model.hands import MID_JOINT  # the alignment joint (SPEC §2); re-exported

__all__ = [
    "M3_TO_CM3",
    "M3_TO_MM3",
    "MID_JOINT",
    "ContactArea",
    "Contacts",
    "HandContacts",
    "MeshLike",
    "chamfer_l1_mm",
    "chamfer_terms_mm",
    "contact_area",
    "contacts",
    "inside_mesh",
    "iou",
    "iou_from_meshes",
    "joint_errors_mm",
    "mesh_iou",
    "mpjpe_mm",
    "penetration_volume",
    "penetration_volume_cm3",
    "sample_box_points",
    "sample_surface_points",
    "signed_distance",
    "winding_numbers",
]

MeshLike = Any
"""A mesh: an object with ``vertices`` (V, 3) and ``faces`` (F, 3) attributes, or a tuple."""


M3_TO_CM3 = 1.0e6
"""Multiply a volume in m³ by this to get cm³."""

M3_TO_MM3 = 1.0e9
"""Multiply a volume in m³ by this to get mm³."""

M_TO_MM = 1000.0
_N_JOINTS = 21
_INSIDE_THRESHOLD = 0.5
_CHUNK = 2_000_000  # query points per libigl call in the voxel grid
_MAX_VOXELS = 200_000_000


# ----------------------------------------------------------------------------------------------
# Mesh helpers
# ----------------------------------------------------------------------------------------------


def _as_vf(mesh: MeshLike) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    """Return C-contiguous float64 vertices and int64 faces of a mesh-like object."""
    if hasattr(mesh, "vertices") and hasattr(mesh, "faces"):
        vertices, faces = mesh.vertices, mesh.faces
    elif isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        vertices, faces = mesh
    else:
        raise TypeError("mesh must have .vertices/.faces or be a (vertices, faces) tuple")
    return _check_vf(vertices, faces)


def _check_vf(
    vertices: ArrayLike, faces: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
    v = np.ascontiguousarray(vertices, dtype=np.float64)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {f.shape}")
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ValueError("faces index vertices out of range")
    return v, f


def _as_points(points: ArrayLike) -> NDArray[np.float64]:
    p = np.ascontiguousarray(points, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {p.shape}")
    return p


#: An inside test of one mesh: ``points [N, 3] -> bool [N]``.
InsideFn = Callable[[NDArray[np.float64]], Any]


def _bbox(vertices: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    return vertices.min(axis=0), vertices.max(axis=0)


def winding_numbers(
    vertices: ArrayLike, faces: ArrayLike, points: ArrayLike, exact: bool = False
) -> NDArray[np.float64]:
    """Generalised winding number of a triangle mesh at query points.

    Args:
        vertices: (V, 3) mesh vertices in metres.
        faces: (F, 3) triangle vertex indices.
        points: (N, 3) query points in metres.
        exact: use the exact ``igl.winding_number`` (O(F) per point) instead of the fast
            Barnes-Hut approximation ``igl.fast_winding_number``.

    Returns:
        (N,) float64 winding numbers (≈ ±1 inside a closed mesh, ≈ 0 outside).
    """
    v, f = _check_vf(vertices, faces)
    q = _as_points(points)
    if len(q) == 0 or len(f) == 0:
        return np.zeros(len(q), dtype=np.float64)
    if exact:
        return np.asarray(igl.winding_number(v, f, q), dtype=np.float64)
    return np.asarray(igl.fast_winding_number(v, f, q), dtype=np.float64)


def inside_mesh(
    vertices: ArrayLike, faces: ArrayLike, points: ArrayLike, exact: bool = False
) -> NDArray[np.bool_]:
    """Inside test of points against a closed triangle mesh (``|winding number| > 0.5``).

    Points outside the mesh's bounding box are reported outside without a libigl query.

    Args:
        vertices: (V, 3) mesh vertices in metres.
        faces: (F, 3) triangle vertex indices.
        points: (N, 3) query points in metres.
        exact: use the exact winding number instead of the fast approximation.

    Returns:
        (N,) boolean array, True where the point is inside the mesh.
    """
    v, f = _check_vf(vertices, faces)
    q = _as_points(points)
    out = np.zeros(len(q), dtype=bool)
    if len(q) == 0 or len(f) == 0:
        return out
    lo, hi = _bbox(v)
    cand = np.flatnonzero(np.all((q >= lo) & (q <= hi), axis=1))
    if len(cand):
        w = winding_numbers(v, f, q[cand], exact=exact)
        out[cand] = np.abs(w) > _INSIDE_THRESHOLD
    return out


def signed_distance(
    vertices: ArrayLike, faces: ArrayLike, points: ArrayLike, exact: bool = False
) -> NDArray[np.float64]:
    """Signed distance (metres) from points to a closed mesh surface, negative inside.

    The magnitude is the exact point-to-triangle distance (``igl.point_mesh_squared_distance``);
    the sign comes from :func:`inside_mesh`.

    Args:
        vertices: (V, 3) mesh vertices in metres.
        faces: (F, 3) triangle vertex indices.
        points: (N, 3) query points in metres.
        exact: use the exact winding number for the sign.

    Returns:
        (N,) float64 signed distances in metres.
    """
    v, f = _check_vf(vertices, faces)
    q = _as_points(points)
    if len(f) == 0:
        raise ValueError("mesh has no faces")
    if len(q) == 0:
        return np.zeros(0, dtype=np.float64)
    sq, _, _ = igl.point_mesh_squared_distance(q, v, f)
    dist = np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0))
    inside = inside_mesh(v, f, q, exact=exact)
    return np.where(inside, -dist, dist)


def sample_box_points(
    box_min: ArrayLike, box_max: ArrayLike, n_points: int, seed: int = 0
) -> NDArray[np.float64]:
    """Uniform random points in an axis-aligned box.

    Args:
        box_min: (3,) lower corner in metres (a scalar is broadcast to all axes).
        box_max: (3,) upper corner in metres.
        n_points: number of points.
        seed: seed of the ``numpy.random.default_rng`` generator.

    Returns:
        (n_points, 3) float64 points in metres.
    """
    lo = np.broadcast_to(np.asarray(box_min, dtype=np.float64), (3,))
    hi = np.broadcast_to(np.asarray(box_max, dtype=np.float64), (3,))
    if np.any(hi <= lo):
        raise ValueError(f"box_max {hi} must exceed box_min {lo} on every axis")
    if n_points <= 0:
        raise ValueError(f"n_points must be positive, got {n_points}")
    rng = np.random.default_rng(seed)
    return lo + rng.random((n_points, 3)) * (hi - lo)


def sample_surface_points(
    vertices: ArrayLike, faces: ArrayLike, n_samples: int, rng: np.random.Generator | int = 0
) -> NDArray[np.float64]:
    """Area-weighted uniform samples on a triangle mesh surface.

    Args:
        vertices: (V, 3) mesh vertices in metres.
        faces: (F, 3) triangle vertex indices.
        n_samples: number of samples.
        rng: a numpy ``Generator`` or an integer seed.

    Returns:
        (n_samples, 3) float64 surface points in metres.

    Raises:
        ValueError: if the mesh has no faces or zero surface area.
    """
    v, f = _check_vf(vertices, faces)
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if len(f) == 0:
        raise ValueError("cannot sample an empty mesh")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    tri = v[f]  # (F, 3, 3)
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0.0:
        raise ValueError("cannot sample a mesh with zero or non-finite surface area")
    cdf = np.cumsum(areas)
    face_idx = np.searchsorted(cdf, gen.random(n_samples) * cdf[-1], side="right")
    face_idx = np.minimum(face_idx, len(f) - 1)
    u = gen.random(n_samples)
    s = np.sqrt(gen.random(n_samples))
    b0, b1, b2 = 1.0 - s, s * (1.0 - u), s * u
    t = tri[face_idx]
    return b0[:, None] * t[:, 0] + b1[:, None] * t[:, 1] + b2[:, None] * t[:, 2]


# ----------------------------------------------------------------------------------------------
# IoU
# ----------------------------------------------------------------------------------------------


def _as_labels(x: ArrayLike, name: str) -> NDArray[np.bool_]:
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a
    if np.issubdtype(a.dtype, np.integer):
        if a.size and (a.min() < 0 or a.max() > 1):
            raise ValueError(f"{name} must hold 0/1 labels")
        return a.astype(bool)
    raise ValueError(f"{name} must be a boolean (or 0/1 integer) array, got dtype {a.dtype}")


def iou(pred_occ: ArrayLike, gt_occ: ArrayLike) -> float:
    """Intersection over union of two sets of occupancy labels at the same points.

    Args:
        pred_occ: boolean (or 0/1 integer) labels, any shape.
        gt_occ: labels of the same shape.

    Returns:
        IoU as a fraction in [0, 1]. When the union is empty (both shapes empty at every point)
        the prediction is perfect and 1.0 is returned.

    Raises:
        ValueError: on shape mismatch or non-boolean labels (threshold probabilities first).
    """
    p = _as_labels(pred_occ, "pred_occ")
    g = _as_labels(gt_occ, "gt_occ")
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred_occ {p.shape} vs gt_occ {g.shape}")
    union = int(np.count_nonzero(p | g))
    if union == 0:
        return 1.0
    return float(np.count_nonzero(p & g) / union)


def mesh_iou(
    pred_mesh: MeshLike, gt_occ: ArrayLike, points: ArrayLike, exact: bool = False
) -> float:
    """IoU of a predicted mesh against ground-truth occupancy labels (paper protocol).

    Args:
        pred_mesh: predicted closed mesh (metres).
        gt_occ: (N,) ground-truth inside labels at ``points``.
        points: (N, 3) evaluation points in metres (e.g. 100k uniform points of the box).
        exact: use the exact winding number.

    Returns:
        IoU fraction in [0, 1] (1.0 if both are empty).
    """
    v, f = _as_vf(pred_mesh)
    q = _as_points(points)
    g = _as_labels(gt_occ, "gt_occ")
    if g.shape != (len(q),):
        raise ValueError(f"gt_occ must have shape ({len(q)},), got {g.shape}")
    return iou(inside_mesh(v, f, q, exact=exact), g)


def iou_from_meshes(
    pred_mesh: MeshLike,
    gt_mesh: MeshLike,
    box_min: ArrayLike,
    box_max: ArrayLike,
    n_points: int = 100_000,
    seed: int = 0,
    exact: bool = False,
) -> float:
    """Volumetric IoU of two meshes from uniform points in a box.

    Args:
        pred_mesh: predicted closed mesh (metres).
        gt_mesh: ground-truth closed mesh (metres).
        box_min: (3,) lower box corner in metres (scalar broadcast).
        box_max: (3,) upper box corner in metres.
        n_points: number of uniform points (paper: 100k).
        seed: sampling seed.
        exact: use the exact winding number.

    Returns:
        IoU fraction in [0, 1]; its sampling standard error is about
        ``sqrt(IoU (1 - IoU) / n_union)`` where ``n_union`` is the number of points in the union.
    """
    q = sample_box_points(box_min, box_max, n_points, seed)
    pv, pf = _as_vf(pred_mesh)
    gv, gf = _as_vf(gt_mesh)
    return iou(inside_mesh(pv, pf, q, exact=exact), inside_mesh(gv, gf, q, exact=exact))


# ----------------------------------------------------------------------------------------------
# Chamfer-L1
# ----------------------------------------------------------------------------------------------


def _align_offset(joints: ArrayLike | None, align_joint: int, name: str) -> NDArray[np.float64]:
    if joints is None:
        return np.zeros(3)
    j = np.asarray(joints, dtype=np.float64)
    if j.shape != (_N_JOINTS, 3):
        raise ValueError(f"{name} must have shape ({_N_JOINTS}, 3), got {j.shape}")
    if not np.all(np.isfinite(j[align_joint])):
        raise ValueError(f"{name}[{align_joint}] is not finite")
    return j[align_joint]


def chamfer_terms_mm(
    pred_vertices: ArrayLike,
    pred_faces: ArrayLike,
    gt_vertices: ArrayLike,
    gt_faces: ArrayLike,
    pred_joints: ArrayLike | None = None,
    gt_joints: ArrayLike | None = None,
    n_samples: int = 100_000,
    seed: int = 0,
    align_joint: int = MID_JOINT,
) -> tuple[float, float]:
    """Accuracy and completeness terms of the Chamfer-L1 distance, in millimetres.

    See :func:`chamfer_l1_mm` for the arguments.

    Returns:
        ``(accuracy, completeness)``: mean nearest-neighbour distance (mm) from the predicted
        samples to the ground-truth samples, and from the ground-truth samples to the predicted.
    """
    pv, pf = _check_vf(pred_vertices, pred_faces)
    gv, gf = _check_vf(gt_vertices, gt_faces)
    if (pred_joints is None) != (gt_joints is None):
        raise ValueError("give both pred_joints and gt_joints, or neither")
    if not 0 <= align_joint < _N_JOINTS:
        raise ValueError(f"align_joint must be in [0, {_N_JOINTS}), got {align_joint}")
    pv = pv - _align_offset(pred_joints, align_joint, "pred_joints")
    gv = gv - _align_offset(gt_joints, align_joint, "gt_joints")
    pred_rng, gt_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    p = sample_surface_points(pv, pf, n_samples, pred_rng)
    g = sample_surface_points(gv, gf, n_samples, gt_rng)
    accuracy = _nearest_sample_distance(p, g, gv, gf).mean()
    completeness = _nearest_sample_distance(g, p, pv, pf).mean()
    return float(accuracy * M_TO_MM), float(completeness * M_TO_MM)


#: Beyond this distance the nearest-sample search is replaced by the distance to the surface.
CHAMFER_EXACT_WITHIN_M = 0.005


def _nearest_sample_distance(
    queries: NDArray[np.float64],
    samples: NDArray[np.float64],
    vertices: NDArray[np.float64],
    faces: NDArray[np.int64],
) -> NDArray[np.float64]:
    """Distance from each query to the nearest of ``samples`` (drawn on the mesh
    ``vertices``/``faces``).

    Exact (k-d tree) for queries within :data:`CHAMFER_EXACT_WITHIN_M` of a sample. A k-d tree
    search from a query far from every sample visits most of the tree, which made evaluating
    badly placed hands take minutes (docs/measurements.md); for those queries the distance to
    the mesh surface (libigl AABB tree) is used instead. It differs from the nearest-sample
    distance ``d`` by about ``gap² / 2d`` (``gap`` = sample spacing, ~0.3 mm at 100k samples on
    a hand): under 0.01 mm.
    """
    d = cKDTree(samples).query(queries, k=1, distance_upper_bound=CHAMFER_EXACT_WITHIN_M)[0]
    far = ~np.isfinite(d)
    if far.any():
        sq = igl.point_mesh_squared_distance(queries[far], vertices, faces)[0]
        d[far] = np.sqrt(np.maximum(sq, 0.0))
    return d


def chamfer_l1_mm(
    pred_vertices: ArrayLike,
    pred_faces: ArrayLike,
    gt_vertices: ArrayLike,
    gt_faces: ArrayLike,
    pred_joints: ArrayLike | None = None,
    gt_joints: ArrayLike | None = None,
    n_samples: int = 100_000,
    seed: int = 0,
    align_joint: int = MID_JOINT,
) -> float:
    """Chamfer-L1 distance between two meshes in millimetres: ½ (accuracy + completeness).

    ``n_samples`` area-weighted surface points are drawn on each mesh (independent random streams
    derived from ``seed``), and the mean Euclidean distance to the nearest sample of the other
    mesh is taken each way (``scipy.spatial.cKDTree``; beyond 5 mm, the distance to the other
    mesh's surface, within 0.01 mm of it: see :func:`_nearest_sample_distance`). Because the two
    sample sets are independent, identical meshes give a small positive floor (≈ 0.5 /
    sqrt(samples per m² of surface); about 0.3 mm for a hand-sized surface at 100k samples), as in
    the paper protocol.

    Args:
        pred_vertices: (V, 3) predicted mesh vertices in metres.
        pred_faces: (F, 3) predicted triangles.
        gt_vertices: (V', 3) ground-truth mesh vertices in metres.
        gt_faces: (F', 3) ground-truth triangles.
        pred_joints: optional (21, 3) predicted joints in metres; with ``gt_joints``, the predicted
            mesh is translated so that ``pred_joints[align_joint]`` is at the origin.
        gt_joints: optional (21, 3) ground-truth joints; the GT mesh is translated likewise.
        n_samples: surface samples per mesh (paper: 100k).
        seed: sampling seed.
        align_joint: joint used for alignment (default 9, the middle MCP "mid joint").

    Returns:
        Chamfer-L1 in millimetres.

    Raises:
        ValueError: on malformed arrays, empty meshes, or when only one of the joint sets is given.
    """
    acc, comp = chamfer_terms_mm(
        pred_vertices,
        pred_faces,
        gt_vertices,
        gt_faces,
        pred_joints,
        gt_joints,
        n_samples=n_samples,
        seed=seed,
        align_joint=align_joint,
    )
    return 0.5 * (acc + comp)


# ----------------------------------------------------------------------------------------------
# MPJPE
# ----------------------------------------------------------------------------------------------


def joint_errors_mm(
    pred_joints: ArrayLike, gt_joints: ArrayLike, align_joint: int = MID_JOINT
) -> NDArray[np.float64]:
    """Per-joint Euclidean errors in millimetres after aligning each hand at ``align_joint``.

    Args:
        pred_joints: (..., 21, 3) predicted joints in metres.
        gt_joints: (..., 21, 3) ground-truth joints in metres, same shape.
        align_joint: joint subtracted from each hand before comparing (default 9).

    Returns:
        (..., 21) errors in millimetres (the alignment joint has error 0). Non-finite inputs
        propagate as NaN.

    Raises:
        ValueError: on shape mismatch or a bad ``align_joint``.
    """
    p = np.asarray(pred_joints, dtype=np.float64)
    g = np.asarray(gt_joints, dtype=np.float64)
    if p.shape != g.shape:
        raise ValueError(f"shape mismatch: pred_joints {p.shape} vs gt_joints {g.shape}")
    if p.ndim < 2 or p.shape[-2:] != (_N_JOINTS, 3):
        raise ValueError(f"joints must have shape (..., {_N_JOINTS}, 3), got {p.shape}")
    if not 0 <= align_joint < _N_JOINTS:
        raise ValueError(f"align_joint must be in [0, {_N_JOINTS}), got {align_joint}")
    p = p - p[..., align_joint : align_joint + 1, :]
    g = g - g[..., align_joint : align_joint + 1, :]
    return np.linalg.norm(p - g, axis=-1) * M_TO_MM


def mpjpe_mm(
    pred_joints: ArrayLike,
    gt_joints: ArrayLike,
    align_joint: int = MID_JOINT,
    mask: ArrayLike | None = None,
) -> float:
    """Mean per-joint position error in millimetres after joint-9 alignment of each hand.

    The mean is over all 21 joints of every valid hand (the alignment joint, whose error is 0,
    is included, as in the IntagHand/Im2Hands evaluation).

    Args:
        pred_joints: (..., 21, 3) predicted joints in metres.
        gt_joints: (..., 21, 3) ground-truth joints in metres, same shape.
        align_joint: joint subtracted from each hand (default 9, middle MCP).
        mask: optional boolean array of shape ``pred_joints.shape[:-2]`` marking valid hands
            (e.g. hands present in the frame). Masked-out hands may contain NaN.

    Returns:
        MPJPE in millimetres; NaN when the mask selects no hand.

    Raises:
        ValueError: on shape mismatch, a mask of the wrong shape, or non-finite joints in a
            valid hand.
    """
    err = joint_errors_mm(pred_joints, gt_joints, align_joint)
    batch = err.shape[:-1]
    if mask is None:
        valid = np.ones(batch, dtype=bool)
    else:
        valid = _as_labels(mask, "mask")
        if valid.shape != batch:
            raise ValueError(f"mask must have shape {batch}, got {valid.shape}")
    sel = err[valid]  # (n_valid, 21)
    if sel.size == 0:
        return float("nan")
    if not np.all(np.isfinite(sel)):
        raise ValueError("non-finite joints in a valid hand (mask it out)")
    return float(sel.mean())


# ----------------------------------------------------------------------------------------------
# Penetration volume
# ----------------------------------------------------------------------------------------------


def penetration_volume(
    mesh_a: MeshLike,
    mesh_b: MeshLike,
    box_min: ArrayLike | None = None,
    box_max: ArrayLike | None = None,
    voxel_size: float = 0.001,
    exact: bool = False,
) -> float:
    """Volume occupied by both hands, in cubic metres (voxel count × voxel volume).

    Voxel centres of a regular grid (edge ``voxel_size``) covering the intersection of the two
    meshes' bounding boxes (further clipped to ``[box_min, box_max]`` if given) are tested against
    both meshes; the result is the number of centres inside both times ``voxel_size**3``. Disjoint
    bounding boxes return 0 without any query. Multiply by :data:`M3_TO_CM3` or :data:`M3_TO_MM3`
    (or call :func:`penetration_volume_cm3`) for other units.

    Args:
        mesh_a: first closed mesh (metres).
        mesh_b: second closed mesh (metres).
        box_min: optional (3,) lower corner of the evaluation region in metres.
        box_max: optional (3,) upper corner of the evaluation region in metres.
        voxel_size: voxel edge in metres (default 1 mm).
        exact: use the exact winding number.

    Returns:
        Penetration volume in m³.
    """
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    va, fa = _as_vf(mesh_a)
    vb, fb = _as_vf(mesh_b)
    if len(fa) == 0 or len(fb) == 0:
        return 0.0
    lo_a, hi_a = _bbox(va)
    lo_b, hi_b = _bbox(vb)
    lo = np.maximum(lo_a, lo_b)
    hi = np.minimum(hi_a, hi_b)
    if box_min is not None:
        lo = np.maximum(lo, np.broadcast_to(np.asarray(box_min, dtype=np.float64), (3,)))
    if box_max is not None:
        hi = np.minimum(hi, np.broadcast_to(np.asarray(box_max, dtype=np.float64), (3,)))
    if np.any(hi <= lo):
        return 0.0
    counts = np.maximum(np.ceil((hi - lo) / voxel_size).astype(np.int64), 1)
    total = int(np.prod(counts))
    if total > _MAX_VOXELS:
        raise ValueError(f"{total} voxels is too many; increase voxel_size (now {voxel_size} m)")
    axes = [lo[i] + (np.arange(counts[i]) + 0.5) * voxel_size for i in range(3)]
    # Midpoint rule over [lo, hi]: drop the centres of the last partial voxel that fall past hi.
    axes = [ax[ax <= hi[i]] for i, ax in enumerate(axes)]
    yz = np.stack(np.meshgrid(axes[1], axes[2], indexing="ij"), axis=-1).reshape(-1, 2)
    slab = max(1, _CHUNK // max(len(yz), 1))
    n_both = 0
    for start in range(0, len(axes[0]), slab):
        xs = axes[0][start : start + slab]
        pts = np.empty((len(xs) * len(yz), 3))
        pts[:, 0] = np.repeat(xs, len(yz))
        pts[:, 1:] = np.tile(yz, (len(xs), 1))
        in_a = inside_mesh(va, fa, pts, exact=exact)
        if in_a.any():
            n_both += int(np.count_nonzero(inside_mesh(vb, fb, pts[in_a], exact=exact)))
    return float(n_both * voxel_size**3)


def penetration_volume_cm3(
    mesh_a: MeshLike,
    mesh_b: MeshLike,
    box_min: ArrayLike | None = None,
    box_max: ArrayLike | None = None,
    voxel_size: float = 0.001,
    exact: bool = False,
) -> float:
    """:func:`penetration_volume` converted to cubic centimetres (1 cm³ = 1e-6 m³)."""
    return penetration_volume(mesh_a, mesh_b, box_min, box_max, voxel_size, exact) * M3_TO_CM3


# ----------------------------------------------------------------------------------------------
# Contacts
# ----------------------------------------------------------------------------------------------


def _near_signed_distance(
    points: NDArray[np.float64],
    vertices: NDArray[np.float64],
    faces: NDArray[np.int64],
    reach: float,
    exact: bool,
    inside: InsideFn | None = None,
) -> NDArray[np.float64]:
    """Signed distance to a mesh for points near it; +inf for the others (outside and farther
    than ``reach`` from its surface).

    Points farther than ``reach`` from the mesh's bounding box are skipped. With ``inside`` (an
    inside test of the mesh, ``points [N, 3] -> bool [N]``) it replaces the winding numbers, and
    the distance is computed only for the points inside or within ``reach`` plus the longest edge
    of a vertex (a point within ``reach`` of a triangle is within that of its corners), exactly
    as without it; the others are outside and farther than ``reach``.
    """
    out = np.full(len(points), np.inf)
    if len(points) == 0 or len(faces) == 0:
        return out
    lo, hi = _bbox(vertices)
    near = np.flatnonzero(np.all((points >= lo - reach) & (points <= hi + reach), axis=1))
    if not len(near):
        return out
    if inside is None:
        out[near] = signed_distance(vertices, faces, points[near], exact=exact)
        return out
    q = points[near]
    ins = np.asarray(inside(q), dtype=bool).reshape(-1)
    tri = vertices[faces]
    edge = float(np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=-1).max())
    tree = cKDTree(vertices)
    d, _ = tree.query(q, distance_upper_bound=reach + edge)
    keep = ins | np.isfinite(d)
    if keep.any():
        dist = _local_surface_distance(q[keep], vertices, faces, tree, edge)
        out[near[keep]] = np.where(ins[keep], -dist, dist)
    return out


def _local_surface_distance(
    points: NDArray[np.float64],
    vertices: NDArray[np.float64],
    faces: NDArray[np.int64],
    tree: cKDTree,
    edge: float,
) -> NDArray[np.float64]:
    """Exact point-to-mesh distances, computed on the faces that can hold a nearest point.

    A point's nearest surface point lies no farther than its nearest vertex (distance ``r``), and
    the triangle holding it has its corners within ``r + edge`` of the point; only faces with a
    corner that close to some point are handed to igl, whose tree over the whole mesh would
    otherwise cost more than the queries (contacts touch a small part of a hand).
    """
    r, _ = tree.query(points)
    reach = float(r.max()) + edge
    near_point, _ = cKDTree(points).query(vertices, distance_upper_bound=reach)
    close = np.isfinite(near_point)
    local = faces[close[faces].any(axis=1)]
    sq, _, _ = igl.point_mesh_squared_distance(points, vertices, local)
    return np.sqrt(np.maximum(np.asarray(sq, dtype=np.float64), 0.0))


@dataclass(frozen=True)
class ContactArea:
    """Contact area of each hand, in square metres.

    Attributes:
        a: area of mesh A's surface in contact with (or inside) mesh B, m².
        b: area of mesh B's surface in contact with (or inside) mesh A, m².
    """

    a: float
    b: float

    @property
    def mean(self) -> float:
        """Both-hands average contact area in m²."""
        return 0.5 * (self.a + self.b)

    @property
    def mean_cm2(self) -> float:
        """Both-hands average contact area in cm²."""
        return self.mean * 1.0e4


def _contact_area_one(
    va: NDArray[np.float64],
    fa: NDArray[np.int64],
    vb: NDArray[np.float64],
    fb: NDArray[np.int64],
    contact_distance: float,
    exact: bool,
) -> float:
    if len(fa) == 0 or len(fb) == 0:
        return 0.0
    tri = va[fa]
    areas = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    centroids = tri.mean(axis=1)
    sd = _near_signed_distance(centroids, vb, fb, contact_distance, exact)
    return float(areas[sd <= contact_distance].sum())


def contact_area(
    mesh_a: MeshLike, mesh_b: MeshLike, contact_distance: float = 0.003, exact: bool = False
) -> ContactArea:
    """Surface area of each hand that touches or penetrates the other hand, in m².

    Computed per triangle: a triangle of A counts with its whole area when its **centroid** is
    inside B or within ``contact_distance`` of B's surface (signed distance ≤ contact_distance),
    and symmetrically for B. The resolution is therefore the triangle size; for meshes with large
    faces, subdivide first.

    Args:
        mesh_a: first closed mesh (metres).
        mesh_b: second closed mesh (metres).
        contact_distance: contact threshold in metres (default 3 mm).
        exact: use the exact winding number for the inside test.

    Returns:
        :class:`ContactArea` with per-hand areas ``a`` and ``b`` (m²) and their ``mean``.
    """
    if contact_distance < 0:
        raise ValueError(f"contact_distance must be >= 0, got {contact_distance}")
    va, fa = _as_vf(mesh_a)
    vb, fb = _as_vf(mesh_b)
    return ContactArea(
        a=_contact_area_one(va, fa, vb, fb, contact_distance, exact),
        b=_contact_area_one(vb, fb, va, fa, contact_distance, exact),
    )


@dataclass(frozen=True)
class HandContacts:
    """Vertices of one hand that penetrate or touch the other hand.

    The two sets are disjoint: a vertex inside the other hand is *penetrating*, a vertex outside it
    but within the contact distance of its surface is *touching*.

    Attributes:
        penetrating: (P,) int64 indices of vertices inside the other hand.
        depth: (P,) float64 penetration depth in metres (distance to the other hand's surface, > 0).
        penetrating_points: (P, 3) float64 positions of those vertices in metres.
        touching: (T,) int64 indices of vertices outside the other hand within contact distance.
        distance: (T,) float64 distance in metres to the other hand's surface (≥ 0).
        touching_points: (T, 3) float64 positions of those vertices in metres.
    """

    penetrating: NDArray[np.int64]
    depth: NDArray[np.float64]
    penetrating_points: NDArray[np.float64]
    touching: NDArray[np.int64]
    distance: NDArray[np.float64]
    touching_points: NDArray[np.float64]

    @property
    def max_depth(self) -> float:
        """Largest penetration depth in metres (0 when nothing penetrates)."""
        return float(self.depth.max()) if len(self.depth) else 0.0


@dataclass(frozen=True)
class Contacts:
    """Per-vertex contacts between two hands (input to ROS markers and metrics).

    Attributes:
        a: vertices of mesh A relative to mesh B.
        b: vertices of mesh B relative to mesh A.
        contact_distance: the contact threshold used, in metres.
    """

    a: HandContacts
    b: HandContacts
    contact_distance: float

    @property
    def penetrating(self) -> bool:
        """True when any vertex of either hand is inside the other hand."""
        return bool(len(self.a.penetrating) or len(self.b.penetrating))

    @property
    def max_depth(self) -> float:
        """Largest penetration depth over both hands in metres."""
        return max(self.a.max_depth, self.b.max_depth)


def _hand_contacts(
    va: NDArray[np.float64],
    vb: NDArray[np.float64],
    fb: NDArray[np.int64],
    contact_distance: float,
    exact: bool,
    inside_b: InsideFn | None = None,
) -> HandContacts:
    sd = _near_signed_distance(va, vb, fb, contact_distance, exact, inside_b)
    pen = np.flatnonzero(sd < 0.0)
    touch = np.flatnonzero((sd >= 0.0) & (sd <= contact_distance))
    return HandContacts(
        penetrating=pen.astype(np.int64),
        depth=-sd[pen],
        penetrating_points=va[pen],
        touching=touch.astype(np.int64),
        distance=sd[touch],
        touching_points=va[touch],
    )


def contacts(
    mesh_a: MeshLike, mesh_b: MeshLike, contact_distance: float = 0.003, exact: bool = False,
    inside: tuple[InsideFn, InsideFn] | None = None,
) -> Contacts:  # fmt: skip
    """Surface vertices of each hand that penetrate or touch the other hand.

    Args:
        mesh_a: first closed mesh (metres).
        mesh_b: second closed mesh (metres).
        contact_distance: contact threshold in metres (default 3 mm).
        exact: use the exact winding number for the inside test.
        inside: inside tests of ``(mesh_a, mesh_b)`` (``points [N, 3] -> bool [N]``, e.g. the
            occupancy the meshes were extracted from) used instead of winding numbers; the
            distances are then computed only where they can be reported (faster, same result
            for the same inside answers).

    Returns:
        :class:`Contacts` with a :class:`HandContacts` for each hand.
    """
    if contact_distance < 0:
        raise ValueError(f"contact_distance must be >= 0, got {contact_distance}")
    va, fa = _as_vf(mesh_a)
    vb, fb = _as_vf(mesh_b)
    in_a, in_b = inside if inside is not None else (None, None)
    return Contacts(
        a=_hand_contacts(va, vb, fb, contact_distance, exact, in_b),
        b=_hand_contacts(vb, va, fa, contact_distance, exact, in_a),
        contact_distance=float(contact_distance),
    )
