"""Canonicalisation of a hand from its 21 keypoints (SPEC §3.1, HALO-style).

From keypoints alone we build, per hand, everything the per-part occupancy networks need:

1. the **root frame** (:func:`im2hands_model.hands.root_frame`): wrist at the origin,
   wrist->middle MCP along +y, the normal of the index/middle root-bone plane along +z; points in
   this frame divided by 0.4 m are the *normalised hand space*. Left hands are mirrored into
   right hands there (``(x, y, z) -> (x, y, -z)``, :func:`im2hands_model.hands.mirror_normalized`);
2. a **local frame per bone**, propagated down each finger from its root bone by the minimal
   rotation between consecutive bone directions (so flexion and abduction move the frame, the
   palm fixes its roll);
3. the **canonical hand**: flat and straight, root bones at fixed spread angles in the palm plane
   (:data:`CANONICAL_SPREAD_DEG`), each finger's bones laid end to end along its root direction with
   their true lengths;
4. for each of the **16 parts** (palm + the 15 finger bones that end at PIP, DIP and tip; for
   the thumb MCP, IP and tip) the rigid transform ``T_b`` that takes normalised-space points to the
   canonical hand so that bone ``b`` lands on its canonical place (the palm's transform is the
   identity), and the part's length.

Everything is batched torch code, differentiable, and safe on bad input: a hand with non-finite or
degenerate keypoints is flagged ``valid=False`` and computed from a stand-in hand so nothing
downstream sees NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from im2hands_model.hands import (
    FINGER_JOINTS,
    MID_JOINT,
    NORM_SCALE,
    NUM_JOINTS,
    mirror_normalized,
    root_frame,
    to_normalized,
)

NUM_PARTS = 16

#: Joint pairs (parent, child) of the 15 finger bones that are parts 1..15, thumb to pinky.
PART_BONES: tuple[tuple[int, int], ...] = tuple(
    (j[k], j[k + 1]) for j in FINGER_JOINTS for k in range(3)
)

#: Canonical in-plane angle of each finger's root bone, degrees from +y toward +x (the thumb side of
#: a right hand), thumb to pinky. Rounded from Anny's rest hand in the root frame (33, 14, 0, -11,
#: -23); any fixed values work, these keep the canonical hand close to real ones.
CANONICAL_SPREAD_DEG: tuple[float, ...] = (35.0, 14.0, 0.0, -11.0, -23.0)

#: Below this bone length (normalised units, 0.4 mm) a hand is degenerate.
MIN_BONE_LENGTH = 1e-3

# A stand-in right hand in normalised space, used in place of invalid hands (so no NaN appears):
# straight fingers at the canonical spread, typical adult bone lengths (metres / 0.4).
_ROOT_LENGTH_M = (0.045, 0.105, 0.10, 0.095, 0.09)
_BONE_LENGTH_M = (0.032, 0.032, 0.028)


def _canonical_directions() -> Tensor:
    angles = torch.tensor(CANONICAL_SPREAD_DEG, dtype=torch.float64) * (math.pi / 180.0)
    return torch.stack([angles.sin(), angles.cos(), torch.zeros(5, dtype=torch.float64)], -1)


def stand_in_joints(dtype: torch.dtype = torch.float32) -> Tensor:
    """A plausible flat right hand ``[21, 3]`` in normalised space (replaces invalid hands)."""
    dirs = _canonical_directions()
    joints = torch.zeros(NUM_JOINTS, 3, dtype=torch.float64)
    for f, chain in enumerate(FINGER_JOINTS):
        pos = dirs[f] * _ROOT_LENGTH_M[f] / NORM_SCALE
        joints[chain[0]] = pos
        for k in range(3):
            pos = pos + dirs[f] * _BONE_LENGTH_M[k] / NORM_SCALE
            joints[chain[k + 1]] = pos
    # Lift the thumb slightly off the palm plane so the frame construction is generic.
    joints[1:5, 2] += torch.linspace(0.0, 0.05, 4, dtype=torch.float64)
    return joints.to(dtype)


@dataclass
class HandPose:
    """Canonicalisation of ``B`` hands.

    Attributes:
        rot: ``[B, 3, 3]`` root frame (rows are axes; camera frame -> root frame).
        origin: ``[B, 3]`` wrist, camera frame (metres).
        joints_norm: ``[B, 21, 3]`` keypoints in normalised space, left hands mirrored.
        transforms: ``[B, 16, 4, 4]`` normalised space -> canonical hand, per part (part 0 = palm).
        lengths: ``[B, 16]`` part lengths in normalised units (part 0: wrist to middle MCP).
        valid: ``[B]`` bool, False where the keypoints were non-finite or degenerate.
        is_left: ``[B]`` bool, whether the hand was mirrored.
    """

    rot: Tensor
    origin: Tensor
    joints_norm: Tensor
    transforms: Tensor
    lengths: Tensor
    valid: Tensor
    is_left: Tensor

    def to_normalized(self, points: Tensor) -> Tensor:
        """Camera-frame points ``[B, N, 3]`` to this hand's normalised space (mirrored if left)."""
        p = to_normalized(points, self.rot, self.origin)
        return torch.where(self.is_left[:, None, None], mirror_normalized(p), p)

    def to_parts(self, points_norm: Tensor) -> Tensor:
        """Normalised points ``[B, N, 3]`` to every part's canonical space ``[B, 16, N, 3]``."""
        rot = self.transforms[:, :, :3, :3]
        trans = self.transforms[:, :, :3, 3]
        return torch.einsum("bpij,bnj->bpni", rot, points_norm) + trans[:, :, None, :]


