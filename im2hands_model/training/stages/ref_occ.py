"""Training stage ``ref_occ``: the two-hand refinement R on top of a frozen, trained I.

Config (besides the engine's keys)::

    init:
      init_occ_checkpoint: runs/init_occ/best.pt   # I's checkpoint (its config builds I)
    model:
      encoder: {depth: resnet18, base_width: 16, feature_dim: 32, global_dim: 128}  # R's own
      refine: {dim: 64, num_anchors: 512, latent_dim: 128, hidden: 128}   # TwoHandRefinement
      anchor_candidates: 2048      # each hand's points I scores to find anchors on its surface
    loss:
      penetration_weight: 0.001
    data:
      points_per_hand: 2048

Per step: I (frozen, no gradients) scores both hands at the training points of both hands; anchors
are picked near I's 0.5 level among each hand's points and spread by farthest-point sampling
(:func:`~im2hands_model.networks.ref_occ.sample_anchors`); R refines both hands' logits at all
points. Loss (SPEC §3.3): MSE of each hand's occupancy on its own points + ``penetration_weight`` x
the penetration loss (one hand's occupancy times the other's over both hands' points).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from im2hands_model.meshing import THRESHOLD_R
from im2hands_model.networks.init_occ import TwoHandInitialOccupancy
from im2hands_model.networks.ref_occ import RefinedOccupancy, own_points, penetration_loss
from im2hands_model.training.checkpoint import load_trained_network, unwrap
from im2hands_model.training.stages.occupancy_common import (
    dataset_faces,
    occupancy_iou,
    occupancy_picture,
    subsample_points,
)


def load_init_occ(path: str | os.PathLike) -> TwoHandInitialOccupancy:
    """A trained I from an ``init_occ`` checkpoint (read with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"I checkpoint {path} not found: train the init_occ stage first "
            "(python training/train.py --config training/configs/init_occ.yaml) or set "
            "init.init_occ_checkpoint"
        )
    _, cfg, net = load_trained_network(path, "init_occ")
    net.config = dict(cfg.get("model", {}))
    return net


class RefOccStage:
    """Trains :class:`~im2hands_model.networks.ref_occ.TwoHandRefinement` with I frozen."""

    name = "ref_occ"
    best_metric = "iou"
    best_mode = "max"
    frozen_prefixes = ("init.",)  # I is loaded from init.init_occ_checkpoint, never trained here

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.points = int(cfg.get("data", {}).get("points_per_hand", 2048))
        self.pen_weight = float(cfg.get("loss", {}).get("penetration_weight", 0.001))
        ckpt = cfg.get("init", {}).get("init_occ_checkpoint")
        if not ckpt:
            raise ValueError("ref_occ needs init.init_occ_checkpoint (a trained init_occ run)")
        self.init_checkpoint = ckpt

    def build_model(self, device: torch.device) -> nn.Module:
        init = load_init_occ(self.init_checkpoint)
        # Keep I's architecture in this run's config, so an R checkpoint alone rebuilds I+R.
        self.cfg.setdefault("init", {})["init_occ_model"] = init.config
        return RefinedOccupancy.from_config(self.cfg, init).to(device)

    def _losses(
        self, refined: Tensor, labels: Tensor, present: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        occ = torch.sigmoid(own_points(refined))
        mse = ((occ - labels) ** 2).mean(-1)
        w = present.to(mse.dtype)
        mse = (mse * w).sum() / w.sum().clamp_min(1.0)
        p = labels.shape[-1]
        hand_of_query = (
            torch.cat([torch.zeros(p, dtype=torch.long), torch.ones(p, dtype=torch.long)])
            .to(refined.device)[None]
            .expand(refined.shape[0], -1)
        )
        pen = penetration_loss(refined, hand_of_query, present)
        loss = mse + self.pen_weight * pen
        return loss, {"mse": float(mse.detach()), "penetration": float(pen.detach())}

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        points, labels = subsample_points(
            batch["occ_points"], batch["occ_labels"], self.points, gen
        )
        # anchors come from the stored points (half of them near the surface), not the subsample
        init_logits, refined = model(
            points, batch["joints_3d"], batch["K"], batch["image"], batch["hand_present"], gen,
            batch["occ_points"],
        )  # fmt: skip
        return self._losses(refined, labels, batch["hand_present"])

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        present = batch["hand_present"]
        init_logits, refined = unwrap(model)(
            batch["occ_points"], batch["joints_3d"], batch["K"], batch["image"], present
        )
        labels = batch["occ_labels"]
        loss, terms = self._losses(refined, labels, present)
        both = (torch.sigmoid(refined[:, 0]) * torch.sigmoid(refined[:, 1]) > 0.25).float()
        return {
            "iou": occupancy_iou(own_points(refined), labels, present),
            "iou_init": occupancy_iou(own_points(init_logits), labels, present),
            "overlap_fraction": float(both.mean()),
            "loss": float(loss),
            **terms,
        }

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Tensor]) -> np.ndarray | None:
        net = unwrap(model)

        n = min(2, batch["image"].shape[0])
        c = min(net.anchor_candidates, batch["occ_points"].shape[2])
        states = [
            net.prepare(
                batch["joints_3d"][s : s + 1],
                batch["K"][s : s + 1],
                batch["image"][s : s + 1],
                batch["hand_present"][s : s + 1],
                candidates_norm=batch["occ_points"][s : s + 1, :, :c],
            )
            for s in range(n)
        ]

        def occ_fn(sample: int, points_norm: Tensor) -> Tensor:
            _, refined = net.score(states[sample], points_norm[None])
            return torch.sigmoid(own_points(refined)[0])

        return occupancy_picture(
            batch, occ_fn, dataset_faces(self.cfg), samples=n, threshold=THRESHOLD_R,
            variant="I+R",
        )  # fmt: skip
