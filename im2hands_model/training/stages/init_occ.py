"""Training stage ``init_occ``: the initial occupancy network I (or plain HALO), GT keypoints in.

Config (besides the engine's keys)::

    model:
      image_conditioning: true     # false: keypoint-only HALO baseline
      hidden: 64                   # part-MLP width
      img_dim: 19                  # injected image feature
      token_dim: 32
      soft_max_temperature: null
      capsule_prior: false         # true: part logits start from capsules around the bones
      encoder: {depth: resnet18, base_width: 16, feature_dim: 32, global_dim: 128}
    data:
      points_per_hand: 2048        # occupancy points drawn per hand and step

    loss:
      part_weight: 0.5             # NASA-style part-assignment loss (0: off)

Loss: binary cross-entropy of each present hand's logits against its occupancy labels, plus
``part_weight`` x the part-assignment loss (each inside point belongs to its nearest part), which
speeds up early training of the 16 part MLPs.
Validation: IoU of the occupancy (threshold 0.5) on every stored query point of the validation
scenes (half uniform in the box, half near the surface, so it is stricter than the box IoU of the
paper protocol in ``training/evaluate.py``), and the BCE.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from im2hands_model.hands import mirror_normalized
from im2hands_model.networks.init_occ import (
    TwoHandInitialOccupancy,
    nearest_part,
    occupancy_bce,
    part_assignment_loss,
)
from im2hands_model.training.checkpoint import unwrap
from im2hands_model.training.stages.occupancy_common import (
    dataset_faces,
    occupancy_iou,
    occupancy_picture,
    subsample_points,
)


class InitOccStage:
    """Trains :class:`~im2hands_model.networks.init_occ.TwoHandInitialOccupancy`."""

    name = "init_occ"
    best_metric = "iou"
    best_mode = "max"

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.points = int(cfg.get("data", {}).get("points_per_hand", 2048))
        self.part_weight = float(cfg.get("loss", {}).get("part_weight", 0.5))
        if self.points <= 0:
            raise ValueError(f"data.points_per_hand must be positive, got {self.points}")

    def build_model(self, device: torch.device) -> nn.Module:
        return TwoHandInitialOccupancy.from_config(self.cfg.get("model", {})).to(device)

    def _logits(self, model: nn.Module, batch: dict[str, Tensor], points: Tensor) -> Tensor:
        return model(
            points,
            batch["joints_3d"],
            K=batch["K"],
            present=batch["hand_present"],
            image=batch["image"],
            normalized=True,
        )

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        points, labels = subsample_points(
            batch["occ_points"], batch["occ_labels"], self.points, gen
        )
        present = batch["hand_present"]
        if not self.part_weight:
            logits = self._logits(model, batch, points)
            loss = occupancy_bce(logits, labels, present)
            return loss, {"bce": float(loss.detach())}
        logits, parts = model(
            points, batch["joints_3d"], K=batch["K"], present=present, image=batch["image"],
            normalized=True, return_parts=True,
        )  # fmt: skip
        with torch.no_grad():
            target = self.part_targets(unwrap(model), points, batch["joints_3d"])
        bce = occupancy_bce(logits, labels, present)
        aux = part_assignment_loss(parts, labels, target, present)
        loss = bce + self.part_weight * aux
        return loss, {"bce": float(bce.detach()), "part": float(aux.detach())}

    @staticmethod
    def part_targets(net: nn.Module, points: Tensor, joints: Tensor) -> Tensor:
        """``[B, 2, N]`` nearest part of each point (left hands mirrored like the network's)."""
        poses = net.poses(joints)
        mirrored = [mirror_normalized(points[:, 0]), points[:, 1]]
        return torch.stack([nearest_part(mirrored[h], poses[h].joints_norm) for h in range(2)], 1)

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        logits = self._logits(model, batch, batch["occ_points"])
        present = batch["hand_present"]
        return {
            "iou": occupancy_iou(logits, batch["occ_labels"], present),
            "bce": float(occupancy_bce(logits, batch["occ_labels"], present)),
        }

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Tensor]) -> np.ndarray | None:
        net = unwrap(model)
        n = min(2, batch["image"].shape[0])
        scenes = [{k: v[s : s + 1] for k, v in batch.items()} for s in range(n)]
        contexts = [net.encode(sc["image"]) for sc in scenes]

        def occ_fn(sample: int, points_norm: Tensor) -> Tensor:
            sc = scenes[sample]
            logits = net(
                points_norm[None],
                sc["joints_3d"],
                K=sc["K"],
                ctx=contexts[sample],
                present=sc["hand_present"],
                normalized=True,
            )
            return torch.sigmoid(logits[0])

        return occupancy_picture(batch, occ_fn, dataset_faces(self.cfg), samples=n)
