"""Canonicalisation from keypoints (SPEC §3.1) on real Anny hands and random rigid motions."""

import numpy as np
import pytest
import torch

from im2hands_model.canonical import (
    NUM_PARTS,
    PART_BONES,
    canonical_joints,
    canonicalize,
    stand_in_joints,
)
from im2hands_model.hands import FINGER_JOINTS, NORM_SCALE, mirror_points


@pytest.fixture(scope="module")
def hands() -> torch.Tensor:
    """12 real posed Anny right hands in the camera frame, float64 [12, 21, 3]."""
    from im2hands_model.data.anny_hand import AnnyHand
    from im2hands_model.data.poses import POSE_STYLES, sample_pose

    rng = np.random.default_rng(3)
    model = AnnyHand()
    styles = list(POSE_STYLES)
    poses = np.stack([sample_pose(rng, styles[i % len(styles)]) for i in range(12)])
    out = model(rng.uniform(0.2, 0.8, (12, 6)), poses)
    joints = torch.from_numpy(out.joints)
    rot = _random_rotations(12, 0)
    return joints @ rot.transpose(-1, -2) + torch.tensor([0.05, -0.02, 0.5], dtype=torch.float64)


def _random_rotations(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.det(q)[:, None, None]  # proper rotations


def _apply(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return (t[..., :3, :3] @ p[..., None])[..., 0] + t[..., :3, 3]


def test_each_transform_puts_its_bone_on_the_canonical_hand(hands):
    pose = canonicalize(hands)
    assert pose.valid.all()
    assert pose.transforms.shape == (12, NUM_PARTS, 4, 4)
    root_len = torch.stack([pose.joints_norm[:, j[0]].norm(dim=-1) for j in FINGER_JOINTS], -1)
    canon = canonical_joints(root_len, pose.lengths[:, 1:])
    for b, (p, c) in enumerate(PART_BONES, start=1):
        t = pose.transforms[:, b]
        assert torch.allclose(_apply(t, pose.joints_norm[:, p]), canon[:, p], atol=1e-9)
        assert torch.allclose(_apply(t, pose.joints_norm[:, c]), canon[:, c], atol=1e-9)
        rot = t[:, :3, :3]
        eye = torch.eye(3, dtype=rot.dtype).expand_as(rot)
        assert torch.allclose(rot @ rot.transpose(-1, -2), eye, atol=1e-9)
        assert torch.allclose(torch.det(rot), torch.ones(12, dtype=rot.dtype), atol=1e-9)
    assert torch.equal(pose.transforms[:, 0], torch.eye(4, dtype=hands.dtype).expand(12, 4, 4))
    # the canonical hand is flat (palm plane z = 0) and the lengths are the true ones (metres)
    assert canon[..., 2].abs().max() < 1e-12
    parents, children = zip(*PART_BONES, strict=True)
    true = (hands[:, list(children)] - hands[:, list(parents)]).norm(dim=-1)
    assert torch.allclose(pose.lengths[:, 1:] * NORM_SCALE, true, atol=1e-12)


def test_canonical_output_is_invariant_to_global_rotation_and_translation(hands):
    base = canonicalize(hands)
    rot = _random_rotations(12, 1)
    moved = hands @ rot.transpose(-1, -2) + torch.tensor([0.3, -0.1, 0.2], dtype=hands.dtype)
    other = canonicalize(moved)
    assert torch.allclose(base.transforms, other.transforms, atol=1e-9)
    assert torch.allclose(base.lengths, other.lengths, atol=1e-12)
    assert torch.allclose(base.joints_norm, other.joints_norm, atol=1e-9)
    # ... while a query point moved along with the hand keeps its part coordinates
    q = hands[:, :1] + 0.01
    q_moved = q @ rot.transpose(-1, -2) + torch.tensor([0.3, -0.1, 0.2], dtype=hands.dtype)
    a = base.to_parts(base.to_normalized(q))
    b = other.to_parts(other.to_normalized(q_moved))
    assert torch.allclose(a, b, atol=1e-9)


def test_a_mirrored_left_hand_gives_the_right_hand_result(hands):
    right = canonicalize(hands)
    left_joints = mirror_points(hands, hands[:, 0])
    left = canonicalize(left_joints, is_left=True)
    assert torch.allclose(left.transforms, right.transforms, atol=1e-9)
    assert torch.allclose(left.joints_norm, right.joints_norm, atol=1e-9)
    q = hands[:, 5:8] + 0.003
    q_left = mirror_points(q, hands[:, 0])
    assert torch.allclose(left.to_normalized(q_left), right.to_normalized(q), atol=1e-9)
    # without mirroring, a left hand is not a right hand
    plain = canonicalize(left_joints, is_left=False)
    assert not torch.allclose(plain.joints_norm, right.joints_norm, atol=1e-3)


def test_gradients_are_finite_for_float32_and_flag_bad_hands(hands):
    joints = hands.float().clone()
    joints[3] = float("nan")  # a hand with NaN keypoints
    joints[5, 6] = joints[5, 5]  # a zero-length bone
    joints = joints.requires_grad_(True)
    pose = canonicalize(joints, torch.arange(12) % 2 == 0)
    assert pose.valid.tolist() == [i not in (3, 5) for i in range(12)]
    assert torch.isfinite(pose.transforms).all() and torch.isfinite(pose.lengths).all()
    (pose.transforms.square().sum() + pose.lengths.sum()).backward()
    assert torch.isfinite(joints.grad).all()
    assert joints.grad[0].abs().sum() > 0


def test_stand_in_hand_is_valid_and_the_input_shape_is_checked():
    hand = stand_in_joints()[None] * NORM_SCALE
    assert canonicalize(hand).valid.all()
    with pytest.raises(ValueError, match=r"\[B, 21, 3\]"):
        canonicalize(torch.zeros(2, 20, 3))
    empty = canonicalize(torch.zeros(0, 21, 3))
    assert empty.transforms.shape == (0, NUM_PARTS, 4, 4)
