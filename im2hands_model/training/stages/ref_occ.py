"""Training stage ``ref_occ``: the two-hand refinement R on top of a frozen, trained I.

Config (besides the engine's keys)::

    init:
      init_occ_checkpoint: runs/init_occ/best.pt   # I's checkpoint (its config builds I), or
                                                   # "pretrained": the shipped I
    model:
      encoder: {depth: resnet18, base_width: 16, feature_dim: 32, global_dim: 128}  # R's own
      refine: {dim: 64, num_anchors: 512, latent_dim: 128, hidden: 128}   # TwoHandRefinement
      anchor_candidates: 2048      # each hand's points I scores to find anchors on its surface
    loss:
      penetration_weight: 0.001
      overlap_weight: 0.0          # the penetration loss again, at the points where I overlaps
      overlap_points: 128          # ... per hand, the most overlapping of
      overlap_pool: 1024           # ... this many of its stored points
    data:
      points_per_hand: 2048

Per step: I (frozen, no gradients) scores both hands at the training points of both hands; anchors
are picked near I's 0.5 level among each hand's points and spread by farthest-point sampling
(:func:`~im2hands_model.networks.ref_occ.sample_anchors`); R refines both hands' logits at all
points. Loss (SPEC §3.3): MSE of each hand's occupancy on its own points + ``penetration_weight`` x
the penetration loss (one hand's occupancy times the other's over both hands' points).

The training points rarely lie inside both hands, so that loss hardly sees I's overlaps. With
``overlap_weight > 0`` each hand also gets the ``overlap_points`` of its stored points where I's
two hands overlap most (:func:`~im2hands_model.networks.ref_occ.overlap_indices`): their own
occupancy joins the MSE (the hand keeps what is its), and their penetration loss is added with
``overlap_weight`` -- so R learns to push the other hand's surface out there.
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

#: ``init.init_occ_checkpoint`` value for the shipped I (``im2hands_model/weights``)
PRETRAINED_INIT = "pretrained"


def load_init_occ(path: str | os.PathLike) -> TwoHandInitialOccupancy:
    """A trained I from an ``init_occ`` checkpoint (read with ``weights_only=True``), or the
    shipped one for :data:`PRETRAINED_INIT` (to go on training the shipped R without its runs)."""
    if str(path) == PRETRAINED_INIT:
        from im2hands_model.pretrained import load_pretrained, manifest

        net = load_pretrained("init_occ")
        net.config = dict(manifest()["models"]["init_occ"]["config"].get("model", {}))
        return net
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
        loss = cfg.get("loss", {})
        self.pen_weight = float(loss.get("penetration_weight", 0.001))
        self.overlap_weight = float(loss.get("overlap_weight", 0.0))
        self.overlap_points = int(loss.get("overlap_points", 128))
        self.overlap_pool = int(loss.get("overlap_pool", 1024))
        if self.overlap_weight < 0 or self.overlap_points < 1 or self.overlap_pool < 1:
            raise ValueError("loss.overlap_weight must be >= 0 and loss.overlap_points, "
                             "loss.overlap_pool positive")  # fmt: skip
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
        self, refined: Tensor, labels: Tensor, present: Tensor, overlap: int = 0
    ) -> tuple[Tensor, dict[str, float]]:
        """The loss at each hand's ``P`` points, the last ``overlap`` of them the overlap
        points (their own occupancy in the MSE; their penetration weighted apart)."""
        occ = torch.sigmoid(own_points(refined))
        mse = ((occ - labels) ** 2).mean(-1)
        w = present.to(mse.dtype)
        mse = (mse * w).sum() / w.sum().clamp_min(1.0)
        p = labels.shape[-1]
        regular = torch.arange(p, device=refined.device) < p - overlap  # [P]
        ignore = torch.full((p,), -1, dtype=torch.long, device=refined.device)

        def owners(cols: Tensor) -> Tensor:  # hand of each query where ``cols``, else ignored
            hand = [torch.where(cols, torch.full_like(ignore, h), ignore) for h in (0, 1)]
            return torch.cat(hand)[None].expand(refined.shape[0], -1)

        pen = penetration_loss(refined, owners(regular), present)
        loss = mse + self.pen_weight * pen
        terms = {"mse": float(mse.detach()), "penetration": float(pen.detach())}
        if overlap:
            pen_overlap = penetration_loss(refined, owners(~regular), present)
            loss = loss + self.overlap_weight * pen_overlap
            terms["overlap_penetration"] = float(pen_overlap.detach())
        return loss, terms

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        points, labels = subsample_points(
            batch["occ_points"], batch["occ_labels"], self.points, gen
        )
        inputs = (batch["joints_3d"], batch["K"], batch["image"], batch["hand_present"], gen,
                  batch["occ_points"])  # fmt: skip
        # anchors come from the stored points (half of them near the surface), not the subsample
        if self.overlap_weight == 0:
            _, refined = model(points, *inputs)
            return self._losses(refined, labels, batch["hand_present"])
        pool, pool_labels = subsample_points(
            batch["occ_points"], batch["occ_labels"], self.overlap_pool, gen
        )
        num = min(self.overlap_points, pool.shape[2])
        _, refined, picked = model(points, *inputs, overlap_pool=pool, overlap_num=num)
        labels = torch.cat([labels, torch.gather(pool_labels, 2, picked)], 2)
        return self._losses(refined, labels, batch["hand_present"], overlap=num)

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
