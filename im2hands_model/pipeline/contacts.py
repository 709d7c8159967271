"""Contacts and penetration between the two reconstructed hands of a frame (SPEC §3.7).

* Per-vertex contacts come from :func:`im2hands_model.metrics.contacts`: vertices of one hand
  inside the other (with their depth) or within the contact distance of its surface.
* The contact area of a hand is the area of its surface around those vertices (each vertex owns a
  third of its triangles' area), averaged over the two hands.
* The penetration volume is the number of voxels inside both hands times the voxel volume. Only
  the box around the vertices of either hand that lie inside the other (grown by the longest
  mesh edge) is voxelised: the overlap of two closed surfaces is bounded by those parts of them,
  so the rest of the overlap of the hands' bounding boxes holds none of it (a sliver thinner
  than an edge aside), and on clasped hands that box is many times smaller. With
  the occupancy grids the meshes were extracted from (:class:`GridOccupancy`), "inside" is read
  off the grids by trilinear lookup, which is what the meshes enclose and costs a few
  milliseconds; without them the meshes are tested with winding numbers (slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from im2hands_model.hands import NORM_SCALE
from im2hands_model.meshing import Grid
from im2hands_model.metrics import M3_TO_CM3, contacts, penetration_volume
from im2hands_model.pipeline.result import ContactReport

__all__ = [
    "DEFAULT_CONTACT_DISTANCE",
    "DEFAULT_VOXEL_SIZE",
    "GridOccupancy",
    "hand_contacts",
    "vertex_areas",
]

DEFAULT_CONTACT_DISTANCE = 0.003  #: metres
DEFAULT_VOXEL_SIZE = 0.001  #: metres, penetration volume voxels
_MAX_VOXELS = 8_000_000  # a (20 cm)^3 overlap at 1 mm; coarser voxels beyond that


class GridOccupancy:
    """Inside tests of both hands from their meshing grid (camera-frame points).

    Args:
        grid: the final :class:`~im2hands_model.meshing.Grid` (probabilities, each hand in its
            own normalised box).
        threshold: the iso-level the meshes were extracted at.
        rot, origin: ``[2, 3, 3]`` / ``[2, 3]`` root frames of the hands (camera frame).
    """

    def __init__(self, grid: Grid, threshold: float, rot: Any, origin: Any) -> None:
        self.grid, self.threshold = grid, threshold
        self.rot = torch.as_tensor(rot, dtype=torch.float32, device=grid.values.device)
        self.origin = torch.as_tensor(origin, dtype=torch.float32, device=grid.values.device)

    @property
    def device(self) -> torch.device:
        return self.grid.values.device

    def inside(self, hand: int, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[N]`` bool tensor: camera-frame points ``[N, 3]`` inside ``hand``."""
        return self.values(hand, points) >= self.threshold

    def values(self, hand: int, points: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``[N]`` occupancy probabilities of ``hand`` at camera-frame points ``[N, 3]``
        (trilinear in its grid; 0 outside the grid's box)."""
        dev = self.grid.values.device
        p = torch.as_tensor(points, dtype=torch.float32, device=dev)
        norm = (p - self.origin[hand]) @ self.rot[hand].T / NORM_SCALE
        # grid_sample's (x, y, z) index (W, H, D); the grid is stored [x, y, z] -> reverse
        coords = (norm / self.grid.box_half).flip(-1).view(1, 1, 1, -1, 3)
        vol = self.grid.values[hand][None, None]
        val = F.grid_sample(vol, coords, mode="bilinear", padding_mode="zeros", align_corners=True)
        return val.view(-1)


def vertex_areas(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """``[V]`` area owned by each vertex: a third of each incident triangle's area."""
    tri = np.asarray(vertices, dtype=np.float64)[faces]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    return np.bincount(np.asarray(faces).reshape(-1), weights=np.repeat(area / 3.0, 3),
                       minlength=len(vertices)).astype(np.float64)  # fmt: skip


def _longest_edge(mesh: Any) -> float:
    tri = np.asarray(mesh.vertices, dtype=np.float64)[np.asarray(mesh.faces)]
    return float(np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=-1).max(initial=0.0))


def _penetration_box(meshes: Sequence[Any], inside_other: Sequence[np.ndarray]) -> np.ndarray:
    """``[2, 3]`` corners of the region that can hold the hands' overlap: the box of the
    vertices inside the other hand, grown by the longest edge, within both bounding boxes."""
    pts = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1, 3) for p in inside_other])
    pad = max(_longest_edge(m) for m in meshes)
    lo = np.max([pts.min(0) - pad, meshes[0].vertices.min(0), meshes[1].vertices.min(0)], 0)
    hi = np.min([pts.max(0) + pad, meshes[0].vertices.max(0), meshes[1].vertices.max(0)], 0)
    return np.stack([lo, hi])


