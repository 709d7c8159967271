"""Pieces shared by the occupancy stages (``init_occ``, ``ref_occ``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from im2hands_model.hands import root_frame


def subsample_points(
    points: Tensor, labels: Tensor, count: int, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Draw ``count`` of the ``N`` stored points per hand, without replacement.

    Args:
        points: ``[B, 2, N, 3]``; labels: ``[B, 2, N]``; gen: the step's generator (CPU).

    Returns:
        ``([B, 2, count, 3], [B, 2, count])``; all points when ``count >= N``.
    """
    b, h, n = labels.shape
    if count >= n:
        return points, labels
    keys = torch.rand((b, h, n), generator=gen).to(points.device)
    idx = keys.topk(count, dim=-1).indices
    return (
        torch.gather(points, 2, idx[..., None].expand(-1, -1, -1, 3)),
        torch.gather(labels, 2, idx),
    )


def occupancy_iou(logits: Tensor, labels: Tensor, present: Tensor, threshold: float = 0.5) -> float:
    """Mean per-hand IoU of ``sigmoid(logits) >= threshold`` vs labels, over present hands."""
    pred = torch.sigmoid(logits) >= threshold
    gt = labels >= 0.5
    inter = (pred & gt).sum(-1).float()
    union = (pred | gt).sum(-1).float()
    iou = inter / union.clamp_min(1.0)
    mask = present.bool() & (union > 0)
    return float(iou[mask].mean()) if mask.any() else float("nan")


def mesh_scene(
    occ_fn: Callable[[Tensor], Tensor],
    joints: Tensor,
    present: Tensor,
    resolution: int = 32,
    upsampling_steps: int = 3,
    threshold: float = 0.5,
) -> list:
    """Both hands of one scene as camera-frame meshes (``None`` for absent / empty hands).

    Args:
        occ_fn: ``points [2, P, 3] -> probabilities [2, P]``, points in each hand's own
            (unmirrored) normalised space defined by ``joints``.
        joints: ``[2, 21, 3]`` the keypoints the occupancy was conditioned on (camera frame).
        present: ``[2]`` bool.
    """
    from im2hands_model.meshing import extract_meshes, mesh_to_camera

    valid = [bool(present[h]) and bool(torch.isfinite(joints[h]).all()) for h in range(2)]
    meshes = extract_meshes(
        occ_fn,
        num_hands=2,
        resolution=resolution,
        upsampling_steps=upsampling_steps,
        threshold=threshold,
        device=joints.device,
        valid=valid,
    )
    rot, origin = root_frame(joints)
    return [mesh_to_camera(mesh, rot[h], origin[h]) for h, mesh in enumerate(meshes)]


def dataset_faces(cfg: dict, split: str = "val") -> np.ndarray | None:
    """``[2, F, 3]`` GT mesh faces of a config's dataset split (None if unavailable)."""
    root = cfg.get("data", {}).get(split)
    path = Path(root) / "faces.npy" if root else None
    return np.load(path) if path is not None and path.is_file() else None


def occupancy_picture(
    batch: dict[str, Tensor],
    occ_fn: Callable[[int, Tensor], Tensor],
    faces: np.ndarray | None,
    samples: int = 2,
    resolution: int = 24,
    upsampling_steps: int = 1,
    threshold: float = 0.5,
    variant: str = "prediction",
) -> np.ndarray:
    """GT vs predicted meshes over the crop for the first ``samples`` scenes of a batch.

    ``occ_fn(sample, points_norm [2, P, 3]) -> probabilities [2, P]`` evaluates both hands of one
    scene at points in each hand's own normalised space (from the batch's ``joints_3d``). Meshes
    come from the reference mesher at a coarse resolution (a picture, not a metric).
    """
    from im2hands_model.evaluation import comparison_picture
    from im2hands_model.meshing import Mesh

    rows = []
    for s in range(samples):
        present = batch["hand_present"][s]
        pred = mesh_scene(
            lambda p, s=s: occ_fn(s, p),
            batch["joints_3d"][s],
            present,
            resolution,
            upsampling_steps,
            threshold,
        )
        gt = [
            Mesh(batch["vertices"][s, h].cpu().numpy(), faces[h])
            if bool(present[h]) and faces is not None
            else None
            for h in range(2)
        ]
        image = (batch["image"][s].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8)
        rows.append((image, gt, {variant: pred}))
    return comparison_picture(rows, [batch["K"][s].cpu().numpy() for s in range(samples)])
