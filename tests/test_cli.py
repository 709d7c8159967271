"""The ``im2hands`` command as a user runs it: a real process of the installed console script."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml
from PIL import Image

from im2hands_model.cli import default_intrinsics, read_camera_info
from im2hands_model.evaluation import hand_metrics
from im2hands_model.pipeline.bench import synthetic_frames

EXE = shutil.which("im2hands") or str(Path(sys.executable).parent / "im2hands")


def run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def frame_files(tmp_path_factory):
    """A rendered two-hand camera frame as PNG, its camera YAML and its GT keypoints JSON."""
    d = tmp_path_factory.mktemp("cli")
    frame = synthetic_frames(2)[1]  # clasped hands
    Image.fromarray(frame.image).save(d / "frame.png")
    calib = {"camera_matrix": {"rows": 3, "cols": 3, "data": frame.K.reshape(-1).tolist()}}
    (d / "camera.yaml").write_text(yaml.safe_dump(calib))
    kp = {"left": frame.joints[0].tolist(), "right": frame.joints[1].tolist()}
    (d / "keypoints.json").write_text(json.dumps(kp))
    return d, frame


def test_reconstruct_writes_meshes_keypoints_contacts_and_overlay(frame_files):
    d, frame = frame_files
    out = d / "out"
    proc = run("reconstruct", str(d / "frame.png"), "--camera-info", str(d / "camera.yaml"),
               "--keypoints", str(d / "keypoints.json"), "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == {
        "left.ply", "right.ply", "keypoints.json", "contacts.json", "overlay.png",
    }  # fmt: skip
    for h, side in enumerate(("left", "right")):
        mesh = trimesh.load(out / f"{side}.ply", process=False)
        assert mesh.is_watertight and mesh.volume > 0
        # in the camera frame, where the hand's ground truth is
        iou = hand_metrics(mesh, frame.vertices[h], frame.faces[h], None, frame.joints[h],
                           np.random.default_rng(0), 20_000, 500)["iou"]  # fmt: skip
        assert iou > 70.0
    kp = json.loads((out / "keypoints.json").read_text())
    np.testing.assert_allclose(kp["right"]["joints"], frame.joints[1], atol=1e-5)
    contacts = json.loads((out / "contacts.json").read_text())
    assert contacts["in_contact"] and contacts["contact_area_cm2"] > 0
    overlay = np.asarray(Image.open(out / "overlay.png"))
    assert overlay.shape == frame.image.shape and (overlay != frame.image).any()


def test_reconstruct_without_hands_says_so_and_exits_1(tmp_path, frame_files):
    d, _ = frame_files
    (tmp_path / "none.json").write_text(json.dumps({"left": None, "right": None}))
    proc = run("reconstruct", str(d / "frame.png"), "--fx", "500", "--fy", "500", "--cx", "320",
               "--cy", "240", "--keypoints", str(tmp_path / "none.json"), "-o",
               str(tmp_path / "o"), "--device", "cpu")  # fmt: skip
    assert proc.returncode == 1
    assert "no hand found" in proc.stderr
    assert json.loads((tmp_path / "o" / "keypoints.json").read_text())["left"] is None


def test_reconstruct_refuses_bad_input_with_a_message(tmp_path, frame_files):
    d, _ = frame_files
    (tmp_path / "bad.png").write_bytes(b"not a png")
    proc = run("reconstruct", str(tmp_path / "bad.png"), "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "cannot read image" in proc.stderr
    proc = run("reconstruct", str(d / "frame.png"), "--fx", "0", "--fy", "500", "--cx", "1",
               "--cy", "1", "-o", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 2 and "focal lengths must be positive" in proc.stderr
    proc = run("reconstruct", str(d / "frame.png"), "--fx", "500", "-o", str(tmp_path / "o"))
    assert proc.returncode == 2 and "--fx --fy --cx --cy" in proc.stderr


def test_camera_info_formats(tmp_path):
    K = [[500.0, 0, 320], [0, 510, 240], [0, 0, 1]]
    flat = [v for row in K for v in row]
    for i, data in enumerate([{"camera_matrix": {"data": flat}}, {"k": flat}, {"K": flat}, K]):
        path = tmp_path / f"c{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        np.testing.assert_array_equal(read_camera_info(path), K)
    (tmp_path / "bad.yaml").write_text("width: 3\n")
    with pytest.raises(ValueError, match="no 3x3 camera matrix"):
        read_camera_info(tmp_path / "bad.yaml")
    assert default_intrinsics(640, 480)[0, 0] == 640


def test_bench_prints_stages_and_writes_the_json(tmp_path):
    """A small run (2 frames, 1 in reference mode, keypoint-only I so the reference stays short):
    the JSON holds the issue's keys with sane values."""
    out = tmp_path / "bench.json"
    proc = run("bench", "--frames", "2", "--reference-frames", "1", "--halo", "--device", "cpu",
               "--json", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "end to end" in proc.stdout and "reference mode" in proc.stdout
    report = json.loads(out.read_text())
    for key in ("end_to_end_ms_median", "end_to_end_ms_p95", "reference_end_to_end_ms_median",
                "speedup", "iou_delta_points", "queries_per_frame", "device"):  # fmt: skip
        assert key in report, key
    assert report["device"] == "cpu" and report["frames"] == 2
    assert report["end_to_end_ms_p95"] >= report["end_to_end_ms_median"] > 0
    assert report["speedup"] > 2.0
    assert abs(report["iou_delta_points"]) < 5.0
    assert report["iou_reference"] > 60.0


def test_bench_with_given_keypoints_uses_each_frames_ground_truth(tmp_path):
    out = tmp_path / "bench.json"
    proc = run("bench", "--frames", "2", "--reference-frames", "0", "--halo", "--device", "cpu",
               "--keypoint-source", "given", "--json", str(out), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["config"]["keypoint_source"] == "given"
    assert report["frames_with_hands"] == 2 and "K" not in report["stages_ms"]


def test_bench_tracking_writes_the_issue_keys_and_a_plot(tmp_path):
    """A short real-time run (2 key scenes half a second apart, 64^3): the headline keys of
    docs/tracking_bench.json, per-frame rows and the plot."""
    out, plot = tmp_path / "tracking.json", tmp_path / "tracking.png"
    proc = run("bench-tracking", "--keys", "2", "--seconds-per-key", "0.5", "--resolution", "64",
               "--keypoint-source", "given", "--device", "cpu", "--json", str(out), "--plot",
               str(plot), "--quiet")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("mesh_rate_hz", "latency_ms_reposed_median", "iou_reposed", "iou_full",
                "full_speedup", "cpu_cores_used", "kinds", "per_frame"):  # fmt: skip
        assert key in report, key
    assert report["frames"] == 16 and 0 < report["frames_processed"] <= 16
    assert sum(report["kinds"].values()) == report["frames_processed"]
    assert report["full_speedup"] > 0 and report["cpu_cores_used"]["pipeline"] > 0
    assert plot.stat().st_size > 1000


def test_export_onnx_writes_the_graphs_and_their_manifest(tmp_path):
    proc = run("export-onnx", str(tmp_path / "onnx"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert "onnx_manifest.json" in names and "init_hand_right.onnx" in names
    manifest = json.loads((tmp_path / "onnx" / "onnx_manifest.json").read_text())
    assert manifest["graphs"] and all(
        (tmp_path / "onnx" / f"{name}.onnx").is_file() for name in manifest["graphs"]
    )


def test_reconstruct_a_photo_with_the_default_source_and_a_depth_image(tmp_path):
    """The default keypoint source on a real photo (one left hand), with a 16-bit depth PNG:
    the hand is found and placed at the depth the image says."""
    photo = Path(__file__).parent / "data" / "handSrc.jpg"
    depth = np.full((480, 640), 450, np.uint16)  # a hand on a table 45 cm away
    Image.fromarray(depth).save(tmp_path / "depth.png")
    out = tmp_path / "out"
    proc = run("reconstruct", str(photo), "--fx", "600", "--fy", "600", "--cx", "320",
               "--cy", "240", "--depth", str(tmp_path / "depth.png"), "--resolution", "32",
               "-o", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "left" in proc.stdout and not (out / "right.ply").exists()
    kp = json.loads((out / "keypoints.json").read_text())
    z = np.asarray(kp["left"]["joints"])[:, 2]
    assert np.abs(np.median(z) - 0.45 - 0.012) < 0.03
    bad = run("reconstruct", str(photo), "--depth", str(tmp_path / "missing.png"), "-o", str(out))
    assert bad.returncode == 2 and "depth" in bad.stderr


def test_demo_tracks_each_scene_and_reports_keypoint_error(tmp_path):
    proc = run("demo", "-o", str(tmp_path), "--frames", "1", "--video-frames", "3",
               "--resolution", "32", "--device", "cpu")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ms detected" in proc.stdout and "ms tracked" in proc.stdout
    assert "mediapipe keypoints: IoU" in proc.stdout and "keypoints " in proc.stdout
    assert (tmp_path / "overview.png").is_file()


def test_bench_keypoints_writes_the_issue_keys(tmp_path):
    out = tmp_path / "kp.json"
    proc = run("bench-keypoints", "--frames", "3", "--seed", "4242", "--no-learned",
               "--json", str(out), "--pictures", str(tmp_path / "sheet.jpg"),
               "--photos", str(Path(__file__).parent / "data" / "handSrc.jpg"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    keys = ("hands_found_pct", "both_found_pct", "handedness_pct", "mpjpe_aligned_mm",
            "root_error_mm", "root_error_depth_mm", "ms_per_frame_detect", "ms_per_frame_tracked")
    for key in keys:
        assert key in report and key in report["baselines"]["plain"], key
    assert report["frames"] == 3 and (tmp_path / "sheet.jpg").is_file()
