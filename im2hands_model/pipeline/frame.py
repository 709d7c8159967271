"""Checking and normalising what a caller hands to the pipeline: an image and its intrinsics.

Everything a user can get wrong (dtype, layout, channels, size, NaN or zero intrinsics) becomes
an :class:`InputError` with a message that says what was expected, before any network runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "MAX_PIXELS",
    "Frame",
    "InputError",
    "as_intrinsics",
    "as_rgb8",
    "default_intrinsics",
]

#: Largest accepted image (pixels); 8192 x 8192 fits, a 3-channel copy is then 200 MB.
MAX_PIXELS = 8192 * 8192


class InputError(ValueError):
    """The image or intrinsics given to the pipeline cannot be used (the message says why)."""


def as_rgb8(image: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """An image as contiguous ``uint8 [H, W, 3]`` RGB.

    Accepts numpy arrays, torch tensors (``[H, W, C]``) and PIL images; grey ``[H, W]`` or
    ``[H, W, 1]`` is replicated, RGBA drops alpha. ``uint8`` is used as is, ``uint16`` is scaled
    by 1/257, floats must lie in [0, 1].

    Raises:
        InputError: anything else (wrong rank or channels, empty, too large, NaN, bad range).
    """
    if image is None:
        raise InputError("image is None")
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    elif hasattr(image, "detach") and hasattr(image, "cpu"):  # torch
        image = image.detach().cpu().numpy()
    arr = np.asarray(image)
    if arr.dtype == object:
        raise InputError("image must be a numeric array, got objects")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise InputError(
            f"image must be [H, W] grey, [H, W, 3] RGB or [H, W, 4] RGBA; got shape {arr.shape}"
        )
    h, w = arr.shape[:2]
    if h < 1 or w < 1:
        raise InputError(f"image is empty ({h}x{w} pixels)")
    if h * w > max_pixels:
        raise InputError(
            f"image of {w}x{h} pixels is larger than the limit of {max_pixels} pixels; "
            "downscale it (and its intrinsics) first"
        )
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputError("image contains NaN or infinite values")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InputError(
                f"float images must hold values in [0, 1], got [{lo:.3g}, {hi:.3g}] "
                "(pass uint8 for 0..255)"
            )
        return np.ascontiguousarray(np.round(arr * 255.0).astype(np.uint8))
    raise InputError(f"image dtype {arr.dtype} is not supported (uint8, uint16 or float)")


def as_intrinsics(K: Any) -> np.ndarray:
    """``float64 [3, 3]`` pinhole intrinsics, checked.

    Raises:
        InputError: not 3x3, non-finite, non-positive focal lengths, or a last row that is not
            ``[0, 0, 1]``.
    """
    if K is None:
        raise InputError("intrinsics K is None")
    if hasattr(K, "detach"):
        K = K.detach().cpu().numpy()
    arr = np.asarray(K, dtype=np.float64)
    if arr.shape == (9,):
        arr = arr.reshape(3, 3)
    if arr.shape != (3, 3):
        raise InputError(f"intrinsics K must be 3x3, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputError("intrinsics K contain NaN or infinite values")
    if not (arr[0, 0] > 0 and arr[1, 1] > 0):
        raise InputError(f"focal lengths must be positive, got fx={arr[0, 0]}, fy={arr[1, 1]}")
    if not np.allclose(arr[2], [0.0, 0.0, 1.0]):
        raise InputError(f"the last row of K must be [0, 0, 1], got {arr[2].tolist()}")
    return arr


def default_intrinsics(width: int, height: int) -> np.ndarray:
    """A guess for an unknown camera: focal length = the longer image side (about 53 degrees
    across it), principal point at the centre.

    Raises:
        InputError: a non-positive size.
    """
    if width <= 0 or height <= 0:
        raise InputError(f"image size must be positive, got {width}x{height}")
    f = float(max(width, height))
    return np.array([[f, 0.0, width / 2.0], [0.0, f, height / 2.0], [0.0, 0.0, 1.0]])


@dataclass
class Frame:
    """A checked input frame: ``rgb`` uint8 ``[H, W, 3]`` and ``K`` float64 ``[3, 3]``."""

    rgb: np.ndarray
    K: np.ndarray

    @classmethod
    def from_input(cls, image: Any, K: Any, max_pixels: int = MAX_PIXELS) -> Frame:
        return cls(as_rgb8(image, max_pixels), as_intrinsics(K))

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])
