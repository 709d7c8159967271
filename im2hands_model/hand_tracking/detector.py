"""MediaPipe's two hand networks, run by LiteRT: palms in an image, landmarks in a region.

* :class:`PalmDetector` -- the SSD palm detector on the letterboxed 192x192 image: 2016 fixed
  anchors decoded into palm boxes and 7 palm keypoints, sigmoid scores, weighted non-maximum
  suppression. Each palm becomes a :class:`Region` (a rotated square) the way MediaPipe's graph
  makes one: rotated so that the wrist -> middle-finger-base keypoints point up, scaled 2.6x and
  shifted half its height toward the fingers.
* :class:`LandmarkModel` -- the landmark network on a 224x224 crop of one region: 21 landmarks
  (image pixels after mapping back), 21 metric world landmarks (rotated back into the camera's
  axes), a hand-presence score and the handedness score.

Our own code chooses every region (that is what the two-hand search and the tracker need), so
the graph logic of MediaPipe is re-written here from its published graph settings; the networks
themselves are Google's files, loaded from :mod:`~im2hands_model.hand_tracking.models`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from im2hands_model.hand_tracking.models import model_path

__all__ = [
    "HandLandmarks",
    "LandmarkModel",
    "Palm",
    "PalmDetector",
    "Region",
    "region_from_landmarks",
    "region_from_points",
    "warp_region",
]


def _interpreter(path: str, threads: int):  # noqa: ANN202 (LiteRT's class)
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    return interpreter


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -80.0, 80.0)))


# ------------------------------------------------------------------------------------ regions
def _box_iou(lo_a: np.ndarray, hi_a: np.ndarray, lo_b: np.ndarray, hi_b: np.ndarray) -> float:
    """Intersection over union of two axis-aligned boxes given by their corners."""
    inter = float(np.prod(np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None)))
    union = float(np.prod(hi_a - lo_a) + np.prod(hi_b - lo_b)) - inter
    return inter / max(union, 1e-12)


@dataclass(frozen=True)
class Region:
    """A rotated square of the image that the landmark model looks at.

    Attributes:
        cx, cy: centre, pixels.
        size: side length, pixels.
        angle: rotation, radians; 0 = fingers up (-y); positive turns the region's "up"
            toward +x (clockwise on screen).
        source: what proposed it (``palm``, ``track``, ``beside``, ``mirror``, ``union``...).
    """

    cx: float
    cy: float
    size: float
    angle: float
    source: str = "palm"

    def crop_to_image(self, side: int) -> np.ndarray:
        """``[2, 3]`` affine map from crop pixels (``side`` x ``side``) to image pixels."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        k = self.size / side
        # crop x axis -> (c, s) in the image, crop y axis -> (-s, c)
        A = np.array([[c * k, -s * k], [s * k, c * k]])
        centre = np.array([self.cx, self.cy]) - A @ np.array([side / 2.0, side / 2.0])
        return np.c_[A, centre]

    def corners(self) -> np.ndarray:
        """``[4, 2]`` image pixels of the corners (for drawing)."""
        M = self.crop_to_image(1)
        unit = np.array([[0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 1, 1]], dtype=np.float64)
        return unit @ M.T

    def iou(self, other: Region) -> float:
        """Overlap of the two regions' axis-aligned bounds (as MediaPipe compares rects)."""
        a, b = self.corners(), other.corners()
        return _box_iou(a.min(0), a.max(0), b.min(0), b.max(0))


def warp_region(rgb: np.ndarray, region: Region, side: int) -> np.ndarray:
    """The ``side x side`` RGB crop of a region (outside the image black, as MediaPipe pads)."""
    return cv2.warpAffine(
        rgb, region.crop_to_image(side), (side, side),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
    )  # fmt: skip


def region_from_points(
    points: np.ndarray, start: np.ndarray, end: np.ndarray, scale: float, shift: float,
    source: str,
) -> Region:
    """The square around ``points`` rotated so that ``start -> end`` points up, its side the
    longer extent times ``scale``, moved ``shift`` of its side toward ``end`` (MediaPipe's
    rect transformation with ``square_long``)."""
    d = np.asarray(end, np.float64) - np.asarray(start, np.float64)
    angle = math.atan2(d[0], -d[1])  # 0 when end is straight above start
    c, s = math.cos(angle), math.sin(angle)
    # coordinates in the region's frame: x' = (c, s) . p, y' = (-s, c) . p
    R = np.array([[c, s], [-s, c]])
    local = np.asarray(points, np.float64) @ R.T
    lo, hi = local.min(0), local.max(0)
    centre_local = 0.5 * (lo + hi)
    side = float((hi - lo).max()) * scale
    centre_local[1] += shift * float(hi[1] - lo[1])  # shifted by the height before scaling
    centre = R.T @ centre_local
    return Region(float(centre[0]), float(centre[1]), side, angle, source)


