"""Both hands where MediaPipe finds one: region proposals, de-duplication and handedness.

Stock MediaPipe runs the palm detector, keeps the regions that overlap less than IoU 0.5 and runs
the landmark model on each. When two hands touch or cross, the palm detector often sees one palm,
or its two regions overlap and one is dropped: one hand out of two. :class:`HandFinder` keeps
looking until it has two hands or runs out of proposals, cheapest first:

1. ``seeds`` -- the caller's regions (the tracker's: the previous frame's hands);
2. ``palm`` -- every palm the detector finds on the whole image;
3. ``union`` -- the detector again on a zoomed crop around the hand(s) found so far (the square
   that two interacting hands would share), where the second palm is larger and less hidden;
4. ``mirror`` -- the detector on the mirrored image (its anchors and learned priors are not
   mirror-symmetric, so the other hand's palm sometimes scores only there);
5. ``beside`` / ``across`` -- the found hand's region moved one palm-width to either side, and
   turned upside down (the other hand's fingers crossing it).

A region whose landmarks land on a hand already found is a duplicate and is dropped: median
landmark distance under :data:`DUPLICATE_DISTANCE` of the smaller hand's 2D size, or palms centred
within :data:`SAME_PALM_DISTANCE` of it with the same handedness (one hand read twice, e.g. upside
down; two hands of one side cannot share a palm). So is a landmark answer below the presence
threshold.

**Handedness** (:func:`assign_sides`): the landmark model's score (for an unmirrored camera
image, :mod:`~im2hands_model.hand_tracking.detector`) and the chirality of the hand's own 3D
landmarks (:func:`im2hands_model.hands.skeleton_chirality`) are added as log-odds; two hands get
opposite sides, whichever assignment the summed evidence prefers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from im2hands_model.hand_tracking.detector import (
    HandLandmarks,
    LandmarkModel,
    PalmDetector,
    Region,
    region_from_landmarks,
    warp_region,
)
from im2hands_model.hands import skeleton_chirality

__all__ = [
    "CHIRALITY_WEIGHT",
    "DUPLICATE_DISTANCE",
    "HandFinder",
    "SearchReport",
    "assign_sides",
    "handedness_logit",
    "same_hand",
]

#: Median landmark distance, as a fraction of the smaller hand's 2D box diagonal, under which
#: two answers are the same hand.
DUPLICATE_DISTANCE = 0.25
#: Palm centres closer than this (fraction of the smaller hand's 2D size) with the same handedness
#: are one hand.
SAME_PALM_DISTANCE = 0.25
#: Log-odds of "right hand" per unit of skeleton chirality (+0.6 to +2 for a clear right hand).
CHIRALITY_WEIGHT = 2.0
_LOGIT_CLIP = 8.0


def _diag(uv: np.ndarray) -> float:
    return float(np.linalg.norm(uv.max(0) - uv.min(0)))


_PALM = [0, 5, 9, 13, 17]


def same_hand(a: np.ndarray, b: np.ndarray, same_side: bool = False) -> bool:
    """Whether two ``[21, 2]`` landmark sets are one hand found twice (``same_side``: both
    answers say the same handedness)."""
    scale = max(min(_diag(a), _diag(b)), 1e-9)
    if float(np.median(np.linalg.norm(a - b, axis=-1))) < DUPLICATE_DISTANCE * scale:
        return True
    palms = float(np.linalg.norm(a[_PALM].mean(0) - b[_PALM].mean(0)))
    return same_side and palms < SAME_PALM_DISTANCE * scale


def handedness_logit(hand: HandLandmarks, chirality_weight: float = CHIRALITY_WEIGHT) -> float:
    """Log-odds that ``hand`` is a right hand: the model's score plus its 3D chirality."""
    p = min(max(hand.p_right, 1e-4), 1 - 1e-4)
    model = float(np.clip(math.log(p / (1 - p)), -_LOGIT_CLIP, _LOGIT_CLIP))
    return model + chirality_weight * float(skeleton_chirality(hand.world))


def assign_sides(
    hands: Sequence[HandLandmarks], chirality_weight: float = CHIRALITY_WEIGHT
) -> list[tuple[int, float]]:
    """``(side, P(that side))`` of each of at most two hands (0 = left, 1 = right)."""
    logits = [handedness_logit(h, chirality_weight) for h in hands]
    if len(logits) > 2:
        raise ValueError(f"at most two hands, got {len(logits)}")
    if len(logits) == 1:
        side = int(logits[0] > 0)
        return [(side, 1.0 / (1.0 + math.exp(-abs(logits[0]))))]
    if not logits:
        return []
    # first = right, second = left, or the other way round: summed log-odds decide
    margin = logits[0] - logits[1]
    p_first_right = 1.0 / (1.0 + math.exp(-float(np.clip(margin, -50, 50))))
    first = int(margin > 0)
    p = p_first_right if first else 1.0 - p_first_right
    return [(first, p), (1 - first, p)]


