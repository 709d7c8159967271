"""Hand conventions shared by every part of im2hands (SPEC §2).

* 21 joints per hand in InterHand2.6M / IntagHand order: 0 wrist; 1-4 thumb (CMC, MCP, IP, tip);
  5-8 index (MCP, PIP, DIP, tip); 9-12 middle; 13-16 ring; 17-20 pinky.
* Hands are indexed ``0 = left``, ``1 = right`` wherever two hands are stacked.
* Units are metres in the camera optical frame (x right, y down, z forward).
* The *normalised hand space* puts the wrist at the origin, rotates into the root frame
  (:func:`root_frame`) and divides by :data:`NORM_SCALE` (0.4 m); the occupancy box is
  ``[-BOX_HALF, BOX_HALF]^3`` in these units.
* Left hands are mirrored (x -> -x about the wrist) into right hands for per-hand networks.

Functions accept numpy arrays or torch tensors and return the same kind, with any leading
batch dimensions.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

NUM_JOINTS = 21
HAND_NAMES: tuple[str, str] = ("left", "right")
LEFT, RIGHT = 0, 1
MID_JOINT = 9  # middle-finger MCP: the alignment joint of the paper's metrics
NORM_SCALE = 0.4  # metres per normalised unit
BOX_HALF = 0.55  # half side of the occupancy box in normalised units (0.22 m)

JOINT_NAMES: tuple[str, ...] = (
    "wrist",
    "thumb_cmc", "thumb_mcp", "thumb_ip", "thumb_tip",
    "index_mcp", "index_pip", "index_dip", "index_tip",
    "middle_mcp", "middle_pip", "middle_dip", "middle_tip",
    "ring_mcp", "ring_pip", "ring_dip", "ring_tip",
    "pinky_mcp", "pinky_pip", "pinky_dip", "pinky_tip",
)  # fmt: skip

FINGER_NAMES: tuple[str, ...] = ("thumb", "index", "middle", "ring", "pinky")

#: Parent of each joint in the kinematic tree (the wrist has none).
#: Display colour of each hand (RGB 0-255): left blue, right orange, everywhere pictures are made.
HAND_COLOURS: tuple[tuple[int, int, int], tuple[int, int, int]] = ((60, 140, 255), (255, 140, 40))

PARENTS: tuple[int, ...] = (
    -1,
    0, 1, 2, 3,
    0, 5, 6, 7,
    0, 9, 10, 11,
    0, 13, 14, 15,
    0, 17, 18, 19,
)  # fmt: skip

#: The 20 bones as (parent, child) joint pairs, root bones first per finger.
SKELETON_EDGES: tuple[tuple[int, int], ...] = tuple((p, c) for c, p in enumerate(PARENTS) if p >= 0)

#: Joints of each finger from its root to its tip.
FINGER_JOINTS: tuple[tuple[int, ...], ...] = tuple(
    tuple(range(1 + 4 * f, 5 + 4 * f)) for f in range(5)
)

TIP_JOINTS: tuple[int, ...] = (4, 8, 12, 16, 20)

#: Anny hand rig (``anny-hand.R`` / ``.L``): the bone whose head is each joint, by base name
#: (the ``.R``/``.L`` suffix is added per side). Tips have no bone head: they come from the
#: mesh (see :mod:`im2hands_model.data.anny_hand`). The thumb in Anny has no separate
#: metacarpal bone: ``finger1-1`` starts at the CMC joint.
ANNY_JOINT_BONES: tuple[str | None, ...] = (
    "wrist",
    "finger1-1", "finger1-2", "finger1-3", None,
    "finger2-1", "finger2-2", "finger2-3", None,
    "finger3-1", "finger3-2", "finger3-3", None,
    "finger4-1", "finger4-2", "finger4-3", None,
    "finger5-1", "finger5-2", "finger5-3", None,
)  # fmt: skip

#: For each fingertip, the Anny bone whose vertices hold the tip (the distal phalanx).
ANNY_TIP_BONES: tuple[str, ...] = ("finger1-3", "finger2-3", "finger3-3", "finger4-3", "finger5-3")

ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)


def anny_joints(
    bone_labels: list[str] | tuple[str, ...],
    bone_heads: ArrayT,
    tips: ArrayT,
) -> ArrayT:
    """Assemble the 21 joints from Anny bone heads and the five fingertip positions.

    Args:
        bone_labels: the rig's bone labels (``model.bone_labels``), with or without side suffix.
        bone_heads: ``[..., n_bones, 3]`` posed bone heads (same order as ``bone_labels``).
        tips: ``[..., 5, 3]`` fingertip positions, thumb to pinky.

    Returns:
        ``[..., 21, 3]`` joints in our order.
    """
    base = [label.rsplit(".", 1)[0] for label in bone_labels]
    missing = [b for b in ANNY_JOINT_BONES if b is not None and b not in base]
    if missing:
        raise ValueError(f"Anny rig lacks the bones {missing}; expected the anny-hand rig")
    head_index = [base.index(b) if b is not None else -1 for b in ANNY_JOINT_BONES]
    parts = []
    tip = 0
    for i in head_index:
        if i >= 0:
            parts.append(bone_heads[..., i, :])
        else:
            parts.append(tips[..., tip, :])
            tip += 1
    if isinstance(bone_heads, torch.Tensor):
        return torch.stack(parts, dim=-2)
    return np.stack(parts, axis=-2)


#: Thumb CMC and the four MCPs; each finger's next three joints follow its base.
FINGER_BASES = (1, 5, 9, 13, 17)


def _cross(a: ArrayT, b: ArrayT) -> ArrayT:
    """Cross product over the last axis (component-wise, so that ONNX export needs no op for it)."""
    parts = [a[..., 1] * b[..., 2] - a[..., 2] * b[..., 1],
             a[..., 2] * b[..., 0] - a[..., 0] * b[..., 2],
             a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]]  # fmt: skip
    return torch.stack(parts, -1) if isinstance(a, torch.Tensor) else np.stack(parts, -1)


def skeleton_chirality(joints: ArrayT) -> ArrayT:
    """Signed handedness of 21 joints ``[..., 21, 3]`` from their shape alone: ``[...]``, > 0 for a
    right hand, < 0 for a left hand, 0 for a degenerate palm.

    The palm normal ``n = (index MCP - wrist) x (pinky MCP - wrist)`` points out of the palm of a
    right hand and out of the back of a left hand (in a right-handed frame such as the camera's).
    Fingers and thumb bend toward the palm, so the components along ``n`` of each finger's
    joints relative to its base (thumb CMC, MCPs) are positive for a right hand. Returns their
    mean over the three joints per finger, summed over the fingers and divided by the palm size
    (mean wrist-MCP distance): +0.6 to +2 on the project's right hand in every pose style of the
    synthetic data, near 0 only for a flat hand (ambiguous). Mirroring flips the sign; rotation,
    translation and scale leave it unchanged.
    """
    a = joints[..., 5, :] - joints[..., 0, :]
    b = joints[..., 17, :] - joints[..., 0, :]
    normal = _cross(a, b)
    bases = list(FINGER_BASES)
    children = [base + k for base in FINGER_BASES for k in (1, 2, 3)]
    rel = joints[..., children, :] - joints[..., [i for i in bases for _ in range(3)], :]
    bend = (rel * normal[..., None, :]).sum(-1).sum(-1) / 3.0
    if isinstance(joints, torch.Tensor):
        norm, palm = normal.norm(dim=-1), 0.5 * (a.norm(dim=-1) + b.norm(dim=-1))
        ok = (norm > 1e-12) & (palm > 1e-12)
        return torch.where(ok, bend / (norm * palm).clamp_min(1e-24), torch.zeros_like(bend))
    norm = np.linalg.norm(normal, axis=-1)
    palm = 0.5 * (np.linalg.norm(a, axis=-1) + np.linalg.norm(b, axis=-1))
    ok = (norm > 1e-12) & (palm > 1e-12)
    return np.where(ok, bend / np.maximum(norm * palm, 1e-24), 0.0)


def mirror_points(points: ArrayT, wrist: ArrayT | None = None) -> ArrayT:
    """Mirror points x -> -x about the wrist (a plane through the wrist, normal to camera x).

    Turns a left hand into a right hand and back; applying it twice is the identity.

    Args:
        points: ``[..., N, 3]``.
        wrist: ``[..., 3]`` mirror centre; ``None`` mirrors about x = 0.
    """
    out = points.clone() if isinstance(points, torch.Tensor) else np.array(points, copy=True)
    if wrist is None:
        out[..., 0] = -out[..., 0]
    else:
        out[..., 0] = 2 * wrist[..., None, 0] - out[..., 0]
    return out


def flip_faces(faces: ArrayT) -> ArrayT:
    """Reverse the winding of triangles ``[F, 3]`` (needed after mirroring a mesh)."""
    return faces[..., [0, 2, 1]]


def mirror_normalized(points: ArrayT) -> ArrayT:
    """Map normalised-space points of a hand to those of its mirror image.

    With :func:`root_frame`, mirroring a hand about the wrist (camera x -> -x) maps its
    normalised coordinates (x, y, z) to (x, y, -z): the root frame's z axis is a cross
    product, so it flips with the mirror while x and y follow it.
    """
    out = points.clone() if isinstance(points, torch.Tensor) else np.array(points, copy=True)
    out[..., 2] = -out[..., 2]
    return out


def _normalize(v: ArrayT) -> ArrayT:
    if isinstance(v, torch.Tensor):
        return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


def root_frame(joints: ArrayT) -> tuple[ArrayT, ArrayT]:
    """The hand's root frame from its keypoints (HALO-style canonical orientation).

    y points from the wrist to the middle MCP (joint 9); z is the normal of the plane of the
    index and middle root bones (``(j5 - j0) x (j9 - j0)``, made orthogonal to y), which for a
    right hand points out of the palm; x = y x z completes a right-handed frame.

    Args:
        joints: ``[..., 21, 3]``.

    Returns:
        ``(R, origin)``: ``R`` is ``[..., 3, 3]`` with the frame axes as *rows*, so that
        ``R @ (p - origin)`` expresses a point in the root frame; ``origin`` is the wrist.
    """
    is_torch = isinstance(joints, torch.Tensor)
    cross = torch.linalg.cross if is_torch else np.cross
    origin = joints[..., 0, :]
    y = _normalize(joints[..., MID_JOINT, :] - origin)
    n = cross(joints[..., 5, :] - origin, joints[..., MID_JOINT, :] - origin)
    n = n - (n * y).sum(-1)[..., None] * y
    z = _normalize(n)
    x = cross(y, z)
    rot = torch.stack([x, y, z], dim=-2) if is_torch else np.stack([x, y, z], axis=-2)
    return rot, origin


def to_normalized(points: ArrayT, rot: ArrayT, origin: ArrayT) -> ArrayT:
    """Camera-frame points ``[..., N, 3]`` (metres) to normalised hand space."""
    return ((points - origin[..., None, :]) @ _transpose(rot)) / NORM_SCALE


def from_normalized(points: ArrayT, rot: ArrayT, origin: ArrayT) -> ArrayT:
    """Normalised hand-space points ``[..., N, 3]`` back to the camera frame (metres)."""
    return (points * NORM_SCALE) @ rot + origin[..., None, :]


def _transpose(m: ArrayT) -> ArrayT:
    return m.transpose(-1, -2) if isinstance(m, torch.Tensor) else np.swapaxes(m, -1, -2)
