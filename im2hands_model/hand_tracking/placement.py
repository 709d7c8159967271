"""Placing a detected hand in the camera frame, from its landmarks or from a depth image.

The landmark model gives each hand twice: 2D landmarks ``uv`` (pixels) and metric 3D landmarks
``X`` (metres, camera axes, origin near the hand's centre). Only the translation ``t`` is
missing, the one that makes ``X + t`` project onto ``uv``.

**From the image alone** (:func:`solve_translation`). With ``(x, y, 1) = K^-1 (u, v, 1)`` the
pinhole equations ``x (Z + t_z) = X + t_x`` and ``y (Z + t_z) = Y + t_y`` are linear in ``t``:
42 equations, 3 unknowns, linear least squares, then a few Gauss-Newton steps on the pixel error
itself. The depth found this way scales with the size the model believes the hand has (a 10 %
larger hand lands 10 % closer), so :func:`scale_to_prior` first pulls that size part of the way
toward an adult hand's (:data:`PALM_SIZE_M`): the model's size estimate is noisy, the spread of
real hand sizes is about ±10 %.

**With a registered depth image** (:func:`depth_translation`). Each visible joint's depth is the
median of the valid pixels (finite, > 0) in a small window around its 2D landmark; the skin lies
in front of the joint centre, so :data:`SURFACE_TO_JOINT_M` is added. Every joint then votes
``t_z = depth_j - Z_j``; the median vote, refined as the mean of the votes within
:data:`DEPTH_INLIER_M` of it, resists holes and another hand in front of some joints. ``t_x`` and
``t_y`` then follow from the 2D landmarks in closed form. Too few valid joints: ``None``, and the
caller keeps the image-only placement.

**Along the rays** (:func:`along_rays`). The placed hand is finally re-shaped so that every joint
lies on the camera ray of its 2D landmark, at the depth the placement gave it: the landmark
model's 2D output is more precise than its 3D shape (on validation renders this lowers the
joint-9-aligned error by about 4 mm).
"""

from __future__ import annotations

import numpy as np

from im2hands_model.geometry import project_points as project

__all__ = [
    "along_rays",
    "DEPTH_INLIER_M",
    "MIN_DEPTH_JOINTS",
    "PALM_SIZE_M",
    "SURFACE_TO_JOINT_M",
    "depth_translation",
    "palm_size",
    "project",
    "scale_to_prior",
    "solve_translation",
]

#: Typical wrist-to-finger-base (MCP) distance of MediaPipe's world landmarks, metres (its wrist
#: landmark sits at the wrist crease; chosen on validation renders, seed 200).
PALM_SIZE_M = 0.08
#: Depth of a joint centre behind the skin the depth camera sees, metres (validation renders).
SURFACE_TO_JOINT_M = 0.012
#: Votes for the hand's depth within this of the median count as inliers, metres.
DEPTH_INLIER_M = 0.02
#: Fewest joints with a valid depth needed to place a hand from depth.
MIN_DEPTH_JOINTS = 4
_MCPS = (5, 9, 13, 17)


def along_rays(joints: np.ndarray, uv: np.ndarray, K: np.ndarray) -> np.ndarray:
    """``joints`` ``[N, 3]`` moved onto the camera rays of their pixels ``uv``, keeping each
    joint's depth (camera z)."""
    rays = np.c_[np.asarray(uv, np.float64), np.ones(len(uv))] @ np.linalg.inv(K).T
    return rays * np.asarray(joints, np.float64)[:, 2:3]


def palm_size(joints: np.ndarray) -> float:
    """Mean wrist-to-MCP distance of 21 joints (metres for metric joints)."""
    j = np.asarray(joints, np.float64).reshape(21, 3)
    return float(np.linalg.norm(j[list(_MCPS)] - j[0], axis=1).mean())


def scale_to_prior(world: np.ndarray, weight: float) -> np.ndarray:
    """World landmarks rescaled about their centre so that their palm size moves ``weight`` of
    the way (in log scale) toward :data:`PALM_SIZE_M`; ``weight`` 0 keeps the model's size."""
    size = palm_size(world)
    if not weight or size <= 1e-6:
        return np.asarray(world, np.float64)
    factor = (PALM_SIZE_M / size) ** float(weight)
    centre = world.mean(0)
    return centre + (world - centre) * factor


