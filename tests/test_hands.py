"""Joint convention, root frame and mirroring (im2hands_model.hands)."""

import numpy as np
import pytest
import torch

from im2hands_model import hands


def _random_hand(rng: np.random.Generator) -> np.ndarray:
    joints = rng.normal(0, 0.05, (21, 3))
    joints[0] = 0
    joints[5] = [-0.02, 0.09, 0.0]
    joints[9] = [0.0, 0.095, 0.0]
    return joints + rng.normal(0, 0.005, (21, 3)) + [0.1, -0.05, 0.5]


def test_convention_tables_are_consistent():
    assert len(hands.JOINT_NAMES) == len(hands.PARENTS) == hands.NUM_JOINTS == 21
    assert len(hands.SKELETON_EDGES) == 20
    assert hands.JOINT_NAMES[hands.MID_JOINT] == "middle_mcp"
    for finger, joints in zip(hands.FINGER_NAMES, hands.FINGER_JOINTS, strict=True):
        assert all(hands.JOINT_NAMES[j].startswith(finger) for j in joints)
        assert hands.PARENTS[joints[0]] == 0
    assert hands.TIP_JOINTS == tuple(j[-1] for j in hands.FINGER_JOINTS)


def test_anny_joints_maps_bone_heads_and_tips():
    labels = [
        "root", "wrist.R", "finger1-1.R", "finger1-2.R", "finger1-3.R",
        "metacarpal1.R", "finger2-1.R", "finger2-2.R", "finger2-3.R",
        "metacarpal2.R", "finger3-1.R", "finger3-2.R", "finger3-3.R",
        "metacarpal3.R", "finger4-1.R", "finger4-2.R", "finger4-3.R",
        "metacarpal4.R", "finger5-1.R", "finger5-2.R", "finger5-3.R",
    ]  # fmt: skip
    heads = np.arange(21 * 3, dtype=float).reshape(21, 3)
    tips = -np.arange(15, dtype=float).reshape(5, 3) - 1
    joints = hands.anny_joints(labels, heads, tips)
    assert joints.shape == (21, 3)
    np.testing.assert_array_equal(joints[0], heads[1])  # wrist
    np.testing.assert_array_equal(joints[1], heads[2])  # thumb CMC = finger1-1 head
    np.testing.assert_array_equal(joints[5], heads[6])  # index MCP = finger2-1 head
    np.testing.assert_array_equal(joints[9], heads[10])
    np.testing.assert_array_equal(joints[19], heads[20])
    np.testing.assert_array_equal(joints[hands.TIP_JOINTS, :], tips)
    t = hands.anny_joints(labels, torch.tensor(heads), torch.tensor(tips))
    np.testing.assert_array_equal(t.numpy(), joints)
    with pytest.raises(ValueError, match="lacks the bones"):
        hands.anny_joints(labels[:5], heads[:5], tips)


def test_root_frame_is_a_rotation_aligned_with_the_hand():
    rng = np.random.default_rng(0)
    joints = _random_hand(rng)
    rot, origin = hands.root_frame(joints)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(rot) == pytest.approx(1.0)
    local = hands.to_normalized(joints, rot, origin)
    np.testing.assert_allclose(local[0], 0, atol=1e-12)
    # middle MCP on +y, index MCP in the local z = 0 plane
    assert local[9, 0] == pytest.approx(0, abs=1e-12) and local[9, 2] == pytest.approx(0, abs=1e-12)
    assert local[9, 1] > 0
    assert local[5, 2] == pytest.approx(0, abs=1e-12)
    back = hands.from_normalized(local, rot, origin)
    np.testing.assert_allclose(back, joints, atol=1e-12)
    # torch and numpy agree, batched
    batch = np.stack([joints, _random_hand(rng)])
    rt, ot = hands.root_frame(torch.tensor(batch))
    rn, on = hands.root_frame(batch)
    np.testing.assert_allclose(rt.numpy(), rn, atol=1e-12)
    np.testing.assert_allclose(ot.numpy(), on)


def test_normalised_space_is_invariant_to_rigid_motion():
    rng = np.random.default_rng(1)
    joints = _random_hand(rng)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.linalg.det(q))
    moved = joints @ q.T + [0.3, -0.2, 0.1]
    a = hands.to_normalized(joints, *hands.root_frame(joints))
    b = hands.to_normalized(moved, *hands.root_frame(moved))
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_mirroring_round_trips():
    rng = np.random.default_rng(2)
    joints = _random_hand(rng)
    wrist = joints[0]
    once = hands.mirror_points(joints, wrist)
    assert not np.allclose(once, joints)
    np.testing.assert_allclose(once[0], wrist)
    np.testing.assert_allclose(hands.mirror_points(once, wrist), joints, atol=1e-15)
    np.testing.assert_allclose(hands.mirror_points(hands.mirror_points(joints)), joints)
    faces = np.array([[0, 1, 2], [2, 3, 0]])
    np.testing.assert_array_equal(hands.flip_faces(hands.flip_faces(faces)), faces)
    t = torch.tensor(joints)
    np.testing.assert_allclose(hands.mirror_points(t, t[0]).numpy(), once)


def test_mirror_normalized_matches_mirroring_in_the_camera_frame():
    rng = np.random.default_rng(3)
    joints = _random_hand(rng)
    points = rng.normal(0, 0.05, (50, 3)) + joints[0]
    norm = hands.to_normalized(points, *hands.root_frame(joints))
    mj = hands.mirror_points(joints, joints[0])
    mp = hands.mirror_points(points, joints[0])
    mirrored_norm = hands.to_normalized(mp, *hands.root_frame(mj))
    np.testing.assert_allclose(hands.mirror_normalized(norm), mirrored_norm, atol=1e-12)
