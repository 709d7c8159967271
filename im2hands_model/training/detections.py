"""The default keypoint source's output on a dataset, stored with its scenes (K's real inputs).

``im2hands-data detect DIR`` runs the MediaPipe source (:mod:`im2hands_model.hand_tracking`)
once over every scene of a shard dataset -- on the full camera frame when the dataset has it
(``--full-frame``: what users run), else on the crop -- and writes, into each shard folder, the
keys below; ``index.json`` lists them and records the detector's settings and hit rate. The
paper trains K on an off-the-shelf predictor's actual outputs; these are ours, so K learns the
two-hand errors a real detector makes (swapped sides, the occluded hand's fingers, depth).

=====================  ===================  ====================================================
key                    shape, dtype         meaning
=====================  ===================  ====================================================
src_present            [2] bool             the source found that hand (left, right slots)
src_confidence         [2] float32          its hand-presence score (0 when not found)
src_joints_3d          [2, 21, 3] float32   its keypoints placed from the image alone, camera
                                            frame, metres (0 when not found)
src_joints_3d_depth    [2, 21, 3] float32   the same hands placed with the rendered depth
src_joints_2d          [2, 21, 2] float32   its 2D keypoints in the crop, pixels
=====================  ===================  ====================================================

A shard is written key by key through temporary files renamed into place, and shards already
done with the same settings are skipped, so an interrupted run resumes; ``index.json`` is
rewritten last.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from im2hands_model.data.shards import INDEX_FILE
from im2hands_model.geometry import project_points

__all__ = ["DETECTION_KEYS", "detect_dataset", "detect_scene"]

#: Keys written per scene (module docstring).
DETECTION_KEYS = ("src_present", "src_confidence", "src_joints_3d", "src_joints_3d_depth",
                  "src_joints_2d")  # fmt: skip
_MARK = "detections.json"  # per shard: the settings it was detected with


def detect_scene(source: Any, image: np.ndarray, K: np.ndarray, crop_K: np.ndarray,
                 depth: np.ndarray | None = None) -> dict[str, np.ndarray]:  # fmt: skip
    """One scene's detection keys from ``source`` (a :class:`MediaPipeHands`) on ``image``
    (``uint8 [H, W, 3]``, intrinsics ``K``); 2D keypoints are given in the crop of ``crop_K``."""
    found = source.find(image)
    alone = source.place(found, K)
    placed = source.place(found, K, depth) if depth is not None else alone
    present = alone.present
    uv = np.zeros((2, 21, 2), np.float32)
    for h in np.flatnonzero(present):
        uv[h] = project_points(alone.joints[h], crop_K)  # placed joints lie in front (z > 1 cm)
    both = present & placed.present
    return {
        "src_present": present.astype(bool),
        "src_confidence": np.where(present, alone.confidence, 0.0).astype(np.float32),
        "src_joints_3d": alone.joints.astype(np.float32),
        "src_joints_3d_depth": np.where(both[:, None, None], placed.joints,
                                        alone.joints).astype(np.float32),  # fmt: skip
        "src_joints_2d": uv,
    }


def _settings(config: Any, frame: str) -> dict[str, Any]:
    from im2hands_model.hand_tracking.models import WHEEL_REQUIREMENT

    cfg = asdict(config)
    cfg.pop("smoothing", None)
    cfg.pop("one_euro", None)
    return {"source": "mediapipe", "models": WHEEL_REQUIREMENT, "image": frame, "config": cfg}


def _shard_done(folder: Path, settings: dict[str, Any]) -> bool:
    mark = folder / _MARK
    if not mark.is_file() or not all((folder / f"{k}.npy").is_file() for k in DETECTION_KEYS):
        return False
    return json.loads(mark.read_text()).get("settings") == settings


def _detect_shard(args: tuple[str, dict[str, Any], bool]) -> dict[str, Any]:
    """Detect one shard folder (a worker's job); returns its counts."""
    import torch

    from im2hands_model.hand_tracking.source import DetectorConfig, MediaPipeHands

    torch.set_num_threads(1)
    folder_s, settings, full = args
    folder = Path(folder_s)
    if _shard_done(folder, settings):
        return json.loads((folder / _MARK).read_text())["counts"]
    config = DetectorConfig(**{**settings["config"], "smoothing": False})
    source = MediaPipeHands(config)
    image_key, k_key = ("image_full", "K_full") if full else ("image", "K")
    images = np.load(folder / f"{image_key}.npy", mmap_mode="r")
    Ks = np.load(folder / f"{k_key}.npy")
    crop_Ks = np.load(folder / "K.npy")
    depths = np.load(folder / "depth_full.npy", mmap_mode="r") if full else None
    present = np.load(folder / "hand_present.npy")
    rows = [detect_scene(source, np.asarray(images[i]), Ks[i], crop_Ks[i],
                         None if depths is None else np.asarray(depths[i]))
            for i in range(len(Ks))]  # fmt: skip
    for key in DETECTION_KEYS:
        tmp = folder / f".{key}.tmp.npy"
        np.save(tmp, np.stack([r[key] for r in rows]))
        os.replace(tmp, folder / f"{key}.npy")
    found = np.stack([r["src_present"] for r in rows])
    counts = {"scenes": len(rows), "hands": int(present.sum()),
              "found": int((found & present).sum()), "extra": int((found & ~present).sum())}
    tmp = folder / f".{_MARK}.tmp"
    tmp.write_text(json.dumps({"settings": settings, "counts": counts}))
    os.replace(tmp, folder / _MARK)
    return counts


def detect_dataset(root: str | os.PathLike, config: Any = None, workers: int = 1,
                   progress: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run the default keypoint source over the dataset at ``root`` (module docstring).

    Args:
        config: a :class:`~im2hands_model.hand_tracking.source.DetectorConfig` (default: the
            source's defaults).
        workers: processes, one shard at a time each.

    Returns:
        The detections' record as written to ``index.json`` (settings, hands found).
    """
    from im2hands_model.hand_tracking.source import DetectorConfig

    root = Path(root)
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise FileNotFoundError(f"{root} is not an im2hands dataset (no {INDEX_FILE})")
    index = json.loads(index_path.read_text())
    full = "image_full" in index["keys"] and "K_full" in index["keys"]
    settings = _settings(config or DetectorConfig(), "full" if full else "crop")
    jobs = [(str(root / s["name"]), settings, full) for s in index["shards"]]
    bar = tqdm(total=index["num_scenes"], desc="detect", unit="scene", disable=not progress)
    totals = {"scenes": 0, "hands": 0, "found": 0, "extra": 0}

    def add(counts: dict[str, Any]) -> None:
        for k in totals:
            totals[k] += int(counts[k])
        bar.update(int(counts["scenes"]))

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            add(_detect_shard(job))
    else:  # LiteRT interpreters are per process; spawn keeps the parent's state out
        with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
            for counts in pool.imap_unordered(_detect_shard, jobs):
                add(counts)
    bar.close()
    record = {**settings, **totals,
              "found_pct": round(100.0 * totals["found"] / max(totals["hands"], 1), 2)}
    for key in DETECTION_KEYS:
        a = np.load(Path(jobs[0][0]) / f"{key}.npy", mmap_mode="r")
        index["keys"][key] = {"shape": list(a.shape[1:]), "dtype": str(a.dtype)}
    index["detections"] = record
    tmp = root / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, index_path)
    return record