def solve_translation(
    world: np.ndarray, uv: np.ndarray, K: np.ndarray, iterations: int = 5
) -> tuple[np.ndarray, float]:
    """The translation ``t`` that makes ``world + t`` project onto ``uv`` with ``K``.

    Linear least squares (module docstring), then ``iterations`` Gauss-Newton steps on the
    reprojection error in pixels (stopped while a point is not in front of the camera).

    Returns:
        ``(t [3], rms)``: the translation (metres) and the RMS reprojection error in pixels
        (``inf`` when a point lies at or behind the camera).
    """
    X = np.asarray(world, dtype=np.float64).reshape(-1, 3)
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    K = np.asarray(K, dtype=np.float64).reshape(3, 3)
    if len(X) != len(uv) or len(X) < 2:
        raise ValueError(f"need matching [N, 3] and [N, 2] with N >= 2, got {X.shape}, {uv.shape}")
    xy = (np.c_[uv, np.ones(len(uv))] @ np.linalg.inv(K).T)[:, :2]
    A = np.zeros((2 * len(X), 3))
    A[0::2, 0] = 1.0
    A[1::2, 1] = 1.0
    A[0::2, 2] = -xy[:, 0]
    A[1::2, 2] = -xy[:, 1]
    b = np.empty(2 * len(X))
    b[0::2] = xy[:, 0] * X[:, 2] - X[:, 0]
    b[1::2] = xy[:, 1] * X[:, 2] - X[:, 1]
    t = np.linalg.lstsq(A, b, rcond=None)[0]

    def rms_of(t_: np.ndarray) -> float:
        p = X + t_
        if p[:, 2].min() <= 0.0:
            return float("inf")
        return float(np.sqrt(((project(p, K) - uv) ** 2).sum(1).mean()))

    error = rms_of(t)
    for _ in range(iterations):
        if not np.isfinite(error):
            break
        p = X + t
        proj = project(p, K)
        residual = (proj - uv).reshape(-1)
        J = (K[None, :2, :] - proj[:, :, None] * K[None, 2:3, :]) / p[:, 2, None, None]
        step = np.linalg.lstsq(J.reshape(-1, 3), residual, rcond=None)[0]
        new_t = t - step
        new_error = rms_of(new_t)
        if not new_error < error:
            break
        t, error = new_t, new_error
    return t, error


def _joint_depths(depth: np.ndarray, uv: np.ndarray, radius: int) -> np.ndarray:
    """``[N]`` median valid depth (metres) in a window around each pixel; NaN where none."""
    h, w = depth.shape
    out = np.full(len(uv), np.nan)
    for i, (u, v) in enumerate(np.asarray(uv, np.float64)):
        if not (np.isfinite(u) and np.isfinite(v)):
            continue
        x, y = int(round(u)), int(round(v))
        patch = depth[max(y - radius, 0) : min(y + radius + 1, h),
                      max(x - radius, 0) : min(x + radius + 1, w)]  # fmt: skip
        valid = patch[np.isfinite(patch) & (patch > 0)]
        if valid.size:
            out[i] = float(np.median(valid))
    return out


def depth_translation(
    world: np.ndarray, uv: np.ndarray, K: np.ndarray, depth: np.ndarray, radius: int = 2
) -> tuple[np.ndarray, int] | None:
    """The hand's translation from a registered metric depth image (module docstring).

    Args:
        world: ``[21, 3]`` metric landmarks (camera axes, any origin).
        uv: ``[21, 2]`` 2D landmarks, pixels of the depth image.
        K: intrinsics of that image.
        depth: ``float [H, W]`` metres; 0 or NaN = no measurement.
        radius: half-size of the window sampled around each landmark, pixels.

    Returns:
        ``(t [3], joints used)``, or ``None`` when fewer than :data:`MIN_DEPTH_JOINTS` joints
        have a depth that agrees with the others.
    """
    X = np.asarray(world, np.float64).reshape(-1, 3)
    uv = np.asarray(uv, np.float64).reshape(-1, 2)
    K = np.asarray(K, np.float64).reshape(3, 3)
    d = _joint_depths(np.asarray(depth, np.float32), uv, radius) + SURFACE_TO_JOINT_M
    ok = np.isfinite(d)
    if ok.sum() < MIN_DEPTH_JOINTS:
        return None
    votes = d[ok] - X[ok, 2]
    median = float(np.median(votes))
    inliers = np.abs(votes - median) <= DEPTH_INLIER_M
    if inliers.sum() < MIN_DEPTH_JOINTS:
        return None
    tz = float(votes[inliers].mean())
    z = X[:, 2] + tz
    if z.min() <= 0.0:
        return None
    xy = (np.c_[uv, np.ones(len(uv))] @ np.linalg.inv(K).T)[:, :2]
    txy = (xy * z[:, None] - X[:, :2]).mean(0)
    return np.array([txy[0], txy[1], tz]), int(inliers.sum())
