"""Warm-up calls that make a fresh pipeline's first real frame as fast as the rest.

The first calls of each stage allocate buffers and pick kernels; the node (and benchmarks) run
them before the camera's frames arrive. The frame is built in: a grey image with the joints of
two clasped hands (``warmup_hands.json``), so warming up needs neither the renderer nor a
camera, and runs every stage -- K, I, R, meshing and contacts -- plus the keypoint source.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["warmup", "warmup_frame"]

_HANDS = Path(__file__).with_name("warmup_hands.json")


def warmup_frame() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """``(grey uint8 [480, 640, 3] image, K [3, 3], {"left": [21, 3], "right": [21, 3]})``."""
    data = json.loads(_HANDS.read_text())
    width, height = data["size"]
    image = np.full((height, width, 3), 128, np.uint8)
    keypoints = {side: np.asarray(data[side], np.float64) for side in ("left", "right")}
    return image, np.asarray(data["K"], np.float64), keypoints


def warmup(model: Any, calls: int = 2) -> float:
    """Run ``calls`` reconstructions of the built-in frame (and the keypoint source once);
    returns the seconds it took. Tracking state is reset afterwards."""
    t0 = time.monotonic()
    image, K, keypoints = warmup_frame()
    for _ in range(calls):
        model(image, K, keypoints=keypoints)
    if calls and model.config.keypoint_source != "given":
        model(image, K)  # the keypoint source's own first call (no hand in a grey image)
    model.reset_tracking()
    return time.monotonic() - t0
