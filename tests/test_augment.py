"""Mirror / rotation augmentation of the keypoint predictor's crops, on real rendered scenes.

The new views must be exact: every joint projects with the new intrinsics onto its new pixel,
the picture moves with the labels, a mirrored left hand is labelled (and shaped) as a right hand,
and no present joint leaves the crop.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from im2hands_model.data.shards import ShardDataset
from im2hands_model.hands import skeleton_chirality as chirality
from im2hands_model.training.augment import mirror_rotate
from im2hands_model.training.config import ConfigError, load_config

KEYS = ("image", "K", "joints_3d", "joints_2d", "hand_present")


@pytest.fixture(scope="module")
def batch(tiny_dataset_dir) -> dict[str, torch.Tensor]:
    data = ShardDataset(tiny_dataset_dir, keys=list(KEYS))
    items = [data[i] for i in range(len(data))]
    return {k: torch.stack([it[k] for it in items]) for k in KEYS}


def _project(j3: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    p = j3.double() @ K.double().transpose(1, 2)[:, None]
    return p[..., :2] / p[..., 2:3]


def _sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear colours ``[B, 2, 21, 3]`` of ``image`` at pixels ``uv [B, 2, 21, 2]``."""
    h, w = image.shape[-2:]
    grid = torch.stack([2 * uv[..., 0] / w - 1, 2 * uv[..., 1] / h - 1], -1).float()
    out = F.grid_sample(image, grid.flatten(1, 2)[:, None], align_corners=False)  # [B,3,1,42]
    return out[:, :, 0].permute(0, 2, 1).reshape(*uv.shape[:3], 3)


def _views(batch, seed: int, mirror: float, rotate: float):
    return mirror_rotate(*(batch[k] for k in KEYS), torch.Generator().manual_seed(seed),
                         mirror=mirror, rotate_deg=rotate)  # fmt: skip


def test_new_views_are_exact_camera_geometry(batch):
    image, K, j3, j2, present = _views(batch, 0, 0.5, 40.0)
    pres = present.bool()
    assert pres.sum() == batch["hand_present"].bool().sum()
    # labels: each joint projects with the new K onto its new pixel
    err = (_project(j3, K) - j2.double()).norm(dim=-1)[pres]
    assert float(err.max()) < 1e-3
    # the source's labels project with its own K too (the check above is not vacuous)
    src = (_project(batch["joints_3d"], batch["K"]) - batch["joints_2d"].double()).norm(dim=-1)
    assert float(src[batch["hand_present"].bool()].max()) < 1e-2
    # rigid: bone lengths survive
    bones = (j3[..., 1:, :] - j3[..., :1, :]).norm(dim=-1)
    bones0 = (batch["joints_3d"][..., 1:, :] - batch["joints_3d"][..., :1, :]).norm(dim=-1)
    assert torch.allclose(bones.sort(dim=1).values, bones0.sort(dim=1).values, atol=1e-5)
    # K stays a pinhole with the same focal length
    assert torch.allclose(K[:, 0, 0], batch["K"][:, 0, 0]) and (K[:, 1, 0] == 0).all()
    # every present joint is still inside the crop
    h, w = image.shape[-2:]
    inside = (j2[..., 0] >= 0) & (j2[..., 0] <= w) & (j2[..., 1] >= 0) & (j2[..., 1] <= h)
    assert bool(inside[pres].all())
    # something actually happened: some crops were rotated, some mirrored
    assert (K[:, 0, 2] - batch["K"][:, 0, 2]).abs().max() > 1.0
    assert not torch.equal(image, batch["image"])


