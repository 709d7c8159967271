"""``im2hands bench-keypoints``: how well and how fast each keypoint source finds both hands.

On rendered full camera frames with ground truth (:func:`im2hands_model.pipeline.bench.
synthetic_frames`), each source -- the default MediaPipe source with the two-hand search, one
plain MediaPipe pass (palms, IoU-0.5 de-duplication, landmarks: stock MediaPipe's logic on the
same models) and the shipped learned predictor -- is scored on:

* ``hands_found_pct``: GT hands matched by a found hand (2D landmarks within half the hand's
  size of the GT projection);
* ``both_found_pct``: two-hand frames with both hands found;
* ``handedness_pct``: matched hands given the right side;
* ``false_hands_pct``: found hands that match no GT hand (a hand found twice, or a phantom), per
  GT hand;
* ``mpjpe_aligned_mm``: MPJPE after aligning each matched hand at joint 9 (the paper's protocol);
* ``root_error_mm`` / ``root_error_depth_mm``: median error of the hand's root joint in the
  camera frame (joint 9, the middle-finger base: the joint the aligned errors are measured
  from), without and with the rendered depth image; ``centroid_error_mm`` /
  ``centroid_error_depth_mm`` the same for the mean of the 21 joints, which is what placement
  solves for (the root also carries the shape error of the hand);
* ``ms_per_frame_detect`` / ``ms_per_frame_tracked``: median time per frame on one thread, with
  the full search and in tracking mode (video frames: the same frame repeated, so every hand is
  tracked from the previous call).

Errors are computed on matched hands only (a missed hand counts in ``hands_found_pct``), against
the GT hand it matched, whichever side it was given, so placement and handedness are scored
apart.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SourceScores", "format_table", "load_frames", "run_keypoint_bench"]

KEYS = ("hands_found_pct", "both_found_pct", "handedness_pct", "false_hands_pct",
        "mpjpe_aligned_mm",
        "root_error_mm", "root_error_depth_mm", "ms_per_frame_detect",
        "ms_per_frame_tracked", "centroid_error_mm", "centroid_error_depth_mm")  # fmt: skip


@dataclass
class SourceScores:
    """Accumulated per-hand errors of one source."""

    name: str
    gt_hands: int = 0
    found: int = 0
    false: int = 0
    two_hand_frames: int = 0
    both_found: int = 0
    right_side: int = 0
    aligned_mm: list[float] = field(default_factory=list)
    root_mm: list[float] = field(default_factory=list)
    root_depth_mm: list[float] = field(default_factory=list)
    centroid_mm: list[float] = field(default_factory=list)
    centroid_depth_mm: list[float] = field(default_factory=list)
    ms_detect: list[float] = field(default_factory=list)
    ms_tracked: list[float] = field(default_factory=list)
    by_layout: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        def pct(a: int, b: int) -> float | None:
            return round(100.0 * a / b, 1) if b else None

        def med(values: list[float]) -> float | None:
            return round(float(np.median(values)), 1) if values else None

        def mean(values: list[float]) -> float | None:
            return round(float(np.mean(values)), 1) if values else None

        return {
            "hands_found_pct": pct(self.found, self.gt_hands),
            "both_found_pct": pct(self.both_found, self.two_hand_frames),
            "handedness_pct": pct(self.right_side, self.found),
            "false_hands_pct": pct(self.false, self.gt_hands),
            "mpjpe_aligned_mm": mean(self.aligned_mm),
            "root_error_mm": med(self.root_mm),
            "root_error_depth_mm": med(self.root_depth_mm),
            "ms_per_frame_detect": med(self.ms_detect),
            "ms_per_frame_tracked": med(self.ms_tracked),
            "centroid_error_mm": med(self.centroid_mm),
            "centroid_error_depth_mm": med(self.centroid_depth_mm),
            "hands": self.gt_hands,
            "found_pct_by_layout": {k: pct(v[0], v[1]) for k, v in sorted(self.by_layout.items())},
        }


def load_frames(n: int, seed: int, cache: Path | None = None, realism: bool = False
                ) -> list[Any]:  # fmt: skip
    """``n`` rendered frames of ``seed`` (read from / written to ``cache``, an ``.npz``;
    ``realism``: the realistic renders, :mod:`im2hands_model.data.realism`)."""
    from im2hands_model.pipeline.bench import BenchFrame, synthetic_frames

    if cache is not None and cache.is_file():
        with np.load(cache, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}  # each read of an npz key decompresses it
        same = bool(data.get("realism", np.array(False))) == realism
        if int(data["n"]) >= n and int(data["seed"]) == seed and same:
            return [
                BenchFrame(data["image"][i], data["K"][i], data["joints"][i], data["present"][i],
                           data["vertices"][i], data["faces"], str(data["layout"][i]),
                           data["depth"][i])  # fmt: skip
                for i in range(n)
            ]
    frames = synthetic_frames(n, seed=seed, progress=True, realism=realism)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            cache, n=n, seed=seed, realism=realism, image=np.stack([f.image for f in frames]),
            K=np.stack([f.K for f in frames]), joints=np.stack([f.joints for f in frames]),
            present=np.stack([f.present for f in frames]),
            vertices=np.stack([f.vertices for f in frames]), faces=frames[0].faces,
            layout=np.array([f.layout for f in frames]), depth=np.stack([f.depth for f in frames]),
        )  # fmt: skip
    return frames


def _match(uv: np.ndarray, present: np.ndarray, gt_uv: np.ndarray, gt_present: np.ndarray
           ) -> dict[int, int]:  # fmt: skip
    """Found side -> GT side, by mean 2D joint distance under half the GT hand's 2D size."""
    pairs = []
    for s in np.flatnonzero(present):
        for g in np.flatnonzero(gt_present):
            size = float(np.linalg.norm(gt_uv[g].max(0) - gt_uv[g].min(0)))
            d = float(np.linalg.norm(uv[s] - gt_uv[g], axis=-1).mean())
            if d < 0.5 * size:
                pairs.append((d, int(s), int(g)))
    out: dict[int, int] = {}
    for _, s, g in sorted(pairs):
        if s not in out and g not in out.values():
            out[s] = g
    return out


