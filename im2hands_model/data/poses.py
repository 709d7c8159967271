"""Finger poses within anatomical joint limits, for the Anny hand (:mod:`.anny_hand`).

A pose is a ``[len(POSED_BONES), 3]`` array of degrees per bone: flexion (toward the palm),
twist along the bone, abduction toward the thumb side. :func:`sample_pose` draws a pose from a
named *style* (open, relaxed, grasp, fist, point, pinch, random) through a few coupled latent
values per finger (curl, spread), the way real fingers move: the DIP follows the PIP, flexed
fingers close their spread. Every angle is finally clipped to :data:`JOINT_LIMITS`.

Limits are from the hand-kinematics literature (active ranges of motion, in degrees):
MCP flexion -20..90 with 10-30 of abduction, PIP 0..105, DIP 0..80; thumb CMC, MCP 0..55 and
IP -15..80. Self-intersection is rejected by the caller with a winding-number test
(:func:`self_intersection_count`).
"""

from __future__ import annotations

import numpy as np

from im2hands_model.data.anny_hand import POSED_BONES
from im2hands_model.metrics import winding_numbers

POSE_STYLES: tuple[str, ...] = ("open", "relaxed", "grasp", "fist", "point", "pinch", "random")

_FINGERS = ("finger2", "finger3", "finger4", "finger5")  # index, middle, ring, pinky
_METACARPAL_FLEX_MAX = (0.0, 0.0, 8.0, 15.0)  # ring and pinky metacarpals cup the palm
#: Abduction range (toward thumb positive) of each MCP: index spreads radially, ring and pinky
#: ulnarly, the middle finger both ways a little.
_MCP_ABDUCTION = ((-10.0, 20.0), (-12.0, 12.0), (-20.0, 10.0), (-30.0, 10.0))


def _limits() -> np.ndarray:
    lim = np.zeros((len(POSED_BONES), 3, 2))
    idx = {b: i for i, b in enumerate(POSED_BONES)}
    lim[idx["finger1-1"]] = [(-20, 45), (-25, 20), (-20, 40)]
    lim[idx["finger1-2"]] = [(-10, 55), (-5, 5), (-8, 8)]
    lim[idx["finger1-3"]] = [(-15, 80), (0, 0), (0, 0)]
    for f, name in enumerate(_FINGERS):
        meta = idx[f"metacarpal{f + 1}"]
        lim[meta] = [(0, _METACARPAL_FLEX_MAX[f]), (0, 0), (0, 0)]
        lim[idx[f"{name}-1"]] = [(-20, 90), (-5, 5), _MCP_ABDUCTION[f]]
        lim[idx[f"{name}-2"]] = [(-5, 105), (0, 0), (0, 0)]
        lim[idx[f"{name}-3"]] = [(-5, 80), (0, 0), (0, 0)]
    return lim


#: ``[n_bones, 3 (flexion, twist, abduction), 2 (min, max)]`` degrees.
JOINT_LIMITS: np.ndarray = _limits()


