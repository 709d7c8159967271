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
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from im2hands_model.hands import from_normalized, to_normalized
from im2hands_model.meshing import THRESHOLD_R
from im2hands_model.networks.backbone import ImageEncoder
from im2hands_model.networks.init_occ import TwoHandInitialOccupancy
from im2hands_model.networks.ref_occ import TwoHandRefinement, penetration_loss, sample_anchors
from im2hands_model.training.checkpoint import load_trained_network, unwrap
from im2hands_model.training.stages.init_occ import build_init_occ
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


def build_refined(cfg: dict, init: TwoHandInitialOccupancy | None = None) -> RefinedOccupancy:
    """I+R from a ``ref_occ`` config; without ``init``, I is built untrained from
    ``init.init_occ_model`` (the weights then come from the ref_occ checkpoint)."""
    if init is None:
        model_cfg = cfg.get("init", {}).get("init_occ_model")
        if model_cfg is None:
            raise ValueError("this ref_occ config does not record I's architecture")
        init = build_init_occ(model_cfg)
    m = cfg.get("model", {})
    return RefinedOccupancy(
        init,
        encoder=dict(m.get("encoder", {})),
        refine=dict(m.get("refine", {})),
        anchor_candidates=int(m.get("anchor_candidates", 2048)),
    )


def hands_center(joints: Tensor, present: Tensor) -> Tensor:
    """``[B, 3]`` mean of the present hands' wrists (of both if none is marked present)."""
    w = present.to(joints.dtype)
    w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
    return (joints[:, :, 0] * w[..., None]).sum(1) / w.sum(1, keepdim=True)


@dataclass
class RefinementState:
    """Per-image state of :class:`RefinedOccupancy` (see :meth:`RefinedOccupancy.prepare`)."""

    joints: Tensor
    K: Tensor
    present: Tensor
    poses: list
    init_ctx: object
    feats: object = None
    center: Tensor | None = None
    ctx: object = None


