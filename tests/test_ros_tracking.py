"""The node with ``tracked_meshes``: a real ``im2hands-node`` process fed a rendered moving
sequence with its keypoints; full reconstructions run in the background and the frames in
between get re-posed meshes, counted in /diagnostics."""

from __future__ import annotations

import time

import numpy as np
import pytest
import trimesh

from im2hands_model.pipeline.tracking_bench import sequence_frames
from im2hands_ros import conversions as conv
from tests.ros_helpers import wait_for
from tests.test_ros_node import Rig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sequence():
    return [f for _, f in sequence_frames(seed=4343, keys=2, fps=10.0, seconds_per_key=2.0)]


def _stamp(msg) -> tuple[int, int]:
    return _key(msg.header)


def _key(header) -> tuple[int, int]:
    return header.stamp.sec, header.stamp.nanosec


def test_tracked_meshes_are_published_between_full_reconstructions(tmp_path, sequence):
    rig = Rig(tmp_path, ["-p", "keypoint_source:=topic", "-p", "tracked_meshes:=true",
                         "-p", "max_frame_age:=5.0", "-p", "diagnostics_rate:=5.0"])  # fmt: skip
    try:
        assert "meshes tracked between full reconstructions" in rig.text()
        headers = []
        for frame in sequence:
            headers.append((rig.send(frame), frame))
            time.sleep(0.1)  # a 10 Hz camera
        last_key = _key(headers[-1][0])
        wait_for(lambda: any(_stamp(m) == last_key for _, m in rig.right_mesh), 60,
                 "the last frame's mesh cloud", rig.log)  # fmt: skip
        clouds = {_stamp(m): m for _, m in rig.right_mesh}
        meshed = []
        for h, frame in headers:
            msg = clouds.get(_key(h))
            got = None if msg is None else conv.mesh_from_msg(msg)
            if got is not None:
                mesh = trimesh.Trimesh(*got)
                assert mesh.is_watertight
                # near this frame's own ground truth, not an old pose
                from scipy.spatial import cKDTree

                dist, _ = cKDTree(frame.vertices[1]).query(mesh.vertices)
                meshed.append(float(np.median(dist)))
        assert len(meshed) >= len(sequence) // 2, len(meshed)
        assert np.median(meshed) < 0.008, meshed
        wait_for(lambda: rig.diag and rig.diagnostics().get("meshes_reposed", "0") != "0", 10,
                 "re-posed frames in /diagnostics", rig.log)  # fmt: skip
        d = rig.diagnostics()
        assert int(d["meshes_reposed"]) >= 5 and d["shape_age_s_median"] != "n/a"
        assert d["full_failed"] == "0"
    finally:
        rig.close()