def _grid_penetration_m3(meshes: Sequence[Any], occ: Any, voxel: float,
                         max_voxels: int = _MAX_VOXELS, box: np.ndarray | None = None,
                         ) -> float:  # fmt: skip
    lo = np.maximum(meshes[0].vertices.min(0), meshes[1].vertices.min(0))
    hi = np.minimum(meshes[0].vertices.max(0), meshes[1].vertices.max(0))
    if box is not None:
        lo, hi = np.maximum(lo, box[0]), np.minimum(hi, box[1])
    if np.any(hi <= lo):
        return 0.0
    while np.prod(np.ceil((hi - lo) / voxel)) > max_voxels:
        voxel *= 1.25  # in small steps: a doubling would leave as few as 1/8 of the voxels
    dev = occ.device
    axes = [torch.arange(lo[i] + voxel / 2, hi[i], voxel, device=dev) for i in range(3)]
    if any(len(a) == 0 for a in axes):
        return 0.0
    pts = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).view(-1, 3).float()
    inside_a = occ.inside(0, pts)
    both = int(occ.inside(1, pts[inside_a]).sum()) if bool(inside_a.any()) else 0
    return float(both) * voxel**3


def _inside_fn(occupancy: Any, hand: int) -> Any:
    def inside(points: np.ndarray) -> np.ndarray:
        return occupancy.inside(hand, points).cpu().numpy()

    return inside


def hand_contacts(
    meshes: Sequence[Any | None],
    contact_distance: float = DEFAULT_CONTACT_DISTANCE,
    voxel_size: float = DEFAULT_VOXEL_SIZE,
    occupancy: Any = None,
    max_voxels: int = _MAX_VOXELS,
    vertex_sign: bool = False,
) -> ContactReport:
    """Contacts between ``meshes = [left, right]`` (camera frame, metres; closed).

    Args:
        meshes: the two hands' meshes (objects with ``vertices``/``faces``), ``None`` if missing.
        contact_distance: metres.
        voxel_size: penetration volume voxel edge, metres.
        occupancy: the grids the meshes came from (fast inside tests; module docstring): a
            :class:`GridOccupancy`, or anything with its ``device`` and ``inside``.
        max_voxels: with ``occupancy``, the voxel edge doubles until the overlap of the hands'
            boxes holds at most this many voxels (a bound on the time).
        vertex_sign: with ``occupancy``, which vertices lie inside the other hand is read off
            it too instead of winding numbers (re-posed frames: the carried grids, which the
            penetration volume reads as well).

    Returns:
        :class:`ContactReport`; empty unless both meshes exist.
    """
    if contact_distance < 0:
        raise ValueError(f"contact_distance must be >= 0, got {contact_distance}")
    if not voxel_size > 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    report = ContactReport(contact_distance=float(contact_distance))
    if len(meshes) != 2 or any(m is None for m in meshes):
        return report
    a, b = meshes
    inside = None
    if vertex_sign and occupancy is not None:
        inside = tuple(_inside_fn(occupancy, h) for h in (0, 1))
    found = contacts(a, b, contact_distance, inside=inside)
    per_hand = (found.a, found.b)
    report.penetrating_points = [h.penetrating_points for h in per_hand]
    report.depth = [h.depth for h in per_hand]
    report.touching_points = [h.touching_points for h in per_hand]
    report.distance = [h.distance for h in per_hand]
    if found.penetrating:
        box = _penetration_box(meshes, report.penetrating_points)
        if occupancy is not None:
            volume = _grid_penetration_m3(meshes, occupancy, voxel_size, max_voxels, box)
        else:
            volume = penetration_volume(a, b, box[0], box[1], voxel_size=voxel_size)
        report.penetration_volume_cm3 = volume * M3_TO_CM3
    areas = []
    for mesh, hand in zip(meshes, per_hand, strict=True):
        idx = np.concatenate([hand.penetrating, hand.touching])
        areas.append(vertex_areas(mesh.vertices, mesh.faces)[idx].sum() if len(idx) else 0.0)
    report.contact_area_cm2 = float(np.mean(areas)) * 1.0e4
    return report
