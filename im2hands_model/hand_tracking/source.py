"""The default keypoint source: MediaPipe's real-photo hand models, two hands, camera frame.

One call takes an RGB image, its intrinsics and optionally a registered depth image, and returns
both hands' 21 keypoints in the camera frame (:class:`~im2hands_model.pipeline.result.Keypoints`,
0 = left, 1 = right):

1. find up to two hands (:class:`~im2hands_model.hand_tracking.two_hands.HandFinder`);
2. tell left from right (:func:`~im2hands_model.hand_tracking.two_hands.assign_sides`);
3. place each hand (:mod:`~im2hands_model.hand_tracking.placement`): from the depth image where
   it has valid pixels on the hand, else from the landmarks with the hand-size prior.

:class:`HandTracker` takes the frames of one video, in order: each hand's next region comes from
its current landmarks, so the palm detector runs only while a hand is missing (every frame), and
the wider two-hand search every :data:`SEARCH_EVERY` frames then; a track keeps its side;
keypoints are smoothed by a One-Euro filter, which restarts when the track is lost.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from im2hands_model.hand_tracking.detector import (
    HandLandmarks,
    LandmarkModel,
    PalmDetector,
    region_from_landmarks,
)
from im2hands_model.hand_tracking.filters import OneEuroFilter, OneEuroParams
from im2hands_model.hand_tracking.placement import (
    along_rays,
    depth_translation,
    palm_size,
    project,
    scale_to_prior,
    solve_translation,
)
from im2hands_model.hand_tracking.two_hands import HandFinder, SearchReport, assign_sides
from im2hands_model.pipeline.result import Keypoints

#: While a hand is missing, the tracker runs the full two-hand search on every this many frames
#: (the palm detector alone on the others), so a hand that comes back is found within as many.
SEARCH_EVERY = 3

__all__ = ["SEARCH_EVERY", "DetectorConfig", "FoundHands", "FrameReport", "HandReport",
           "HandTracker", "MediaPipeHands", "as_depth"]  # fmt: skip


@dataclass
class DetectorConfig:
    """Settings of the MediaPipe keypoint source.

    Attributes:
        variant: ``full`` or ``lite`` MediaPipe models.
        presence_threshold: smallest hand-presence score of a hand.
        palm_threshold: smallest palm-detector score.
        search: look for the second hand beyond stock MediaPipe (``False``: one plain pass).
        size_prior: how far (0..1, log scale) each hand's size is pulled toward an adult's
            before it is placed from the image alone.
        smoothing: One-Euro smoothing of tracked keypoints (video only).
        one_euro: the filter's parameters.
        threads: LiteRT CPU threads per model.
    """

    variant: str = "full"
    presence_threshold: float = 0.5
    palm_threshold: float = 0.5
    search: bool = True
    size_prior: float = 0.75
    smoothing: bool = True
    one_euro: OneEuroParams = field(default_factory=OneEuroParams)
    threads: int = 1

    def check(self) -> None:
        if self.variant not in ("full", "lite"):
            raise ValueError(f"variant must be 'full' or 'lite', got {self.variant!r}")
        for name in ("presence_threshold", "palm_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"{name} must lie in (0, 1)")
        if not 0.0 <= self.size_prior <= 1.0:
            raise ValueError("size_prior must lie in [0, 1]")
        if self.threads < 1:
            raise ValueError("threads must be >= 1")
        self.one_euro.check()


@dataclass
class HandReport:
    """How one hand of a frame was found and placed.

    Attributes:
        side: 0 = left, 1 = right.
        presence: the landmark model's hand-presence score.
        side_probability: probability of that side (model score and chirality combined).
        found_by: the proposal that found it (``track``, ``palm``, ``union``, ``mirror``, ...).
        placement: ``depth`` or ``image``.
        reprojection_px: RMS reprojection error of the placed joints, pixels.
        depth_joints: joints whose depth was used (0 for an image placement).
    """

    side: int
    presence: float
    side_probability: float
    found_by: str
    placement: str
    reprojection_px: float
    depth_joints: int = 0


@dataclass
class FrameReport:
    """What the source did on the last frame."""

    hands: list[HandReport] = field(default_factory=list)
    search: SearchReport = field(default_factory=SearchReport)
    detector_ran: bool = False
    #: why the depth image was not used for some hand ("" when it was, or none was given)
    depth_issue: str = ""


@dataclass
class FoundHands:
    """The hands one image holds, before placement: landmarks, ``(side, P(side))`` and the
    proposal that found each, and the image's ``(height, width)``."""

    hands: list[HandLandmarks]
    sides: list[tuple[int, float]]
    found_by: list[str]
    shape: tuple[int, int]


