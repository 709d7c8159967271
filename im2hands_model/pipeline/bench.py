"""``im2hands bench``: how fast the pipeline is, and what its shortcuts cost, on fixed frames.

Frames are rendered by the synthetic generator from a fixed seed (full 640x480 camera frames
with their intrinsics and ground truth), so every run sees the same images.

1. **Speed**: every frame goes through the pipeline as configured (by default the shipped
   model: learned keypoints, K, I, R at 128³ effective on the CPU, 256³ on a GPU), after three
   warm-up calls; median and p95 per stage and end to end, and the occupancy queries per frame.
2. **Reference**: the first ``reference_frames`` frames go through the fast mode and through the
   reference mode (:mod:`~im2hands_model.pipeline.reference`: the paper protocol, dense 32³ ->
   256³ MISE per hand and stage, every part for every query, I recomputed inside R), both with
   the ground-truth keypoints so that the comparison isolates the occupancy and meshing
   shortcuts. The report gives the speed ratio of the two modes and the IoU of each against
   the ground-truth meshes (paper protocol), measured in the same run.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "BENCH_SEED",
    "BenchFrame",
    "format_report",
    "frame_iou",
    "run_bench",
    "synthetic_frames",
    "write_json",
]

BENCH_SEED = 4242  #: seed of the benchmark frames (not a training or test seed)
STAGES = ("keypoints", "K", "I", "R", "meshing", "contacts", "total")


@dataclass
class BenchFrame:
    """A full camera frame with its ground truth (hands 0 = left, 1 = right)."""

    image: np.ndarray  # uint8 [H, W, 3]
    K: np.ndarray  # [3, 3]
    joints: np.ndarray  # [2, 21, 3]
    present: np.ndarray  # [2] bool
    vertices: np.ndarray  # [2, V, 3]
    faces: np.ndarray  # [2, F, 3]
    layout: str
    depth: np.ndarray | None = None  # float32 [H, W], camera z in metres, 0 = background

    @property
    def keypoints(self) -> np.ndarray:
        """GT keypoints in the pipeline's caller format (NaN rows for absent hands)."""
        kp = self.joints.astype(np.float64).copy()
        kp[~self.present] = np.nan
        return kp


def synthetic_frames(n: int, seed: int = BENCH_SEED, progress: bool = False,
                     realism: bool = False, depth_noise: bool = False
                     ) -> list[BenchFrame]:  # fmt: skip
    """``n`` rendered two-hand camera frames (640x480) from the synthetic generator
    (``realism``: with arms, photo backgrounds, light and camera effects; ``depth_noise``: the
    depth a consumer depth camera would measure, :func:`.realism.depth_camera`)."""
    from tqdm import tqdm

    from im2hands_model.data.layouts import LAYOUTS
    from im2hands_model.data.synthetic import SceneGenerator

    gen = SceneGenerator(points_per_hand=64, full_frame=True, realism=realism,
                         depth_noise=depth_noise)
    frames = []
    for i in tqdm(range(n), desc="render frames", unit="frame", disable=not progress):
        a = gen.generate(seed, i).arrays
        frames.append(
            BenchFrame(
                image=np.asarray(a["image_full"], dtype=np.uint8),
                K=np.asarray(a["K_full"], dtype=np.float64),
                joints=np.asarray(a["joints_3d"], dtype=np.float64),
                present=np.asarray(a["hand_present"], dtype=bool),
                vertices=np.asarray(a["vertices"], dtype=np.float64),
                faces=gen.faces,
                layout=LAYOUTS[int(a["layout"])],
                depth=np.asarray(a["depth_full"], dtype=np.float32),
            )
        )
    gen.renderer.release()
    return frames


def frame_iou(result: Any, frame: BenchFrame, n_points: int, seed: int) -> float:
    """Mean IoU (percent) of the frame's present hands (a missing mesh scores 0)."""
    from im2hands_model.evaluation import hand_metrics

    rng = np.random.default_rng(seed)
    scores = []
    for h in np.flatnonzero(frame.present):
        hand = result.hands[h]
        m = hand_metrics(hand.mesh if hand is not None else None, frame.vertices[h],
                         frame.faces[h], None, frame.joints[h], rng, n_points, 1000)  # fmt: skip
        scores.append(m["iou"])
    return float(np.mean(scores)) if scores else float("nan")


