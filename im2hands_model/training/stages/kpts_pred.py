"""Training stage ``kpts_pred``: the learned two-hand keypoint predictor (SPEC §3.5).

Config (besides the engine's keys)::

    model:
      encoder: {depth: resnet18, base_width: 16, feature_dim: 32, global_dim: 128}
      head_dim: 64             # heatmap head channels, root/presence MLP width
      crop_width_m: 0.3        # prior metric width of a crop at the hand's depth
      input_size: null         # resize crops to this width first (e.g. 128: 4x cheaper)
      free_slots: false        # learn which output slot holds which hand (handedness head)
      slot_order: head         # free_slots: order the slots by the head or by skeleton chirality
    loss:                      # weights of keypoint_loss (defaults shown)
      w_2d: 3.0
      w_rel_depth: 10.0
      w_root_depth: 5.0
      w_presence: 0.2

Training crops get the photometric jitter of ``data.augment`` (colour, noise) and, with
``mirror`` (probability) and ``rotate`` (largest angle, degrees), new views of the same scene:
mirrored (the hands swap) and rotated about the crop centre, with exact labels and intrinsics
(:func:`~im2hands_model.training.augment.mirror_rotate`).

Validation: ``mpjpe_mm`` (each hand aligned at joint 9, present hands; the paper protocol),
``mpjpe_abs_mm`` (camera frame), ``px_2d`` (mean 2D error, pixels), ``px_2d_either_order`` (the same
with the two hands matched in the better order: localisation without handedness),
``root_depth_mm`` (wrist depth error), ``presence_acc`` and, for ``free_slots`` networks,
``handedness_acc``. Joint metrics are NaN for a batch without any present hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn

from im2hands_model.hands import NUM_JOINTS, SKELETON_EDGES
from im2hands_model.metrics import mpjpe_mm
from im2hands_model.networks.kpts_pred import (
    DEFAULT_LOSS_WEIGHTS,
    KeypointPredictor,
    joint_error_mm,
    keypoint_loss,
)
from im2hands_model.training.augment import (
    augment_options,
    geometric_options,
    mirror_rotate,
    photometric,
)
from im2hands_model.training.checkpoint import load_trained_network, unwrap

GT_COLOUR = (40, 220, 60)
PRED_COLOUR = (235, 40, 40)
INPUT_COLOUR = (60, 120, 255)


def load_keypoint_predictor(path: str | os.PathLike) -> KeypointPredictor:
    """A trained predictor from a ``kpts_pred`` checkpoint (read with ``weights_only=True``),
    in eval mode with its parameters frozen."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"keypoint predictor checkpoint {path} not found: train the kpts_pred stage first "
            "(python training/train.py --config training/configs/kpts_pred.yaml)"
        )
    _, _, net = load_trained_network(path, "kpts_pred")
    for p in net.parameters():
        p.requires_grad_(False)
    return net.eval()


