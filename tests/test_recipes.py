"""The experiment scripts in training/recipes run end to end on a tiny rendered dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from im2hands_model.data.shards import ShardDataset

ROOT = Path(__file__).resolve().parents[1]


def test_handedness_probe_trains_and_reports_every_present_hand(tiny_dataset_dir, tmp_path):
    out = tmp_path / "probe.json"
    d = str(tiny_dataset_dir)
    cmd = [sys.executable, str(ROOT / "training" / "recipes" / "handedness_probe.py"), "--train",
           d, "--val", d, "--test", d, "--test-scenes", "5", "--minutes", "0.05", "--batch", "8",
           "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    present = ShardDataset(d, keys=["hand_present"])
    n_hands = sum(int(present[i]["hand_present"].sum()) for i in range(len(present)))
    n_test = sum(int(present[i]["hand_present"].sum()) for i in range(5))
    assert report["hands"] == {"train": n_hands, "val": n_hands, "test": n_test}
    assert report["steps"] >= 1
    for name, n in (("val", n_hands), ("test", n_test)):
        acc = report["accuracy"][name]  # over each crop and its mirror: a multiple of 1 / 2n
        assert 0.0 <= acc <= 1.0 and abs(acc * 2 * n - round(acc * 2 * n)) < 1e-6
    assert "handedness accuracy" in proc.stdout


def test_skeleton_length_prior_recovers_the_depth_of_exact_joints(tiny_dataset_dir):
    """Given a hand's exact pixels, relative depths and its own skeleton length, the searched
    depth puts every joint back where it was (to the search step)."""
    sys.path.insert(0, str(ROOT / "training" / "recipes"))
    from root_depth_prior import EDGES, depth_from_length

    data = ShardDataset(str(tiny_dataset_dir), keys=["joints_3d", "K", "hand_present"])
    checked = 0
    for i in range(len(data)):
        item = data[i]
        K = item["K"].double().numpy()
        for h in np.flatnonzero(item["hand_present"].numpy()):
            joints = item["joints_3d"][h].double().numpy()
            uvw = joints @ K.T
            uv, rel = uvw[:, :2] / uvw[:, 2:], joints[:, 2] - joints[0, 2]
            length = np.linalg.norm(joints[EDGES[:, 0]] - joints[EDGES[:, 1]], axis=-1).sum()
            found = depth_from_length(uv, rel, K, length)
            assert np.abs(found - joints).max() < 1e-3, (i, h)
            # a hand 10 % larger is placed 10 % farther away (same pixels)
            far = depth_from_length(uv, rel, K, 1.1 * length)
            assert far[0, 2] > joints[0, 2] * 1.05, (i, h)
            checked += 1
    assert checked >= 4


def test_root_depth_prior_reports_both_depths_for_every_hand(tiny_dataset_dir, tmp_path):
    out = tmp_path / "depth.json"
    d = str(tiny_dataset_dir)
    cmd = [sys.executable, str(ROOT / "training" / "recipes" / "root_depth_prior.py"),
           "--data", d, "--train", d, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    present = ShardDataset(d, keys=["hand_present"])
    n_hands = sum(int(present[i]["hand_present"].sum()) for i in range(len(present)))
    assert report["hands"] == report["train_hands"] == n_hands
    assert 300 < report["mean_skeleton_length_mm"] < 2000
    for name in ("learned", "length_prior"):
        row = report["depth"][name]
        assert 0 < row["joint9_depth_error_mm"] and 0 < row["mpjpe_camera_mm"] < 5000, name
    assert "length_prior" in proc.stdout
