"""``im2hands-data detect``: the real MediaPipe source over a real realistic dataset, stored with
its scenes, resumed, and read by K's training stage as its input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from im2hands_model.training.detections import DETECTION_KEYS

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "im2hands_model.data.cli"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=600)


def _load(root: Path, key: str) -> np.ndarray:
    shards = sorted(p for p in root.iterdir() if p.name.startswith("shard_"))
    return np.concatenate([np.load(s / f"{key}.npy") for s in shards])


@pytest.fixture(scope="module")
def detected(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("det") / "ds"
    made = _run("synth", "--n", "6", "--seed", "11", "--out", str(out), "--workers", "1",
                "--points-per-hand", "64", "--image-size", "128", "--shard-size", "3",
                "--full-frame", "--realism", "--quiet", "--no-contact-sheet")  # fmt: skip
    assert made.returncode == 0, made.stderr[-3000:]
    proc = _run("detect", str(out), "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc.stdout


def test_detections_are_stored_with_each_scene(detected):
    root, stdout = detected
    summary = json.loads(stdout.strip().splitlines()[-1])
    index = json.loads((root / "index.json").read_text())
    record = index["detections"]
    assert record["image"] == "full" and record["source"] == "mediapipe"
    assert set(DETECTION_KEYS) <= set(index["keys"])
    assert summary["scenes"] == 6 and summary["found"] == record["found"]
    present, gt = _load(root, "hand_present"), _load(root, "joints_2d")
    found = _load(root, "src_present")
    assert found.dtype == bool and found.shape == (6, 2)
    assert record["hands"] == int(present.sum()) and record["found"] == int((found & present).sum())
    assert record["found"] >= 0.4 * record["hands"]  # realistic renders: most hands are found
    joints, uv = _load(root, "src_joints_3d"), _load(root, "src_joints_2d")
    conf = _load(root, "src_confidence")
    assert (joints[~found] == 0).all() and (conf[~found] == 0).all()
    assert (joints[found][..., 2] > 0.05).all() and (conf[found] > 0.4).all()
    # the found hands lie where the hands are, in the crop's pixels (128 px crops)
    both = found & present
    err = np.linalg.norm(uv[both] - gt[both], axis=-1).mean(-1)
    assert np.median(err) < 15, err
    with_depth = _load(root, "src_joints_3d_depth")
    cam = _load(root, "joints_3d")
    # with the rendered depth the found hands are placed nearer their true depth
    z_err = np.abs(joints[both][:, 9, 2] - cam[both][:, 9, 2])
    z_err_depth = np.abs(with_depth[both][:, 9, 2] - cam[both][:, 9, 2])
    assert np.median(z_err_depth) <= np.median(z_err) + 1e-6


def test_a_second_run_resumes_and_a_folder_that_is_no_dataset_is_refused(detected, tmp_path):
    root, stdout = detected
    stamp = {p: p.stat().st_mtime_ns for p in root.glob("shard_*/src_*.npy")}
    again = _run("detect", str(root), "--workers", "1", "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines()[-1] == stdout.strip().splitlines()[-1]
    assert {p: p.stat().st_mtime_ns for p in root.glob("shard_*/src_*.npy")} == stamp
    bad = _run("detect", str(tmp_path), "--quiet")
    assert bad.returncode == 2 and "not an im2hands dataset" in bad.stderr


def test_k_trains_from_the_stored_detections(detected, tmp_path):
    from im2hands_model.metrics import mpjpe_mm
    from im2hands_model.training.config import load_config
    from im2hands_model.training.engine import train

    root, _ = detected
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    cfg = load_config(configs / "kpts_ref.yaml", [
        f"data.train={root}", f"data.val={root}", "data.num_workers=0", "train.max_steps=4",
        "train.batch_size=6", "train.val_every=4", "train.val_batches=1", "train.ckpt_every=4",
        "train.device=cpu", "train.scheduler.warmup_steps=0",
        "model.encoder={depth: resnet18, base_width: 8, feature_dim: 16, global_dim: 32}",
    ], out=tmp_path)  # fmt: skip
    train(cfg)
    val = json.loads((tmp_path / "val_log.jsonl").read_text().splitlines()[-1])["metrics"]
    # the detection metrics start from what the source found, over the hands it found
    both = _load(root, "src_present") & _load(root, "hand_present")
    source = mpjpe_mm(_load(root, "src_joints_3d").astype(np.float64),
                      _load(root, "joints_3d").astype(np.float64), mask=both)  # fmt: skip
    assert val["mpjpe_in_mm"] == pytest.approx(source, rel=1e-4)
    assert {"noise_mpjpe_in_mm", "noise_mpjpe_mm", "noise_mpjpe_abs_mm"} <= set(val)
    assert val["noise_mpjpe_in_mm"] != pytest.approx(val["mpjpe_in_mm"])


def test_the_chain_from_the_image_is_evaluated_on_the_stored_detections(detected, tmp_path):
    """training/evaluate.py meshes on the source's keypoints refined by K: a hand the source
    missed gets no mesh (IoU 0), and the rows say how many hands were found."""
    import shutil

    from im2hands_model.training.evaluate import evaluate, parse_args

    root = tmp_path / "ds"
    shutil.copytree(detected[0], root)
    stored = root / "shard_00000" / "src_present.npy"
    missed = np.load(stored)
    missed[0] = [True, False]  # as if the source had missed the first scene's right hand
    np.save(stored, missed)

    def run(*extra: str) -> dict:
        return evaluate(parse_args([
            "--pretrained", "--networks", "kpts_ref,halo,init_occ,ref_occ", "--data", str(root),
            "--out", str(tmp_path / "out"), "--scenes", "3", "--resolution", "8",
            "--upsampling-steps", "1", "--n-iou", "2000", "--n-chamfer", "2000", "--pictures",
            "0", "--quiet", *extra,
        ]))  # fmt: skip

    summary = run("--sources", "src+K")
    present = _load(root, "hand_present")[:3]
    found = _load(root, "src_present")[:3] & present
    assert present[0].all() and found.sum() < present.sum()
    row = summary["variants"]["I on source kpts + K"]
    assert row["keypoint_source"] == "src+K" and row["n_hands"] == int(present.sum())
    assert row["hands_found_pct"] == pytest.approx(100.0 * found.sum() / present.sum())
    assert row["counts"]["mpjpe_mm"] == int(found.sum())  # missed hands have no joints
    # the scene with a missed hand has no penetration row: it is not a two-hand mesh
    assert row["n_scenes"] == int(found.all(axis=1).sum())
    kp = summary["keypoints"]["sources"]
    assert kp["source kpts"]["n_hands"] == int(found.sum())
    assert kp["source kpts"]["hands_found_pct"] == pytest.approx(row["hands_found_pct"])
    assert {"source kpts + K", "noisy kpts + K"} <= set(kp)
    assert "source kpts + K" in (tmp_path / "out" / "results.md").read_text()
    # docs/chain.json's figures, read off the same summary
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training" / "recipes"))
    from chain_summary import chain_figures

    chain = chain_figures(summary)
    assert chain["i_iou"] == row["iou"] and chain["scenes"] == 3
    assert chain["source_k_mpjpe_mm"] == kp["source kpts + K"]["mpjpe_mm"]
    assert chain["hands_found_pct"] == pytest.approx(row["hands_found_pct"])
    assert {"halo_iou", "ir_iou", "i_pen_cm3", "ir_pen_cm3", "source_mpjpe_mm"} <= set(chain)
    with pytest.raises(ValueError, match="not available"):
        evaluate(parse_args(["--pretrained", "--networks", "init_occ", "--data", str(root),
                             "--out", str(tmp_path), "--sources", "src+K", "--quiet"]))
