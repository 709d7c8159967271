"""Carry a reconstructed hand mesh to new keypoints by its parts' own rigid transforms.

Im2Hands' occupancy is defined in each part's canonical frame (:mod:`im2hands_model.canonical`):
a surface point near bone ``b`` sits at a fixed place in part ``b``'s canonical space whatever
the pose. So a mesh extracted for keypoints ``J0`` is bound once (:func:`bind_mesh`): every
vertex in every part's canonical space, and a weight per part from its distance to that part's
bone (a soft minimum, so vertices near a joint follow both bones and the surface does not
crack). For keypoints ``J1`` (:func:`repose_mesh`) each part puts its copy of the vertex back
through its transform of ``J1``, and the weights blend the copies: linear blend skinning with
the canonicalisation's transforms as bones. Faces are kept, so a watertight mesh stays
watertight; a rigid motion of the whole hand is carried exactly.

How far the pose has moved is :attr:`Reposed.part_turn_deg`, the largest rotation of any finger
part relative to the palm since the binding: beyond a few tens of degrees the blend bends
vertices the full reconstruction would have placed differently (knuckles, skin between fingers),
and the caller should wait for a new reconstruction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from im2hands_model.canonical import HandPose, canonicalize
from im2hands_model.hands import from_normalized, mirror_normalized
from im2hands_model.networks.init_occ import part_distances

__all__ = ["BLEND_SCALE", "MAX_PART_TURN_DEG", "MeshBinding", "Reposed", "ReposedOccupancy",
           "bind_mesh", "repose_mesh", "repose_meshes"]  # fmt: skip

#: Softness of the part weights (normalised units, 0.4 m each, so 1 mm): a vertex 1 mm nearer to
#: one bone than to another takes 73 % of its position from it; 5 mm nearer, over 99 %.
BLEND_SCALE = 0.0025
#: Points farther than this from every re-posed vertex are outside it (normalised units: 3 cm;
#: no point inside a hand is that far from its surface).
CARRY_REACH = 0.075
#: A point is carried by a vertex within (1 + this) times its nearest vertex's distance (k-d
#: tree ``eps``): the blended motion differs between such vertices only across a joint's
#: blend zone, and the lookups are a third cheaper.
CARRY_NEAREST_EPS = 0.5
#: Default limit of :attr:`Reposed.part_turn_deg` beyond which re-posing should stop.
MAX_PART_TURN_DEG = 90.0


@dataclass
class MeshBinding:
    """A hand mesh bound to the parts of the keypoints it was reconstructed for.

    Attributes:
        faces: ``[F, 3]`` the mesh's faces (kept by every re-posed mesh).
        canonical: ``[16, V, 3]`` each vertex in each part's canonical space (float64).
        weights: ``[16, V]`` each part's share of each vertex (columns sum to 1).
        is_left: the hand is a left hand (mirrored into a right one in normalised space).
        pose: the canonicalisation of the keypoints bound to.
    """

    faces: np.ndarray
    canonical: Tensor
    weights: Tensor
    is_left: bool
    pose: HandPose


@dataclass
class Reposed:
    """A re-posed mesh: ``vertices [V, 3]`` (camera frame, float32), the binding's ``faces``,
    and ``part_turn_deg``, the largest finger-part rotation relative to the palm since binding."""

    vertices: np.ndarray
    faces: np.ndarray
    part_turn_deg: float
    pose: HandPose  # the new keypoints' canonicalisation


def _pose(joints: np.ndarray | Tensor, is_left: bool) -> HandPose:
    j = torch.as_tensor(np.asarray(joints, dtype=np.float64))
    if j.shape != (21, 3):
        raise ValueError(f"keypoints must be [21, 3], got {tuple(j.shape)}")
    pose = canonicalize(j[None], is_left)
    if not bool(pose.valid[0]):
        raise ValueError("these keypoints are non-finite or degenerate: nothing to re-pose to")
    return pose


def bind_mesh(vertices: np.ndarray, faces: np.ndarray, joints: np.ndarray,
              is_left: bool) -> MeshBinding:  # fmt: skip
    """Bind a camera-frame mesh (``vertices [V, 3]``, ``faces [F, 3]``) to the ``joints
    [21, 3]`` (camera frame, metres) it was reconstructed for."""
    pose = _pose(joints, is_left)
    v = torch.as_tensor(np.asarray(vertices, dtype=np.float64))[None]
    norm = pose.to_normalized(v)  # [1, V, 3], mirrored if left
    dist = part_distances(norm, pose.joints_norm)[0]  # [16, V]
    weights = torch.softmax(-dist / BLEND_SCALE, dim=0)
    return MeshBinding(
        faces=np.asarray(faces, dtype=np.int64),
        canonical=pose.to_parts(norm)[0],
        weights=weights,
        is_left=bool(is_left),
        pose=pose,
    )


def part_turn_deg(binding: MeshBinding, pose: HandPose) -> float:
    """The largest angle (degrees) by which a part has turned relative to the palm since
    ``binding`` (the palm's own motion is the root frame's, carried exactly)."""
    rot = pose.transforms[0, :, :3, :3]
    bound = binding.pose.transforms[0, :, :3, :3]
    rel = rot.transpose(-1, -2) @ bound  # bound normalised -> new normalised, per part
    cos = ((rel.diagonal(dim1=-2, dim2=-1).sum(-1) - 1.0) / 2.0).clamp(-1.0, 1.0)
    return math.degrees(float(torch.acos(cos).max()))


def repose_mesh(binding: MeshBinding, joints: np.ndarray) -> Reposed:
    """The bound mesh carried to ``joints [21, 3]`` (camera frame, metres).

    Raises:
        ValueError: ``joints`` is not ``[21, 3]``, or non-finite / degenerate.
    """
    return repose_meshes([binding], [joints])[0]


def repose_meshes(bindings: Sequence[MeshBinding], joints: Sequence[np.ndarray]) -> list[Reposed]:
    """:func:`repose_mesh` for several meshes (a frame's two hands) with one canonicalisation:
    its cost is per call far more than per hand (many small tensor operations).

    Raises:
        ValueError: a ``joints`` is not ``[21, 3]``, or non-finite / degenerate.
    """
    if len(bindings) != len(joints):
        raise ValueError(f"{len(bindings)} bindings but {len(joints)} keypoint sets")
    if not bindings:
        return []
    j = [torch.as_tensor(np.asarray(k, dtype=np.float64)) for k in joints]
    for k in j:
        if k.shape != (21, 3):
            raise ValueError(f"keypoints must be [21, 3], got {tuple(k.shape)}")
    poses = canonicalize(torch.stack(j), torch.tensor([b.is_left for b in bindings]))
    if not bool(poses.valid.all()):
        raise ValueError("these keypoints are non-finite or degenerate: nothing to re-pose to")
    return [_repose(b, _one(poses, i)) for i, b in enumerate(bindings)]


def _one(poses: HandPose, i: int) -> HandPose:
    return HandPose(*(getattr(poses, f.name)[i : i + 1] for f in fields(HandPose)))


def _repose(binding: MeshBinding, pose: HandPose) -> Reposed:
    rot = pose.transforms[0, :, :3, :3]  # [16, 3, 3]
    trans = pose.transforms[0, :, :3, 3]  # [16, 3]
    # each part's copy back to normalised space: R^T (c - t)
    copies = torch.einsum("pji,pvj->pvi", rot, binding.canonical - trans[:, None])
    norm = (binding.weights[..., None] * copies).sum(0)  # [V, 3]
    if binding.is_left:
        norm = mirror_normalized(norm)
    cam = from_normalized(norm[None], pose.rot, pose.origin)[0]
    return Reposed(cam.numpy().astype(np.float32), binding.faces, part_turn_deg(binding, pose),
                   pose)  # fmt: skip


class ReposedOccupancy:
    """Inside tests of re-posed meshes, read off the grids of the full reconstruction they came
    from (``hand_contacts``' fast penetration volume for re-posed frames).

    A point is carried back to the pose of the full reconstruction by the blended part motion of
    its nearest re-posed vertex (the inverse of that vertex's own re-posing, exact within one
    rigid part) and looked up in the full reconstruction's occupancy grid.

    Args:
        grids: the full reconstruction's
            :class:`~im2hands_model.pipeline.contacts.GridOccupancy`.
        bindings: ``[left, right]`` :class:`MeshBinding` of its meshes.
        reposed: ``[left, right]`` :class:`Reposed` meshes of this frame.
    """

    def __init__(self, grids: Any, bindings: list[MeshBinding], reposed: list[Reposed]) -> None:
        self.grids, self.bindings, self.reposed = grids, bindings, reposed
        self.device = grids.device
        # per hand, built on its first query: most frames never ask (hands not overlapping)
        self._carry: list[tuple[Any, Tensor, Tensor] | None] = [None] * len(bindings)

    def _carrier(self, hand: int) -> tuple[Any, Tensor, Tensor]:
        """``(k-d tree of the re-posed vertices in normalised space, A [V, 3, 3], a [V, 3])``
        with ``n_old = A n_new + a`` at each vertex: ``sum_b w_b R0_b^T (R1_b n + t1_b - t0_b)``."""
        if self._carry[hand] is None:
            from scipy.spatial import cKDTree

            b, r = self.bindings[hand], self.reposed[hand]
            verts = torch.as_tensor(r.vertices, dtype=torch.float64)[None]
            r0, t0 = b.pose.transforms[0, :, :3, :3], b.pose.transforms[0, :, :3, 3]
            r1, t1 = r.pose.transforms[0, :, :3, :3], r.pose.transforms[0, :, :3, 3]
            rot = r0.transpose(-1, -2) @ r1  # [16, 3, 3]
            shift = (r0.transpose(-1, -2) @ (t1 - t0)[..., None])[..., 0]  # [16, 3]
            self._carry[hand] = (cKDTree(r.pose.to_normalized(verts)[0].numpy()),
                                 torch.einsum("pv,pij->vij", b.weights, rot),
                                 b.weights.T @ shift)  # fmt: skip
        return self._carry[hand]

    def inside(self, hand: int, points: Any) -> Tensor:
        """``[N]`` bool tensor: camera-frame points ``[N, 3]`` inside ``hand``'s re-posed mesh."""
        return self.values(hand, points) >= self.grids.threshold

    def values(self, hand: int, points: Any) -> Tensor:
        """``[N]`` float32 occupancy probabilities of ``hand`` at camera-frame points ``[N, 3]``:
        the full reconstruction's, carried (0 beyond :data:`CARRY_REACH` of every vertex)."""
        p = torch.as_tensor(np.asarray(points.cpu() if hasattr(points, "cpu") else points),
                            dtype=torch.float64)  # fmt: skip
        b, r = self.bindings[hand], self.reposed[hand]
        tree, rot, shift = self._carrier(hand)
        n_new = r.pose.to_normalized(p[None])[0]
        dist, idx = tree.query(n_new.numpy(), eps=CARRY_NEAREST_EPS,
                               distance_upper_bound=CARRY_REACH)  # fmt: skip
        near = torch.as_tensor(np.isfinite(dist))
        out = torch.zeros(len(p), dtype=torch.float32)
        if not bool(near.any()):
            return out.to(self.device)
        idx = torch.as_tensor(idx[near.numpy()])
        n_old = (rot[idx] @ n_new[near][..., None])[..., 0] + shift[idx]
        if b.is_left:
            n_old = mirror_normalized(n_old)
        cam = from_normalized(n_old[None], b.pose.rot, b.pose.origin)[0]
        out[near] = self.grids.values(hand, cam.float()).cpu()
        return out.to(self.device)
