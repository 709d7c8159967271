"""The experiment scripts in training/recipes run end to end on a tiny rendered dataset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