def skeleton_sheet(
    images: Tensor,
    skeletons: list[tuple[Tensor, Tensor, tuple[int, int, int]]],
    max_samples: int = 4,
    min_size: int = 256,
) -> np.ndarray:
    """Crops side by side with 2D skeletons drawn over them.

    Args:
        images: ``[B, 3, S, S]`` in ``[0, 1]``.
        skeletons: ``(joints_2d [B, 2, 21, 2] pixels, present [B, 2] bool, RGB colour)`` layers,
            drawn in order (later on top); only present, finite hands are drawn.
        max_samples: at most this many crops.
        min_size: crops are enlarged by an integer factor to at least this size.

    Returns:
        ``[H, W, 3]`` uint8 picture.
    """
    n = min(max_samples, images.shape[0])
    h, w = images.shape[-2:]
    scale = max(1, -(-min_size // max(h, w)))
    tiles = []
    for i in range(n):
        img = (images[i].detach().float().clamp(0, 1) * 255).round().byte()
        pic = Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).resize(
            (w * scale, h * scale), Image.NEAREST
        )
        draw = ImageDraw.Draw(pic)
        for joints, present, colour in skeletons:
            pts = joints[i].detach().float().cpu().numpy() * scale
            for hand in range(2):
                if not bool(present[i, hand]) or not np.isfinite(pts[hand]).all():
                    continue
                p = pts[hand]
                for a, b in SKELETON_EDGES:
                    draw.line([tuple(p[a]), tuple(p[b])], fill=colour, width=2)
                r = max(1.5, scale)
                for x, y in p[:NUM_JOINTS]:
                    draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        tiles.append(np.asarray(pic))
    gap = np.full((h * scale, 4, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for t in tiles:
        parts += [t, gap]
    return np.ascontiguousarray(np.concatenate(parts[:-1], axis=1))


def joint_metrics(pred: Tensor, gt: Tensor, present: Tensor) -> dict[str, float]:
    """``mpjpe_mm`` (aligned at joint 9, :func:`im2hands_model.metrics.mpjpe_mm`) and
    ``mpjpe_abs_mm`` (camera frame) of ``[B, 2, 21, 3]`` joints over present hands."""
    mask = present.bool()
    if not bool(mask.any()):
        return {"mpjpe_mm": float("nan"), "mpjpe_abs_mm": float("nan")}
    rel = mpjpe_mm(pred.detach().double().cpu().numpy(), gt.double().cpu().numpy(),
                   mask=mask.cpu().numpy())  # fmt: skip
    abs_err = joint_error_mm(pred.detach().float(), gt.float(), None)[mask]
    return {"mpjpe_mm": rel, "mpjpe_abs_mm": float(abs_err.mean())}


def loss_options(cfg: dict, allowed: dict, stage: str) -> dict:
    """The config's ``loss`` section, refusing keys that ``allowed`` (the defaults) lacks."""
    loss_cfg = dict(cfg.get("loss", {}) or {})
    unknown = sorted(set(loss_cfg) - set(allowed))
    if unknown:
        raise ValueError(f"{stage}: unknown loss keys {unknown}; allowed: {sorted(allowed)}")
    return loss_cfg


def _px_either_order(uv: Tensor, gt: Tensor, present: Tensor) -> float:
    """Mean 2D error (pixels) of two-hand crops with the hands matched in the better of the two
    orders: localisation without handedness (``px_2d`` minus this is what wrong handedness
    calls cost). Crops with one hand count that hand in both orders' best."""
    err = (uv - torch.nan_to_num(gt)).norm(dim=-1).mean(-1)  # [B, 2]
    swap = (uv[:, [1, 0]] - torch.nan_to_num(gt)).norm(dim=-1).mean(-1)
    keep = torch.where(present, err, torch.zeros_like(err)).sum(-1)
    other = torch.where(present, swap, torch.zeros_like(swap)).sum(-1)
    best = torch.minimum(keep, other) / present.sum(-1).clamp_min(1)
    return float(best[present.any(-1)].mean())


class KptsPredStage:
    """Trains :class:`~im2hands_model.networks.kpts_pred.KeypointPredictor`."""

    name = "kpts_pred"
    best_metric = "mpjpe_mm"
    best_mode = "min"
    #: a free_slots network can warm-start from one trained without (train.init_weights)
    optional_prefixes = ("handedness.",)

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.model_cfg = dict(cfg.get("model", {}) or {})
        loss_cfg = loss_options(cfg, DEFAULT_LOSS_WEIGHTS, self.name)
        self.weights = {k: float(v) for k, v in loss_cfg.items()}
        self.augment = augment_options(cfg)
        self.geometric = geometric_options(cfg)

    def build_model(self, device: torch.device) -> nn.Module:
        return KeypointPredictor.from_config(self.model_cfg).to(device)

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        keys = ("image", "K", "joints_3d", "joints_2d", "hand_present")
        views = mirror_rotate(*(batch[k] for k in keys), gen, *self.geometric)
        batch = {**batch, **dict(zip(keys, views, strict=True))}
        image = photometric(batch["image"], gen, *self.augment)
        pred = model(image, batch["K"])
        return keypoint_loss(pred, batch, self.weights)

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        net = unwrap(model)
        pred = net(batch["image"], batch["K"])
        present = batch["hand_present"].bool()
        gt = batch["joints_3d"]
        out = joint_metrics(pred.joints, gt, present)
        if bool(present.any()):
            px = (pred.joints_2d - batch["joints_2d"]).norm(dim=-1)[present]
            root = (pred.root_depth - gt[..., 0, 2]).abs()[present] * 1000.0
            out["px_2d"] = float(px.mean())
            out["root_depth_mm"] = float(root.mean())
            either = _px_either_order(pred.joints_2d, batch["joints_2d"], present)
            out["px_2d_either_order"] = either
        else:
            out["px_2d"] = out["root_depth_mm"] = out["px_2d_either_order"] = float("nan")
        out["presence_acc"] = float((pred.present() == present).float().mean())
        loss, terms = keypoint_loss(pred, batch, self.weights)
        out["loss"] = float(loss)
        if "handedness_acc" in terms:
            out["handedness_acc"] = terms["handedness_acc"]
        return out

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Tensor]) -> np.ndarray | None:
        net = unwrap(model)
        n = min(4, batch["image"].shape[0])
        pred = net(batch["image"][:n], batch["K"][:n])
        return skeleton_sheet(
            batch["image"][:n],
            [
                (batch["joints_2d"][:n], batch["hand_present"][:n], GT_COLOUR),
                (pred.joints_2d, pred.present(), PRED_COLOUR),
            ],
        )
