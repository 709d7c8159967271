"""``im2hands-synthetic-camera`` as a real process, heard by a real rclpy listener.

One camera run (2 frames, 20 Hz, 40 frames, JPEG on) feeds most assertions; it exits by itself
after ``count`` frames. Other runs check a namespaced reliable ``bgr8`` camera stopped by
SIGTERM, SIGINT while rendering, and bad parameters.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("rclpy")

import trimesh  # noqa: E402
from geometry_msgs.msg import PoseArray  # noqa: E402
from ros_helpers import Listener, spawn, stop, wait_for  # noqa: E402
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2  # noqa: E402

from im2hands_ros import conversions as conv  # noqa: E402

RATE = 20.0
COUNT = 40
CAMERA = "im2hands-synthetic-camera"
START_TIMEOUT = 90.0  # imports + rendering on a busy 2-core machine

pytestmark = pytest.mark.slow


def _stamp(msg: Any) -> int:
    return msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec


def _by_stamp(received: list[tuple[int, Any]]) -> dict[int, Any]:
    return {_stamp(m): m for _, m in received}


def _no_traceback(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Any]:
    """Everything one counted camera run published, with its exit code and log."""
    log = tmp_path_factory.mktemp("camera") / "camera.log"
    with Listener("camera_test_listener") as listener:
        got = {
            "image": listener.listen("image", Image, depth=10),
            "compressed": listener.listen("image/compressed", CompressedImage, depth=10),
            "depth": listener.listen("depth", Image, depth=10),
            "camera_info": listener.listen("camera_info", CameraInfo, depth=10),
            "keypoints": listener.listen("ground_truth/keypoints", PoseArray, reliable=True),
            "left": listener.listen("ground_truth/left/mesh", PointCloud2, reliable=True),
            "right": listener.listen("ground_truth/right/mesh", PointCloud2, reliable=True),
        }
        proc = spawn(
            [CAMERA, "--ros-args", "-p", f"rate:={RATE}", "-p", "frames:=2", "-p",
             f"count:={COUNT}", "-p", "compressed:=true"],
            log,
        )  # fmt: skip
        try:
            wait_for(lambda: proc.poll() is not None, START_TIMEOUT + COUNT / RATE,
                     "the counted camera run to exit", log)  # fmt: skip
            # the last reliable messages were acknowledged before the exit; let callbacks finish
            wait_for(lambda: len(got["right"]) >= COUNT, 5.0, "all ground-truth meshes", log)
        finally:
            code = stop(proc)
    return {"code": code, "log": log, **got}


def test_counted_run_exits_cleanly_after_count_frames(run):
    assert run["code"] == 0, run["log"].read_text()[-3000:]
    _no_traceback(run["log"])
    text = run["log"].read_text()
    assert "ready: 2 frames, publishing at 20 Hz" in text
    assert f"published {COUNT} frames" in text
    for key in ("keypoints", "left", "right"):  # reliable: every frame, once
        stamps = [_stamp(m) for _, m in run[key]]
        assert len(stamps) == COUNT and len(set(stamps)) == COUNT, key


def test_publish_rate(run):
    stamps = np.sort([_stamp(m) for _, m in run["keypoints"]]) / 1e9
    rate = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    assert abs(rate - RATE) < 0.2 * RATE, rate
    arrivals = np.sort([t for t, _ in run["keypoints"]]) / 1e9
    assert abs((len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) - RATE) < 0.2 * RATE


def test_all_messages_of_a_frame_share_one_header(run):
    assert run["image"], "no image arrived (best effort)"
    by = {key: _by_stamp(run[key]) for key in ("camera_info", "keypoints", "left", "right")}
    assert set(by["keypoints"]) == set(by["left"]) == set(by["right"])
    for stamp, image in _by_stamp(run["image"]).items():
        for key, msgs in by.items():
            assert stamp in msgs, f"{key} has no message stamped like the image"
            assert msgs[stamp].header.frame_id == image.header.frame_id == "camera_optical_frame"
    assert set(by["camera_info"]) <= set(by["keypoints"])


def test_image_and_camera_info(run):
    seen: dict[int, np.ndarray] = {}
    for _, msg in run["image"]:
        assert (msg.width, msg.height, msg.encoding) == (640, 480, "rgb8")
        rgb = conv.image_to_rgb(msg)
        assert rgb.shape == (480, 640, 3) and rgb.std() > 5  # a rendered scene, not a blank
        seen[_stamp(msg)] = rgb
    assert len({rgb.tobytes() for rgb in seen.values()}) <= 2  # two frames cycled
    for _, info in run["camera_info"]:
        K = conv.camera_info_to_K(info)
        assert (info.width, info.height) == (640, 480)
        assert K[0, 2] == pytest.approx(320, abs=40) and K[1, 2] == pytest.approx(240, abs=40)


def test_compressed_image_is_the_same_frame(run):
    assert run["compressed"], "no compressed image arrived (best effort)"
    raw = {s: conv.image_to_rgb(m) for s, m in _by_stamp(run["image"]).items()}
    checked = 0
    for _, msg in run["compressed"]:
        assert "jpeg" in msg.format
        rgb = conv.compressed_to_rgb(msg)
        assert rgb.shape == (480, 640, 3)
        if _stamp(msg) in raw:
            diff = np.abs(rgb.astype(np.int16) - raw[_stamp(msg)].astype(np.int16))
            assert diff.mean() < 4.0
            checked += 1
    assert checked or not raw


def test_depth_is_the_rendered_depth_of_the_frame(run):
    """The depth image is registered to the colour image: millimetres on the hands, 0 off them,
    and the ground-truth joints lie just behind the surface it sees."""
    assert run["depth"], "no depth image arrived (best effort)"
    kp = _by_stamp(run["keypoints"])
    info = conv.camera_info_to_K(run["camera_info"][0][1])
    for _, msg in run["depth"]:
        assert (msg.width, msg.height, msg.encoding) == (640, 480, "16UC1")
        depth = conv.depth_to_array(msg)
        assert depth.dtype == np.uint16 and 0.002 < (depth > 0).mean() < 0.6
        joints = conv.keypoints_from_pose_array(kp[_stamp(msg)])
        for hand in joints[np.isfinite(joints).all(axis=(1, 2))]:
            uv = (hand @ info.T)[:, :2] / hand[:, 2:3]
            u, v = np.round(uv[9]).astype(int)  # the middle-finger base: rarely hidden
            if depth[v, u] > 0:
                assert -0.005 < hand[9, 2] - depth[v, u] / 1000 < 0.1


def test_ground_truth_meshes_and_keypoints(run):
    K = conv.camera_info_to_K(run["camera_info"][0][1])
    meshes = {side: _by_stamp(run[side]) for side in ("left", "right")}
    present_seen = 0
    for stamp, msg in _by_stamp(run["keypoints"]).items():
        kp = conv.keypoints_from_pose_array(msg)
        for h, side in enumerate(("left", "right")):
            mesh = conv.mesh_from_msg(meshes[side][stamp])
            present = bool(np.isfinite(kp[h]).all())
            assert present == (mesh is not None), (stamp, side)
            if not present:
                continue
            present_seen += 1
            tm = trimesh.Trimesh(*mesh, process=False)
            assert tm.is_watertight and tm.volume > 0
            uvw = kp[h] @ K.T
            uv = uvw[:, :2] / uvw[:, 2:]
            assert (uv >= 0).all() and (uv[:, 0] < 640).all() and (uv[:, 1] < 480).all()
            # the joints lie in (or next to) their own hand's mesh
            assert np.linalg.norm(kp[h].mean(0) - tm.vertices.mean(0)) < 0.1
    assert present_seen


def test_namespaced_reliable_bgr8_camera_stops_on_sigterm(tmp_path, run):
    log = tmp_path / "camera.log"
    with Listener("camera_ns_listener") as listener:
        images = listener.listen("/cam/image", Image, reliable=True)
        infos = listener.listen("/cam/camera_info", CameraInfo, reliable=True)
        compressed = listener.listen("/cam/image/compressed", CompressedImage)
        depths = listener.listen("/cam/depth", Image, reliable=True)
        proc = spawn(
            [CAMERA, "--ros-args", "-r", "__ns:=/cam", "-p", "frames:=1", "-p", "rate:=10",
             "-p", "encoding:=bgr8", "-p", "reliability:=reliable", "-p", "frame_id:=cam",
             "-p", "depth:=32FC1", "-p", "depth_noise:=true"],
            log,
        )  # fmt: skip
        try:
            wait_for(lambda: len(images) >= 3 and len(infos) >= 3 and depths, START_TIMEOUT,
                     "images on /cam/image", log)  # fmt: skip
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(15)
        finally:
            stop(proc)
    assert code == 0, log.read_text()[-3000:]
    _no_traceback(log)
    assert not compressed
    msg = images[0][1]
    assert msg.encoding == "bgr8" and msg.header.frame_id == "cam"
    # same seed: the only frame here is frame 0 of the main run (its even-numbered frames)
    order = {s: i for i, s in enumerate(sorted(_by_stamp(run["keypoints"])))}
    frame0 = [m for s, m in _by_stamp(run["image"]).items() if order[s] % 2 == 0]
    if frame0:
        assert np.array_equal(conv.image_to_rgb(msg), conv.image_to_rgb(frame0[0]))
    # depth_noise: the same frame's depth as a consumer depth camera measures it, in metres
    noisy = conv.depth_to_array(depths[0][1])
    clean = [conv.depth_to_array(m) for s, m in _by_stamp(run["depth"]).items()
             if order[s] % 2 == 0]  # fmt: skip
    assert noisy.dtype == np.float32 and (noisy > 0).any()
    if clean:
        exact = clean[0].astype(np.float32) / 1000
        both = (noisy > 0) & (exact > 0)
        assert not ((noisy > 0) & (exact == 0)).any()  # no depth where nothing is
        assert both.sum() < 0.97 * (exact > 0).sum()  # holes along the edges
        assert np.median(np.abs(noisy[both] - exact[both])) < 0.006


def test_sigint_while_rendering_exits_cleanly(tmp_path):
    log = tmp_path / "camera.log"
    proc = spawn([CAMERA, "--ros-args", "-p", "frames:=50"], log)
    try:
        wait_for(lambda: "rendering 50 frame(s)" in log.read_text(), START_TIMEOUT,
                 "rendering to start", log)  # fmt: skip
        proc.send_signal(signal.SIGINT)
        code = proc.wait(20)
    finally:
        stop(proc)
    assert code == 0, log.read_text()[-3000:]
    _no_traceback(log)
    assert "ready" not in log.read_text()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rate:=-1.0", "parameter 'rate' must be > 0"),
        ("encoding:=yuv422", "parameter 'encoding' must be one of rgb8, bgr8"),
        ("sequence:=1", "parameter 'sequence' must be 0 or at least 2 key scenes"),
        ("depth_noise:=1", "parameter 'depth_noise' must be true or false"),
    ],
)
def test_bad_parameter_exits_with_2(tmp_path, override, message):
    log = tmp_path / "camera.log"
    proc = spawn([CAMERA, "--ros-args", "-p", override], log)
    try:
        code = proc.wait(60)
    finally:
        stop(proc)
    text = log.read_text()
    assert code == 2, text[-3000:]
    assert message in text and "Traceback" not in text


def test_a_sequence_plays_moving_hands_with_their_ground_truth(tmp_path):
    """``sequence:=2``: the hands move smoothly from frame to frame, with ground truth each."""
    log = tmp_path / "camera.log"
    count = 20
    with Listener("camera_sequence_listener") as listener:
        keypoints = listener.listen("ground_truth/keypoints", PoseArray, reliable=True)
        images = listener.listen("image", Image, depth=10)
        proc = spawn([CAMERA, "--ros-args", "-p", "rate:=15.0", "-p", "sequence:=2", "-p",
                      f"count:={count}"], log)  # fmt: skip
        try:
            wait_for(lambda: proc.poll() is not None, START_TIMEOUT + count / 15.0,
                     "the sequence run to exit", log)  # fmt: skip
            wait_for(lambda: len(keypoints) >= count, 5.0, "every frame's keypoints", log)
        finally:
            code = stop(proc)
    assert code == 0, log.read_text()[-3000:]
    _no_traceback(log)
    joints = np.stack([conv.keypoints_from_pose_array(m) for _, m in keypoints[:count]])
    step = np.linalg.norm(np.diff(joints, axis=0), axis=-1).max(axis=(1, 2))
    assert (step > 1e-4).all()  # every frame moves
    assert step.max() < 0.08  # smoothly (metres per frame at 15 Hz)
    assert images and conv.image_to_rgb(images[-1][1]).shape == (480, 640, 3)