@dataclass
class SearchReport:
    """What the search of one frame did: landmark-model runs and the proposal kinds that
    found a new hand, in order."""

    palm_runs: int = 0
    landmark_runs: int = 0
    found_by: list[str] = field(default_factory=list)


class HandFinder:
    """Up to two distinct hands in an RGB image (module docstring).

    Args:
        palm: the :class:`PalmDetector`.
        landmarks: the :class:`LandmarkModel`.
        presence_threshold: smallest hand-presence score of an accepted answer.
        search: look for the second hand beyond stock MediaPipe's proposals (``False``: one
            plain MediaPipe pass -- palms, regions de-duplicated at IoU 0.5, landmarks).
    """

    def __init__(self, palm: PalmDetector, landmarks: LandmarkModel,
                 presence_threshold: float = 0.5, search: bool = True) -> None:  # fmt: skip
        self.palm, self.landmarks = palm, landmarks
        self.presence_threshold, self.search = float(presence_threshold), bool(search)

    def __call__(
        self, rgb: np.ndarray, seeds: Sequence[Region] = (), detect: bool = True,
        search: bool | None = None,
    ) -> tuple[list[HandLandmarks], SearchReport]:  # fmt: skip
        """The hands of one image, at most two, and how they were found.

        Args:
            rgb: ``uint8 [H, W, 3]``.
            seeds: regions to try first (e.g. the previous frame's).
            detect: run the palm detector when fewer than two hands came from the seeds.
            search: this call's two-hand search switch (``None``: the finder's own).
        """
        search = self.search if search is None else bool(search)
        report = SearchReport()
        hands: list[HandLandmarks] = []

        def attempt(region: Region) -> bool:
            if len(hands) >= 2:
                return False
            answer = self.landmarks(rgb, region)
            report.landmark_runs += 1
            if answer.presence < self.presence_threshold:
                return False
            side = handedness_logit(answer) > 0
            if any(same_hand(answer.uv, h.uv, side == (handedness_logit(h) > 0)) for h in hands):
                return False
            hands.append(answer)
            report.found_by.append(region.source)
            return True

        for region in seeds:
            attempt(region)
        if len(hands) >= 2 or not detect:
            return hands, report
        regions = self._palm_regions(rgb, report)
        if not search:
            # stock MediaPipe: drop regions overlapping a kept one (or a seed) at IoU > 0.5
            kept: list[Region] = list(seeds)
            for region in regions:
                if all(region.iou(k) <= 0.5 for k in kept):
                    kept.append(region)
                    attempt(region)
            return hands, report
        for region in regions:
            attempt(region)
        if not hands:  # no palm at all: the mirrored image is the last resort
            for region in self._mirrored_regions(rgb, report):
                attempt(region)
            return hands, report
        if len(hands) >= 2:
            return hands, report
        for proposals in (self._union_regions, self._mirrored_regions, self._beside_regions):
            for region in proposals(rgb, report, hands[0]):
                if attempt(region):
                    return hands, report
        return hands, report

    # -- proposals -------------------------------------------------------------------------------
    def _palm_regions(self, rgb: np.ndarray, report: SearchReport) -> list[Region]:
        report.palm_runs += 1
        return [p.region("palm") for p in self.palm(rgb)]

    def _mirrored_regions(
        self, rgb: np.ndarray, report: SearchReport, _found: HandLandmarks | None = None
    ) -> list[Region]:
        report.palm_runs += 1
        width = rgb.shape[1]
        out = []
        for p in self.palm(np.ascontiguousarray(rgb[:, ::-1])):
            r = p.region("mirror")
            out.append(replace(r, cx=width - 1 - r.cx, angle=-r.angle))
        return out

    def _union_regions(
        self, rgb: np.ndarray, report: SearchReport, found: HandLandmarks
    ) -> list[Region]:
        """Palms in the upright square around the found hand that a second, interacting hand
        would share, detected at the palm detector's full resolution."""
        r = region_from_landmarks(found.uv)
        side = 1.6 * r.size
        square = Region(r.cx, r.cy, side, 0.0, "union")
        size = 384  # detector input is 192: twice that keeps small palms legible
        M = square.crop_to_image(size)
        crop = warp_region(rgb, square, size)
        report.palm_runs += 1
        out = []
        for p in self.palm(crop):
            reg = p.region("union")
            centre = M[:, :2] @ np.array([reg.cx, reg.cy]) + M[:, 2]
            out.append(Region(float(centre[0]), float(centre[1]), reg.size * side / size,
                              reg.angle, "union"))  # fmt: skip
        return out

    def _beside_regions(
        self, rgb: np.ndarray, report: SearchReport, found: HandLandmarks
    ) -> list[Region]:
        r = region_from_landmarks(found.uv, "beside")
        c, s = math.cos(r.angle), math.sin(r.angle)
        across = np.array([c, s])  # the region's x axis in the image
        step = 0.45 * r.size
        out = [replace(r, cx=r.cx + k * step * across[0], cy=r.cy + k * step * across[1])
               for k in (-1.0, 1.0)]  # fmt: skip
        out.append(replace(r, angle=r.angle + math.pi, source="across"))
        return out
