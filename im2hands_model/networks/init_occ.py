"""Initial occupancy **I** (SPEC §3.2): HALO's part occupancy plus Im2Hands' query-image attention.

One hand (:class:`InitialOccupancy`):

* the hand is canonicalised from its keypoints (:mod:`im2hands_model.canonical`): 16 part transforms
  ``T_b`` and part lengths;
* a **shape code** (MLP 16->40->16 of the 16 lengths) and a **pose code** (Linear 48->8 of the
  transforms' translations) condition every part;
* each part ``b`` has its own MLP on ``[T_b x (3), length_b (1), shape (16), pose (8)]`` with widths
  ``28 -> H -> H -> (H + img) -> H -> 1`` (H = 64), LeakyReLU(0.1), residual hidden layers. All 16
  part MLPs run as one batched matmul (weights stacked ``[16, in, out]``);
* occupancy = ``max_b sigmoid(logit_b)`` = ``sigmoid(max_b logit_b)``, or a soft maximum
  (temperature-scaled log-sum-exp) when ``soft_max_temperature`` is set;
* with image conditioning, a ~19-d feature per query enters the third layer. It comes from
  :class:`QueryImageAttention`: the query (its crop position and depth relative to the wrist)
  attends over itself and the image's patch tokens. Without it the network is exactly HALO
  ("keypoint-only mode", the ablation baseline and the fallback far from the training domain).

Two hands (:class:`TwoHandInitialOccupancy`): one shared image encoder, separate weights per hand;
left hands are mirrored into right hands before their network and back after (by construction of
the normalised space, see :mod:`im2hands_model.canonical`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from im2hands_model.canonical import NUM_PARTS, PART_BONES, HandPose, canonicalize
from im2hands_model.hands import (
    FINGER_JOINTS,
    NORM_SCALE,
    from_normalized,
    mirror_normalized,
    to_normalized,
)
from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures, PatchTokenizer

# Bones behind :func:`part_distances`: the five root bones (palm), then the 15 part bones.
_BONES = tuple((0, f[0]) for f in FINGER_JOINTS) + PART_BONES
_BONE_PARENTS = [p for p, _ in _BONES]
_BONE_CHILDREN = [c for _, c in _BONES]

#: Initial capsule radii of the parts (metres): palm, then thumb to pinky, proximal to distal.
CAPSULE_RADIUS_M = (0.014,) + (0.011, 0.010, 0.009) + (0.009, 0.008, 0.0075) * 4

#: Logit given to every point of a hand that is absent or has invalid keypoints (occupancy ~ 0).
EMPTY_LOGIT = -20.0


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


#: Points farther than this from every bone of a hand are empty for it (not run through I at
#: inference, :attr:`Shortcuts.skip_distance`): hand surfaces lie within ~3 cm of their bones,
#: and most of a meshing grid is far from the hand.
SKIP_DISTANCE_M = 0.045


@dataclass(frozen=True)
class Shortcuts:
    """Inference shortcuts of I, passed to each call (never stored on the network, so pipelines
    with different settings can share one network).

    Attributes:
        skip_distance: points farther than this (metres) from every bone of a hand get
            :data:`EMPTY_LOGIT` without running the network (``None``: every point runs).
        cull_parts: each point's logit is the maximum over its ``cull_parts`` nearest parts only
            (``None``: all 16); applies to the points that run.
    """

    skip_distance: float | None = None
    cull_parts: int | None = None


#: No shortcut: every part MLP at every point (training, the paper's reference protocol).
EXACT = Shortcuts()


class HandKernel(Protocol):
    """One hand's occupancy network on the points of one scene: what a backend swaps.

    ``(hand, points [1, n, 3] (mirrored if left), pose (one scene), query_pos [1, n, 3] or None,
    tokens [1, T, D] or None, part distances [1, 16, n], cull_parts) -> logits [1, n]``.
    """

    def __call__(self, hand: int, points: Tensor, pose: HandPose, query_pos: Tensor | None,
                 tokens: Tensor | None, dist: Tensor, cull_parts: int | None,
                 ) -> Tensor: ...  # fmt: skip


class PartLinear(nn.Module):
    """``P`` independent linear layers applied as one batched matmul.

    ``x [B, P, N, in] -> [B, P, N, out]`` with weight ``[P, in, out]`` and bias ``[P, out]``.
    """

    def __init__(self, parts: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = _uniform((parts, in_features, out_features), in_features)
        self.bias = _uniform((parts, out_features), in_features)

    def forward(self, x: Tensor) -> Tensor:
        return torch.matmul(x, self.weight) + self.bias[:, None, :]


class QueryImageAttention(nn.Module):
    """Per-query image feature: the query token attends over ``[query; patch tokens]``.

    Args:
        token_dim: width of the patch tokens and of the attention.
        out_dim: size of the feature handed to the part MLPs (~19 in the paper).
        heads: attention heads (2 in the paper).
    """

    def __init__(self, token_dim: int = 32, out_dim: int = 19, heads: int = 2) -> None:
        super().__init__()
        if token_dim % heads:
            raise ValueError(f"token_dim {token_dim} is not divisible by heads {heads}")
        self.heads = heads
        self.embed = nn.Sequential(
            nn.Linear(3, token_dim), nn.LeakyReLU(0.1), nn.Linear(token_dim, token_dim)
        )
        self.q = nn.Linear(token_dim, token_dim)
        self.kv = nn.Linear(token_dim, 2 * token_dim)
        self.out = nn.Linear(token_dim, out_dim)

    def forward(self, query_pos: Tensor, tokens: Tensor) -> Tensor:
        """Feature ``[B, N, out_dim]`` of queries attending over image tokens.

        Args:
            query_pos: ``[B, N, 3]`` crop position (u, v in [-1, 1]) and depth to the wrist / 0.4.
            tokens: ``[B, T, D]`` patch tokens.
        """
        b, n, _ = query_pos.shape
        h = self.heads
        qt = self.embed(query_pos)  # [B, N, D]
        d = qt.shape[-1] // h
        q = self.q(qt).view(b, n, h, d)
        k_self, v_self = self.kv(qt).view(b, n, 2, h, d).unbind(2)  # [B, N, h, d]
        k_img, v_img = self.kv(tokens).view(b, tokens.shape[1], 2, h, d).unbind(2)  # [B, T, h, d]
        scale = 1.0 / math.sqrt(d)
        s_self = (q * k_self).sum(-1, keepdim=True) * scale  # [B, N, h, 1]
        s_img = torch.einsum("bnhd,bthd->bnht", q, k_img) * scale  # [B, N, h, T]
        w = torch.softmax(torch.cat([s_self, s_img], -1), dim=-1)
        mixed = w[..., :1] * v_self + torch.einsum("bnht,bthd->bnhd", w[..., 1:], v_img)
        return self.out(mixed.reshape(b, n, h * d))


class InitialOccupancy(nn.Module):
    """HALO occupancy of one (right or mirrored-left) hand, optionally image-conditioned.

    Args:
        hidden: width H of the part MLPs (64 in the paper).
        img_dim: size of the injected image feature (0: plain HALO).
        soft_max_temperature: ``None`` for the hard max over parts; else ``t * logsumexp(l / t)``.
        capsule_prior: add to each part's logit ``s (r_b - d_b(x))``, a capsule around its bone
            (``d_b`` from :func:`part_distances`; learnable radii ``r_b`` and sharpness ``s``),
            and start the MLPs at zero output, so training begins from a plausible hand instead of
            noise. The MLPs learn the residual shape. Off: exactly HALO's part networks.
    """

    def __init__(
        self,
        hidden: int = 64,
        img_dim: int = 0,
        soft_max_temperature: float | None = None,
        capsule_prior: bool = False,
    ) -> None:
        super().__init__()
        self.hidden, self.img_dim = hidden, img_dim
        self.soft_max_temperature = soft_max_temperature
        self.shape_mlp = nn.Sequential(
            nn.Linear(NUM_PARTS, 40), nn.LeakyReLU(0.1), nn.Linear(40, 16)
        )
        self.pose_code = nn.Linear(3 * NUM_PARTS, 8)
        code_dim = 1 + 16 + 8
        # Layer 0 is split into the point part (3 inputs) and the per-hand code part (25 inputs) so
        # that the code is multiplied once per hand and part, not once per point.
        fan0 = 3 + code_dim
        self.w0_point = _uniform((NUM_PARTS, 3, hidden), fan0)
        self.w0_code = _uniform((NUM_PARTS, code_dim, hidden), fan0)
        self.b0 = _uniform((NUM_PARTS, hidden), fan0)
        self.l1 = PartLinear(NUM_PARTS, hidden, hidden)
        self.l2 = PartLinear(NUM_PARTS, hidden, hidden)
        self.l2_img = _uniform((NUM_PARTS, img_dim, hidden), hidden + img_dim) if img_dim else None
        self.l3 = PartLinear(NUM_PARTS, hidden, hidden)
        self.l4 = PartLinear(NUM_PARTS, hidden, 1)
        self.act = nn.LeakyReLU(0.1)
        self.capsule_prior = capsule_prior
        if capsule_prior:
            radius = torch.tensor(CAPSULE_RADIUS_M) / NORM_SCALE
            self.capsule_radius = nn.Parameter(radius)
            # logit slope: 1 per 2 mm (normalised units: 0.005)
            self.capsule_log_sharpness = nn.Parameter(torch.tensor(math.log(1.0 / 0.005)))
            nn.init.zeros_(self.l4.weight)
            nn.init.zeros_(self.l4.bias)

    def _check_img(self, img: Tensor | None) -> None:
        if (img is None) != (self.img_dim == 0):
            raise ValueError(
                "this network was built with img_dim="
                f"{self.img_dim}; got {'no' if img is None else 'an'} image feature"
            )

    def _first_layer(self, pose: HandPose) -> tuple[Tensor, Tensor]:
        """Per-hand layer-0 weights ``[B, 16, 3, H]`` and biases ``[B, 16, H]``.

        ``T_b x = R_b x + t_b``, so ``(T_b x) W = x (R_b^T W) + t_b W``: the part transform and the
        per-hand code (length, shape, pose) are folded into layer 0 once per hand and part.
        """
        shape = self.shape_mlp(pose.lengths)  # [B, 16]
        posec = self.pose_code(pose.transforms[:, :, :3, 3].flatten(1))  # [B, 8]
        code = torch.cat(
            [
                pose.lengths[..., None],
                shape[:, None].expand(-1, NUM_PARTS, -1),
                posec[:, None].expand(-1, NUM_PARTS, -1),
            ],
            -1,
        )  # [B, 16, 25]
        rot = pose.transforms[:, :, :3, :3]
        trans = pose.transforms[:, :, :3, 3]
        w_point = torch.einsum("bpji,pjh->bpih", rot, self.w0_point)  # [B, 16, 3, H]
        bias = torch.einsum("bpj,pjh->bph", trans, self.w0_point)
        bias = bias + torch.einsum("bpc,pch->bph", code, self.w0_code) + self.b0
        return w_point, bias

    def _hidden_layers(
        self, h: Tensor, img_term: Tensor | None, linear: Callable[[PartLinear, Tensor], Tensor]
    ) -> Tensor:
        """Layers 1-4 on layer 0's pre-activation ``h``: the part logits (last dim dropped).

        ``linear(layer, x)`` applies a :class:`PartLinear` -- all parts batched, or one part's
        weights (:meth:`nearest_parts_logits`); ``img_term`` is the image feature's share of
        layer 2.
        """
        h = self.act(h)
        h = h + self.act(linear(self.l1, h))
        pre = linear(self.l2, h)
        if img_term is not None:
            pre = pre + img_term
        h = h + self.act(pre)
        h = h + self.act(linear(self.l3, h))
        return linear(self.l4, h)[..., 0]

    def part_logits(
        self, points_norm: Tensor, pose: HandPose, img: Tensor | None, dist: Tensor | None = None
    ) -> Tensor:
        """Per-part logits ``[B, 16, N]`` for normalised points ``[B, N, 3]`` (mirrored if left).

        ``dist``: the points' :func:`part_distances` when the caller has them already.
        """
        self._check_img(img)
        w_point, bias = self._first_layer(pose)
        h = torch.einsum("bni,bpih->bpnh", points_norm, w_point) + bias[:, :, None, :]
        img_term = None
        if self.l2_img is not None:
            img_term = torch.einsum("bni,pih->bpnh", img, self.l2_img)
        out = self._hidden_layers(h, img_term, lambda layer, x: layer(x))
        if self.capsule_prior:
            if dist is None:
                dist = part_distances(points_norm, pose.joints_norm)  # [B, 16, N]
            sharp = self.capsule_log_sharpness.exp()
            out = out + sharp * (self.capsule_radius[:, None] - dist)
        return out

    def nearest_parts_logits(
        self,
        points_norm: Tensor,
        pose: HandPose,
        img: Tensor | None,
        parts: int,
        dist: Tensor | None = None,
    ) -> Tensor:
        """Hand logits ``[B, N]`` from each point's ``parts`` nearest parts only (inference).

        The same network as :meth:`forward` with the maximum taken over the ``parts`` parts whose
        bones are nearest to each point instead of all 16: far parts hardly ever hold the
        maximum (their capsule prior is far below zero there, and the part-assignment loss
        trains every part to be empty away from its bone), and skipping them makes meshing
        several times cheaper. ``parts >= 16`` is exactly :meth:`forward` (hard maximum only).
        ``dist``: the points' :func:`part_distances` when the caller has them already.
        """
        self._check_img(img)
        if dist is None:
            dist = part_distances(points_norm, pose.joints_norm)  # [B, 16, N]
        if parts >= NUM_PARTS or self.soft_max_temperature:
            return self.reduce_parts(self.part_logits(points_norm, pose, img, dist))
        b, n, _ = points_norm.shape
        chosen = dist.topk(parts, dim=1, largest=False).indices  # [B, k, N]
        w_point, bias = self._first_layer(pose)
        out = points_norm.new_full((b, n), float("-inf"))
        sharp = self.capsule_log_sharpness.exp() if self.capsule_prior else None
        for i in range(b):
            part_of = chosen[i].reshape(-1)  # pair j: part part_of[j] at point j % n
            point_of = torch.arange(n, device=points_norm.device).repeat(parts)
            order = torch.argsort(part_of, stable=True)
            part_of, point_of = part_of[order], point_of[order]
            counts = torch.bincount(part_of, minlength=NUM_PARTS).tolist()
            logits = points_norm.new_empty(len(part_of))
            start = 0
            for p, count in enumerate(counts):
                if count == 0:
                    continue
                rows = point_of[start : start + count]
                h = points_norm[i, rows] @ w_point[i, p] + bias[i, p]
                img_term = None if self.l2_img is None else img[i, rows] @ self.l2_img[p]
                val = self._hidden_layers(
                    h, img_term, lambda layer, x, p=p: x @ layer.weight[p] + layer.bias[p]
                )
                if sharp is not None:
                    val = val + sharp * (self.capsule_radius[p] - dist[i, p, rows])
                logits[start : start + count] = val
                start += count
            out[i].scatter_reduce_(0, point_of, logits, reduce="amax")
        return out

    def forward(self, points_norm: Tensor, pose: HandPose, img: Tensor | None = None) -> Tensor:
        """Occupancy logits ``[B, N]`` (probability: sigmoid) at normalised points ``[B, N, 3]``."""
        return self.reduce_parts(self.part_logits(points_norm, pose, img))

    def reduce_parts(self, parts: Tensor) -> Tensor:
        """Part logits ``[B, 16, N]`` -> hand logits ``[B, N]`` (max, or soft max)."""
        if self.soft_max_temperature:
            t = self.soft_max_temperature
            return t * torch.logsumexp(parts / t, dim=1)
        return parts.max(dim=1).values


@dataclass
class ImageContext:
    """What I keeps from one image: encoder features and patch tokens ``[B, T, D]``."""

    feats: ImageFeatures
    tokens: Tensor
    image_size: tuple[int, int]  # (height, width) of the crop in pixels


class TwoHandInitialOccupancy(nn.Module):
    """I for both hands: shared image encoder, one :class:`InitialOccupancy` per hand.

    Args:
        image_conditioning: ``False`` gives plain HALO (keypoint-only mode, no image encoder).
        hidden: part-MLP width.
        img_dim: injected image feature size.
        token_dim: patch-token / attention width.
        encoder: keyword arguments of :class:`~im2hands_model.networks.backbone.ImageEncoder`.
        soft_max_temperature, capsule_prior: see :class:`InitialOccupancy`.
    """

    @classmethod
    def from_config(cls, model_cfg: dict) -> TwoHandInitialOccupancy:
        """I from a run config's ``model`` section (missing keys: defaults)."""
        return cls(
            image_conditioning=bool(model_cfg.get("image_conditioning", True)),
            hidden=int(model_cfg.get("hidden", 64)),
            img_dim=int(model_cfg.get("img_dim", 19)),
            token_dim=int(model_cfg.get("token_dim", 32)),
            encoder=dict(model_cfg.get("encoder", {})),
            soft_max_temperature=model_cfg.get("soft_max_temperature"),
            capsule_prior=bool(model_cfg.get("capsule_prior", False)),
        )

    def __init__(
        self,
        image_conditioning: bool = True,
        hidden: int = 64,
        img_dim: int = 19,
        token_dim: int = 32,
        encoder: dict | None = None,
        soft_max_temperature: float | None = None,
        capsule_prior: bool = False,
    ) -> None:
        super().__init__()
        self.image_conditioning = image_conditioning
        if image_conditioning:
            self.encoder = ImageEncoder(**(encoder or {}))
            feature_dim = self.encoder.feature_dim
            self.tokenizer = PatchTokenizer(feature_dim, token_dim)
            self.attention = nn.ModuleList(
                [QueryImageAttention(token_dim, img_dim) for _ in range(2)]
            )
        else:
            self.encoder, self.tokenizer, self.attention = None, None, None
            img_dim = 0
        self.hands = nn.ModuleList(
            [
                InitialOccupancy(hidden, img_dim, soft_max_temperature, capsule_prior)
                for _ in range(2)
            ]
        )

    def encode(self, image: Tensor | None) -> ImageContext | None:
        """Image ``[B, 3, H, W]`` in [0, 1] -> the context the queries attend to (None for HALO)."""
        if not self.image_conditioning:
            return None
        if image is None:
            raise ValueError("this I is image-conditioned: pass the image crop")
        feats = self.encoder(image)
        return ImageContext(feats, self.tokenizer(feats.fmap), tuple(image.shape[-2:]))

    def poses(self, joints: Tensor) -> list[HandPose]:
        """Canonicalise both hands of ``joints [B, 2, 21, 3]`` (left mirrored)."""
        return [canonicalize(joints[:, h], is_left=h == 0) for h in range(2)]

    def forward_normalized(
        self,
        points_norm: Tensor,
        joints: Tensor,
        K: Tensor | None = None,
        ctx: ImageContext | None = None,
        present: Tensor | None = None,
        poses: list[HandPose] | None = None,
        return_parts: bool = False,
        hand: int | None = None,
        shortcuts: Shortcuts = EXACT,
        kernel: HandKernel | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B, 2, Q]`` at points ``[B, 2, Q, 3]`` in each hand's own normalised space.

        This is the one two-hand orchestration of I (mirroring, query positions, empty-space
        skipping, presence); the per-hand network is :meth:`hand_kernel` or a given ``kernel``
        (e.g. an ONNX Runtime session, :class:`HandKernel`).

        ``points_norm[:, h]`` uses hand ``h``'s root frame from ``joints`` *without* mirroring (the
        dataset's ``occ_points``). With ``hand`` (0 or 1) only that hand's network runs; the other
        row is :data:`EMPTY_LOGIT`. Absent hands (``present [B, 2]`` False) and hands with invalid
        keypoints get :data:`EMPTY_LOGIT`. ``shortcuts`` apply without gradients only (inference).
        With ``return_parts`` also the per-part logits ``[B, 2, 16, Q]`` (for the part-assignment
        loss; all parts batched, no shortcuts).
        """
        if return_parts and kernel is not None:
            raise ValueError("return_parts needs the torch part MLPs (no kernel)")
        poses = poses or self.poses(joints)
        # Scene by scene through a kernel when points are skipped or a backend runs them;
        # otherwise all scenes and parts in one batched call (training).
        per_scene = kernel is not None or (
            shortcuts != EXACT and not return_parts and not torch.is_grad_enabled()
        )
        out, parts_out = [], []
        for h, pose in enumerate(poses):
            keep = pose.valid if present is None else pose.valid & present[:, h]
            if hand is not None and h != hand:
                out.append(points_norm.new_full(points_norm.shape[:1] + points_norm.shape[2:3],
                                                EMPTY_LOGIT))  # fmt: skip
                continue
            p = points_norm[:, h]
            if h == 0:  # the left hand's network sees it mirrored into a right hand
                p = mirror_normalized(p)
            qpos = None
            if self.image_conditioning:
                if ctx is None or K is None:
                    raise ValueError("image-conditioned I needs K and the image context")
                cam = from_normalized(points_norm[:, h], pose.rot, pose.origin)
                qpos = self.query_position(cam, pose, K, ctx)
            if per_scene:
                logits = self._per_scene(h, p, pose, qpos, ctx, keep, shortcuts,
                                         kernel or self.hand_kernel)  # fmt: skip
            else:
                img = None if qpos is None else self.attention[h](qpos, ctx.tokens)
                parts = self.hands[h].part_logits(p, pose, img)
                logits = self.hands[h].reduce_parts(parts)
                parts_out.append(parts)
            out.append(torch.where(keep[:, None], logits, logits.new_full((), EMPTY_LOGIT)))
        if return_parts:
            return torch.stack(out, 1), torch.stack(parts_out, 1)
        return torch.stack(out, 1)

    def hand_kernel(self, hand: int, points: Tensor, pose: HandPose, query_pos: Tensor | None,
                    tokens: Tensor | None, dist: Tensor, cull_parts: int | None,
                    ) -> Tensor:  # fmt: skip
        """The torch :class:`HandKernel`: query attention, then the part MLPs (all 16, or each
        point's ``cull_parts`` nearest)."""
        feat = None if query_pos is None else self.attention[hand](query_pos, tokens)
        net = self.hands[hand]
        if cull_parts:
            return net.nearest_parts_logits(points, pose, feat, cull_parts, dist)
        return net.reduce_parts(net.part_logits(points, pose, feat, dist))

    def forward(
        self,
        queries: Tensor,
        joints: Tensor,
        K: Tensor | None = None,
        ctx: ImageContext | None = None,
        present: Tensor | None = None,
        image: Tensor | None = None,
        normalized: bool = False,
        return_parts: bool = False,
        shortcuts: Shortcuts = EXACT,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Logits ``[B, 2, Q]``: hand ``h``'s occupancy at ``queries[:, h]`` ``[B, 2, Q, 3]``.

        Args:
            queries: ``[B, 2, Q, 3]`` camera frame, metres (the same points for both hands is
                fine), or each hand's own normalised space when ``normalized`` is set.
            joints: ``[B, 2, 21, 3]`` keypoints, camera frame.
            K: ``[B, 3, 3]`` crop intrinsics (image-conditioned only).
            ctx: :meth:`encode` output (image-conditioned only); computed from ``image`` if not
                given, so one ``forward`` call can hold the whole training computation (DDP).
            present: ``[B, 2]`` bool; absent hands get :data:`EMPTY_LOGIT`.
            image: ``[B, 3, H, W]`` crop in [0, 1], used when ``ctx`` is None.
            normalized: ``queries`` are in normalised space (see :meth:`forward_normalized`).
            return_parts: also return the part logits ``[B, 2, 16, Q]``.
            shortcuts: inference shortcuts (:class:`Shortcuts`).
        """
        if ctx is None and self.image_conditioning:
            ctx = self.encode(image)
        poses = self.poses(joints)
        if normalized:
            return self.forward_normalized(queries, joints, K, ctx, present, poses, return_parts,
                                           shortcuts=shortcuts)  # fmt: skip
        norm = torch.stack(
            [to_normalized(queries[:, h], poses[h].rot, poses[h].origin) for h in range(2)], 1
        )
        return self.forward_normalized(norm, joints, K, ctx, present, poses, return_parts,
                                       shortcuts=shortcuts)

    def _per_scene(self, h: int, p: Tensor, pose: HandPose, qpos: Tensor | None,
                   ctx: ImageContext | None, keep: Tensor, shortcuts: Shortcuts,
                   kernel: HandKernel) -> Tensor:  # fmt: skip
        """Logits ``[B, Q]`` of hand ``h``, one scene at a time: only the points near its bones
        (all with no :attr:`Shortcuts.skip_distance`) of kept scenes go through ``kernel``."""
        dist = part_distances(p, pose.joints_norm)  # [B, 16, Q]: also the capsule priors' input
        if shortcuts.skip_distance is None:
            near = torch.ones(dist.shape[0], dist.shape[2], dtype=torch.bool, device=p.device)
        else:
            near = dist.min(1).values <= shortcuts.skip_distance / NORM_SCALE  # [B, Q]
        out = p.new_full(near.shape, EMPTY_LOGIT)
        for b in range(p.shape[0]):
            idx = near[b].nonzero()[:, 0]
            if idx.numel() == 0 or not bool(keep[b]):
                continue
            sub = HandPose(*(getattr(pose, f)[b : b + 1] for f in HandPose.__dataclass_fields__))
            val = kernel(
                h, p[b : b + 1, idx], sub, None if qpos is None else qpos[b : b + 1, idx],
                None if ctx is None else ctx.tokens[b : b + 1], dist[b : b + 1, :, idx],
                shortcuts.cull_parts,
            )  # fmt: skip
            out[b, idx] = val[0].to(out.dtype)
        return out

    @staticmethod
    def query_position(cam: Tensor, pose: HandPose, K: Tensor, ctx: ImageContext) -> Tensor:
        """Query embedding input ``[B, N, 3]``: crop position in [-1, 1] and depth to the wrist."""
        z = cam[..., 2].clamp_min(1e-3)
        u = K[:, None, 0, 0] * cam[..., 0] / z + K[:, None, 0, 2]
        v = K[:, None, 1, 1] * cam[..., 1] / z + K[:, None, 1, 2]
        height, width = ctx.image_size
        rel = (cam[..., 2] - pose.origin[:, None, 2]) / NORM_SCALE
        return torch.stack([2 * u / width - 1, 2 * v / height - 1, rel], -1)


def occupancy_bce(logits: Tensor, labels: Tensor, present: Tensor) -> Tensor:
    """Mean binary cross-entropy ``logits [B, 2, N]`` vs ``labels [B, 2, N]`` over present hands."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
    weight = present.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


def part_distances(points_norm: Tensor, joints_norm: Tensor) -> Tensor:
    """Distance ``[B, 16, N]`` from each point to each part's bone (normalised units).

    The 15 finger bones are parts 1..15; the palm (part 0) is the nearest of the five root bones
    (wrist to each finger's first joint). Points ``[B, N, 3]`` and joints ``[B, 21, 3]`` are in
    the same (for left hands mirrored) normalised space. Rigid part transforms keep distances, so
    this is also the distance to the bone in the part's canonical space.
    """
    a = joints_norm[:, _BONE_PARENTS]  # [B, 20, 3]
    ab = joints_norm[:, _BONE_CHILDREN] - a
    ap = points_norm[:, None] - a[:, :, None]  # [B, 20, N, 3]
    t = ((ap * ab[:, :, None]).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-12)[..., None]).clamp(0, 1)
    dist = (ap - t[..., None] * ab[:, :, None]).norm(dim=-1)  # [B, 20, N]
    return torch.cat([dist[:, :5].min(1, keepdim=True).values, dist[:, 5:]], 1)


def nearest_part(points_norm: Tensor, joints_norm: Tensor) -> Tensor:
    """Index ``[B, N]`` of the part nearest to each point (the part-assignment target)."""
    return part_distances(points_norm, joints_norm).argmin(1)


def part_assignment_loss(
    parts: Tensor, labels: Tensor, target_part: Tensor, present: Tensor
) -> Tensor:
    """NASA-style auxiliary loss: inside points belong to their nearest part only.

    Each part's logit at a point is pushed to ``label`` if it is the point's nearest part and to 0
    otherwise, which teaches every part MLP its own piece of the hand early in training (the max
    over parts alone only trains the currently largest part at each point).

    Args:
        parts: ``[B, 2, 16, N]`` part logits; labels: ``[B, 2, N]``; target_part: ``[B, 2, N]``;
        present: ``[B, 2]``.
    """
    onehot = F.one_hot(target_part, NUM_PARTS).permute(0, 1, 3, 2).to(parts.dtype)
    target = onehot * labels[:, :, None]
    loss = F.binary_cross_entropy_with_logits(parts, target, reduction="none").mean((-1, -2))
    weight = present.to(loss.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)