#: The landmarks MediaPipe's tracking region is fitted to (no DIPs and finger tips).
_ROI_JOINTS = [0, 1, 2, 3, 5, 6, 9, 10, 13, 14, 17, 18]


def region_from_landmarks(uv: np.ndarray, source: str = "track") -> Region:
    """The tracking region of a hand from its 21 2D landmarks (MediaPipe's landmarks-to-ROI:
    rotation from the wrist to the middle of the index, middle and ring bases, the box over the
    wrist, thumb and the fingers' first two joints, scaled 2.0 and shifted 0.1 toward the
    fingers)."""
    uv = np.asarray(uv, np.float64).reshape(21, 2)
    top = 0.25 * (uv[5] + uv[13]) + 0.5 * uv[9]
    return region_from_points(uv[_ROI_JOINTS], uv[0], top, 2.0, -0.1, source)


# ------------------------------------------------------------------------------------ palms
@dataclass
class Palm:
    """One palm: score, box centre/size and the 7 palm keypoints, all in image pixels."""

    score: float
    box: np.ndarray  # [4] cx, cy, w, h
    keypoints: np.ndarray  # [7, 2]

    def region(self, source: str = "palm") -> Region:
        # the box sets the extent, keypoints 0 (wrist) -> 2 (middle base) the rotation
        cx, cy, w, h = self.box
        d = self.keypoints[2] - self.keypoints[0]
        angle = math.atan2(d[0], -d[1])
        side = max(w, h) * 2.6
        c, s = math.cos(angle), math.sin(angle)
        up = np.array([s, -c])  # the region's "up" in the image
        centre = np.array([cx, cy]) + 0.5 * max(w, h) * up
        return Region(float(centre[0]), float(centre[1]), float(side), angle, source)


def _ssd_anchors() -> np.ndarray:
    """``[2016, 2]`` anchor centres in [0, 1] of the palm detector (MediaPipe's settings: 4
    layers, strides 8, 16, 16, 16, two anchors per cell, fixed size, offset 0.5)."""
    strides = (8, 16, 16, 16)
    centres = []
    layer = 0
    while layer < len(strides):
        stride = strides[layer]
        per_cell = 0
        # layers with the same stride share one grid
        while layer < len(strides) and strides[layer] == stride:
            per_cell += 2
            layer += 1
        cells = math.ceil(192 / stride)
        ys, xs = np.meshgrid(np.arange(cells), np.arange(cells), indexing="ij")
        grid = np.stack([(xs + 0.5) / cells, (ys + 0.5) / cells], -1).reshape(-1, 1, 2)
        centres.append(np.repeat(grid, per_cell, axis=1).reshape(-1, 2))
    return np.concatenate(centres).astype(np.float64)


def _weighted_nms(palms: list[Palm], iou_threshold: float) -> list[Palm]:
    """MediaPipe's weighted NMS: each cluster of boxes overlapping the best one at IoU >=
    ``iou_threshold`` becomes one palm, its box and keypoints the score-weighted mean."""

    def iou(a: np.ndarray, b: np.ndarray) -> float:  # boxes as (cx, cy, w, h)
        return _box_iou(a[:2] - a[2:] / 2, a[:2] + a[2:] / 2, b[:2] - b[2:] / 2, b[:2] + b[2:] / 2)

    remaining = sorted(palms, key=lambda p: -p.score)
    kept = []
    while remaining:
        best = remaining[0]
        near = [iou(best.box, p.box) >= iou_threshold for p in remaining]
        cluster = [p for p, n in zip(remaining, near, strict=True) if n]
        remaining = [p for p, n in zip(remaining, near, strict=True) if not n]
        w = np.array([p.score for p in cluster])[:, None]
        box = (np.stack([p.box for p in cluster]) * w).sum(0) / w.sum()
        kps = (np.stack([p.keypoints for p in cluster]) * w[:, :, None]).sum(0) / w.sum()
        kept.append(Palm(best.score, box, kps))
    return kept