def _score(scores: SourceScores, frame: Any, kp: Any, kp_depth: Any | None) -> None:
    from im2hands_model.hand_tracking.placement import project
    from im2hands_model.hands import MID_JOINT
    from im2hands_model.metrics import joint_errors_mm

    gt_uv = np.stack([project(frame.joints[h], frame.K) for h in range(2)])
    n_gt = int(frame.present.sum())
    scores.gt_hands += n_gt
    uv = kp.joints_2d if kp.joints_2d is not None else np.stack(
        [project(np.maximum(kp.joints[h], 1e-3), frame.K) for h in range(2)])  # fmt: skip
    match = _match(uv, kp.present, gt_uv, frame.present)
    scores.found += len(match)
    scores.false += int(kp.present.sum()) - len(match)
    layout = scores.by_layout.setdefault(frame.layout, [0, 0])
    layout[0] += len(match)
    layout[1] += n_gt
    if n_gt == 2:
        scores.two_hand_frames += 1
        scores.both_found += int(len(match) == 2)
    for s, g in match.items():
        scores.right_side += int(s == g)
        pred, gt = kp.joints[s].astype(np.float64), frame.joints[g]
        scores.aligned_mm.append(float(joint_errors_mm(pred, gt).mean()))
        scores.root_mm.append(1e3 * float(np.linalg.norm(pred[MID_JOINT] - gt[MID_JOINT])))
        scores.centroid_mm.append(1e3 * float(np.linalg.norm(pred.mean(0) - gt.mean(0))))
        if kp_depth is not None and kp_depth.present[s]:
            d = kp_depth.joints[s].astype(np.float64)
            scores.root_depth_mm.append(1e3 * float(np.linalg.norm(d[MID_JOINT] - gt[MID_JOINT])))
            scores.centroid_depth_mm.append(1e3 * float(np.linalg.norm(d.mean(0) - gt.mean(0))))


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


def run_keypoint_bench(frames: list[Any], learned: bool = True, progress: bool = True
                       ) -> dict[str, Any]:  # fmt: skip
    """Scores of the MediaPipe source, one plain MediaPipe pass and the learned predictor."""
    import torch
    from tqdm import tqdm

    from im2hands_model.hand_tracking.source import DetectorConfig, HandTracker, MediaPipeHands

    torch.set_num_threads(1)
    ours = MediaPipeHands(DetectorConfig(search=True))
    plain = MediaPipeHands(DetectorConfig(search=False, size_prior=0.0))
    tracker = HandTracker(DetectorConfig(search=True, smoothing=False))
    results = {"mediapipe": SourceScores("mediapipe"), "plain": SourceScores("plain")}
    learned_source = pipeline = None
    if learned:
        from im2hands_model.pipeline import Im2Hands
        from im2hands_model.pipeline.frame import Frame
        from im2hands_model.pipeline.keypoints import LearnedKeypoints

        pipeline = Im2Hands.from_pretrained(device="cpu")
        learned_source = LearnedKeypoints(pipeline.nets["kpts_pred"], 2)
        results["mediapipe+K"] = SourceScores("mediapipe+K")
        results["learned"] = SourceScores("learned")
    for frame in tqdm(frames, desc="keypoint sources", unit="frame", disable=not progress):
        found, ms_find = _timed(ours.find, frame.image)
        kp_ours, ms_place = _timed(ours.place, found, frame.K)
        results["mediapipe"].ms_detect.append(ms_find + ms_place)
        _score(results["mediapipe"], frame, kp_ours, ours.place(found, frame.K, frame.depth))
        tracker.reset()
        tracker(frame.image, frame.K)
        _, ms = _timed(tracker, frame.image, frame.K)
        if len(tracker.tracks) == int(frame.present.sum()):
            results["mediapipe"].ms_tracked.append(ms)
        found, ms_find = _timed(plain.find, frame.image)
        kp, ms_place = _timed(plain.place, found, frame.K)
        results["plain"].ms_detect.append(ms_find + ms_place)
        _score(results["plain"], frame, kp, plain.place(found, frame.K, frame.depth))
        if learned_source is not None and pipeline is not None:
            image = Frame.from_input(frame.image, frame.K)
            if kp_ours.any:
                with torch.inference_mode():
                    refined, ms = _timed(pipeline._refine_keypoints, image, kp_ours)
                refined.joints_2d = kp_ours.joints_2d  # same hands: match them as found
                results["mediapipe+K"].ms_detect.append(ms)
            else:
                refined = kp_ours
            _score(results["mediapipe+K"], frame, refined, None)
            kp, ms = _timed(learned_source, image)
            results["learned"].ms_detect.append(ms)
            _score(results["learned"], frame, kp, None)
    summary = {name: s.summary() for name, s in results.items()}
    head = summary.pop("mediapipe")
    layouts = sorted({f.layout for f in frames})
    return {**head, "baselines": summary, "frames": len(frames), "layouts": layouts}


