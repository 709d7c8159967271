"""Would a skeleton-length prior place the predicted hands better in depth? A check, not a stage.

    python training/recipes/root_depth_prior.py [--data out/bench/val] [--train out/bench/train] \
        [--weights DIR] [--out runs/default/root_depth_prior.json]

The shipped keypoint predictor's joints are far off in the camera frame, mostly in depth
(docs/results_notes.md). A classical alternative to its learned root depth: keep its 2D joints
and relative depths, and choose each hand's depth so that the summed length of its 20 bones
equals the training set's mean (a hand seen twice as far looks half as big). This script
compares the two on the scenes of ``--data`` (every present hand, slots as predicted): mean
joint error in the camera frame and the depth error of joint 9. It prints and writes both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import default_collate
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from im2hands_model.data.shards import ShardDataset  # noqa: E402
from im2hands_model.hands import MID_JOINT, SKELETON_EDGES  # noqa: E402

EDGES = np.asarray(SKELETON_EDGES)
DEPTHS_M = np.arange(0.05, 3.0, 0.0005)  # the depths searched, metres


def mean_skeleton_length(folder: str, limit: int) -> tuple[float, int]:
    """Mean summed bone length (metres) of the present hands of the first ``limit`` scenes."""
    data = ShardDataset(folder, keys=["joints_3d", "hand_present"])
    lengths = []
    for i in range(min(limit, len(data))):
        item = data[i]
        joints, present = item["joints_3d"].double().numpy(), item["hand_present"].numpy()
        for h in np.flatnonzero(present):
            bones = joints[h, EDGES[:, 0]] - joints[h, EDGES[:, 1]]
            lengths.append(np.linalg.norm(bones, axis=-1).sum())
    if not lengths:
        raise SystemExit(f"no hands in the first {limit} scenes of {folder}")
    return float(np.mean(lengths)), len(lengths)


def depth_from_length(uv: np.ndarray, rel: np.ndarray, K: np.ndarray, length: float) -> np.ndarray:
    """``[21, 3]`` joints: pixels ``uv`` and relative depths ``rel`` back-projected at the root
    depth (searched on :data:`DEPTHS_M`) whose skeleton is ``length`` metres long."""
    rays = np.c_[uv, np.ones(len(uv))] @ np.linalg.inv(K).T  # z = 1
    cand = (DEPTHS_M[:, None, None] + rel[None, :, None]) * rays[None]
    bones = cand[:, EDGES[:, 0]] - cand[:, EDGES[:, 1]]
    total = np.linalg.norm(bones, axis=-1).sum(-1)
    return cand[int(np.argmin(np.abs(total - length)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="out/bench/val", help="scenes to score")
    ap.add_argument("--train", default="out/bench/train", help="scenes for the mean length")
    ap.add_argument("--train-scenes", type=int, default=400)
    ap.add_argument("--weights", default=None, help="weights folder (default: shipped)")
    ap.add_argument("--out", default="runs/default/root_depth_prior.json")
    args = ap.parse_args(argv)

    from im2hands_model.pretrained import load_pretrained

    torch.set_num_threads(1)
    length, n_train = mean_skeleton_length(args.train, args.train_scenes)
    net = load_pretrained("kpts_pred", "cpu", args.weights)
    data = ShardDataset(args.data, keys=["image", "K", "joints_3d", "hand_present"])
    errors: dict[str, list[tuple[float, float]]] = {"learned": [], "length_prior": []}
    with torch.no_grad():
        for start in tqdm(range(0, len(data), 16), desc="scenes", leave=False):
            batch = default_collate([data[i] for i in range(start, min(len(data), start + 16))])
            pred = net(batch["image"], batch["K"])
            for n in range(len(batch["K"])):
                K = batch["K"][n].double().numpy()
                for h in np.flatnonzero(batch["hand_present"][n].numpy()):
                    gt = batch["joints_3d"][n, h].double().numpy()
                    uv = pred.joints_2d[n, h].double().numpy()
                    rel = pred.rel_depth[n, h].double().numpy()
                    prior = depth_from_length(uv, rel, K, length)
                    for name, j in (("learned", pred.joints[n, h].double().numpy()),
                                    ("length_prior", prior)):  # fmt: skip
                        err = np.linalg.norm(j - gt, axis=-1).mean()
                        errors[name].append((err, abs(j[MID_JOINT, 2] - gt[MID_JOINT, 2])))
    report = {
        "data": args.data,
        "train": args.train,
        "mean_skeleton_length_mm": length * 1000,
        "train_hands": n_train,
        "hands": len(errors["learned"]),
        "depth": {},
    }
    for name, rows in errors.items():
        mm = np.asarray(rows) * 1000
        report["depth"][name] = {
            "mpjpe_camera_mm": float(mm[:, 0].mean()),
            "mpjpe_camera_median_mm": float(np.median(mm[:, 0])),
            "joint9_depth_error_mm": float(mm[:, 1].mean()),
        }
        print(f"{name:>12}: camera-frame MPJPE {mm[:, 0].mean():.1f} mm "
              f"(median {np.median(mm[:, 0]):.1f}), joint-9 depth error {mm[:, 1].mean():.1f} mm "
              f"({report['hands']} hands)")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