class PalmDetector:
    """Palms in an RGB image (module docstring).

    Args:
        variant: ``full`` (default) or ``lite``.
        score_threshold: smallest palm score (MediaPipe: 0.5).
        iou_threshold: weighted-NMS overlap (MediaPipe: 0.3).
        threads: LiteRT CPU threads.
    """

    SIZE = 192

    def __init__(self, variant: str = "full", score_threshold: float = 0.5,
                 iou_threshold: float = 0.3, threads: int = 1) -> None:  # fmt: skip
        if variant not in ("full", "lite"):
            raise ValueError(f"variant must be 'full' or 'lite', got {variant!r}")
        self.net = _interpreter(str(model_path(f"palm_detection_{variant}.tflite")), threads)
        self._input = self.net.get_input_details()[0]["index"]
        outputs = sorted(self.net.get_output_details(), key=lambda d: d["shape"][-1])
        self._scores, self._boxes = outputs[0]["index"], outputs[1]["index"]
        self.anchors = _ssd_anchors()
        self.score_threshold, self.iou_threshold = score_threshold, iou_threshold

    def __call__(self, rgb: np.ndarray) -> list[Palm]:
        """Palms of an RGB ``uint8 [H, W, 3]`` image, best first, in image pixels."""
        h, w = rgb.shape[:2]
        scale = self.SIZE / max(h, w)
        nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
        resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        pad_y, pad_x = (self.SIZE - nh) // 2, (self.SIZE - nw) // 2
        tensor = np.zeros((1, self.SIZE, self.SIZE, 3), np.float32)
        tensor[0, pad_y : pad_y + nh, pad_x : pad_x + nw] = resized.astype(np.float32) / 255.0
        self.net.set_tensor(self._input, tensor)
        self.net.invoke()
        raw = self.net.get_tensor(self._boxes)[0].astype(np.float64)
        scores = _sigmoid(self.net.get_tensor(self._scores)[0, :, 0].astype(np.float64))
        palms = []
        for i in np.flatnonzero(scores >= self.score_threshold):
            a = self.anchors[i]
            values = raw[i] / self.SIZE
            box = np.array([values[0] + a[0], values[1] + a[1], values[2], values[3]])
            kps = values[4:18].reshape(7, 2) + a
            # letterboxed unit square -> image pixels
            box[:2] = (box[:2] * self.SIZE - (pad_x, pad_y)) / scale
            box[2:] = box[2:] * self.SIZE / scale
            kps = (kps * self.SIZE - (pad_x, pad_y)) / scale
            palms.append(Palm(float(scores[i]), box, kps))
        return _weighted_nms(palms, self.iou_threshold)


# ------------------------------------------------------------------------------------ landmarks
@dataclass
class HandLandmarks:
    """The landmark model's answer for one region.

    Attributes:
        region: the region it looked at.
        presence: hand-presence probability.
        p_right: probability that this is a right hand *on an unmirrored camera image* (the
            model's own score is for a mirrored selfie image and is swapped here).
        uv: ``[21, 2]`` landmarks, image pixels.
        z: ``[21]`` relative depth of the landmarks, pixels (model's scale).
        world: ``[21, 3]`` metric landmarks, metres, camera axes, origin near the hand centre.
    """

    region: Region
    presence: float
    p_right: float
    uv: np.ndarray
    z: np.ndarray
    world: np.ndarray


class LandmarkModel:
    """21 hand landmarks in a region of an RGB image (module docstring).

    Args:
        variant: ``full`` (default) or ``lite``.
        threads: LiteRT CPU threads.
    """

    SIZE = 224

    def __init__(self, variant: str = "full", threads: int = 1) -> None:
        if variant not in ("full", "lite"):
            raise ValueError(f"variant must be 'full' or 'lite', got {variant!r}")
        self.net = _interpreter(str(model_path(f"hand_landmark_{variant}.tflite")), threads)
        self._input = self.net.get_input_details()[0]["index"]
        # outputs by name: Identity (landmarks), _1 (presence), _2 (handedness), _3 (world)
        by_name = {d["name"]: d["index"] for d in self.net.get_output_details()}
        self._out = [by_name[n] for n in ("Identity", "Identity_1", "Identity_2", "Identity_3")]

    def __call__(self, rgb: np.ndarray, region: Region) -> HandLandmarks:
        crop = warp_region(rgb, region, self.SIZE)
        self.net.set_tensor(self._input, (crop.astype(np.float32) / 255.0)[None])
        self.net.invoke()
        lm, presence, handed, world = (self.net.get_tensor(i) for i in self._out)
        lm = lm.reshape(21, 3).astype(np.float64)
        M = region.crop_to_image(self.SIZE)
        uv = lm[:, :2] @ M[:, :2].T + M[:, 2]
        z = lm[:, 2] * region.size / self.SIZE
        c, s = math.cos(region.angle), math.sin(region.angle)
        world = world.reshape(21, 3).astype(np.float64)
        world_xy = world[:, :2] @ np.array([[c, -s], [s, c]]).T
        world = np.c_[world_xy, world[:, 2]]
        # the model's handedness score is P(left) for a mirrored selfie image, which is P(right)
        # for an ordinary camera image (checked on photos of known hands and by chirality)
        p_right = float(np.asarray(handed).reshape(-1)[0])
        return HandLandmarks(
            region, float(np.asarray(presence).reshape(-1)[0]), p_right,
            uv, z, world,
        )  # fmt: skip