def format_table(report: dict[str, Any]) -> str:
    rows = [("mediapipe (default)", report)] + [
        (name, values) for name, values in report["baselines"].items()
    ]
    head = "| source | " + " | ".join(KEYS) + " |"
    lines = [head, "|" + "---|" * (len(KEYS) + 1)]
    for name, values in rows:
        cells = ["–" if values.get(k) is None else f"{values[k]:g}" for k in KEYS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw_keypoints(rgb: np.ndarray, kp: Any) -> np.ndarray:
    """The image with each found hand's 2D keypoints and bones (left blue, right orange)."""
    from PIL import Image, ImageDraw

    from im2hands_model.hands import SKELETON_EDGES

    image = Image.fromarray(np.ascontiguousarray(rgb))
    draw = ImageDraw.Draw(image)
    width = max(2, round(rgb.shape[1] / 200))
    for side, colour in ((0, (40, 120, 255)), (1, (255, 140, 0))):
        if not kp.present[side]:
            continue
        uv = kp.joints_2d[side]
        for a, b in SKELETON_EDGES:
            draw.line([tuple(uv[a]), tuple(uv[b])], fill=colour, width=width)
        for u, v in uv:
            draw.ellipse([u - width, v - width, u + width, v + width], fill=(255, 255, 255))
    return np.asarray(image)


TILE = (320, 240)  #: size of one picture in the sheets, pixels


def fit_tile(rgb: np.ndarray, tile: tuple[int, int] = TILE) -> np.ndarray:
    """``rgb`` shrunk into a white ``tile`` (width, height), centred, aspect kept."""
    from PIL import Image

    im = Image.fromarray(rgb)
    im.thumbnail(tile)
    canvas = Image.new("RGB", tile, (255, 255, 255))
    canvas.paste(im, ((tile[0] - im.width) // 2, (tile[1] - im.height) // 2))
    return np.asarray(canvas)


def picture(frames: list[Any], photos: list[np.ndarray], path: Path, columns: int = 4) -> None:
    """A sheet: real photos with the default source's keypoints (top row), then rendered
    two-hand frames with one plain MediaPipe pass (middle) and the two-hand search (bottom),
    first those where the search found a hand the plain pass missed."""
    from PIL import Image

    from im2hands_model.hand_tracking.source import DetectorConfig, MediaPipeHands

    ours, plain = MediaPipeHands(), MediaPipeHands(DetectorConfig(search=False))
    tile = TILE
    fit = fit_tile

    def intrinsics(a: np.ndarray) -> np.ndarray:
        h, w = a.shape[:2]
        return np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1.0]])

    rows = [[fit(draw_keypoints(p, ours(p, intrinsics(p)))) for p in photos[:columns]]]
    pairs = []
    for f in (f for f in frames if f.present.all()):
        a, b = plain(f.image, f.K), ours(f.image, f.K)
        pairs.append((int(b.present.sum()) - int(a.present.sum()), f, a, b))
        if sum(p[0] > 0 for p in pairs) >= columns:
            break
    pairs = sorted(pairs, key=lambda p: -p[0])[:columns]
    rows.append([fit(draw_keypoints(f.image, a)) for _, f, a, _ in pairs])
    rows.append([fit(draw_keypoints(f.image, b)) for _, f, _, b in pairs])
    blank = np.full((*tile[::-1], 3), 255, np.uint8)
    sheet = np.concatenate([np.concatenate(r + [blank] * (columns - len(r)), axis=1)
                            for r in rows], axis=0)  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(path, quality=88)


def write_json(report: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