def as_depth(depth: object, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """A depth image as ``float32 [H, W]`` metres, or ``(None, why)``.

    Accepts ``uint16`` millimetres (0 = no measurement) and float metres (0 or NaN = none), of
    the colour image's size ``shape``.
    """
    arr = np.asarray(depth)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        return None, f"depth image must be [H, W], got shape {list(arr.shape)}"
    if tuple(arr.shape) != tuple(shape):
        got, want = f"{arr.shape[1]}x{arr.shape[0]}", f"{shape[1]}x{shape[0]}"
        return None, f"depth image is {got}, the colour image {want}"
    if arr.dtype == np.uint16:
        return arr.astype(np.float32) * 1e-3, ""
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False), ""
    return None, f"depth image must be uint16 millimetres or float metres, got {arr.dtype}"


class MediaPipeHands:
    """Both hands' keypoints from an RGB image (module docstring); one image at a time.

    Args:
        config: :class:`DetectorConfig`.

    Raises:
        ModelFileError: the MediaPipe model files are not installed (the message says how).
    """

    name = "mediapipe"

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.config.check()
        c = self.config
        self.palm = PalmDetector(c.variant, c.palm_threshold, threads=c.threads)
        self.landmarks = LandmarkModel(c.variant, threads=c.threads)
        self.finder = HandFinder(self.palm, self.landmarks, c.presence_threshold, c.search)
        #: what the last call did
        self.last = FrameReport()
        self._warned: set[str] = set()

    def __call__(self, rgb: np.ndarray, K: np.ndarray, depth: object = None) -> Keypoints:
        """Keypoints of one ``uint8 [H, W, 3]`` RGB image with intrinsics ``K``.

        Args:
            depth: optional registered depth image (:func:`as_depth`); a hand without valid
                depth pixels, or a depth image that does not fit, is placed from the image.
        """
        return self.place(self.find(rgb), K, depth)

    def find(self, rgb: np.ndarray) -> FoundHands:
        """Steps 1 and 2 (module docstring): the hands of one image and their sides."""
        hands, search = self.finder(rgb)
        self.last = FrameReport(search=search, detector_ran=True)
        return FoundHands(hands, assign_sides(hands), list(search.found_by), rgb.shape[:2])

    def place(self, found: FoundHands, K: np.ndarray, depth: object = None) -> Keypoints:
        """Step 3: the found hands in the camera frame of ``K`` (with ``depth``, if given)."""
        return self._keypoints(found.hands, found.sides, found.found_by, found.shape, K, depth)

    def _keypoints(
        self, hands: list[HandLandmarks], sides: list[tuple[int, float]], found_by: list[str],
        shape: tuple[int, int], K: np.ndarray, depth: object,
    ) -> Keypoints:  # fmt: skip
        K = np.asarray(K, np.float64).reshape(3, 3)
        self.last.hands = []  # placing again (another depth image) replaces the reports
        depth_m, issue = (None, "") if depth is None else as_depth(depth, shape)
        if issue:
            self._warn_once(issue)
        joints = np.zeros((2, 21, 3))
        uv = np.zeros((2, 21, 2))
        present = np.zeros(2, bool)
        confidence = np.zeros(2)
        for hand, (side, p_side), how in zip(hands, sides, found_by, strict=True):
            xyz, report = self._place(hand, K, depth_m)
            if xyz is None:
                continue
            report.side, report.side_probability, report.found_by = side, p_side, how
            if depth_m is not None and report.placement != "depth":
                issue = issue or "no valid depth pixels on a hand"
            self.last.hands.append(report)
            joints[side], uv[side], present[side] = xyz, hand.uv, True
            confidence[side] = hand.presence
        self.last.depth_issue = issue
        return Keypoints(joints, present, confidence, joints_2d=uv)

    def _place(
        self, hand: HandLandmarks, K: np.ndarray, depth: np.ndarray | None
    ) -> tuple[np.ndarray | None, HandReport]:
        report = HandReport(0, hand.presence, 0.0, "", "image", float("nan"))
        if depth is not None:
            placed = depth_translation(hand.world, hand.uv, K, depth)
            if placed is not None:
                t, report.depth_joints = placed
                xyz = hand.world + t
                report.placement = "depth"
                report.reprojection_px = _rms(project(xyz, K), hand.uv)
                return along_rays(xyz, hand.uv, K), report
        world = scale_to_prior(hand.world, self.config.size_prior)
        t, rms = solve_translation(world, hand.uv, K)
        xyz = world + t
        if not np.isfinite(rms) or xyz[:, 2].min() <= 0.01:
            return None, report
        report.reprojection_px = rms
        return along_rays(xyz, hand.uv, K), report

    def _warn_once(self, issue: str) -> None:
        kind = issue.split(",")[0][:40]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"depth image not used: {issue}; hands placed from the image alone",
                          RuntimeWarning, stacklevel=3)  # fmt: skip


