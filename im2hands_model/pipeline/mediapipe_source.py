"""MediaPipe Hands as a keypoint source (optional extra: ``pip install 'im2hands_ros[mediapipe]'``).

MediaPipe Hands (the legacy ``mediapipe.solutions.hands`` API of ``mediapipe==0.10.14``) finds up
to two hands in an RGB image and gives, per hand, 21 landmarks in the same joint order as
:mod:`im2hands_model.hands` (0 wrist; 1-4 thumb CMC, MCP, IP, tip; 5-8 index MCP, PIP, DIP, tip;
9-12 middle; 13-16 ring; 17-20 pinky):

* ``multi_hand_landmarks``: normalised image coordinates, ``x`` and ``y`` in [0, 1] of the image
  width and height (``x * W``, ``y * H`` are pixels);
* ``multi_hand_world_landmarks``: metric 3D coordinates (metres) with the origin at the hand's
  approximate geometric centre and the axes of the camera (x right, y down, z away from the
  camera), but no position in the camera frame;
* ``multi_handedness``: a label ``"Left"`` or ``"Right"`` and its probability.

**Lift to the camera frame.** Each hand's world landmarks ``X_i`` are only translated (MediaPipe
already orients them like the camera): the translation ``t`` is the one that makes ``X_i + t``
project onto the measured 2D landmarks with ``K``. With ``(x_i, y_i, 1) = K^-1 (u_i, v_i, 1)``
the pinhole equations ``x_i (Z_i + t_z) = X_i + t_x`` and ``y_i (Z_i + t_z) = Y_i + t_y`` are
linear in ``t``: 42 equations, 3 unknowns, solved by linear least squares
(:func:`solve_translation`). The linear residual is the image error times the depth, so a few
Gauss-Newton steps then minimise the reprojection error in pixels itself. A hand is rejected when
a joint ends up at or behind the camera (``Z_i + t_z <= 1 cm``) or when the RMS reprojection
error exceeds ``max_reprojection_error`` (default 0.1) times the diagonal of the hand's 2D
landmark box (the world landmarks do not fit the image). The depth inherits MediaPipe's idea of
the hand's size: a hand 10 % larger than MediaPipe assumes is put 10 % too close. Rejected
detections never block a side: hands are lifted first, then assigned.

**Handedness.** MediaPipe labels hands *assuming a mirrored (selfie) image*: on an ordinary,
unmirrored camera image its ``"Left"`` is the person's right hand (checked on rendered scenes
with known hands). :func:`side_from_label` therefore maps ``"Left"`` to 1 (right) and ``"Right"``
to 0 (left). The pipeline reconstructs in the camera frame of the image it is given, so pass the
camera's unmirrored image; for a mirrored (selfie) image flip the image back (``rgb[:, ::-1]``,
``cx -> W - cx``) first, or hands come out as their mirror images.

**Two hands with the same label** (:func:`assign_sides`): detections are taken by decreasing
handedness score. Each goes to the side its label names if that side is still free. Otherwise it
is moved to the other side only if (a) that side is free, (b) it is not a second detection of a
hand already taken (median 2D landmark distance at least ``DUPLICATE_DISTANCE`` = 0.25 of the
smaller hand's 2D box diagonal) and (c) the chirality of its own 3D landmarks
(:func:`chirality`) does not contradict the other side (``sign * chirality >= -CHIRALITY_MARGIN``,
ambiguous flat hands pass); otherwise it is dropped.

MediaPipe's graph is not thread-safe: use one :class:`MediaPipeKeypoints` per thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import numpy as np

from im2hands_model.hands import skeleton_chirality
from im2hands_model.pipeline.result import Keypoints

__all__ = [
    "CHIRALITY_MARGIN",
    "DUPLICATE_DISTANCE",
    "HandDetection",
    "MediaPipeKeypoints",
    "assign_sides",
    "chirality",
    "import_mediapipe",
    "lift_hand",
    "side_from_label",
    "solve_translation",
]

MEDIAPIPE_REQUIREMENT = "mediapipe==0.10.14"
INSTALL_HINT = "pip install 'im2hands_ros[mediapipe]'"

#: Normalised chirality below which a hand counts as contradicting a side (see :func:`chirality`).
CHIRALITY_MARGIN = 0.3
#: Median landmark distance, as a fraction of the 2D box diagonal, under which two detections
#: are the same hand.
DUPLICATE_DISTANCE = 0.25
#: Smallest depth of a lifted joint, metres.
MIN_DEPTH_M = 0.01


def import_mediapipe() -> Any:
    """The ``mediapipe`` module with its legacy ``solutions.hands`` API.

    Raises:
        ImportError: MediaPipe is not installed, or a release without ``solutions.hands``.
    """
    try:
        import mediapipe as mp
    except ImportError as err:
        raise ImportError(
            f"the 'mediapipe' keypoint source needs {MEDIAPIPE_REQUIREMENT}, which could not be "
            f"imported ({err}); install it with: {INSTALL_HINT}"
        ) from err
    try:
        mp.solutions.hands.Hands  # noqa: B018 (probe the legacy API)
    except AttributeError as err:
        version = getattr(mp, "__version__", "unknown")
        raise ImportError(
            f"mediapipe {version} has no 'solutions.hands' API; the keypoint source needs "
            f"{MEDIAPIPE_REQUIREMENT}: {INSTALL_HINT}"
        ) from err
    return mp


def _protobuf_version() -> str:
    try:
        from google import protobuf

        return str(protobuf.__version__)
    except ImportError:
        return "none"


# ---------------------------------------------------------------------------------- pure helpers
def side_from_label(label: str) -> int:
    """Hand index (0 = left, 1 = right) of a MediaPipe handedness label on an unmirrored image.

    MediaPipe assumes a mirrored (selfie) image, so its ``"Left"`` is the right hand here.

    Raises:
        ValueError: a label other than ``"Left"`` or ``"Right"``.
    """
    if label == "Left":
        return 1
    if label == "Right":
        return 0
    raise ValueError(f"unknown MediaPipe handedness label {label!r}")


def chirality(joints: np.ndarray) -> float:
    """Signed handedness of 21 joints from their shape alone: > 0 right hand, < 0 left hand
    (:func:`im2hands_model.hands.skeleton_chirality`)."""
    return float(skeleton_chirality(np.asarray(joints, dtype=np.float64).reshape(21, 3)))


def _box_diagonal(uv: np.ndarray) -> float:
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return float(np.linalg.norm(uv.max(0) - uv.min(0)))


def _same_hand(uv_a: np.ndarray, uv_b: np.ndarray) -> bool:
    """Whether two detections' 2D landmarks are the same hand found twice."""
    scale = min(_box_diagonal(uv_a), _box_diagonal(uv_b))
    distance = float(np.median(np.linalg.norm(np.asarray(uv_a) - np.asarray(uv_b), axis=-1)))
    return distance < DUPLICATE_DISTANCE * max(scale, 1e-9)


