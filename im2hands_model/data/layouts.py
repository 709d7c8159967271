"""Two-hand layouts: where the second hand goes relative to the first.

Each layout gives the rigid placement of both hands in a common *pair frame*. Interacting layouts
(clasped, crossed, touching) bring the hands together along an approach direction until their
surfaces first meet (a bisection on the inside test), then press them a few millimetres further,
as soft hands do; the small overlap this leaves is split between the hands afterwards
(:func:`im2hands_model.data.occupancy.split_overlap`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

from im2hands_model.data.occupancy import hands_overlap
from im2hands_model.hands import root_frame

LAYOUTS: tuple[str, ...] = ("clasped", "crossed", "touching", "close", "apart", "single")
#: Pose styles that make sense for each layout (None: any).
LAYOUT_POSE_STYLES: dict[str, tuple[str, ...] | None] = {
    "clasped": ("open", "relaxed", "grasp"),
    "crossed": ("open", "relaxed", "point"),
    "touching": None,
    "close": None,
    "apart": None,
    "single": None,
}

_CONTACT_TOLERANCE_M = 2e-4  # bisection stops when the bracket is this narrow
_PRESS_RANGE_M = (0.0, 0.004)  # how far touching hands are pressed together past first contact
_CLOSE_GAP_RANGE_M = (0.005, 0.04)
_APART_RANGE_M = (0.12, 0.3)


@dataclass
class Placement:
    """Rigid motions ``x -> x @ R.T + t`` of each hand's vertices into the pair frame."""

    rotation: np.ndarray  # [2, 3, 3]
    translation: np.ndarray  # [2, 3]
    approach: np.ndarray  # [3] direction the second hand came from
    press_m: float  # extra press after first contact (0 when not touching)


def palm_frame(joints: np.ndarray, is_right: bool) -> np.ndarray:
    """Rows: (across the palm, wrist->middle MCP, palm normal out of the palm side)."""
    rot, _ = root_frame(joints)
    if not is_right:  # the root frame's z points out of the back of a left hand
        rot = rot * np.array([[-1.0], [1.0], [-1.0]])
    return rot


def _palm_centre(joints: np.ndarray) -> np.ndarray:
    """Mean of the wrist and the four finger MCPs."""
    return joints[[0, 5, 9, 13, 17]].mean(0)


def _orient(frame: np.ndarray, finger_dir: np.ndarray, palm_dir: np.ndarray) -> np.ndarray:
    """Rotation taking a hand whose palm frame is ``frame`` to the wanted directions."""
    y = finger_dir / np.linalg.norm(finger_dir)
    z = palm_dir - (palm_dir @ y) * y
    z /= np.linalg.norm(z)
    target = np.stack([np.cross(y, z), y, z])
    return target.T @ frame


def _transform(v: np.ndarray, rot: np.ndarray, t: np.ndarray) -> np.ndarray:
    return v @ rot.T + t


def first_contact(
    va: np.ndarray, fa: np.ndarray, vb: np.ndarray, fb: np.ndarray, direction: np.ndarray
) -> float:
    """Smallest offset ``s`` along ``direction`` at which ``vb + s * direction`` does not overlap
    hand A, found by bisection between an overlapping and a free offset."""
    lo = 0.0
    hi = 0.05
    while hands_overlap(va, fa, vb + hi * direction, fb):
        lo, hi = hi, hi * 2
        if hi > 2.0:
            raise RuntimeError("hands could not be separated along the approach direction")
    if not hands_overlap(va, fa, vb + lo * direction, fb):
        return lo
    while hi - lo > _CONTACT_TOLERANCE_M:
        mid = 0.5 * (lo + hi)
        if hands_overlap(va, fa, vb + mid * direction, fb):
            lo = mid
        else:
            hi = mid
    return hi


def _relative_orientation(
    layout: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Finger direction and palm normal of hand B in hand A's palm frame, approach direction
    and a lateral offset (pair frame = A's palm frame: x across, y fingers, z out of the palm)."""
    if layout == "clasped":  # palms facing, fingers roughly parallel and interleaved
        angle = np.deg2rad(rng.uniform(-35, 35))
        finger = np.array([np.sin(angle), np.cos(angle), 0.0])
        palm = np.array([rng.normal(0, 0.1), rng.normal(0, 0.1), -1.0])
        lateral = np.array(
            [rng.choice([-1, 1]) * rng.uniform(0.005, 0.012), rng.uniform(-0.03, 0.03), 0]
        )
        return finger, palm, np.array([0, 0, 1.0]), lateral
    if layout == "crossed":  # fingers crossing at a large angle, palm or back facing A's palm
        angle = np.deg2rad(rng.choice([-1, 1]) * rng.uniform(60, 120))
        finger = np.array([np.sin(angle), np.cos(angle), 0.0])
        palm = np.array([0, 0, rng.choice([-1.0, 1.0])]) + rng.normal(0, 0.15, 3)
        side = rng.choice([-1.0, 1.0])
        lateral = np.array([rng.uniform(-0.02, 0.02), rng.uniform(0.02, 0.08), 0])
        return finger, palm, np.array([0, 0, side]), lateral
    # touching / close / apart: any relative orientation and approach direction
    rot = Rotation.random(random_state=rng).as_matrix()
    approach = Rotation.random(random_state=rng).apply([0, 0, 1.0])
    return rot[:, 1], rot[:, 2], approach, np.zeros(3)


def place_hands(
    layout: str,
    verts: tuple[np.ndarray, np.ndarray],
    faces: tuple[np.ndarray, np.ndarray],
    joints: tuple[np.ndarray, np.ndarray],
    rights: tuple[bool, bool],
    rng: np.random.Generator,
) -> Placement:
    """Place hand B relative to hand A (both given in their own frames) for a layout.

    For ``single`` the second placement is meaningless and set to identity.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    frame_a = palm_frame(joints[0], rights[0])
    frame_b = palm_frame(joints[1], rights[1])
    # Pair frame = A's palm frame, with A's palm centre (mean of wrist and MCPs) at the origin.
    centre_a = _palm_centre(joints[0])
    rot_a = frame_a
    t_a = -centre_a @ rot_a.T
    if layout == "single":
        return Placement(
            np.stack([rot_a, np.eye(3)]), np.stack([t_a, np.zeros(3)]), np.zeros(3), 0.0
        )
    finger, palm, approach, lateral = _relative_orientation(layout, rng)
    approach = approach / np.linalg.norm(approach)
    rot_b = _orient(frame_b, finger, palm)
    centre_b = _palm_centre(joints[1])
    t_b = -centre_b @ rot_b.T + lateral
    va = _transform(verts[0], rot_a, t_a)
    vb = _transform(verts[1], rot_b, t_b)
    if layout == "apart":
        s = first_contact(va, faces[0], vb, faces[1], approach) + rng.uniform(*_APART_RANGE_M)
        press = 0.0
    else:
        s = first_contact(va, faces[0], vb, faces[1], approach)
        if layout == "close":
            s += rng.uniform(*_CLOSE_GAP_RANGE_M)
            press = 0.0
        else:
            press = float(rng.uniform(*_PRESS_RANGE_M))
            s -= press
    t_b = t_b + s * approach
    return Placement(np.stack([rot_a, rot_b]), np.stack([t_a, t_b]), approach, press)
