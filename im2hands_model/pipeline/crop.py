"""Square crops like the training data's: where the networks look, and what they see.

The synthetic crops (``im2hands_model.data.synthetic``, with :mod:`im2hands_model.geometry`) are
squares around the projected hand
vertices, the hands spanning ``CROP_FILL`` = 80 % of the side, resampled to 256 px, with the
intrinsics adjusted. At inference only keypoints are known: the vertices reach
``KEYPOINT_MARGIN`` = 1.08 times further than the keypoints (median over 200 held-out synthetic
scenes; 10th-90th percentile 1.02-1.17), so a crop around keypoints has side
``extent * 1.08 / 0.8``.

Pixel convention (as the dataset): pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``; a crop
window ``(x0, y0, side)`` maps full-image point ``x`` to crop point ``(x - x0) * size / side``.
Crops may reach past the image border; the outside is black.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from im2hands_model.geometry import CROP_FILL, crop_intrinsics

__all__ = ["CROP_SIZE", "KEYPOINT_MARGIN", "CropWindow", "crop_image", "project"]

CROP_SIZE = 256  #: side of the network input crops, pixels
KEYPOINT_MARGIN = 1.08  #: hand vertex extent / keypoint extent in the image (module docstring)
MIN_SIDE = 24.0  #: smallest crop side in full-image pixels (a hand of a few pixels is noise)


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    """Pinhole projection ``[..., 3] -> [..., 2]`` pixels (depths clamped to 1 mm)."""
    p = np.asarray(points, dtype=np.float64)
    z = np.maximum(p[..., 2:3], 1e-3)
    return (p[..., :2] / z) * np.diag(K)[:2] + K[:2, 2]


@dataclass(frozen=True)
class CropWindow:
    """A square window ``[x0, x0 + side) x [y0, y0 + side)`` of the full image (pixels)."""

    x0: float
    y0: float
    side: float

    @classmethod
    def around(
        cls, uv: np.ndarray, fill: float = CROP_FILL, margin: float = KEYPOINT_MARGIN
    ) -> CropWindow:
        """The training-style crop around 2D keypoints ``[N, 2]`` (module docstring)."""
        uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
        uv = uv[np.isfinite(uv).all(1)]
        if len(uv) == 0:
            raise ValueError("no finite keypoints to crop around")
        lo, hi = uv.min(0), uv.max(0)
        side = max(float((hi - lo).max()) * margin / fill, MIN_SIDE)
        cx, cy = 0.5 * (lo + hi)
        return cls(float(cx - side / 2), float(cy - side / 2), side)

    @classmethod
    def whole(cls, width: int, height: int) -> CropWindow:
        """The square that holds the whole image, centred (letterbox)."""
        side = float(max(width, height))
        return cls((width - side) / 2, (height - side) / 2, side)

    def intrinsics(self, K: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
        """``[3, 3]`` intrinsics of the crop resampled to ``size`` px (same camera frame)."""
        return crop_intrinsics(K, (self.x0, self.y0), self.side, size)

    def to_full(self, uv_crop: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
        """Crop pixels ``[..., 2]`` -> full-image pixels."""
        return np.asarray(uv_crop, dtype=np.float64) * (self.side / size) + [self.x0, self.y0]


def crop_image(rgb: np.ndarray, window: CropWindow, size: int = CROP_SIZE) -> np.ndarray:
    """``uint8 [size, size, 3]``: the window of ``rgb`` resampled (bilinear, area-averaged first
    when shrinking by 2x or more, so distant hands are not aliased)."""
    img = Image.fromarray(rgb)
    x0, y0, side = window.x0, window.y0, window.side
    factor = int(side // (2 * size))
    if factor >= 2:
        img = img.reduce(factor)
        x0, y0, side = x0 / factor, y0 / factor, side / factor
    out = img.transform(
        (size, size), Image.Transform.EXTENT, (x0, y0, x0 + side, y0 + side),
        resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0),
    )  # fmt: skip
    return np.asarray(out, dtype=np.uint8)