def _rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).sum(-1).mean()))


@dataclass
class _Track:
    side: int
    p_side: float
    hand: HandLandmarks
    filter: OneEuroFilter
    filter_2d: OneEuroFilter


class HandTracker(MediaPipeHands):
    """The MediaPipe source over the frames of one video, in order (module docstring).

    Call it like :class:`MediaPipeHands`, with each frame's time in seconds (``t``; default: the
    previous time + 1/30 s). :meth:`reset` forgets all tracks (a cut in the video).
    """

    name = "mediapipe"

    def __init__(self, config: DetectorConfig | None = None) -> None:
        super().__init__(config)
        self.tracks: list[_Track] = []
        self._t = 0.0
        self._missing = 0  # frames in a row with fewer than two hands

    def reset(self) -> None:
        self.tracks = []
        self._missing = 0

    def __call__(
        self, rgb: np.ndarray, K: np.ndarray, depth: object = None, t: float | None = None
    ) -> Keypoints:
        self._t = self._t + 1.0 / 30.0 if t is None else float(t)
        seeds = [region_from_landmarks(tr.hand.uv, "track") for tr in self.tracks]
        wide = self.config.search and self._missing % SEARCH_EVERY == 0
        hands, search = self.finder(rgb, seeds, detect=True, search=wide)
        self.last = FrameReport(search=search, detector_ran=search.palm_runs > 0)
        self._missing = 0 if len(hands) >= 2 else self._missing + 1
        # an answer from a seed region continues that seed's track (the landmark model returns
        # the region it was given); tracks whose seed found nothing are lost with their filters
        track_of = {id(seed): tr for seed, tr in zip(seeds, self.tracks, strict=True)}
        kept: list[_Track] = []
        new: list[HandLandmarks] = []
        new_how: list[str] = []
        for hand, how in zip(hands, search.found_by, strict=True):
            track = track_of.get(id(hand.region))
            if track is not None:
                track.hand = hand
                kept.append(track)
            else:
                new.append(hand)
                new_how.append(how)
        found_by = ["track"] * len(kept) + new_how
        for hand, (side, p) in zip(new, self._new_sides(kept, new), strict=True):
            filters = OneEuroFilter(self.config.one_euro), OneEuroFilter(self.config.one_euro)
            kept.append(_Track(side, p, hand, *filters))
        self.tracks = kept
        kp = self._keypoints([tr.hand for tr in kept], [(tr.side, tr.p_side) for tr in kept],
                             found_by, rgb.shape[:2], K, depth)  # fmt: skip
        if self.config.smoothing:
            kp = self._smooth(kp)
        return kp

    def _new_sides(self, kept: list[_Track], new: list[HandLandmarks]) -> list[tuple[int, float]]:
        if not new:
            return []
        taken = {tr.side for tr in kept}
        if not taken:
            return assign_sides(new)
        free = 1 - next(iter(taken))
        # one side is held by a track: a new hand can only be the other one
        return [(free, assign_sides(new[:1])[0][1])]

    def _smooth(self, kp: Keypoints) -> Keypoints:
        joints, uv = kp.joints.astype(np.float64), kp.joints_2d.astype(np.float64)
        for tr in self.tracks:
            s = tr.side
            if not kp.present[s]:
                continue
            joints[s] = tr.filter(joints[s], self._t, palm_size(joints[s]))
            diag = float(np.linalg.norm(uv[s].max(0) - uv[s].min(0)))
            uv[s] = tr.filter_2d(uv[s], self._t, diag)
        return Keypoints(joints, kp.present, kp.confidence, joints_2d=uv)
