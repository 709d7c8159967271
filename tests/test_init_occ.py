"""The initial occupancy network I (HALO + query-image attention) on real hands."""

import pytest
import torch

from im2hands_model.canonical import NUM_PARTS, canonicalize, stand_in_joints
from im2hands_model.hands import mirror_points
from im2hands_model.networks.init_occ import (
    EMPTY_LOGIT,
    InitialOccupancy,
    TwoHandInitialOccupancy,
    occupancy_bce,
)

ENCODER = dict(depth="resnet18", base_width=8, feature_dim=16, global_dim=32)


@pytest.fixture(scope="module")
def batch(tiny_dataset_dir):
    from torch.utils.data import DataLoader

    from im2hands_model.data.shards import ShardDataset

    return next(iter(DataLoader(ShardDataset(tiny_dataset_dir), batch_size=4)))


def test_parts_run_as_one_batched_matmul_equal_to_a_loop_over_parts(batch):
    torch.manual_seed(0)
    net = InitialOccupancy(hidden=32, img_dim=5)
    pose = canonicalize(batch["joints_3d"][:, 1])
    points = batch["occ_points"][:, 1, :64]
    img = torch.randn(4, 64, 5)
    parts = net.part_logits(points, pose, img)
    assert parts.shape == (4, NUM_PARTS, 64)
    act = torch.nn.functional.leaky_relu
    for b in range(NUM_PARTS):  # the same network written part by part
        x = pose.to_parts(points)[:, b]
        shape = net.shape_mlp(pose.lengths)
        posec = net.pose_code(pose.transforms[:, :, :3, 3].flatten(1))
        code = torch.cat([pose.lengths[:, b, None], shape, posec], -1)[:, None].expand(-1, 64, -1)
        w0 = torch.cat([net.w0_point[b], net.w0_code[b]], 0)
        h = act(torch.cat([x, code], -1) @ w0 + net.b0[b], 0.1)
        h = h + act(h @ net.l1.weight[b] + net.l1.bias[b], 0.1)
        h = h + act(h @ net.l2.weight[b] + net.l2.bias[b] + img @ net.l2_img[b], 0.1)
        h = h + act(h @ net.l3.weight[b] + net.l3.bias[b], 0.1)
        out = (h @ net.l4.weight[b] + net.l4.bias[b])[..., 0]
        assert torch.allclose(out, parts[:, b], atol=1e-4)
    assert torch.equal(net(points, pose, img), parts.max(1).values)


def test_halo_mode_has_no_image_branch_and_is_invariant_to_rigid_motion(batch):
    torch.manual_seed(0)
    halo = TwoHandInitialOccupancy(image_conditioning=False, hidden=32)
    assert halo.encoder is None and halo.encode(None) is None
    joints = batch["joints_3d"].double()
    halo = halo.double()
    queries = joints[:, :, :8] + 0.004  # points near the fingers, the same for both hands
    rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    rot = rot * torch.det(rot)
    shift = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    a = halo(queries, joints, present=batch["hand_present"])
    b = halo(queries @ rot.T + shift, joints @ rot.T + shift, present=batch["hand_present"])
    assert torch.allclose(a, b, atol=1e-9)


def test_mirrored_scene_gives_the_other_hands_occupancy_when_weights_are_shared(batch):
    torch.manual_seed(0)
    net = TwoHandInitialOccupancy(image_conditioning=False, hidden=32)
    net.hands[0].load_state_dict(net.hands[1].state_dict())
    right = batch["joints_3d"][:, 1]
    wrist = right[:, 0]
    q = right[:, 4:12] + 0.002
    joints = torch.stack([mirror_points(right, wrist), right], 1)
    queries = torch.stack([mirror_points(q, wrist), q], 1)
    logits = net(queries, joints)
    assert torch.allclose(logits[:, 0], logits[:, 1], atol=1e-5)


