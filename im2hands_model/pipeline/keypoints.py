"""Keypoint sources: where the two hands' 3D keypoints of a frame come from (SPEC §3.5).

* ``MediaPipeHands`` / ``HandTracker`` (:mod:`im2hands_model.hand_tracking`) -- the default:
  MediaPipe's real-photo-trained hand models with our two-hand search, placement and tracking.
* :class:`LearnedKeypoints` -- the project's keypoint predictor. It needs no ground truth: a first
  pass looks at the whole frame (letterboxed into the square input), the second at a
  training-style crop around the first pass's 2D keypoints.
* :func:`given_keypoints` -- keypoints passed in by the caller (another detector, a topic, GT).

Every source returns :class:`~im2hands_model.pipeline.result.Keypoints` in the camera frame of the
full image, hands 0 = left, 1 = right.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from im2hands_model.pipeline.crop import CropWindow, crop_image, project
from im2hands_model.pipeline.frame import Frame, InputError
from im2hands_model.pipeline.result import HAND_NAMES, Keypoints

__all__ = ["LearnedKeypoints", "crop_around", "crop_tensor", "given_keypoints"]


def crop_tensor(frame: Frame, window: CropWindow, device: torch.device) -> tuple:
    """``(image [1, 3, S, S] float in [0, 1], K [1, 3, 3])`` of a crop window of the frame."""
    crop = crop_image(frame.rgb, window)
    image = torch.from_numpy(np.array(crop)).to(device).permute(2, 0, 1)[None].float().div_(255.0)
    K = torch.as_tensor(window.intrinsics(frame.K), dtype=torch.float32, device=device)[None]
    return image, K


class LearnedKeypoints:
    """The learned two-hand keypoint predictor over a whole frame.

    Args:
        predictor: a :class:`~im2hands_model.networks.kpts_pred.KeypointPredictor`.
        passes: 1 = only the letterboxed whole frame; 2 (default) = then a crop around it.
        presence_threshold: presence probability above which a hand counts as found.
    """

    name = "learned"

    def __init__(self, predictor: Any, passes: int = 2, presence_threshold: float = 0.5) -> None:
        if passes < 1:
            raise ValueError(f"passes must be >= 1, got {passes}")
        self.predictor, self.passes, self.threshold = predictor, passes, presence_threshold

    @torch.no_grad()
    def __call__(self, frame: Frame) -> Keypoints:
        # torch modules: their parameters' device; ONNX Runtime drop-ins: their ``device``
        device = getattr(self.predictor, "device", None) or next(self.predictor.parameters()).device
        window = CropWindow.whole(frame.width, frame.height)
        for _ in range(self.passes):
            image, K = crop_tensor(frame, window, device)
            pred = self.predictor(image, K)
            conf = torch.sigmoid(pred.presence_logit[0]).cpu().numpy()
            present = conf > self.threshold
            if not present.any():
                return Keypoints(np.zeros((2, 21, 3)), present, conf)
            uv = pred.joints_2d[0].cpu().numpy()[present]
            window = CropWindow.around(window.to_full(uv.reshape(-1, 2)))
        joints = pred.joints[0].cpu().numpy()
        return Keypoints(joints, present, conf, joints_2d=project(joints, frame.K))


def given_keypoints(keypoints: Any, frame: Frame) -> Keypoints:
    """Caller keypoints as :class:`Keypoints`.

    Accepts a :class:`Keypoints`; an array ``[2, 21, 3]`` (left, right; camera frame, metres)
    where a hand is absent when its rows are NaN or all zero; or a mapping
    ``{"left": [21, 3] | None, "right": [21, 3] | None}``.

    Raises:
        InputError: wrong shapes, or keypoints behind the camera.
    """
    if isinstance(keypoints, Keypoints):
        kp = keypoints
    else:
        if isinstance(keypoints, dict):
            unknown = set(keypoints) - set(HAND_NAMES)
            if unknown:
                raise InputError(f"keypoint keys must be 'left'/'right', got {sorted(unknown)}")
            rows = [keypoints.get(name) for name in HAND_NAMES]
            arr = np.full((2, 21, 3), np.nan)
            for h, row in enumerate(rows):
                if row is not None:
                    row = np.asarray(row, dtype=np.float64)
                    if row.shape != (21, 3):
                        name = HAND_NAMES[h]
                        raise InputError(f"{name} keypoints must be [21, 3], got {row.shape}")
                    arr[h] = row
        else:
            if hasattr(keypoints, "detach"):
                keypoints = keypoints.detach().cpu().numpy()
            arr = np.asarray(keypoints, dtype=np.float64)
            if arr.shape != (2, 21, 3):
                raise InputError(f"keypoints must be [2, 21, 3] (left, right), got {arr.shape}")
        nonzero = np.abs(np.nan_to_num(arr)).sum(axis=(1, 2)) > 0
        present = np.isfinite(arr).all(axis=(1, 2)) & nonzero
        kp = Keypoints(np.nan_to_num(arr), present, present.astype(np.float32))
    if (kp.joints[kp.present][..., 2] <= 0).any():
        raise InputError("keypoints must lie in front of the camera (z > 0, metres)")
    if kp.joints_2d is None:
        kp.joints_2d = project(kp.joints, frame.K).astype(np.float32)
    return kp


def crop_around(keypoints: Keypoints, frame: Frame) -> CropWindow:
    """The training-style crop around the present hands' projected keypoints."""
    uv = project(keypoints.joints[keypoints.present], frame.K)
    return CropWindow.around(uv.reshape(-1, 2))