def _curls(style: str, rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
    """Per-finger curl in [0, 1] (index..pinky), thumb curl and thumb opposition."""
    if style == "open":
        c = rng.uniform(0.0, 0.15, 4)
        return c, rng.uniform(0.0, 0.2), rng.uniform(0.0, 0.4)
    if style == "relaxed":
        c = rng.uniform(0.1, 0.45, 4)
        return np.sort(c), rng.uniform(0.1, 0.4), rng.uniform(0.2, 0.6)
    if style == "grasp":
        base = rng.uniform(0.35, 0.7)
        return (
            np.clip(base + rng.normal(0, 0.06, 4), 0, 1),
            rng.uniform(0.3, 0.7),
            rng.uniform(0.5, 1.0),
        )
    if style == "fist":
        return rng.uniform(0.8, 1.0, 4), rng.uniform(0.5, 0.9), rng.uniform(0.4, 0.9)
    if style == "point":
        c = rng.uniform(0.75, 1.0, 4)
        c[0] = rng.uniform(0.0, 0.15)
        return c, rng.uniform(0.4, 0.8), rng.uniform(0.3, 0.8)
    if style == "pinch":
        c = rng.uniform(0.0, 0.9, 4)
        c[0] = rng.uniform(0.35, 0.6)
        return c, rng.uniform(0.3, 0.6), rng.uniform(0.7, 1.0)
    if style == "random":
        return rng.uniform(0.0, 1.0, 4), rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    raise ValueError(f"unknown pose style {style!r}; choose from {POSE_STYLES}")


def sample_pose(rng: np.random.Generator, style: str | None = None) -> np.ndarray:
    """Draw one pose ``[len(POSED_BONES), 3]`` (degrees) of the given style (random if None)."""
    if style is None:
        style = POSE_STYLES[rng.integers(len(POSE_STYLES))]
    curls, thumb_curl, opposition = _curls(style, rng)
    spread = rng.uniform(0.0, 1.0)
    idx = {b: i for i, b in enumerate(POSED_BONES)}
    pose = np.zeros((len(POSED_BONES), 3))
    for f, name in enumerate(_FINGERS):
        c = curls[f]
        # MCP leads the curl in grasps; PIP/DIP follow with anatomical coupling (DIP ~ 2/3 PIP).
        mcp = np.interp(c, [0, 1], [-10, 88]) + rng.normal(0, 6)
        pip = np.interp(c, [0, 1], [0, 102]) + rng.normal(0, 8)
        dip = 0.67 * pip + rng.normal(0, 5)
        lo, hi = _MCP_ABDUCTION[f]
        spread_dir = hi if f == 0 else (lo if f >= 2 else rng.uniform(lo, hi))
        abd = spread * spread_dir * (1.0 - 0.8 * c) + rng.normal(0, 2)
        pose[idx[f"{name}-1"]] = [mcp, rng.normal(0, 2), abd]
        pose[idx[f"{name}-2"]] = [pip, 0, 0]
        pose[idx[f"{name}-3"]] = [dip, 0, 0]
        pose[idx[f"metacarpal{f + 1}"], 0] = c * _METACARPAL_FLEX_MAX[f]
    pose[idx["finger1-1"]] = [
        np.interp(opposition, [0, 1], [-10, 40]) + rng.normal(0, 4),
        np.interp(opposition, [0, 1], [-15, 15]) + rng.normal(0, 4),
        np.interp(opposition, [0, 1], [30, -10]) + rng.normal(0, 5),
    ]
    pose[idx["finger1-2"]] = [np.interp(thumb_curl, [0, 1], [0, 50]) + rng.normal(0, 4), 0, 0]
    pose[idx["finger1-3"]] = [np.interp(thumb_curl, [0, 1], [-10, 75]) + rng.normal(0, 5), 0, 0]
    return np.clip(pose, JOINT_LIMITS[..., 0], JOINT_LIMITS[..., 1])


#: Rows of a pose array that belong to each finger (thumb to pinky), metacarpals excluded.
FINGER_POSE_ROWS: tuple[np.ndarray, ...] = tuple(
    np.array([POSED_BONES.index(f"finger{f}-{k}") for k in (1, 2, 3)]) for f in range(1, 6)
)


def probes_inside(
    vertices: np.ndarray, faces: np.ndarray, probes: np.ndarray, threshold: float = 1.2
) -> np.ndarray:
    """Which probe vertices lie inside another part of the same mesh (bool per probe).

    A vertex on a surface has a generalised winding number of about 0.5 with respect to its own
    mesh; one that has also pushed into another finger reaches about 1.5. Probe vertices
    (:attr:`AnnyHand.probe_vertices`) lie away from joint creases, where skinning folds the skin,
    so a probe above ``threshold`` means a finger passing through another finger or the palm.
    """
    v = np.ascontiguousarray(vertices, dtype=np.float64)
    return winding_numbers(v, faces, v[probes]) > threshold


def self_intersection_count(
    vertices: np.ndarray, faces: np.ndarray, probes: np.ndarray, threshold: float = 1.2
) -> int:
    """Number of probe vertices inside another part of the mesh (see :func:`probes_inside`)."""
    return int(probes_inside(vertices, faces, probes, threshold).sum())
