"""Camera geometry shared by the data, the pipeline and the keypoint sources: projection, crops.

Core module (imports nothing else of the package): the synthetic data cuts its training crops
with these functions and the pipeline cuts its run-time crops with the same ones, so the two
agree by construction.
"""

from __future__ import annotations

import numpy as np

__all__ = ["CROP_FILL", "crop_intrinsics", "crop_square", "project_points"]

CROP_FILL = 0.8  #: hands span this fraction of the square crop (IntagHand)


def project_points(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pixels ``[N, 2]`` (u, v) of camera-frame points ``[N, 3]`` through a full pinhole ``K``
    (skew included): ``u = (fx x + s y) / z + cx``, ``v = fy y / z + cy``."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    q = p @ np.asarray(K, dtype=np.float64).T
    return q[:, :2] / q[:, 2:3]


def crop_square(uv: np.ndarray, fill: float = CROP_FILL) -> tuple[np.ndarray, float]:
    """The IntagHand-style square crop around image points ``uv`` ``[N, 2]`` (pixels).

    The square is centred on the points' bounding box, whose longer side spans ``fill`` of it.

    Returns:
        ``(centre [2], side)`` in pixels.
    """
    lo, hi = uv.min(0), uv.max(0)
    return 0.5 * (lo + hi), (hi - lo).max() / fill


def crop_intrinsics(
    K: np.ndarray, corner: np.ndarray | tuple[float, float], side: float, size: int
) -> np.ndarray:
    """Intrinsics of the square ``[x0, x0 + side) x [y0, y0 + side)`` of an image (``corner`` =
    ``(x0, y0)``, pixels) resampled to ``size`` x ``size`` pixels (same pixel convention)."""
    Kc = np.asarray(K, dtype=np.float64).copy()
    Kc[0, 2] -= corner[0]
    Kc[1, 2] -= corner[1]
    Kc[:2] *= size / side
    return Kc