def _skew(v: Tensor) -> Tensor:
    zero = torch.zeros_like(v[..., 0])
    x, y, z = v.unbind(-1)
    return torch.stack(
        [
            torch.stack([zero, -z, y], -1),
            torch.stack([z, zero, -x], -1),
            torch.stack([-y, x, zero], -1),
        ],
        -2,
    )


def minimal_rotation(a: Tensor, b: Tensor) -> Tensor:
    """The smallest rotation ``[..., 3, 3]`` taking unit vectors ``a`` to ``b`` (Rodrigues).

    Defined everywhere except ``b = -a`` (a finger bent back on itself, which joint limits exclude);
    the denominator is clamped there so the result stays finite.
    """
    v = torch.linalg.cross(a, b)
    c = (a * b).sum(-1)
    k = _skew(v)
    eye = torch.eye(3, dtype=a.dtype, device=a.device).expand(k.shape)
    return eye + k + (k @ k) / (1.0 + c).clamp_min(1e-6)[..., None, None]


def _unit(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _frame(u: Tensor, z_hint: Tensor) -> Tensor:
    """Right-handed frame ``[..., 3, 3]``, columns (x, u, z); z = z_hint made orthogonal to u."""
    z = _unit(z_hint - (z_hint * u).sum(-1, keepdim=True) * u)
    x = torch.linalg.cross(u, z)
    return torch.stack([x, u, z], -1)


def validate_joints(joints: Tensor) -> Tensor:
    """``[B]`` bool: finite keypoints with every bone and the palm frame non-degenerate."""
    finite = torch.isfinite(joints).all(-1).all(-1)
    safe = torch.where(finite[:, None, None], joints, torch.zeros_like(joints))
    parents = torch.tensor([p for p, _ in _ALL_BONES], device=joints.device)
    children = torch.tensor([c for _, c in _ALL_BONES], device=joints.device)
    bone = (safe[:, children] - safe[:, parents]).norm(dim=-1)
    wrist = safe[:, 0]
    normal = torch.linalg.cross(safe[:, 5] - wrist, safe[:, MID_JOINT] - wrist).norm(dim=-1)
    min_len = MIN_BONE_LENGTH * NORM_SCALE
    return finite & (bone > min_len).all(-1) & (normal > min_len**2)


_ALL_BONES: tuple[tuple[int, int], ...] = tuple((0, j[0]) for j in FINGER_JOINTS) + PART_BONES


def canonicalize(joints: Tensor, is_left: Tensor | bool = False) -> HandPose:
    """Canonicalise ``B`` hands from camera-frame keypoints.

    Args:
        joints: ``[B, 21, 3]`` keypoints in the camera frame (metres).
        is_left: ``[B]`` bool (or one bool for all): mirror these hands into right hands.

    Returns:
        A :class:`HandPose`. Invalid hands (non-finite or degenerate keypoints) are replaced by a
        stand-in hand at the origin and flagged in ``valid``; gradients never see NaN.
    """
    if joints.ndim != 3 or joints.shape[-2:] != (NUM_JOINTS, 3):
        raise ValueError(f"joints must be [B, 21, 3], got {tuple(joints.shape)}")
    batch = joints.shape[0]
    if isinstance(is_left, bool):
        is_left = torch.full((batch,), is_left, dtype=torch.bool, device=joints.device)
    elif is_left.shape != (batch,):
        raise ValueError(f"is_left must be [B] = [{batch}], got {tuple(is_left.shape)}")
    is_left = is_left.to(device=joints.device, dtype=torch.bool)

    valid = validate_joints(joints)
    stand_in = stand_in_joints(joints.dtype).to(joints.device) * NORM_SCALE
    safe = torch.where(valid[:, None, None], joints, stand_in.expand_as(joints))
    rot, origin = root_frame(safe)
    jn = to_normalized(safe, rot, origin)
    jn = torch.where(is_left[:, None, None], mirror_normalized(jn), jn)
    transforms, lengths = part_transforms(jn)
    return HandPose(
        rot=rot,
        origin=origin,
        joints_norm=jn,
        transforms=transforms,
        lengths=lengths,
        valid=valid,
        is_left=is_left,
    )


def canonical_joints(lengths_root: Tensor, lengths_parts: Tensor) -> Tensor:
    """Keypoints ``[B, 21, 3]`` of the canonical hand with the given bone lengths.

    Args:
        lengths_root: ``[B, 5]`` root-bone lengths (wrist to each finger's first joint).
        lengths_parts: ``[B, 15]`` finger-bone lengths in :data:`PART_BONES` order.
    """
    dirs = _canonical_directions().to(lengths_root)
    out = lengths_root.new_zeros(lengths_root.shape[0], NUM_JOINTS, 3)
    for f, chain in enumerate(FINGER_JOINTS):
        pos = lengths_root[:, f, None] * dirs[f]
        out[:, chain[0]] = pos
        for k in range(3):
            pos = pos + lengths_parts[:, 3 * f + k, None] * dirs[f]
            out[:, chain[k + 1]] = pos
    return out


def part_transforms(joints_norm: Tensor) -> tuple[Tensor, Tensor]:
    """The 16 part transforms and lengths of right hands given in normalised space.

    Args:
        joints_norm: ``[B, 21, 3]`` (left hands already mirrored).

    Returns:
        ``(transforms [B, 16, 4, 4], lengths [B, 16])``: ``transforms[:, b]`` maps normalised points
        to the canonical hand so that bone ``PART_BONES[b - 1]``'s endpoints land on their
        canonical positions; part 0 (palm) is the identity.
    """
    batch, dtype, device = joints_norm.shape[0], joints_norm.dtype, joints_norm.device
    dirs = _canonical_directions().to(dtype=dtype, device=device)
    palm_normal = torch.tensor([0.0, 0.0, 1.0], dtype=dtype, device=device)
    wrist = joints_norm[:, 0]

    root_len = torch.stack(
        [(joints_norm[:, j[0]] - wrist).norm(dim=-1) for j in FINGER_JOINTS], -1
    )  # [B, 5]
    bone_vec = torch.stack([joints_norm[:, c] - joints_norm[:, p] for p, c in PART_BONES], 1)
    bone_len = bone_vec.norm(dim=-1)  # [B, 15]
    canon = canonical_joints(root_len, bone_len)

    rotations, translations = [], []
    for f, chain in enumerate(FINGER_JOINTS):
        u_prev = _unit(joints_norm[:, chain[0]] - wrist)
        frame = _frame(u_prev, palm_normal.expand_as(u_prev))  # root bone's frame
        canon_frame = _frame(dirs[f], palm_normal)  # the same for every bone of the finger
        for k in range(3):
            parent = chain[k]
            u = _unit(bone_vec[:, 3 * f + k])
            frame = minimal_rotation(u_prev, u) @ frame
            rot = canon_frame @ frame.transpose(-1, -2)  # [B, 3, 3]: frame columns -> canonical
            trans = canon[:, parent] - (rot @ joints_norm[:, parent, :, None])[..., 0]
            rotations.append(rot)
            translations.append(trans)
            u_prev = u

    rot = torch.stack(rotations, 1)  # [B, 15, 3, 3]
    trans = torch.stack(translations, 1)
    eye = torch.eye(4, dtype=dtype, device=device)
    transforms = eye.repeat(batch, NUM_PARTS, 1, 1)
    transforms[:, 1:, :3, :3] = rot
    transforms[:, 1:, :3, 3] = trans
    palm_len = (joints_norm[:, MID_JOINT] - wrist).norm(dim=-1)
    lengths = torch.cat([palm_len[:, None], bone_len], 1)
    return transforms, lengths
