"""The node with its default keypoint source (MediaPipe, tracked) and a depth topic: a real
``im2hands-node`` process, real publishers, a real photo and rendered frames with their depth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseArray
from PIL import Image as PILImage
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from im2hands_ros import conversions as conv
from tests.ros_helpers import Listener, spawn, stop, wait_for

pytestmark = pytest.mark.slow
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    log = tmp_path_factory.mktemp("mp_node") / "node.log"
    proc = spawn(["im2hands-node", "--ros-args", "-p", "device:=cpu", "-p", "resolution:=32",
                  "-p", "warmup_frames:=1", "-p", "threads:=1", "-p", "use_depth:=true",
                  "-p", "max_frame_age:=5.0", "-p", "diagnostics_rate:=5.0"], log)  # fmt: skip
    with Listener("mp_listener") as L:
        L.left = L.listen("/hands/left/keypoints", PoseArray, reliable=True)
        L.right = L.listen("/hands/right/keypoints", PoseArray, reliable=True)
        L.diag = L.listen("/diagnostics", DiagnosticArray)
        L.image = L.publisher("image", Image, reliable=True, depth=1)
        L.depth = L.publisher("depth", Image, reliable=True, depth=5)
        L.info = L.publisher("camera_info", CameraInfo, reliable=False, depth=1)
        wait_for(lambda: "active: listening" in log.read_text(errors="replace"), 180,
                 "the node to activate", log)  # fmt: skip
        L.wait_matched()
        K = np.array([[640.0, 0, 320], [0, 640.0, 240], [0, 0, 1]])
        L.wait_heard(L.info, conv.camera_info_from_K(K, 640, 480, Header(frame_id="cam")), L.diag)
        L.log = log
        yield L
    assert stop(proc) == 0, log.read_text(errors="replace")[-3000:]


def _send(L, rgb, K, depth=None) -> Header:
    h = Header(stamp=L.node.get_clock().now().to_msg(), frame_id="cam")
    L.info.publish(conv.camera_info_from_K(K, rgb.shape[1], rgb.shape[0], h))
    if depth is not None:
        L.depth.publish(depth if isinstance(depth, Image) else conv.depth_to_image(depth, h))
    L.image.publish(conv.rgb_to_image(rgb, h))
    return h


def _output(L, h, topic_list, timeout=90.0):
    key = (h.stamp.sec, h.stamp.nanosec)

    def find():
        return next((m for _, m in topic_list
                     if (m.header.stamp.sec, m.header.stamp.nanosec) == key), None)  # fmt: skip

    wait_for(lambda: find() is not None, timeout, "the frame's keypoints", L.log)
    return find()


def _diag(L) -> dict[str, str]:
    return {kv.key: kv.value for kv in L.diag[-1][1].status[0].values}


def test_default_source_finds_a_photo_hand_that_leaves_and_comes_back(node):
    rgb = np.asarray(PILImage.open(DATA / "handSrc.jpg").convert("RGB"))
    K = np.array([[640.0, 0, 320], [0, 640.0, 240], [0, 0, 1]])
    depth = np.full(rgb.shape[:2], 0.5, np.float32)  # a flat 0.5 m wall under the hand
    h = _send(node, rgb, K, depth)
    left = _output(node, h, node.left)
    assert len(left.poses) == 21  # MediaPipe found the left hand of the photo
    z = np.array([p.position.z for p in left.poses])
    assert np.all(np.abs(z - 0.5 - 0.012) < 0.08)  # placed from the depth image
    h = _send(node, np.full_like(rgb, 127), K, depth)  # the hand leaves
    assert len(_output(node, h, node.left).poses) == 0
    found = [len(_output(node, _send(node, rgb, K, depth), node.left).poses) for _ in range(3)]
    assert 21 in found, found  # found again within three frames
    assert len(_output(node, h, node.right).poses) == 0


def test_depth_that_does_not_fit_is_counted_and_logged_once(node):
    from im2hands_model.pipeline.bench import synthetic_frames

    rgb = np.asarray(PILImage.open(DATA / "handSrc.jpg").convert("RGB"))
    K = np.array([[640.0, 0, 320], [0, 640.0, 240], [0, 0, 1]])
    for _ in range(2):
        _output(node, _send(node, rgb, K, np.zeros((10, 10), np.float32)), node.left)
    _output(node, _send(node, rgb, K), node.left)  # no depth image at all
    bad = Header(frame_id="cam")
    wrong = conv.depth_to_image(np.ones(rgb.shape[:2]), bad)
    wrong.encoding = "mono8"
    h = Header(stamp=node.node.get_clock().now().to_msg(), frame_id="cam")
    wrong.header = h
    node.depth.publish(wrong)
    node.info.publish(conv.camera_info_from_K(K, rgb.shape[1], rgb.shape[0], h))
    node.image.publish(conv.rgb_to_image(rgb, h))
    _output(node, h, node.left)
    wait_for(lambda: node.diag and int(_diag(node).get("bad_depth", 0)) >= 1, 10,
             "bad_depth in /diagnostics", node.log)  # fmt: skip
    d = _diag(node)
    assert int(d["depth_unused"]) >= 2 and int(d["no_depth"]) >= 1
    text = node.log.read_text(errors="replace")
    assert text.count("depth not used for a hand") == 1  # logged once, counted every time
    assert "depth image ignored" in text
    # rendered frames with their rendered depth: hands placed from it, nothing counted
    frame = next(f for f in synthetic_frames(3) if f.present.any())
    before = int(_diag(node)["depth_unused"])
    _output(node, _send(node, frame.image, frame.K, frame.depth), node.right)
    assert int(_diag(node)["depth_unused"]) == before
