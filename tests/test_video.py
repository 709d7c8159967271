"""Meshes carried between full reconstructions: re-posing by the parts' transforms, and the
video object that schedules full reconstructions and re-poses in between (real Anny meshes,
real rendered sequences, the shipped networks)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation

from im2hands_model.evaluation import hand_metrics
from im2hands_model.pipeline.model import Im2Hands
from im2hands_model.pipeline.reposing import bind_mesh, repose_mesh, repose_meshes
from im2hands_model.pipeline.tracking_bench import sequence_frames
from im2hands_model.pipeline.video import VideoReconstruction


@pytest.fixture(scope="module")
def sequence():
    """Two key scenes 1 s apart at 15 Hz: 16 frames of moving, turning, closing hands."""
    return sequence_frames(seed=4343, keys=2, fps=15.0)


@pytest.fixture(scope="module")
def model() -> Im2Hands:
    torch.set_num_threads(2)
    return Im2Hands.from_pretrained(device="cpu", resolution=64, keypoint_source="given")


def _iou(vertices, faces, frame, h: int) -> float:
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    m = hand_metrics(mesh, frame.vertices[h], frame.faces[h], None, frame.joints[h],
                     np.random.default_rng(0), 20_000, 200)  # fmt: skip
    return m["iou"]


def test_the_sequence_moves_smoothly_with_ground_truth_per_frame(sequence):
    stamps = np.array([s for s, _ in sequence])
    np.testing.assert_allclose(np.diff(stamps), 1 / 15.0)
    joints = np.stack([f.joints for _, f in sequence])  # [T, 2, 21, 3]
    step = np.linalg.norm(np.diff(joints, axis=0), axis=-1).max(axis=(1, 2))
    # eased in and out: no jump (the fastest step of an eased motion is 1.5x the mean one)
    assert step.max() < 1.7 * step.mean() and step.max() < 0.06
    assert np.linalg.norm(joints[-1] - joints[0], axis=-1).max() > 0.05  # and it does move
    first = sequence[0][1]
    assert first.image.shape == (480, 640, 3) and first.depth.max() > 0
    assert (first.depth[first.depth > 0] < 2.0).all()


def test_reposing_to_the_same_or_a_rigidly_moved_pose_is_exact(sequence):
    frame = sequence[0][1]
    for h in (0, 1):
        binding = bind_mesh(frame.vertices[h], frame.faces[h], frame.joints[h], h == 0)
        same = repose_mesh(binding, frame.joints[h])
        np.testing.assert_allclose(same.vertices, frame.vertices[h], atol=1e-5)
        assert same.part_turn_deg < 1e-3
        rot = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
        shift = np.array([0.05, -0.02, 0.1])
        moved = repose_mesh(binding, frame.joints[h] @ rot.T + shift)
        np.testing.assert_allclose(moved.vertices, frame.vertices[h] @ rot.T + shift, atol=1e-5)
        assert moved.part_turn_deg < 1e-3
    with pytest.raises(ValueError, match="non-finite or degenerate"):
        repose_mesh(binding, np.full((21, 3), np.nan))


def test_both_hands_reposed_at_once_are_each_reposed_alone(sequence):
    first, later = sequence[0][1], sequence[5][1]
    bindings = [bind_mesh(first.vertices[h], first.faces[h], first.joints[h], h == 0)
                for h in (0, 1)]  # fmt: skip
    both = repose_meshes(bindings, [later.joints[0], later.joints[1]])
    for h in (0, 1):
        alone = repose_mesh(bindings[h], later.joints[h])
        np.testing.assert_allclose(both[h].vertices, alone.vertices, atol=1e-6)
        assert both[h].part_turn_deg == pytest.approx(alone.part_turn_deg)
    with pytest.raises(ValueError, match="non-finite or degenerate"):
        repose_meshes(bindings, [later.joints[0], np.full((21, 3), np.nan)])


def test_reposed_ground_truth_follows_the_fingers_and_stays_watertight(sequence):
    """The ground-truth mesh of the first frame, carried to the keypoints of later frames,
    matches their ground truth far better than the unchanged first mesh does."""
    first = sequence[0][1]
    reposed_iou, held_iou = [], []
    for _, frame in sequence[3::4]:
        for h in (0, 1):
            binding = bind_mesh(first.vertices[h], first.faces[h], first.joints[h], h == 0)
            moved = repose_mesh(binding, frame.joints[h])
            assert trimesh.Trimesh(moved.vertices, moved.faces, process=False).is_watertight
            reposed_iou.append(_iou(moved.vertices, moved.faces, frame, h))
            held_iou.append(_iou(first.vertices[h], first.faces[h], frame, h))
    assert np.mean(reposed_iou) > 80.0
    assert np.mean(reposed_iou) > np.mean(held_iou) + 20.0


def test_video_reconstructs_then_reposes_in_between(model, sequence):
    video = VideoReconstruction(model, background=False, full_every=4, max_part_turn_deg=90.0)
    kinds, ious = [], {"reposed": [], "full": []}
    for i, (stamp, frame) in enumerate(sequence[:9]):
        result = video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        kinds.append(result.kind)
        assert result.timings_ms["frame"] > 0 and "keypoints" in result.timings_ms
        for h in (0, 1):
            mesh = result.hands[h].mesh
            assert mesh.is_watertight
            ious[result.kind].append(_iou(mesh.vertices, mesh.faces, frame, h))
        if result.kind == "reposed":
            assert result.shape_age_s == pytest.approx(stamp - sequence[4 * (i // 4)][0])
            assert result.contacts.contact_distance == model.config.contact_distance
        else:
            assert result.shape_age_s == 0.0
    assert kinds == ["full", "reposed", "reposed", "reposed", "full", "reposed", "reposed",
                     "reposed", "full"]  # fmt: skip
    assert video.counts == {"full": 3, "reposed": 6, "keypoints": 0, "failed": 0}
    assert np.mean(ious["reposed"]) > np.mean(ious["full"]) - 8.0


def test_video_waits_when_the_pose_moved_too_far(model, sequence):
    threads = torch.get_num_threads()
    video = VideoReconstruction(model, background=True, max_part_turn_deg=0.5, worker="process")
    assert video.worker == "process" and video.worker_pid not in (None, os.getpid())
    # the frames' work here runs on one torch thread beside the worker, until close()
    assert torch.get_num_threads() == 1
    try:
        stamp, frame = sequence[0]
        first = video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        assert first.kind == "keypoints" and "first full reconstruction" in first.message
        assert all(h.mesh is None for h in first.hands)
        video._pending.result(timeout=120)  # the worker's reconstruction of frame 0
        stamp, frame = sequence[8]
        later = video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        assert later.kind == "keypoints" and "moved" in later.message
        np.testing.assert_allclose(later.hands[1].keypoints, frame.joints[1], atol=1e-6)
    finally:
        video.close()
    assert torch.get_num_threads() == threads


def test_a_failing_full_reconstruction_is_counted_and_the_video_goes_on(model, sequence):
    video = VideoReconstruction(model, background=True, worker="thread")
    try:
        stamp, frame = sequence[0]
        video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        video._pending.result(timeout=120)
        # the worker gets an image it refuses (the keypoints still pass: they are checked
        # against the full-size image on this thread)
        video.full_model = video.full_model.configured(max_pixels=16)
        stamp, frame = sequence[1]
        video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        with pytest.raises(Exception, match="pixels"):
            video._pending.result(timeout=120)
        stamp, frame = sequence[2]
        result = video(frame.image, frame.K, keypoints=frame.keypoints, stamp=stamp)
        assert video.counts["failed"] == 1
        assert result.kind == "reposed" and result.hands[0].mesh.is_watertight
    finally:
        video.close()


def test_penetration_box_holds_the_whole_overlap(model, sequence):
    """The penetration volume voxelises only the box around the vertices inside the other hand:
    on touching frames it is the volume of the whole overlap of the hands' boxes, at a fraction
    of the voxels."""
    from im2hands_model.pipeline.contacts import _grid_penetration_m3, hand_contacts
    from im2hands_model.pipeline.frame import Frame
    from im2hands_model.pipeline.keypoints import given_keypoints
    from im2hands_model.pipeline.reposing import ReposedOccupancy, repose_mesh
    from im2hands_model.pipeline.video import _full_reconstruction

    full = model.configured(keep_occupancy=True)
    _, f0 = sequence[1]
    found = given_keypoints(f0.keypoints, Frame.from_input(f0.image, f0.K))
    shape = _full_reconstruction(full, f0.image, f0.K, found, 0.0, None)
    checked = 0
    for _, frame in sequence[2:6]:  # the hands touch
        moved = [repose_mesh(shape.bindings[h], frame.keypoints[h]) for h in range(2)]
        grids = ReposedOccupancy(shape.result.occupancy, shape.bindings, moved)
        report = hand_contacts(moved, 0.003, 0.002, grids, 10**7, vertex_sign=True)
        whole = _grid_penetration_m3(moved, grids, 0.002, 10**7) * 1e6
        assert report.penetration_volume_cm3 == pytest.approx(whole, rel=0.05, abs=0.01)
        checked += whole > 0.05
    assert checked >= 1, "no frame of the sequence overlaps: the check tested nothing"


def test_reposed_contacts_read_the_carried_grids_like_the_meshes(model, sequence):
    """Re-posed frames take which vertices lie inside the other hand from the carried grids
    (``vertex_sign``) instead of winding numbers on the re-posed meshes: the same contacts up
    to a few vertices on the boundary, the same penetration volume (same grids)."""
    from im2hands_model.pipeline.contacts import hand_contacts
    from im2hands_model.pipeline.frame import Frame
    from im2hands_model.pipeline.keypoints import given_keypoints
    from im2hands_model.pipeline.reposing import ReposedOccupancy, repose_mesh
    from im2hands_model.pipeline.video import _full_reconstruction

    full = model.configured(keep_occupancy=True)
    _, f0 = sequence[1]
    found = given_keypoints(f0.keypoints, Frame.from_input(f0.image, f0.K))
    shape = _full_reconstruction(full, f0.image, f0.K, found, 0.0, None)
    touched = 0
    for _, frame in sequence[2:6]:  # the hands touch
        moved = [repose_mesh(shape.bindings[h], frame.keypoints[h]) for h in range(2)]
        grids = ReposedOccupancy(shape.result.occupancy, shape.bindings, moved)
        fast = hand_contacts(moved, 0.003, 0.001, grids, 60_000, vertex_sign=True)
        plain = hand_contacts(moved, 0.003, 0.001, grids, 60_000)
        # the voxelised box follows the penetrating vertices, which differ by a few
        assert fast.penetration_volume_cm3 == pytest.approx(plain.penetration_volume_cm3,
                                                            rel=0.1, abs=0.02)  # fmt: skip
        for h in range(2):
            for got, want in ((fast.penetrating_points[h], plain.penetrating_points[h]),
                              (fast.touching_points[h], plain.touching_points[h])):
                a, b = {tuple(p) for p in got}, {tuple(p) for p in want}
                assert len(a ^ b) <= 0.1 * max(len(b), 1) + 3
            touched += len(plain.touching_points[h]) + len(plain.penetrating_points[h])
        area, want = fast.contact_area_cm2, plain.contact_area_cm2
        assert abs(area - want) <= 0.1 * want + 0.2
    assert touched > 0
