"""Learned two-hand keypoint predictor: image crop -> 3D keypoints of both hands (SPEC §3.5).

Design (2.5D heatmaps + root depth, integral regression):

* an :class:`~im2hands_model.networks.backbone.ImageEncoder` gives a stride-4 feature map and a
  global code;
* a convolutional head gives, for each of the 2 x 21 joints (left hand first), a heatmap and a
  relative-depth map. The heatmap is turned into a probability map by a softmax over the
  pixels, and the joint's pixel position is its expectation (soft-argmax, i.e. integral
  regression, Sun et al. 2018: differentiable and sub-pixel). The joint's depth relative to
  its hand's wrist is the same expectation of the depth map (in units of 0.1 m);
* each hand's wrist depth comes from an MLP over the global code, the hand's heatmap-pooled
  features and its predicted 2D layout. It is made scale-aware with the focal length: the
  network predicts ``t`` and ``z = (f / S) * k0 * exp(t)``, where ``f`` is the mean focal
  length and ``S`` the crop width in pixels. ``k0 * exp(t)`` is the metric width of the crop
  at the hand's depth, which the network can read off the image; the factor ``f / S`` makes
  the same picture give the right depth for any crop size or camera;
* hand presence (left, right) is a logit from the global code;
* 3D joints are the back-projection ``z K^-1 (u, v, 1)`` of each joint.

Which hand is which (``free_slots``). Two hands of one skin colour, clasped or crossed, look
alike; a network that must put the left hand's wrist in heatmap 0 and the right hand's in
heatmap 21 from the first step spreads each heatmap over both hands until it has learned to
tell them apart, and the soft-argmax of such a map is the point between the hands
(docs/measurements.md). With
``free_slots`` the network's two output slots hold the two hands in whatever order it finds
easiest, the loss scores each crop under both orders and keeps the better one (as in set
prediction, Carion et al. 2020, with two elements), and a handedness logit per slot, trained on
the order the loss chose, puts the slots back in (left, right) order at the end of the forward
pass. Localisation then no longer waits for handedness; a wrong handedness call swaps the two
hands instead of collapsing both. With ``slot_order="chirality"`` the slots are ordered by the
handedness of their own predicted 3D skeletons instead
(:func:`~im2hands_model.hands.skeleton_chirality`: fingers bend toward the palm, so a skeleton
with the right relative depths is a left or a right hand by its shape). That needs no trained
head, and on our renders it was right more often than the head (docs/results_notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from im2hands_model.hands import MID_JOINT, NUM_JOINTS, skeleton_chirality
from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures

DEPTH_UNIT = 0.1  #: metres per unit of the relative-depth maps
DEFAULT_CROP_WIDTH_M = 0.3  #: k0: typical metric width of a crop at the hand's depth

#: Default loss weights (terms are in crop widths, metres and nats; see keypoint_loss).
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "w_2d": 3.0,
    "w_rel_depth": 10.0,
    "w_root_depth": 5.0,
    "w_presence": 0.2,
    "w_heatmap": 0.1,
    "w_handedness": 0.2,
    "heatmap_sigma": 1.0,
}
HEATMAP_SIGMA = 1.0  #: default standard deviation of the heatmap targets, feature cells


@dataclass
class KeypointPrediction:
    """Output of :class:`KeypointPredictor` (hands: 0 = left, 1 = right).

    Attributes:
        joints: ``[B, 2, 21, 3]`` camera frame, metres.
        joints_2d: ``[B, 2, 21, 2]`` crop pixels (soft-argmax of the heatmaps).
        presence_logit: ``[B, 2]``; ``sigmoid > 0.5`` means the hand is present.
        handedness_logit: ``[B, 2]`` logit that the slot holds a right hand (``free_slots``
            networks; ``None`` otherwise). Slots are already ordered by it.
        rel_depth: ``[B, 2, 21]`` depth of each joint minus its wrist's, metres (wrist = 0).
        root_depth: ``[B, 2]`` wrist depth, metres.
        heatmap_logp: ``[B, 2, 21, h, w]`` per-joint log-probability maps, stride 4.
        features: the encoder's output.
        image_size: ``(H, W)`` of the input crop in pixels.
    """

    joints: Tensor
    joints_2d: Tensor
    presence_logit: Tensor
    rel_depth: Tensor
    root_depth: Tensor
    heatmap_logp: Tensor
    features: ImageFeatures
    image_size: tuple[int, int]
    handedness_logit: Tensor | None = None

    @property
    def heatmaps(self) -> Tensor:
        """``[B, 2, 21, h, w]`` per-joint probability maps (each sums to 1)."""
        return self.heatmap_logp.exp()

    def present(self, threshold: float = 0.5) -> Tensor:
        """``[B, 2]`` bool: hands whose presence probability exceeds ``threshold``."""
        return torch.sigmoid(self.presence_logit) > threshold


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.GroupNorm(groups, cout), nn.ReLU(inplace=True)
    )


def backproject(uv: Tensor, depth: Tensor, K: Tensor) -> Tensor:
    """Pixel coordinates and depths to camera-frame points.

    Args:
        uv: ``[B, ..., 2]`` pixels.
        depth: ``[B, ...]`` metres (camera z).
        K: ``[B, 3, 3]``.

    Returns:
        ``[B, ..., 3]`` points with ``K p ~ (u, v, 1)`` and ``p_z = depth``.
    """
    b = uv.shape[0]
    hom = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1).reshape(b, -1, 3)
    rays = hom @ torch.linalg.inv(K.to(hom.dtype)).transpose(1, 2)  # [B, N, 3]
    rays = rays / rays[..., 2:3]
    return (rays.reshape(*uv.shape[:-1], 3)) * depth[..., None]


class KeypointPredictor(nn.Module):
    """Image crop + intrinsics -> two-hand 3D keypoints (see the module docstring).

    Args:
        encoder: keyword arguments of :class:`ImageEncoder` (depth, base_width, feature_dim,
            global_dim, norm).
        head_dim: channels of the heatmap head and width of the root/presence MLPs.
        crop_width_m: ``k0``, the prior metric crop width at the hand's depth (metres).
        input_size: if set, crops are resized (bilinear, antialiased) to this width before the
            encoder, e.g. 128 for 256-pixel crops: 4x less encoder work. Outputs stay in the
            input crop's pixels and camera; the features' ``stride`` is in input pixels too.
        free_slots: learn which slot holds which hand (see the module docstring); outputs are
            returned in (left, right) order either way.
        slot_order: how a ``free_slots`` network puts its slots in (left, right) order:
            ``"head"`` (its handedness head) or ``"chirality"`` (the shape of each slot's
            predicted skeleton; the head is still trained and reported).
    """

    SLOT_ORDERS = ("head", "chirality")

    @classmethod
    def from_config(cls, model_cfg: dict) -> KeypointPredictor:
        """The predictor from a run config's ``model`` section (missing keys: defaults)."""
        return cls(
            encoder=dict(model_cfg.get("encoder", {})),
            head_dim=int(model_cfg.get("head_dim", 64)),
            crop_width_m=float(model_cfg.get("crop_width_m", 0.3)),
            input_size=model_cfg.get("input_size"),
            free_slots=bool(model_cfg.get("free_slots", False)),
            slot_order=str(model_cfg.get("slot_order", "head")),
        )

    def __init__(
        self,
        encoder: dict | None = None,
        head_dim: int = 64,
        crop_width_m: float = DEFAULT_CROP_WIDTH_M,
        input_size: int | None = None,
        free_slots: bool = False,
        slot_order: str = "head",
    ) -> None:
        super().__init__()
        if input_size is not None and input_size < 16:
            raise ValueError(f"input_size must be >= 16 pixels or None, got {input_size}")
        if slot_order not in self.SLOT_ORDERS:
            raise ValueError(f"slot_order must be one of {self.SLOT_ORDERS}, got {slot_order!r}")
        if slot_order != "head" and not free_slots:
            raise ValueError("slot_order applies to free_slots networks only (free_slots=True)")
        self.slot_order = slot_order
        self.input_size = input_size
        self.encoder = ImageEncoder(**(encoder or {}))
        c, g = self.encoder.feature_dim, self.encoder.global_dim
        self.n = 2 * NUM_JOINTS
        self.head = nn.Sequential(_conv_block(c, head_dim), _conv_block(head_dim, head_dim))
        self.heatmap = nn.Conv2d(head_dim, self.n, 1)
        self.depth = nn.Conv2d(head_dim, self.n, 1)
        nn.init.zeros_(self.depth.weight)
        nn.init.zeros_(self.depth.bias)
        # Root depth per hand: global code + the hand's heatmap-pooled head features + its 2D
        # layout (joints relative to their centroid, in crop widths) and relative depths.
        root_in = g + head_dim + NUM_JOINTS * 3
        self.root_mlp = nn.Sequential(
            nn.Linear(root_in, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, 1)
        )
        nn.init.zeros_(self.root_mlp[-1].weight)
        nn.init.zeros_(self.root_mlp[-1].bias)
        self.hand_embed = nn.Parameter(torch.zeros(2, root_in))
        # handedness of each slot from what the slot sees (no slot embedding: symmetric)
        self.handedness = (
            nn.Sequential(
                nn.Linear(root_in, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, 1)
            )
            if free_slots
            else None
        )
        self.presence = nn.Sequential(
            nn.Linear(g, head_dim), nn.ReLU(inplace=True), nn.Linear(head_dim, 2)
        )
        self.register_buffer("crop_width_m", torch.tensor(float(crop_width_m)))

    def _geometry(
        self,
        logits: Tensor,
        dmap: Tensor,
        x: Tensor,
        gcode: Tensor,
        K: Tensor,
        stride: int,
        W: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """Soft-argmax, relative depths, root depth, back-projection and (``free_slots``)
        handedness logits (float32)."""
        b, _, h, w = x.shape
        logp = torch.log_softmax(logits.flatten(2), dim=-1)  # [B, 42, h*w]
        prob = logp.exp()
        ys = (torch.arange(h, device=x.device, dtype=prob.dtype) + 0.5) * stride
        xs = (torch.arange(w, device=x.device, dtype=prob.dtype) + 0.5) * stride
        grid_u = xs.repeat(h)  # [h*w] pixel centre u of each cell (row-major)
        grid_v = ys.repeat_interleave(w)
        uv = torch.stack([prob @ grid_u, prob @ grid_v], dim=-1)  # [B, 42, 2]
        rel = (prob * dmap.flatten(2)).sum(-1).view(b, 2, NUM_JOINTS) * DEPTH_UNIT
        rel = rel - rel[..., :1]  # relative to the wrist
        uv = uv.view(b, 2, NUM_JOINTS, 2)

        # Root depth from the global code, the hand's heatmap-pooled features and its layout.
        pooled = torch.einsum("bjn,bdn->bjd", prob, x.flatten(2))  # [B, 42, D]
        pooled = pooled.view(b, 2, NUM_JOINTS, -1).mean(dim=2)  # [B, 2, D]
        layout = uv.detach() / W
        layout = layout - layout.mean(dim=2, keepdim=True)
        geom = torch.cat([layout.flatten(2), rel.detach() / DEPTH_UNIT], dim=-1)  # [B, 2, 63]
        root_in = torch.cat([gcode[:, None].expand(b, 2, -1), pooled, geom], dim=-1)
        t = self.root_mlp(root_in + self.hand_embed)[..., 0].clamp(-5.0, 5.0)  # [B, 2]
        focal = 0.5 * (K[:, 0, 0] + K[:, 1, 1])
        root = (focal / W)[:, None] * self.crop_width_m * torch.exp(t)

        joints = backproject(uv, root[..., None] + rel, K)
        hand = self.handedness(root_in)[..., 0] if self.handedness is not None else None
        return logp.view(b, 2, NUM_JOINTS, h, w), uv, rel, root, joints, hand

    def forward(self, image: Tensor, K: Tensor) -> KeypointPrediction:
        """Predict keypoints.

        Args:
            image: ``[B, 3, H, W]`` RGB crop in ``[0, 1]``.
            K: ``[B, 3, 3]`` intrinsics of the crop.

        Returns:
            :class:`KeypointPrediction`.
        """
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        b, _, H, W = image.shape
        if K.shape != (b, 3, 3):
            raise ValueError(f"K must be [{b}, 3, 3], got {tuple(K.shape)}")
        if b == 0:
            raise ValueError("empty batch")
        if self.input_size is not None and W != self.input_size:
            h_in = max(1, round(int(H) * self.input_size / int(W)))  # int: plain sizes in traces
            small = F.interpolate(image, size=(h_in, self.input_size), mode="bilinear",
                                  align_corners=False, antialias=True)  # fmt: skip
            feats = self.encoder(small)
            # a pure scale between the two pixel grids (pixel i covers [i, i+1) in both)
            feats = replace(feats, stride=feats.stride * W / self.input_size)
        else:
            feats = self.encoder(image)
        stride = feats.stride
        x = self.head(feats.fmap)  # [B, D, h, w]
        logits = self.heatmap(x)
        dmap = self.depth(x)
        # Geometry in float32 even under mixed precision: bf16 back-projection would cost mm.
        with torch.autocast(device_type=image.device.type, enabled=False):
            logp, uv, rel, root, joints, hand = self._geometry(
                logits.float(), dmap.float(), x.float(), feats.global_code.float(), K.float(),
                stride, W,
            )  # fmt: skip
            presence = self.presence(feats.global_code.float())
        slotted = [joints, uv, presence, rel, root, logp]
        if hand is not None:
            # (left, right) order: swap where slot 0 looks more like a right hand than slot 1
            if self.slot_order == "chirality":
                chir = skeleton_chirality(joints)
                swap = chir[:, 0] > chir[:, 1]
            else:
                swap = hand[:, 0] > hand[:, 1]
            slotted = [_swap_hands(t, swap) for t in [*slotted, hand]]
            hand = slotted.pop()
        joints, uv, presence, rel, root, logp = slotted
        return KeypointPrediction(
            joints=joints,
            joints_2d=uv,
            presence_logit=presence,
            rel_depth=rel,
            root_depth=root,
            heatmap_logp=logp,
            features=feats,
            image_size=(H, W),
            handedness_logit=hand,
        )


def _swap_hands(t: Tensor, swap: Tensor) -> Tensor:
    """``t`` ``[B, 2, ...]`` with its two hands exchanged where ``swap`` ``[B]`` is true."""
    m = swap.view(-1, *([1] * (t.dim() - 1)))
    return torch.where(m, t[:, [1, 0]], t)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` ``[B, 2, ...]`` over the hands selected by ``mask`` ``[B, 2]`` (0 if none)."""
    m = mask.reshape(*mask.shape, *([1] * (x.dim() - mask.dim()))).expand_as(x)
    x = torch.where(m, x, torch.zeros_like(x))
    return x.sum() / m.sum().clamp_min(1)


def _heatmap_kl(
    pred: KeypointPrediction, gt2: Tensor, present: Tensor, sigma: float = HEATMAP_SIGMA
) -> tuple[Tensor, Tensor]:
    """KL(target || heatmap) per GT joint ``[B, 2, 21]`` and its mask (joints of present hands
    inside the crop)."""
    logp = pred.heatmap_logp  # [B, 2, 21, h, w]
    h, w = logp.shape[-2:]
    stride = pred.features.stride
    f = gt2 / stride  # feature coordinates, cell j covers [j, j+1)
    inside = (f[..., 0] >= 0) & (f[..., 0] <= w) & (f[..., 1] >= 0) & (f[..., 1] <= h)
    cu = torch.arange(w, device=logp.device, dtype=logp.dtype) + 0.5
    cv = torch.arange(h, device=logp.device, dtype=logp.dtype) + 0.5
    du = (cu - f[..., 0:1]) ** 2  # [B, 2, 21, w]
    dv = (cv - f[..., 1:2]) ** 2  # [B, 2, 21, h]
    tlog = -(dv[..., :, None] + du[..., None, :]) / (2 * sigma**2)
    tlog = torch.log_softmax(tlog.flatten(-2), dim=-1)
    kl = (tlog.exp() * (tlog - logp.flatten(-2))).sum(-1)  # [B, 2, 21]
    mask = present[..., None] & inside
    return torch.where(mask, kl, torch.zeros_like(kl)), mask


def joint_error_mm(pred: Tensor, gt: Tensor, align_joint: int | None = MID_JOINT) -> Tensor:
    """Per-joint Euclidean error ``[..., 21]`` in mm, after aligning each hand at a joint.

    ``align_joint=None`` compares camera-frame positions directly.
    """
    if align_joint is not None:
        pred = pred - pred[..., align_joint : align_joint + 1, :]
        gt = gt - gt[..., align_joint : align_joint + 1, :]
    return (pred - gt).norm(dim=-1) * 1000.0


def keypoint_loss(
    pred: KeypointPrediction,
    batch: dict[str, Tensor],
    weights: dict[str, float] | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Training loss of :class:`KeypointPredictor`.

    Terms (joint terms over the present hands only):

    * ``loss_2d``: L1 of the 2D joints, divided by the crop width;
    * ``loss_rel_depth``: L1 of the wrist-relative depths, metres;
    * ``loss_root_depth``: L1 of the wrist depth, metres;
    * ``loss_presence``: binary cross-entropy of the presence logits (all hands);
    * ``loss_heatmap``: KL divergence from a Gaussian target (``heatmap_sigma`` cells) around
      each GT joint inside the crop to the predicted heatmap. The integral (soft-argmax) loss
      alone gives weak gradients while the heatmaps are still diffuse; this term makes them
      peak at the right place from the first steps;
    * ``loss_handedness`` (``free_slots`` predictions only): binary cross-entropy of the
      handedness logits of the present hands. The ground truth is scored against the output
      slots in both orders, per crop, and the order with the lower sum of the terms above is
      used for every term (see the module docstring); its handedness is the target.

    Args:
        pred: the prediction for ``batch``.
        batch: needs ``joints_3d [B, 2, 21, 3]``, ``joints_2d [B, 2, 21, 2]``,
            ``hand_present [B, 2]``.
        weights: overrides of :data:`DEFAULT_LOSS_WEIGHTS`.

    Returns:
        ``(loss, terms)``; ``terms`` also has ``mpjpe_mm`` (aligned at joint 9) and
        ``mpjpe_abs_mm`` (camera frame) for logging, and for ``free_slots`` predictions
        ``handedness_acc`` (present hands whose slot order was right) and ``swapped`` (share of
        crops whose better order was the swapped one).
    """
    w = {**DEFAULT_LOSS_WEIGHTS, **(weights or {})}
    unknown = set(w) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise KeyError(f"unknown keypoint loss weights {sorted(unknown)}")
    present = batch["hand_present"].bool()
    gt3 = batch["joints_3d"].float()
    gt2 = batch["joints_2d"].float()
    present = (
        present & torch.isfinite(gt3).flatten(2).all(-1) & torch.isfinite(gt2).flatten(2).all(-1)
    )
    gt3 = torch.where(present[..., None, None], gt3, torch.zeros_like(gt3))
    gt2 = torch.where(present[..., None, None], gt2, torch.zeros_like(gt2))
    width = float(pred.image_size[1])
    pres_target = batch["hand_present"].float()

    def per_hand(gt3: Tensor, gt2: Tensor, present: Tensor, pres_target: Tensor) -> dict:
        """Each term per hand ``[B, 2]`` (joint means; zero for absent hands)."""
        kl, kl_mask = _heatmap_kl(pred, gt2, present, float(w["heatmap_sigma"]))
        gt_rel = gt3[..., 2] - gt3[..., :1, 2]
        t = {
            "2d": ((pred.joints_2d - gt2).abs() / width).mean((-1, -2)),
            "rel_depth": (pred.rel_depth - gt_rel).abs().mean(-1),
            "root_depth": (pred.root_depth - gt3[..., 0, 2]).abs(),
            "heatmap": kl.sum(-1) / kl_mask.sum(-1).clamp_min(1),
        }
        t = {k: torch.where(present, v, torch.zeros_like(v)) for k, v in t.items()}
        t["presence"] = F.binary_cross_entropy_with_logits(
            pred.presence_logit, pres_target, reduction="none"
        )
        return t

    def total(t: dict, hands: Tensor) -> Tensor:
        """Weighted sum per crop ``[B]``, joint terms averaged over the present ``hands``."""
        joint = sum(w[f"w_{k}"] * t[k] for k in ("2d", "rel_depth", "root_depth", "heatmap"))
        presence = w["w_presence"] * t["presence"].mean(-1)
        return joint.sum(-1) / hands.sum(-1).clamp_min(1) + presence

    terms = per_hand(gt3, gt2, present, pres_target)
    swapped = torch.zeros(present.shape[0], dtype=torch.bool, device=present.device)
    if pred.handedness_logit is not None:
        flip = [1, 0]
        other = per_hand(gt3[:, flip], gt2[:, flip], present[:, flip], pres_target[:, flip])
        with torch.no_grad():
            swapped = total(other, present) < total(terms, present)
        terms = {k: torch.where(swapped[:, None], other[k], v) for k, v in terms.items()}
        gt3, present = _swap_hands(gt3, swapped), _swap_hands(present, swapped)
    hands = present.sum().clamp_min(1)
    l2d, lrel, lroot, lheat = (
        terms[k].sum() / hands for k in ("2d", "rel_depth", "root_depth", "heatmap")
    )
    lpres = terms["presence"].mean()
    loss = (
        w["w_2d"] * l2d
        + w["w_rel_depth"] * lrel
        + w["w_root_depth"] * lroot
        + w["w_presence"] * lpres
        + w["w_heatmap"] * lheat
    )
    extra: dict[str, float] = {}
    if pred.handedness_logit is not None:
        # slot 0 holds the right hand where the better order was the swapped one
        right = torch.stack([swapped, ~swapped], dim=1).float()
        bce = F.binary_cross_entropy_with_logits(pred.handedness_logit, right, reduction="none")
        lhand = _masked_mean(bce, present)
        loss = loss + w["w_handedness"] * lhand
        extra = {
            "loss_handedness": float(lhand.detach()),
            "handedness_acc": float(
                _masked_mean((~swapped[:, None]).expand_as(present).float(), present)
            ),
            "swapped": float(swapped.float().mean()),
        }
    with torch.no_grad():
        mpjpe = _masked_mean(joint_error_mm(pred.joints, gt3), present)
        mpjpe_abs = _masked_mean(joint_error_mm(pred.joints, gt3, None), present)
    out = {
        "loss_2d": float(l2d.detach()),
        "loss_rel_depth": float(lrel.detach()),
        "loss_root_depth": float(lroot.detach()),
        "loss_presence": float(lpres.detach()),
        "loss_heatmap": float(lheat.detach()),
        "l1_px": float(l2d.detach()) * width,
        "mpjpe_mm": float(mpjpe),
        "mpjpe_abs_mm": float(mpjpe_abs),
        **extra,
    }
    return loss, out


__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "DEPTH_UNIT",
    "KeypointPrediction",
    "KeypointPredictor",
    "backproject",
    "joint_error_mm",
    "keypoint_loss",
]