def test_the_picture_moves_with_the_labels(batch):
    """Colours at the new joint pixels of the new crop match those at the old pixels of the old
    crop, far better than colours at the old pixels of the new crop (the striped backgrounds
    make a mismatch costly)."""
    image, _, _, j2, present = _views(batch, 1, 0.5, 40.0)
    src_present = batch["hand_present"].bool()
    before = _sample(batch["image"], batch["joints_2d"])
    after = _sample(image, j2)
    # mirrored crops hold the hands in the other order: compare in the better one
    same = (after - before).abs().mean(-1)
    swapped = (after[:, [1, 0]] - before).abs().mean(-1)
    match = torch.minimum(same.mean(-1), swapped.mean(-1))[src_present & present.bool()]
    wrong = (_sample(image, batch["joints_2d"]) - before).abs().mean(-1).mean(-1)[src_present]
    assert float(match.max()) < 0.03  # every hand of every crop, not just most of them
    assert float(wrong.median()) > 5 * float(match.max())


def test_mirroring_makes_the_left_hand_a_right_hand(batch):
    _, _, j3, j2, present = _views(batch, 2, 1.0, 0.0)
    src = batch["joints_3d"].numpy()
    w = batch["image"].shape[-1]
    both = batch["hand_present"].bool().all(-1)
    assert bool(both.any())
    for b in torch.nonzero(both)[:, 0].tolist():
        # slot 0 now holds the mirror image of the old right hand, which is a left hand
        assert chirality(src[b, 0]) < 0 < chirality(src[b, 1])
        assert chirality(j3[b, 0].numpy()) < 0 < chirality(j3[b, 1].numpy())
        assert torch.allclose(j2[b, 0, :, 0], w - batch["joints_2d"][b, 1, :, 0], atol=1e-4)
    assert torch.equal(present, batch["hand_present"][:, [1, 0]])


def test_a_rotation_that_would_lose_a_joint_is_not_applied(batch):
    image, K, j3, j2, _ = _views(batch, 3, 0.0, 180.0)
    moved = (j2 - batch["joints_2d"]).norm(dim=-1).amax((-1, -2)) > 1e-3
    h, w = image.shape[-2:]
    pres = batch["hand_present"].bool()
    inside = (j2[..., 0] >= 0) & (j2[..., 0] <= w) & (j2[..., 1] >= 0) & (j2[..., 1] <= h)
    assert bool(inside[pres].all())
    kept = ~moved
    assert bool(kept.any()) and bool(moved.any())  # 180 degrees loses joints of some crops
    assert torch.equal(image[kept], batch["image"][kept])
    assert torch.equal(j3[kept], batch["joints_3d"][kept])


def test_repeatable_optional_and_checked(batch):
    a = _views(batch, 4, 0.5, 30.0)
    b = _views(batch, 4, 0.5, 30.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    off = _views(batch, 4, 0.0, 0.0)
    assert all(x is batch[k] for x, k in zip(off, KEYS, strict=True))
    with pytest.raises(ValueError, match="mirror"):
        _views(batch, 0, 1.5, 0.0)
    with pytest.raises(ValueError, match="rotate_deg"):
        _views(batch, 0, 0.0, 200.0)
    stretched = {**batch, "K": batch["K"].clone()}
    stretched["K"][:, 1, 1] *= 1.1
    with pytest.raises(ValueError, match="square pixels"):
        _views(stretched, 0, 0.0, 10.0)
    assert _views(stretched, 0, 1.0, 0.0)[1][0, 1, 1] == pytest.approx(
        float(stretched["K"][0, 1, 1]), rel=1e-6
    )  # mirroring alone works for any camera


@pytest.mark.parametrize(("key", "value"), [("rotate", 200), ("mirror", 1.5), ("mirror", -0.1)])
def test_config_rejects_out_of_range_geometric_augmentation(tmp_path, key, value):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: kpts_pred\ndata: {train: a, val: b}\n")
    with pytest.raises(ConfigError, match=f"data.augment.{key}"):
        load_config(cfg, [f"data.augment.{key}={value}"], check_paths=False)
    ok = load_config(cfg, ["data.augment.rotate=45"], check_paths=False)
    assert math.isclose(ok["data"]["augment"]["rotate"], 45.0)


def test_colours_are_untouched_by_mirroring(batch):
    image, *_ = _views(batch, 5, 1.0, 0.0)
    assert torch.equal(image, batch["image"].flip(-1))
    assert np.isfinite(image.numpy()).all()
