"""Training stage ``kpts_ref``: the keypoint refinement network K (SPEC §3.4).

Inputs are the GT keypoints corrupted by :func:`add_keypoint_noise` (per-joint Gaussian plus a
per-hand global offset, drawn from the engine's generator); the target is the GT. With
``init.kpts_pred_checkpoint`` set, the inputs are instead a trained (frozen) keypoint predictor's
output on the crop, plus that noise in training: K then learns to correct the errors the
predictor actually makes (the cascade the pipeline runs). The predictor is not part of K's
checkpoint.

On a dataset with the default source's stored output (``im2hands-data detect``,
:mod:`im2hands_model.training.detections`), ``loss.detection_fraction`` of the scenes start
from the hands the source found (placed from the image alone, or with depth:
``loss.detection_placement``), unchanged: K learns the errors a real detector makes. Hands it
missed, and the other scenes, start from the noisy GT as above, so K stays useful for other
sources.

Config (besides the engine's keys)::

    model:
      encoder: {depth: resnet18, base_width: 16, feature_dim: 32, global_dim: 128}
      use_image: true          # false: keypoint-only K (no encoder, no attention)
      dim: 64                  # joint token size
      layers: 4                # GCN layers (each followed by cross-attention)
      heads: 4
      token_grid: 4            # image patch tokens per side
      patch: 16                # patch side, crop pixels
      pixel_features: true     # add each joint's pixel-aligned feature to its token
    loss:
      sigma_mm: 8.0            # per-joint noise, mm per axis
      global_mm: 10.0          # per-hand offset noise, mm per axis
      abs_weight: 0.5          # weight of the camera-frame error next to the root-relative one
      val_seed: 0              # validation noise: fixed per (val_seed, scene_index)
      predictor_fraction: 1.0  # with a predictor: share of scenes starting from its output
      detection_fraction: 0.7  # with stored detections: share of scenes starting from them
      detection_placement: image   # image | depth: which stored placement K starts from

    init:
      kpts_pred_checkpoint: null   # a kpts_pred run's best.pt: refine its predictions

Validation: ``mpjpe_in_mm`` (the noisy input, or the predictor's output) and ``mpjpe_mm`` (K's
output), both aligned at joint 9 over present hands, and their camera-frame versions
``mpjpe_abs_in_mm`` and ``mpjpe_abs_mm``. The noise is drawn per scene from a generator seeded with
``(val_seed, scene_index)``, so validation is repeatable and independent of batching. With stored
detections, those four are over the hands the source found, starting from its output, and
``noise_mpjpe_in_mm`` / ``noise_mpjpe_mm`` (and ``_abs_``) score K on the noisy GT of every hand:
K must not make either input worse.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from im2hands_model.networks.backbone import project_points
from im2hands_model.networks.kpts_pred import joint_error_mm
from im2hands_model.networks.kpts_ref import KeypointRefiner, add_keypoint_noise, refine_loss
from im2hands_model.training.augment import augment_options, photometric
from im2hands_model.training.checkpoint import unwrap
from im2hands_model.training.stages.kpts_pred import (
    GT_COLOUR,
    INPUT_COLOUR,
    PRED_COLOUR,
    joint_metrics,
    load_keypoint_predictor,
    loss_options,
    skeleton_sheet,
)

DEFAULT_LOSS: dict[str, float] = {
    "sigma_mm": 8.0,
    "global_mm": 10.0,
    "abs_weight": 0.5,
    "val_seed": 0,
    "predictor_fraction": 1.0,
    "detection_fraction": 0.7,
    "detection_placement": "image",
}
#: The stored detection keys K reads (:mod:`im2hands_model.training.detections`).
DETECTION_INPUTS = {"image": "src_joints_3d", "depth": "src_joints_3d_depth"}


def _project(joints: Tensor, K: Tensor) -> Tensor:
    """``[B, 2, 21, 3]`` -> pixels ``[B, 2, 21, 2]``."""
    b = joints.shape[0]
    uv, _ = project_points(joints.reshape(b, -1, 3).float(), K.float())
    return uv.view(*joints.shape[:-1], 2)


class KptsRefStage:
    """Trains :class:`~im2hands_model.networks.kpts_ref.KeypointRefiner`."""

    name = "kpts_ref"
    best_metric = "mpjpe_mm"
    best_mode = "min"
    #: what K reads of a scene (the full frame, depth and occupancy samples are left on disk)
    data_keys = ("image", "K", "joints_3d", "joints_2d", "hand_present", "scene_index")
    optional_data_keys = ("src_present", "src_joints_3d", "src_joints_3d_depth")

    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.model_cfg = dict(cfg.get("model", {}) or {})
        opts = {**DEFAULT_LOSS, **loss_options(cfg, DEFAULT_LOSS, self.name)}
        self.sigma_mm = float(opts["sigma_mm"])
        self.global_mm = float(opts["global_mm"])
        self.abs_weight = float(opts["abs_weight"])
        self.predictor_fraction = float(opts["predictor_fraction"])
        if not 0.0 <= self.predictor_fraction <= 1.0:
            raise ValueError("kpts_ref: loss.predictor_fraction must be in [0, 1]")
        self.val_seed = int(opts["val_seed"])
        self.detection_fraction = float(opts["detection_fraction"])
        if not 0.0 <= self.detection_fraction <= 1.0:
            raise ValueError("kpts_ref: loss.detection_fraction must be in [0, 1]")
        if opts["detection_placement"] not in DETECTION_INPUTS:
            raise ValueError("kpts_ref: loss.detection_placement must be 'image' or 'depth'")
        self.detection_key = DETECTION_INPUTS[opts["detection_placement"]]
        self.augment = augment_options(cfg)
        self.predictor_path = (cfg.get("init") or {}).get("kpts_pred_checkpoint")
        self.predictor: nn.Module | None = None
        if self.sigma_mm < 0 or self.global_mm < 0:
            raise ValueError("kpts_ref: sigma_mm and global_mm must be >= 0")

    def build_model(self, device: torch.device) -> nn.Module:
        if self.predictor_path:
            self.predictor = load_keypoint_predictor(self.predictor_path).to(device)
        return KeypointRefiner.from_config(self.model_cfg).to(device)

    @torch.no_grad()
    def _predicted(self, batch: dict[str, Tensor]) -> Tensor:
        return self.predictor(batch["image"], batch["K"]).joints.float()

    def _detected(self, batch: dict[str, Tensor]) -> Tensor | None:
        """``[B, 2]`` hands both present and found by the stored source (None: no detections)."""
        if self.detection_key not in batch or "src_present" not in batch:
            return None
        return batch["src_present"].bool() & batch["hand_present"].bool()

    def _from_detections(self, batch: dict[str, Tensor], start: Tensor, use: Tensor) -> Tensor:
        """``start`` with the stored detections of the ``use [B, 2]`` hands put in."""
        return torch.where(use[..., None, None], batch[self.detection_key].to(start), start)

    def _refine(self, model: nn.Module, batch: dict[str, Tensor], noisy: Tensor) -> Tensor:
        return model(noisy, batch["hand_present"], image=batch["image"], K=batch["K"])

    def loss(
        self, model: nn.Module, batch: dict[str, Tensor], gen: torch.Generator
    ) -> tuple[Tensor, dict[str, float]]:
        gt, present = batch["joints_3d"], batch["hand_present"]
        start = gt
        if self.predictor is not None:
            # a share of the scenes starts from the predictor's output, the rest from GT, so K
            # also refines keypoints from other sources (caller-provided, other detectors)
            use = torch.rand(gt.shape[0], generator=gen) < self.predictor_fraction
            use = use.to(gt.device)[:, None, None, None]
            start = torch.where(use, self._predicted(batch), gt)
        noisy = add_keypoint_noise(start, present, gen, self.sigma_mm, self.global_mm)
        detected = self._detected(batch)
        if detected is not None and self.detection_fraction > 0:
            scene = torch.rand(gt.shape[0], generator=gen) < self.detection_fraction
            noisy = self._from_detections(batch, noisy, detected & scene.to(gt.device)[:, None])
        if "image" in batch:
            batch = {**batch, "image": photometric(batch["image"], gen, *self.augment)}
        refined = self._refine(model, batch, noisy)
        loss = refine_loss(refined, gt, present, self.abs_weight)
        with torch.no_grad():
            mask = present.bool()
            n = mask.sum().clamp_min(1)
            terms = {
                "loss": float(loss.detach()),
                "mpjpe_mm": float(joint_error_mm(refined, gt)[mask].sum() / (n * 21)),
                "mpjpe_in_mm": float(joint_error_mm(noisy, gt)[mask].sum() / (n * 21)),
            }
        return loss, terms

    def validation_input(self, batch: dict[str, Tensor]) -> Tensor:
        """K's validation input: the predictor's output, else :meth:`validation_noise`."""
        if self.predictor is not None:
            return self._predicted(batch)
        return self.validation_noise(batch)

    def validation_noise(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's GT joints with the fixed validation noise (per scene, repeatable)."""
        gt, present = batch["joints_3d"], batch["hand_present"]
        b = gt.shape[0]
        scenes = batch.get("scene_index")
        out = []
        for i in range(b):
            scene = int(scenes[i]) if scenes is not None else i
            gen = torch.Generator().manual_seed(self.val_seed * 1_000_003 + scene)
            out.append(
                add_keypoint_noise(
                    gt[i : i + 1].cpu(),
                    present[i : i + 1].cpu(),
                    gen,
                    self.sigma_mm,
                    self.global_mm,
                )  # fmt: skip
            )
        return torch.cat(out).to(gt.device)

    @torch.no_grad()
    def validate(self, model: nn.Module, batch: dict[str, Tensor]) -> dict[str, float]:
        net = unwrap(model)
        gt, present = batch["joints_3d"], batch["hand_present"]
        noisy = self.validation_input(batch)
        detected = self._detected(batch)
        out: dict[str, float] = {}
        if detected is not None:  # the noisy GT first: K must not make it worse either
            refined = self._refine(net, batch, noisy)
            before = joint_metrics(noisy, gt, present)
            after = joint_metrics(refined, gt, present)
            out.update(noise_mpjpe_in_mm=before["mpjpe_mm"], noise_mpjpe_mm=after["mpjpe_mm"],
                       noise_mpjpe_abs_in_mm=before["mpjpe_abs_mm"],
                       noise_mpjpe_abs_mm=after["mpjpe_abs_mm"])  # fmt: skip
            noisy = self._from_detections(batch, noisy, detected)
            present = detected  # the detection metrics: over the hands the source found
        refined = self._refine(net, batch, noisy)
        before = joint_metrics(noisy, gt, present)
        after = joint_metrics(refined, gt, present)
        return {
            "mpjpe_in_mm": before["mpjpe_mm"],
            "mpjpe_mm": after["mpjpe_mm"],
            "mpjpe_abs_in_mm": before["mpjpe_abs_mm"],
            "mpjpe_abs_mm": after["mpjpe_abs_mm"],
            "loss": float(refine_loss(refined, gt, batch["hand_present"], self.abs_weight)),
            **out,
        }

    @torch.no_grad()
    def visualize(self, model: nn.Module, batch: dict[str, Tensor]) -> np.ndarray | None:
        net = unwrap(model)
        n = min(4, batch["image"].shape[0])
        sub = {k: v[:n] for k, v in batch.items() if isinstance(v, Tensor)}
        noisy = self.validation_input(sub)
        detected = self._detected(sub)
        if detected is not None:
            noisy = self._from_detections(sub, noisy, detected)
        refined = self._refine(net, sub, noisy)
        present = sub["hand_present"]
        return skeleton_sheet(
            sub["image"],
            [
                (_project(noisy, sub["K"]), present, INPUT_COLOUR),
                (sub["joints_2d"], present, GT_COLOUR),
                (_project(refined, sub["K"]), present, PRED_COLOUR),
            ],
        )