def assign_sides(
    labels: Sequence[str],
    scores: Sequence[float],
    joints_2d: Sequence[np.ndarray],
    world: Sequence[np.ndarray] | None = None,
) -> list[int | None]:
    """The hand index (0 = left, 1 = right) of each detection, ``None`` for a dropped one.

    Detections are taken by decreasing score; each goes to the side its (unmirrored) label names
    when that side is free, else to the other side when that is free, it is not a duplicate of a
    hand already taken and its chirality (from ``world``, when given) does not contradict that
    side; else it is dropped (module docstring).

    Args:
        labels: MediaPipe handedness labels (``"Left"``/``"Right"``, mirrored convention).
        scores: their probabilities.
        joints_2d: ``[21, 2]`` landmarks per detection (any consistent unit, e.g. pixels).
        world: ``[21, 3]`` 3D landmarks per detection for the chirality check, or ``None``.
    """
    n = len(labels)
    if len(scores) != n or len(joints_2d) != n or (world is not None and len(world) != n):
        raise ValueError("labels, scores, joints_2d and world must have one entry per detection")
    sides: list[int | None] = [None] * n
    taken: dict[int, int] = {}  # side -> detection
    for d in sorted(range(n), key=lambda i: -float(scores[i])):
        side = side_from_label(labels[d])
        if side not in taken:
            taken[side] = d
            sides[d] = side
            continue
        other = 1 - side
        if other in taken:
            continue
        if any(_same_hand(joints_2d[d], joints_2d[k]) for k in taken.values()):
            continue
        if world is not None and (2 * other - 1) * chirality(world[d]) < -CHIRALITY_MARGIN:
            continue
        taken[other] = d
        sides[d] = other
    return sides


def _project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    q = points @ K.T
    return q[:, :2] / q[:, 2:3]


