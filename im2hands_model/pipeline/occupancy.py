"""The occupancy stages of one frame, as fields the mesher can query (SPEC §3.2, §3.3, §3.6).

* :class:`InitialField` -- I (or keypoint-only HALO) of both hands for one crop. The image encoder
  runs once when the field is made; every query then costs only the part MLPs (and the query's
  attention over the patch tokens), evaluated for points near the hand's bones and, with part
  culling, only for each point's nearest parts.
* :class:`RefinedField` -- two-hand refinement R on top of an :class:`InitialField`: anchors are
  sampled evenly on I's meshes, R's image encoder and anchor encoder run once; then R's decoder
  is split (:func:`~im2hands_model.meshing.band_refined_grid`) into its smooth part (attention
  over nearby anchors, image features), evaluated for each hand at its own points on a coarse
  band around I's surface, and its head, run at every fine band point with I's probability
  from I's meshing grid (I is never evaluated again). Called on points, it is I then R there
  (the evaluation's I+R).

Both take points ``[2, P, 3]`` in each hand's own (unmirrored) normalised space, the mesher's
coordinates (:mod:`im2hands_model.meshing`), and count evaluated points and network time.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from im2hands_model.hands import from_normalized
from im2hands_model.meshing import synchronize
from im2hands_model.networks.init_occ import EMPTY_LOGIT, EXACT, Shortcuts
from im2hands_model.networks.ref_occ import hands_center, mesh_anchors

__all__ = ["InitialField", "RefinedField"]


class InitialField:
    """I (or HALO) of both hands of one crop.

    Args:
        net: a :class:`~im2hands_model.networks.init_occ.TwoHandInitialOccupancy` (or its ONNX
            Runtime drop-in).
        image: ``[1, 3, S, S]`` crop in [0, 1] (unused by HALO).
        K: ``[1, 3, 3]`` crop intrinsics.
        joints: ``[1, 2, 21, 3]`` keypoints, camera frame.
        present: ``[1, 2]`` bool.
        shortcuts: I's inference shortcuts
            (:class:`~im2hands_model.networks.init_occ.Shortcuts`; default: none, exact).
    """

    def __init__(self, net, image: Tensor, K: Tensor, joints: Tensor, present: Tensor,
                 shortcuts: Shortcuts = EXACT) -> None:  # fmt: skip
        t0 = time.perf_counter()
        self.net, self.K, self.joints, self.present = net, K, joints, present
        self.shortcuts = shortcuts
        self.ctx = net.encode(image) if net.image_conditioning else None
        self.poses = net.poses(joints)
        self.evaluated = 0
        synchronize(joints.device)
        self.seconds = time.perf_counter() - t0

    def logits(self, points_norm: Tensor) -> Tensor:
        """Each hand's logit ``[2, P]`` at its own points ``[2, P, 3]``."""
        out = self.net.forward_normalized(
            points_norm[None], self.joints, self.K, self.ctx, self.present, self.poses,
            shortcuts=self.shortcuts,
        )  # fmt: skip
        return out[0]

    def __call__(self, points_norm: Tensor) -> Tensor:
        t0 = time.perf_counter()
        probs = torch.sigmoid(self.logits(points_norm))
        synchronize(points_norm.device)
        self.seconds += time.perf_counter() - t0
        self.evaluated += int(points_norm.shape[0] * points_norm.shape[1])
        return probs


class RefinedField:
    """I+R of both hands of one crop, as a correction of I's logits (see
    :func:`~im2hands_model.meshing.band_refined_grid`).

    Args:
        refined: a :class:`~im2hands_model.networks.ref_occ.RefinedOccupancy`
            (its ``encoder`` and ``refine`` are used; its I is ``init``'s network).
        init: the frame's :class:`InitialField` (same keypoints and crop).
        image: ``[1, 3, S, S]`` crop; init_meshes: I's meshes ``[left, right]`` in the camera
            frame (``None`` where missing), on which the anchors are sampled.
        seed: seed of the anchor sampling (fixed: the same frame gives the same meshes).
    """

    def __init__(self, refined, init: InitialField, image: Tensor, init_meshes: list,
                 seed: int = 0) -> None:  # fmt: skip
        t0 = time.perf_counter()
        self.refine, self.init = refined.refine, init
        device = init.joints.device
        anchors, has_mesh = mesh_anchors(init_meshes, self.refine.num_anchors, seed, device)
        self.present = init.present & has_mesh
        self.feats = refined.encoder(image)
        self.center = hands_center(init.joints, self.present)
        self.ctx = self.refine.encode_context(
            anchors, self.present, init.K, self.feats, self.center
        )
        self.evaluated = 0
        synchronize(device)
        self.seconds = self.encode_seconds = time.perf_counter() - t0

    def features(self, points_norm: Tensor) -> Tensor:
        """R's smooth decoder features ``[2, P, D]`` of each hand at its own points ``[2, P, 3]``
        (see ``TwoHandRefinement.decode_head``)."""
        t0 = time.perf_counter()
        poses = self.init.poses
        cam = torch.cat(
            [from_normalized(points_norm[h][None], poses[h].rot, poses[h].origin) for h in (0, 1)]
        )  # [2, P, 3]
        dummy = cam.new_zeros(1, 2, cam.shape[1])
        out = self.refine.decode(cam[None], dummy, self.ctx, self.init.K, self.feats, self.center,
                                 return_features=True)[0]  # fmt: skip
        synchronize(points_norm.device)
        self.seconds += time.perf_counter() - t0
        self.evaluated += int(cam.shape[0] * cam.shape[1])
        return out

    def head(self, features: Tensor, init_probs: Tensor) -> Tensor:
        """Refined probabilities ``[2, P]`` from :meth:`features` and I's probabilities."""
        t0 = time.perf_counter()
        logits = torch.logit(init_probs.clamp(1e-6, 1.0 - 1e-6))
        out = torch.sigmoid(self.refine.decode_head(features[None], logits[None], self.present)[0])
        synchronize(features.device)
        self.seconds += time.perf_counter() - t0
        return out

    def __call__(self, points_norm: Tensor) -> Tensor:
        """Refined probabilities ``[2, P]`` of each hand at its own points ``[2, P, 3]``: I's,
        corrected by R wherever I is not empty space (a plain occupancy function for MISE, as
        the evaluation meshes I+R)."""
        logits = self.init.logits(points_norm)
        probs = torch.sigmoid(logits)
        near = (logits > EMPTY_LOGIT).any(0).nonzero()[:, 0]
        if near.numel():
            probs[:, near] = self.head(self.features(points_norm[:, near]), probs[:, near])
        return probs
