"""What the pipeline returns: keypoints, per-hand results, contacts and timings of one frame.

Hands are indexed 0 = left, 1 = right everywhere (as in the dataset). Everything is in the camera
frame of the full input image (OpenCV optical frame: x right, y down, z forward), in metres.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["HAND_NAMES", "ContactReport", "HandResult", "Keypoints", "Reconstruction"]

HAND_NAMES: tuple[str, str] = ("left", "right")


@dataclass
class Keypoints:
    """Two-hand keypoints from a keypoint source.

    Attributes:
        joints: ``[2, 21, 3]`` float32, camera frame, metres (rows of absent hands are unused).
        present: ``[2]`` bool, which hands were found.
        confidence: ``[2]`` float32 in [0, 1] (presence probability of the source).
        joints_2d: ``[2, 21, 2]`` float32 pixels of the full image (projection of ``joints``
            unless the source measured them).
    """

    joints: np.ndarray
    present: np.ndarray
    confidence: np.ndarray
    joints_2d: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.joints = np.asarray(self.joints, dtype=np.float32).reshape(2, 21, 3)
        self.present = np.asarray(self.present, dtype=bool).reshape(2)
        self.confidence = np.asarray(self.confidence, dtype=np.float32).reshape(2)
        # a hand without finite keypoints cannot be reconstructed: it is not present
        finite = np.isfinite(self.joints).all(axis=(1, 2))
        self.present = self.present & finite
        self.joints = np.where(self.present[:, None, None], self.joints, 0.0).astype(np.float32)
        if self.joints_2d is not None:
            self.joints_2d = np.asarray(self.joints_2d, dtype=np.float32).reshape(2, 21, 2)

    @property
    def any(self) -> bool:
        return bool(self.present.any())

    @staticmethod
    def empty() -> Keypoints:
        return Keypoints(np.zeros((2, 21, 3)), np.zeros(2, bool), np.zeros(2))


@dataclass
class HandResult:
    """One reconstructed hand.

    Attributes:
        side: ``"left"`` or ``"right"``.
        mesh: watertight :class:`trimesh.Trimesh` in the camera frame (metres), outward faces;
            ``None`` when the occupancy never crossed the threshold.
        keypoints: ``[21, 3]`` float32 camera frame, metres (after K when enabled).
        confidence: presence probability of the keypoint source, in [0, 1].
    """

    side: str
    mesh: Any
    keypoints: np.ndarray
    confidence: float


@dataclass
class ContactReport:
    """Contacts between the two hands of a frame (SPEC §3.7); empty unless both hands exist.

    Per hand (index 0 = left, 1 = right), vertices of that hand's mesh that lie inside the other
    hand (``penetrating``, with ``depth`` in metres) or outside it within ``contact_distance``
    of its surface (``touching``, with ``distance``).

    Attributes:
        contact_distance: threshold in metres.
        penetrating_points, depth, touching_points, distance: lists of two arrays each
            (``[P, 3]``, ``[P]``, ``[T, 3]``, ``[T]``).
        penetration_volume_cm3: volume inside both hands (voxel count x voxel volume).
        contact_area_cm2: mean over both hands of the surface area touching or inside the other.
    """

    contact_distance: float
    penetrating_points: list[np.ndarray] = field(default_factory=lambda: [np.zeros((0, 3))] * 2)
    depth: list[np.ndarray] = field(default_factory=lambda: [np.zeros(0)] * 2)
    touching_points: list[np.ndarray] = field(default_factory=lambda: [np.zeros((0, 3))] * 2)
    distance: list[np.ndarray] = field(default_factory=lambda: [np.zeros(0)] * 2)
    penetration_volume_cm3: float = 0.0
    contact_area_cm2: float = 0.0

    @property
    def in_contact(self) -> bool:
        return any(len(p) for p in self.penetrating_points + self.touching_points)

    @property
    def max_depth(self) -> float:
        return max((float(d.max()) for d in self.depth if len(d)), default=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary and points (``contacts.json`` of the CLI)."""
        hands = {}
        for h, name in enumerate(HAND_NAMES):
            hands[name] = {
                "penetrating_points": np.round(self.penetrating_points[h], 6).tolist(),
                "penetration_depth_m": np.round(self.depth[h], 6).tolist(),
                "touching_points": np.round(self.touching_points[h], 6).tolist(),
                "distance_m": np.round(self.distance[h], 6).tolist(),
            }
        return {
            "contact_distance_m": self.contact_distance,
            "in_contact": self.in_contact,
            "max_penetration_depth_m": self.max_depth,
            "penetration_volume_cm3": self.penetration_volume_cm3,
            "contact_area_cm2": self.contact_area_cm2,
            "hands": hands,
        }


@dataclass
class Reconstruction:
    """Everything the pipeline found in one frame.

    Attributes:
        hands: ``[left, right]``, each a :class:`HandResult` or ``None`` (hand not found).
        contacts: :class:`ContactReport` (empty unless both hands have meshes).
        timings_ms: wall time per stage (``keypoints``, ``K``, ``I``, ``R``, ``meshing``,
            ``contacts``, ``total``) in milliseconds; stages that did not run are absent.
        queries: occupancy points evaluated per stage (``I``, ``R``) over both hands.
        crop_K: ``[3, 3]`` intrinsics of the square crop the occupancy networks saw.
        crop_box: ``(x0, y0, side)`` of that crop in full-image pixels.
        message: why nothing was reconstructed (empty when hands were found).
        kind: ``"full"`` (reconstructed from this frame), ``"reposed"`` (an earlier full
            reconstruction carried to this frame's keypoints, see
            :class:`~im2hands_model.pipeline.video.VideoReconstruction`) or ``"keypoints"``
            (keypoints only: no shape to carry yet, or the pose moved too far).
        shape_age_s: how old the meshes' shape is: this frame's stamp minus that of the frame
            the shape was reconstructed from (0 for ``"full"``).
        occupancy: the meshes' occupancy grids
            (:class:`~im2hands_model.pipeline.contacts.GridOccupancy`), with
            ``PipelineConfig.keep_occupancy`` only.
    """

    hands: list[HandResult | None]
    contacts: ContactReport
    timings_ms: dict[str, float]
    queries: dict[str, int] = field(default_factory=dict)
    crop_K: np.ndarray | None = None
    crop_box: tuple[float, float, float] | None = None
    message: str = ""
    kind: str = "full"
    shape_age_s: float = 0.0
    occupancy: Any = None

    @property
    def left(self) -> HandResult | None:
        return self.hands[0]

    @property
    def right(self) -> HandResult | None:
        return self.hands[1]

    @property
    def empty(self) -> bool:
        return all(h is None for h in self.hands)

    @property
    def meshes(self) -> list[Any]:
        """``[left, right]`` trimesh meshes (``None`` where missing)."""
        return [None if h is None else h.mesh for h in self.hands]

    def keypoints_dict(self) -> dict[str, Any]:
        """JSON-ready keypoints (``keypoints.json`` of the CLI)."""
        out: dict[str, Any] = {"frame": "camera (x right, y down, z forward), metres"}
        for name, hand in zip(HAND_NAMES, self.hands, strict=True):
            out[name] = (
                None
                if hand is None
                else {
                    "confidence": round(float(hand.confidence), 4),
                    "joints": np.round(hand.keypoints.astype(np.float64), 6).tolist(),
                }
            )
        return out