def solve_translation(
    world: np.ndarray, uv: np.ndarray, K: np.ndarray, iterations: int = 5
) -> tuple[np.ndarray, float]:
    """The translation ``t`` that makes ``world + t`` project onto ``uv`` with ``K``.

    Linear least squares on ``x_i (Z_i + t_z) = X_i + t_x``, ``y_i (Z_i + t_z) = Y_i + t_y``
    (``(x_i, y_i, 1) = K^-1 (u_i, v_i, 1)``), then ``iterations`` Gauss-Newton steps on the
    reprojection error in pixels (skipped or stopped while a point is not in front of the
    camera).

    Args:
        world: ``[N, 3]`` points (metres) in a frame with the camera's axes.
        uv: ``[N, 2]`` their measured pixels.
        K: ``[3, 3]`` intrinsics.
        iterations: Gauss-Newton steps after the linear solution (0: linear only).

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
        return float(np.sqrt(((_project(p, K) - uv) ** 2).sum(1).mean()))

    error = rms_of(t)
    for _ in range(iterations):
        if not np.isfinite(error):
            break
        p = X + t
        proj = _project(p, K)
        residual = (proj - uv).reshape(-1)
        # d(u, v)/dt = (K[0:2] - (u, v) K[2]) / z: K[2] = (0, 0, 1) after checks, kept general.
        J = (K[None, :2, :] - proj[:, :, None] * K[None, 2:3, :]) / p[:, 2, None, None]
        step = np.linalg.lstsq(J.reshape(-1, 3), residual, rcond=None)[0]
        new_t = t - step
        new_error = rms_of(new_t)
        if not new_error < error:
            break
        t, error = new_t, new_error
    return t, error


@dataclass
class HandDetection:
    """One MediaPipe detection and what became of it (see :attr:`MediaPipeKeypoints.detections`).

    Attributes:
        label: MediaPipe's handedness label (mirrored convention).
        score: its probability.
        joints_2d: ``[21, 2]`` measured landmarks, pixels.
        world: ``[21, 3]`` MediaPipe world landmarks, metres, hand-centred.
        side: hand index it was assigned to (0 = left, 1 = right), ``None`` if not used.
        translation: ``[3]`` lift translation (metres) or ``None`` before the lift.
        reprojection_error: RMS reprojection error of the lifted joints, pixels.
        status: ``"ok"`` or why the detection was not used.
    """

    label: str
    score: float
    joints_2d: np.ndarray
    world: np.ndarray
    side: int | None = None
    translation: np.ndarray | None = None
    reprojection_error: float = float("nan")
    status: str = "ok"

    @property
    def joints(self) -> np.ndarray | None:
        """``[21, 3]`` camera-frame joints (metres), ``None`` before the lift."""
        return None if self.translation is None else self.world + self.translation


def lift_hand(
    detection: HandDetection,
    K: np.ndarray,
    max_reprojection_error: float = 0.1,
    iterations: int = 5,
) -> bool:
    """Lift one detection into the camera frame; fills ``translation``, ``reprojection_error``
    and ``status``. Returns whether the hand is accepted.

    Rejected: a joint at or behind ``MIN_DEPTH_M``, or an RMS reprojection error above
    ``max_reprojection_error`` times the diagonal of the 2D landmark box.
    """
    t, rms = solve_translation(detection.world, detection.joints_2d, K, iterations)
    detection.translation, detection.reprojection_error = t, rms
    depth = float((detection.world[:, 2] + t[2]).min())
    if not np.isfinite(rms) or depth <= MIN_DEPTH_M:
        detection.status = f"behind the camera (nearest joint at z = {depth:.3f} m)"
        return False
    limit = max_reprojection_error * _box_diagonal(detection.joints_2d)
    if rms > limit:
        detection.status = f"reprojection error {rms:.1f} px > {limit:.1f} px"
        return False
    detection.status = "ok"
    return True


# ---------------------------------------------------------------------------------- the source
class MediaPipeKeypoints:
    """MediaPipe Hands lifted to the camera frame (module docstring).

    Args:
        max_num_hands: most hands MediaPipe looks for (at most one per side is kept).
        min_detection_confidence: palm detector threshold in [0, 1].
        min_tracking_confidence: landmark tracking threshold in [0, 1] (video mode only).
        static_image_mode: ``True`` (default): every image is detected afresh; ``False``: images
            are frames of one video and hands are tracked between them.
        model_complexity: 0 (faster) or 1 (more accurate) landmark model.
        max_reprojection_error: largest accepted RMS reprojection error of the lifted joints, as
            a fraction of the diagonal of the hand's 2D landmark box.
        refine_iterations: Gauss-Newton steps of the lift after the linear solution.

    Raises:
        ImportError: MediaPipe (the ``mediapipe`` extra) is not installed.
    """

    name = "mediapipe"

    def __init__(
        self,
        max_num_hands: int = 2,
        min_detection_confidence: float = 0.5,
        min_tracking_confidence: float = 0.5,
        static_image_mode: bool = True,
        model_complexity: int = 1,
        max_reprojection_error: float = 0.1,
        refine_iterations: int = 5,
    ) -> None:
        if max_num_hands < 1:
            raise ValueError(f"max_num_hands must be >= 1, got {max_num_hands}")
        for label, value in (
            ("min_detection_confidence", min_detection_confidence),
            ("min_tracking_confidence", min_tracking_confidence),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{label} must lie in [0, 1], got {value}")
        if model_complexity not in (0, 1):
            raise ValueError(f"model_complexity must be 0 or 1, got {model_complexity}")
        if not max_reprojection_error > 0:
            raise ValueError("max_reprojection_error must be > 0")
        mp = import_mediapipe()
        self.max_reprojection_error = float(max_reprojection_error)
        self.refine_iterations = int(refine_iterations)
        try:
            self._hands = mp.solutions.hands.Hands(
                static_image_mode=bool(static_image_mode),
                max_num_hands=int(max_num_hands),
                model_complexity=int(model_complexity),
                min_detection_confidence=float(min_detection_confidence),
                min_tracking_confidence=float(min_tracking_confidence),
            )
        except AttributeError as err:
            # mediapipe 0.10.14 builds its graph options with protobuf APIs that protobuf >= 7
            # removed (FieldDescriptor.label); it declares protobuf < 5
            raise ImportError(
                f"MediaPipe Hands could not start ({err}); {MEDIAPIPE_REQUIREMENT} needs "
                f"protobuf>=4.25.3,<5, found {_protobuf_version()}: {INSTALL_HINT}"
            ) from err
        #: The detections of the last call, with their side, lift and status.
        self.detections: list[HandDetection] = []

    def detect(self, rgb: np.ndarray) -> list[HandDetection]:
        """MediaPipe's raw detections of an RGB ``uint8 [H, W, 3]`` image (not lifted)."""
        if self._hands is None:
            raise RuntimeError("MediaPipeKeypoints is closed")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {list(rgb.shape)}")
        height, width = rgb.shape[:2]
        result = self._hands.process(np.ascontiguousarray(rgb))
        landmarks = result.multi_hand_landmarks or []
        world = result.multi_hand_world_landmarks or []
        handedness = result.multi_handedness or []
        detections = []
        for image_lm, world_lm, hand in zip(landmarks, world, handedness, strict=False):
            best = hand.classification[0]
            uv = np.array([[p.x * width, p.y * height] for p in image_lm.landmark])
            xyz = np.array([[p.x, p.y, p.z] for p in world_lm.landmark])
            if uv.shape != (21, 2) or xyz.shape != (21, 3):
                continue
            detections.append(HandDetection(best.label, float(best.score), uv, xyz))
        return detections

    def __call__(self, rgb: np.ndarray, K: np.ndarray) -> Keypoints:
        """Both hands' keypoints in the camera frame of ``K``.

        Args:
            rgb: ``uint8 [H, W, 3]`` RGB image (unmirrored camera image).
            K: ``[3, 3]`` intrinsics of that image.

        Returns:
            :class:`Keypoints` with ``confidence`` = MediaPipe's handedness probability and
            ``joints_2d`` = the measured landmarks (pixels).
        """
        K = np.asarray(K, dtype=np.float64).reshape(3, 3)
        detections = self.detect(rgb)
        self.detections = detections
        # lift first: a detection that does not fit the image never blocks a side
        lifted = [
            d
            for d in detections
            if lift_hand(d, K, self.max_reprojection_error, self.refine_iterations)
        ]
        sides = assign_sides(
            [d.label for d in lifted],
            [d.score for d in lifted],
            [d.joints_2d for d in lifted],
            [d.world for d in lifted],
        )
        joints = np.zeros((2, 21, 3))
        joints_2d = np.zeros((2, 21, 2))
        present = np.zeros(2, bool)
        confidence = np.zeros(2)
        for det, side in zip(lifted, sides, strict=True):
            if side is None:
                det.status = "dropped: its side is taken and the other one is implausible"
                continue
            det.side = side
            joints[side] = det.joints
            joints_2d[side] = det.joints_2d
            present[side] = True
            confidence[side] = det.score
        return Keypoints(joints, present, confidence, joints_2d=joints_2d)

    def close(self) -> None:
        """Release MediaPipe's graph (idempotent)."""
        if self._hands is not None:
            self._hands.close()
            self._hands = None

    def __enter__(self) -> MediaPipeKeypoints:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