def _stats(values: list[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "p95": float(np.percentile(arr, 95))}


def run_bench(
    model: Any,
    frames: list[BenchFrame],
    reference_frames: int = 2,
    iou_points: int = 50_000,
    progress: bool = True,
    warmup: int = 3,
) -> dict[str, Any]:
    """Run both parts of the benchmark (module docstring); returns the JSON report."""
    from tqdm import tqdm

    if not frames:
        raise ValueError("the benchmark needs at least one frame")
    # Warm-up: the first calls of each network with a new input size are slow on the CPU
    # (kernel selection and allocations: ~2 s each for the predictor, measured).
    # the "given" source reconstructs from each frame's ground-truth keypoints
    given_source = model.config.keypoint_source == "given"

    def keypoints(frame: BenchFrame) -> Any:
        return frame.keypoints if given_source else None

    for _ in range(warmup):
        model(frames[0].image, frames[0].K, keypoints=keypoints(frames[0]))
    per_stage: dict[str, list[float]] = {s: [] for s in STAGES}
    queries, found = [], 0
    for frame in tqdm(frames, desc="fast mode", unit="frame", disable=not progress):
        result = model(frame.image, frame.K, keypoints=keypoints(frame))
        found += int(not result.empty)
        for stage in STAGES:
            if stage in result.timings_ms:
                per_stage[stage].append(result.timings_ms[stage])
        queries.append(sum(result.queries.values()))
    stages = {s: _stats(v) for s, v in per_stage.items() if v and s != "total"}
    total = _stats(per_stage["total"])

    fast_ms, ref_ms, fast_iou, ref_iou = [], [], [], []
    reference = model.configured(reference=True)
    given = model.configured(keypoint_source="given")
    chosen = frames[: max(0, reference_frames)]
    for i, frame in enumerate(tqdm(chosen, desc="reference mode", unit="frame",
                                   disable=not progress)):  # fmt: skip
        r_fast = given(frame.image, frame.K, keypoints=frame.keypoints)
        r_ref = reference(frame.image, frame.K, keypoints=frame.keypoints)
        fast_ms.append(r_fast.timings_ms["total"])
        ref_ms.append(r_ref.timings_ms["total"])
        fast_iou.append(frame_iou(r_fast, frame, iou_points, i))
        ref_iou.append(frame_iou(r_ref, frame, iou_points, i))

    report: dict[str, Any] = {
        "device": str(model.device),
        "device_name": torch.cuda.get_device_name(model.device)
        if model.device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "backend": model.backend,
        "resolution": model.resolution,
        "frames": len(frames),
        "frames_with_hands": found,
        "end_to_end_ms_median": total["median"],
        "end_to_end_ms_p95": total["p95"],
        "fps_median": 1000.0 / total["median"],
        "stages_ms": stages,
        "queries_per_frame": float(np.median(queries)),
        "config": model.describe(),
        "torch": torch.__version__,
    }
    if chosen:
        speedup = float(np.median(ref_ms) / np.median(fast_ms))
        report.update(
            reference_frames=len(chosen),
            reference_keypoints="ground truth (both modes)",
            reference_end_to_end_ms_median=float(np.median(ref_ms)),
            fast_end_to_end_ms_median_same_frames=float(np.median(fast_ms)),
            speedup=speedup,
            iou_fast=float(np.mean(fast_iou)),
            iou_reference=float(np.mean(ref_iou)),
            iou_delta_points=float(np.mean(fast_iou) - np.mean(ref_iou)),
            iou_points=iou_points,
        )
    return report


def format_report(report: dict[str, Any]) -> str:
    """The report as a few readable lines."""
    lines = [
        f"device {report['device']} ({report['device_name']}, {report['threads']} threads), "
        f"backend {report['backend']}, {report['resolution']}^3 effective, "
        f"{report['frames']} frames ({report['frames_with_hands']} with hands found)",
        f"{'stage':<10} {'median ms':>10} {'p95 ms':>10}",
    ]
    for stage, s in report["stages_ms"].items():
        lines.append(f"{stage:<10} {s['median']:>10.1f} {s['p95']:>10.1f}")
    lines.append(
        f"{'end to end':<10} {report['end_to_end_ms_median']:>10.1f} "
        f"{report['end_to_end_ms_p95']:>10.1f}   ({report['fps_median']:.1f} frames/s, "
        f"{report['queries_per_frame']:.0f} queries/frame)"
    )
    if "speedup" in report:
        lines.append(
            f"reference mode (paper protocol, GT keypoints, {report['reference_frames']} frames): "
            f"{report['reference_end_to_end_ms_median']:.0f} ms vs "
            f"{report['fast_end_to_end_ms_median_same_frames']:.0f} ms fast -> "
            f"{report['speedup']:.1f}x; IoU {report['iou_fast']:.2f} % fast vs "
            f"{report['iou_reference']:.2f} % reference (delta {report['iou_delta_points']:+.2f})"
        )
    return "\n".join(lines)


def write_json(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the report (atomically) and return the path."""
    from im2hands_model.io import atomic_write

    text = json.dumps(report, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))