def test_absent_and_invalid_hands_are_masked_without_nan(batch):
    torch.manual_seed(0)
    net = TwoHandInitialOccupancy(hidden=32, encoder=ENCODER)
    joints = batch["joints_3d"].clone()
    joints[0, 0] = float("nan")  # NaN keypoints in the left hand of scene 0
    present = batch["hand_present"].clone()
    present[1, 1] = False
    logits = net(batch["occ_points"][:, :, :128], joints, K=batch["K"], present=present,
                 image=batch["image"], normalized=True)  # fmt: skip
    assert logits.shape == (4, 2, 128) and torch.isfinite(logits).all()
    assert (logits[0, 0] == EMPTY_LOGIT).all() and (logits[1, 1] == EMPTY_LOGIT).all()
    loss = occupancy_bce(logits, batch["occ_labels"][:, :, :128], present)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    empty = net(torch.zeros(0, 2, 5, 3), torch.zeros(0, 2, 21, 3), K=torch.zeros(0, 3, 3),
                image=torch.zeros(0, 3, 128, 128))  # fmt: skip
    assert empty.shape == (0, 2, 5)


def test_image_features_change_the_occupancy_and_are_required(batch):
    torch.manual_seed(0)
    net = TwoHandInitialOccupancy(hidden=32, encoder=ENCODER)
    pts = batch["occ_points"][:, :, :64]
    a = net(pts, batch["joints_3d"], K=batch["K"], image=batch["image"], normalized=True)
    b = net(pts, batch["joints_3d"], K=batch["K"], image=batch["image"].flip(-1), normalized=True)
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="image"):
        net(pts, batch["joints_3d"], K=batch["K"], normalized=True)


def test_capsule_prior_starts_from_a_plausible_hand(batch):
    from im2hands_model.training.stages.occupancy_common import occupancy_iou

    torch.manual_seed(0)
    args = (batch["occ_points"], batch["joints_3d"])
    kw = dict(present=batch["hand_present"], normalized=True)
    with torch.no_grad():
        prior = TwoHandInitialOccupancy(False, hidden=32, capsule_prior=True)(*args, **kw)
        plain = TwoHandInitialOccupancy(False, hidden=32)(*args, **kw)
    labels, present = batch["occ_labels"], batch["hand_present"]
    with_prior = occupancy_iou(prior, labels, present)
    assert with_prior > 0.3  # untrained, capsules around the bones
    assert with_prior > 1.5 * occupancy_iou(plain, labels, present)


def test_nearest_parts_culling_matches_all_parts_near_the_hand():
    """Inference part culling (each point's k nearest parts) on the shipped I: all 16 parts give
    exactly the dense logits; 4 parts agree to 1e-2 in probability near the hand."""
    from im2hands_model.networks.init_occ import EMPTY_LOGIT, Shortcuts
    from im2hands_model.pretrained import load_pretrained

    net = load_pretrained("init_occ")
    joints = stand_in_joints()[None].repeat(2, 1, 1)[None] + torch.tensor([0.0, 0.0, 0.5])
    joints[0, 0, :, 0] -= 0.1
    gen = torch.Generator().manual_seed(0)
    pts = 0.25 * torch.rand(1, 2, 4000, 3, generator=gen) - 0.125
    image = torch.rand(1, 3, 256, 256, generator=gen)
    K = torch.tensor([[[500.0, 0, 128], [0, 500.0, 128], [0, 0, 1]]])
    with torch.no_grad():
        ctx = net.encode(image)
        dense = net.forward_normalized(pts, joints, K, ctx, shortcuts=Shortcuts(0.045))
        out = {}
        for k in (16, 4):
            out[k] = net.forward_normalized(pts, joints, K, ctx, shortcuts=Shortcuts(0.045, k))
    near = dense > EMPTY_LOGIT
    assert near.float().mean() > 0.2
    torch.testing.assert_close(out[16], dense)
    diff = (torch.sigmoid(out[4]) - torch.sigmoid(dense)).abs()
    assert float(diff.max()) < 1e-2