class RefinedOccupancy(nn.Module):
    """Frozen I + R with its own image encoder: ``forward`` is the whole training computation.

    Args:
        init: a trained :class:`TwoHandInitialOccupancy` (frozen here).
        encoder: keyword arguments of R's :class:`ImageEncoder`.
        refine: keyword arguments of :class:`TwoHandRefinement` (image sizes are filled in).
        anchor_candidates: points per hand scored by I to find anchors.
    """

    def __init__(
        self,
        init: TwoHandInitialOccupancy,
        encoder: dict | None = None,
        refine: dict | None = None,
        anchor_candidates: int = 2048,
    ) -> None:
        super().__init__()
        self.init = init.eval()
        for p in self.init.parameters():
            p.requires_grad_(False)
        self.encoder = ImageEncoder(**(encoder or {}))
        refine = dict(refine or {})
        refine.setdefault("image_channels", self.encoder.feature_dim)
        refine.setdefault("image_global_dim", self.encoder.global_dim)
        self.refine = TwoHandRefinement(**refine)
        self.anchor_candidates = anchor_candidates

    def train(self, mode: bool = True) -> RefinedOccupancy:
        super().train(mode)
        self.init.eval()  # I stays frozen, also in training mode
        return self

    @torch.no_grad()
    def init_logits(self, state: RefinementState, points_norm: Tensor) -> tuple[Tensor, Tensor]:
        """I's logits of both hands at both hands' points.

        Args:
            state: from :meth:`prepare`.
            points_norm: ``[B, 2, P, 3]`` each hand's points in its own normalised space.

        Returns:
            ``(queries [B, 2P, 3] camera frame, logits [B, 2, 2P])``, hand 0's points first.
        """
        b, _, p, _ = points_norm.shape
        poses = state.poses
        cam = torch.stack(
            [from_normalized(points_norm[:, h], poses[h].rot, poses[h].origin) for h in (0, 1)], 1
        )
        queries = cam.reshape(b, 2 * p, 3)
        both = torch.stack(
            [to_normalized(queries, poses[h].rot, poses[h].origin) for h in (0, 1)], 1
        )
        logits = self.init.forward_normalized(
            both, state.joints, state.K, state.init_ctx, state.present, poses
        )
        return queries, logits

    def prepare(
        self,
        joints: Tensor,
        K: Tensor,
        image: Tensor,
        present: Tensor,
        candidates_norm: Tensor | None = None,
        anchors: Tensor | None = None,
        gen: torch.Generator | None = None,
    ) -> RefinementState:
        """Everything that does not depend on the query points: run it once per image.

        Args:
            joints: ``[B, 2, 21, 3]``; K: ``[B, 3, 3]``; image: ``[B, 3, S, S]``;
            present: ``[B, 2]`` bool.
            candidates_norm: ``[B, 2, C, 3]`` points (each hand's normalised space) among which
                anchors are picked near I's 0.5 level (training); or
            anchors: ``[B, 2, A, 3]`` camera-frame points on I's surface (e.g. from its mesh).
            gen: generator for the farthest-point-sampling start (None: first candidate).
        """
        with torch.no_grad():
            state = RefinementState(
                joints=joints,
                K=K,
                present=present,
                poses=self.init.poses(joints),
                init_ctx=self.init.encode(image) if self.init.image_conditioning else None,
            )
            if anchors is None:
                if candidates_norm is None:
                    raise ValueError("prepare needs candidates_norm or anchors")
                # each hand's candidates are scored by that hand's I only
                own = self.init.forward_normalized(
                    candidates_norm, joints, K, state.init_ctx, present, state.poses
                )
                cam = torch.stack(
                    [
                        from_normalized(candidates_norm[:, h], state.poses[h].rot,
                                        state.poses[h].origin)
                        for h in (0, 1)
                    ],
                    1,
                )  # fmt: skip
                anchors = sample_anchors(
                    cam,
                    own,
                    present,
                    num=min(self.refine.num_anchors, candidates_norm.shape[2]),
                    start="random" if gen is not None else "first",
                    gen=gen,
                )
        state.feats = self.encoder(image)
        state.center = hands_center(joints, present)
        state.ctx = self.refine.encode_context(anchors, present, K, state.feats, state.center)
        return state

    def score(self, state: RefinementState, points_norm: Tensor) -> tuple[Tensor, Tensor]:
        """Initial and refined logits ``([B, 2, 2P], [B, 2, 2P])`` at both hands' points.

        ``points_norm [B, 2, P, 3]``: each hand's points in its own normalised space; all ``2P``
        points are scored for both hands, hand 0's points first.
        """
        queries, init_logits = self.init_logits(state, points_norm)
        refined = self.refine.decode(
            queries, init_logits, state.ctx, state.K, state.feats, state.center
        )
        return init_logits, refined

    def forward(
        self,
        points_norm: Tensor,
        joints: Tensor,
        K: Tensor,
        image: Tensor,
        present: Tensor,
        gen: torch.Generator | None = None,
        candidates_norm: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """The training computation: anchors among ``candidates_norm [B, 2, C, 3]`` (default:
        the first ``anchor_candidates`` of ``points_norm``), then :meth:`score` at
        ``points_norm`` (shapes as in :meth:`score`)."""
        if candidates_norm is None:
            candidates_norm = points_norm
        candidates_norm = candidates_norm[:, :, : self.anchor_candidates]
        state = self.prepare(joints, K, image, present, candidates_norm=candidates_norm, gen=gen)
        return self.score(state, points_norm)


def own_points(logits: Tensor) -> Tensor:
    """``[B, 2, 2P] -> [B, 2, P]``: each hand's logits at its own points (hand 0's come first)."""
    p = logits.shape[-1] // 2
    return torch.stack([logits[:, 0, :p], logits[:, 1, p:]], 1)


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
        return build_refined(self.cfg, init).to(device)

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
