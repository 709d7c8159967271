"""Two-hand occupancy refinement R (SPEC §3.3).

R takes the initial per-hand occupancy I (logits of both hands at every query), points on each
hand's initial surface ("anchors") and the image, and predicts a refined logit per (query, hand)::

    refined = init_logit + delta(query, hand)

The last layer of ``delta`` is zero-initialised, so an untrained R returns I unchanged.

Architecture (``B`` batch, ``A`` anchors per hand, ``Q`` queries, ``D`` width):

* **Anchor features** -- each anchor's pixel-aligned image feature (:func:`pixel_aligned`) and a
  one-hot hand label, linearly embedded, plus a positional MLP of its normalised position.
* **Encoder** (point transformer, Zhao et al. 2021 style; shared by both hands, each hand's anchors
  are one cloud): a kNN vector-attention block at every level (attention weights
  ``MLP(q_i - k_j + pos(p_i - p_j))``, softmax over the neighbours per channel, values
  ``v_j + pos(p_i - p_j)``), farthest-point down-sampling ``A -> A/2 -> A/4`` (512 -> 256 -> 128 by
  default) with kNN max-pooling, then global multi-head self-attention block(s) on the coarsest
  level and a max-pool to one global code per hand.
* **Context latent** per hand: ``MLP([own code, other hand's code, image global code])``; an absent
  hand's code is zeroed (so its partner sees "no other hand").
* **Decoder** per (query, hand): vector cross-attention from the query over its ``k_dec`` (9)
  nearest anchors *of that hand* (finest-level encoder features and positions), conditioned on the
  context latent; concatenated with the query's pixel-aligned feature and the initial occupancy
  ``sigmoid(init_logit)``; residual FC blocks; a zero-initialised linear layer gives ``delta``.

Coordinates enter every network as ``(x - center) / 0.4`` (metres -> normalised units) with a
common centre for both hands (e.g. the mean of the present wrists). Image features are sampled at
the camera-frame positions (metres) through the crop intrinsics ``K``.

Absent hands (``hand_present`` False) get their initial logits back unchanged; their anchors are
replaced by the centre before anything is computed, so garbage (even NaN) there is harmless.
Anchors of a present hand must be finite (else :class:`ValueError`).

Use :meth:`TwoHandRefinement.encode_context` once per frame and
:meth:`TwoHandRefinement.decode` for every batch of queries (e.g. each MISE level): the encoder and
the image are not recomputed. ``forward`` is the two in a row.

Anchors: at inference the pipeline samples points evenly on the initial mesh (extracted from I);
during training :func:`sample_anchors` picks them without meshing from I's values at candidate
points (see there). The paper samples the initial surface; either way is fine for R.

All point operations are pure PyTorch (:mod:`im2hands_model.networks.point_ops`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from im2hands_model.hands import NORM_SCALE, from_normalized, to_normalized
from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures, pixel_aligned
from im2hands_model.networks.init_occ import EXACT, Shortcuts, TwoHandInitialOccupancy
from im2hands_model.networks.point_ops import farthest_point_sample, gather_points, knn

__all__ = [
    "AnchorGraph",
    "RefinedOccupancy",
    "RefinementContext",
    "RefinementKernels",
    "TwoHandRefinement",
    "mesh_anchors",
    "overlap_indices",
    "penetration_loss",
    "sample_anchors",
]


@dataclass
class RefinementContext:
    """Everything :meth:`TwoHandRefinement.decode` needs from the anchors and the image.

    Attributes:
        anchors: ``[B, 2, A, 3]`` anchors in normalised units (``(x - center) / 0.4``); absent
            hands' anchors are all zero.
        features: ``[B, 2, A, D]`` finest-level encoder features of the anchors.
        latent: ``[B, 2, L]`` context latent per hand.
        present: ``[B, 2]`` bool.
    """

    anchors: Tensor
    features: Tensor
    latent: Tensor
    present: Tensor


@dataclass
class AnchorGraph:
    """Neighbourhoods of the anchors at the encoder's three levels: int64 index tensors only,
    for ``M = 2B`` clouds of ``A`` anchors (:meth:`TwoHandRefinement.anchor_graph`).

    Attributes:
        knn0: ``[M, A, k]`` kNN within level 0.
        down1, pool1: level 1 = the ``[M, A/2]`` farthest-point samples of level 0, and each
            sample's kNN ``[M, A/2, k]`` in level 0 (max-pooled into it).
        knn1: ``[M, A/2, k]`` kNN within level 1.
        down2, pool2: the same from level 1 to level 2 (``A/4``).
        knn2: ``[M, A/4, k]`` kNN within level 2.
    """

    knn0: Tensor
    down1: Tensor
    pool1: Tensor
    knn1: Tensor
    down2: Tensor
    pool2: Tensor
    knn2: Tensor


class RefinementKernels(Protocol):
    """R's three weighted computations, which a backend swaps (e.g. ONNX Runtime sessions);
    :class:`TwoHandRefinement` does everything around them (checks, normalisation, the anchor
    graph, each query's neighbours) and is its own default.

    * ``encode_anchors(anchors [B, 2, A, 3] camera frame with absent hands at the centre,
      present [B, 2], K, center [B, 3], feats, graph) -> RefinementContext``
    * ``decode_features(queries [B, H, Q, 3] or shared [B, Q, 3], neighbours [B*H, Q, k], ctx, K,
      feats, center) -> [B, H, Q, D]``
    * ``decode_head(features [B, H, Q, D], init_logits [B, H, Q], present [B, H]) -> [B, H, Q]``
    """

    def encode_anchors(self, anchors: Tensor, present: Tensor, K: Tensor, center: Tensor,
                       feats: ImageFeatures | None, graph: AnchorGraph,
                       ) -> RefinementContext: ...  # fmt: skip

    def decode_features(self, queries: Tensor, neighbours: Tensor, ctx: RefinementContext,
                        K: Tensor, feats: ImageFeatures | None, center: Tensor,
                        ) -> Tensor: ...  # fmt: skip

    def decode_head(self, features: Tensor, init_logits: Tensor, present: Tensor
                    ) -> Tensor: ...  # fmt: skip


def _mlp(*sizes: int, last_act: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_act:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class VectorAttention(nn.Module):
    """kNN vector attention (point transformer layer), self- or cross-attention.

    ``y_i = sum_j softmax_j(gamma(q_i - k_j + delta_ij)) * (v_j + delta_ij)`` over the neighbours
    ``j`` of ``i``, with ``delta_ij = MLP(p_i - p_j)``; softmax per channel. The first (linear)
    layer of the position MLP is applied per point before the neighbours are gathered (same
    result, less work).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.pos1 = nn.Linear(3, dim)
        self.pos2 = nn.Linear(dim, dim)
        self.gamma = _mlp(dim, dim, dim)

    def forward(
        self, x: Tensor, x_pos: Tensor, src: Tensor, src_pos: Tensor, idx: Tensor
    ) -> Tensor:
        """Args: ``x [M, N, D]`` queries at ``x_pos [M, N, 3]``; ``src [M, S, D]`` at
        ``src_pos [M, S, 3]``; ``idx [M, N, k]`` neighbours of each query in ``src``.
        Returns ``[M, N, D]``."""
        d = self.dim
        q = self.to_q(x)
        per_src = torch.cat([self.to_kv(src), F.linear(src_pos, self.pos1.weight)], dim=-1)
        k, v, p_src = gather_points(per_src, idx).split(d, dim=-1)  # each [M, N, k, D]
        p_x = self.pos1(x_pos)  # W p_i + b
        delta = self.pos2(F.relu(p_x[:, :, None, :] - p_src))  # MLP(p_i - p_j)
        w = torch.softmax(self.gamma(q[:, :, None, :] - k + delta), dim=2)
        return (w * (v + delta)).sum(dim=2)


class PointTransformerBlock(nn.Module):
    """Pre-norm residual kNN vector self-attention followed by a residual feed-forward layer."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = VectorAttention(dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _mlp(dim, 2 * dim, dim)

    def forward(self, x: Tensor, pos: Tensor, idx: Tensor) -> Tensor:
        """``x [M, N, D]``, ``pos [M, N, 3]``, ``idx [M, N, k]`` (kNN within the cloud)."""
        h = self.norm1(x)
        x = x + self.proj(self.attn(h, pos, h, pos, idx))
        return x + self.ffn(self.norm2(x))


class TransitionDown(nn.Module):
    """Farthest-point down-sampling with kNN max-pooling of ``MLP([p_j - p_i, f_j])``."""

    def __init__(self, in_dim: int, out_dim: int, k: int) -> None:
        super().__init__()
        self.k = k
        self.mlp = _mlp(in_dim + 3, out_dim, out_dim, last_act=True)

    def indices(self, pos: Tensor, num: int) -> tuple[Tensor, Tensor]:
        """The step's geometry (no weights): ``(sel [M, num], idx [M, num, k])``, the
        farthest-point samples of ``pos [M, N, 3]`` and each sample's neighbours in ``pos``."""
        sel = farthest_point_sample(pos, num)
        _, idx = knn(gather_points(pos, sel), pos, min(self.k, pos.shape[1]))
        return sel, idx

    def pool(self, x: Tensor, pos: Tensor, sel: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
        """The learned step on given :meth:`indices`: ``(x' [M, num, C'], pos' [M, num, 3])``."""
        new_pos = gather_points(pos, sel)
        rel = gather_points(pos, idx) - new_pos[:, :, None, :]
        feats = self.mlp(torch.cat([rel, gather_points(x, idx)], dim=-1))
        return feats.max(dim=2).values, new_pos

    def forward(self, x: Tensor, pos: Tensor, num: int) -> tuple[Tensor, Tensor]:
        """``x [M, N, C]``, ``pos [M, N, 3]`` -> ``(x' [M, num, C'], pos' [M, num, 3])``."""
        sel, idx = self.indices(pos, num)
        return self.pool(x, pos, sel, idx)


class GlobalAttentionBlock(nn.Module):
    """Pre-norm multi-head self-attention over all points of a cloud, plus a feed-forward layer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = _mlp(dim, 2 * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ffn(self.norm2(x))


class ResBlock(nn.Module):
    """``x + fc2(relu(fc1(relu(x))))`` (Occupancy Networks style)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(F.relu(self.fc1(F.relu(x))))


class TwoHandRefinement(nn.Module):
    """Two-hand occupancy refinement R (module docstring for the architecture).

    Args:
        image_channels: channels ``C`` of ``ImageFeatures.fmap``.
        image_global_dim: size ``G`` of ``ImageFeatures.global_code``.
        dim: encoder width at the finest level (also the decoder's attention width).
        num_anchors: anchors per hand ``A`` expected by default (any ``A >= 4`` works; the levels
            are ``A, A/2, A/4``).
        k_enc: neighbours of the encoder's vector attention and pooling.
        k_dec: anchors each query attends to (per hand).
        global_blocks: global self-attention blocks on the coarsest level.
        heads: heads of the global attention.
        latent_dim: context latent size ``L``.
        hidden: width of the decoder's residual FC blocks.
        dec_blocks: number of residual FC blocks.
        image_stride: stride of ``fmap`` w.r.t. the crop (``ImageFeatures.stride`` overrides).
    """

    def __init__(
        self,
        image_channels: int = 64,
        image_global_dim: int = 256,
        dim: int = 64,
        num_anchors: int = 512,
        k_enc: int = 16,
        k_dec: int = 9,
        global_blocks: int = 1,
        heads: int = 4,
        latent_dim: int = 128,
        hidden: int = 128,
        dec_blocks: int = 3,
        image_stride: int = 4,
    ) -> None:
        super().__init__()
        self.image_channels = image_channels
        self.image_global_dim = image_global_dim
        self.num_anchors = num_anchors
        self.k_enc = k_enc
        self.k_dec = k_dec
        self.image_stride = image_stride
        dims = (dim, dim * 3 // 2, dim * 2)
        self.dims = dims

        # Anchor embedding: [pixel-aligned feature, one-hot hand] -> D, plus MLP(position).
        self.anchor_in = nn.Linear(image_channels + 2, dim)
        self.anchor_pos = _mlp(3, dim, dim)
        self.enc0 = PointTransformerBlock(dims[0])
        self.down1 = TransitionDown(dims[0], dims[1], k_enc)
        self.enc1 = PointTransformerBlock(dims[1])
        self.down2 = TransitionDown(dims[1], dims[2], k_enc)
        self.enc2 = PointTransformerBlock(dims[2])
        self.global_blocks = nn.ModuleList(
            GlobalAttentionBlock(dims[2], heads) for _ in range(global_blocks)
        )
        self.context = _mlp(2 * dims[2] + image_global_dim, latent_dim, latent_dim)

        # Decoder. The first FC layer acts on [attention, latent, pixel feature, occupancy];
        # it is split by input so that per-query terms shared by both hands are computed once.
        self.query_pos = _mlp(3, dim, dim)
        self.query_latent = nn.Linear(latent_dim, dim)
        self.cross = VectorAttention(dim)
        self.cross_norm = nn.LayerNorm(dim)
        self.dec_att = nn.Linear(dim, hidden)
        self.dec_latent = nn.Linear(latent_dim, hidden, bias=False)
        self.dec_pix = nn.Linear(image_channels, hidden, bias=False)
        self.dec_occ = nn.Linear(1, hidden, bias=False)
        self.dec_blocks = nn.ModuleList(ResBlock(hidden) for _ in range(dec_blocks))
        self.dec_out = nn.Linear(hidden, 1)
        nn.init.zeros_(self.dec_out.weight)
        nn.init.zeros_(self.dec_out.bias)

    # ------------------------------------------------------------------ helpers
    def _normalize(self, points: Tensor, center: Tensor) -> Tensor:
        """Camera-frame ``[B, ..., 3]`` -> normalised units about ``center [B, 3]``."""
        shape = (center.shape[0],) + (1,) * (points.dim() - 2) + (3,)
        return (points - center.reshape(shape)) / NORM_SCALE

    def _pixel_features(self, feats: ImageFeatures | None, points: Tensor, K: Tensor) -> Tensor:
        """Pixel-aligned features ``[B, P, C]`` of camera-frame points ``[B, P, 3]``."""
        if feats is None:
            return points.new_zeros(points.shape[0], points.shape[1], self.image_channels)
        c = feats.fmap.shape[1]
        if c != self.image_channels:
            raise ValueError(f"fmap has {c} channels, R was built for {self.image_channels}")
        stride = getattr(feats, "stride", self.image_stride)
        return pixel_aligned(feats.fmap, points, K, stride=stride).to(points.dtype)

    def _global_image(self, feats: ImageFeatures | None, b: int, ref: Tensor) -> Tensor:
        if feats is None:
            return ref.new_zeros(b, self.image_global_dim)
        g = feats.global_code
        if g.shape != (b, self.image_global_dim):
            raise ValueError(
                f"global_code must be [B, {self.image_global_dim}], got {tuple(g.shape)}"
            )
        return g.to(ref.dtype)

    # ------------------------------------------------------------------ encoder
    def encode_context(
        self,
        anchors: Tensor,
        hand_present: Tensor,
        K: Tensor,
        feats: ImageFeatures | None,
        center: Tensor,
        graph: AnchorGraph | None = None,
        kernels: RefinementKernels | None = None,
    ) -> RefinementContext:
        """Encode both hands' anchors and the image once.

        Args:
            anchors: ``[B, 2, A, 3]`` camera frame (metres), points on each hand's initial surface.
            hand_present: ``[B, 2]`` bool.
            K: ``[B, 3, 3]`` crop intrinsics.
            feats: R's own image features (``None`` = no image: zero features).
            center: ``[B, 3]`` common centre (camera frame, metres).
            graph: the anchors' :meth:`anchor_graph`, when the caller computed it already.
            kernels: who runs the weighted part (:class:`RefinementKernels`; default: this
                network's own layers).

        Returns:
            :class:`RefinementContext`.
        """
        if anchors.dim() != 4 or anchors.shape[1] != 2 or anchors.shape[-1] != 3:
            raise ValueError(f"anchors must be [B, 2, A, 3], got {tuple(anchors.shape)}")
        b, _, a, _ = anchors.shape
        if a < 4:
            raise ValueError(f"need at least 4 anchors per hand, got {a}")
        present = hand_present.to(device=anchors.device, dtype=torch.bool)
        if present.shape != (b, 2):
            raise ValueError(f"hand_present must be [B, 2], got {tuple(hand_present.shape)}")
        if center.shape != (b, 3) or not bool(torch.isfinite(center).all()):
            raise ValueError(f"center must be finite [B, 3], got {tuple(center.shape)}")
        p = present[:, :, None, None]
        if not bool(torch.isfinite(torch.where(p, anchors, 0.0)).all()):
            raise ValueError("anchors of a present hand contain NaN/inf")
        # Absent hands: anchors at the centre (normalised zero), so nothing downstream is NaN.
        cam = torch.where(p, anchors, center[:, None, None, :].to(anchors.dtype))
        if graph is None:
            graph = self.anchor_graph(self._normalize(cam, center).reshape(b * 2, a, 3))
        return (kernels or self).encode_anchors(cam, present, K, center, feats, graph)

    def encode_anchors(self, anchors: Tensor, present: Tensor, K: Tensor, center: Tensor,
                       feats: ImageFeatures | None, graph: AnchorGraph,
                       ) -> RefinementContext:  # fmt: skip
        """The anchor encoder (a :class:`RefinementKernels` step) on checked inputs: absent
        hands' anchors already at ``center``, the :class:`AnchorGraph` given."""
        cam = anchors
        b, _, a, _ = cam.shape
        pos = self._normalize(cam, center)  # [B, 2, A, 3]
        m = b * 2
        pos0 = pos.reshape(m, a, 3)
        pix = self._pixel_features(feats, cam.reshape(b, 2 * a, 3), K)
        pix = pix.reshape(b, 2, a, self.image_channels)
        onehot = torch.eye(2, dtype=pos.dtype, device=pos.device)[None, :, None, :]
        onehot = onehot.expand(b, 2, a, 2)
        x = self.anchor_in(torch.cat([pix, onehot], dim=-1)) + self.anchor_pos(pos)

        x = x.reshape(m, a, self.dims[0])
        f0 = self.enc0(x, pos0, graph.knn0)

        x1, pos1 = self.down1.pool(f0, pos0, graph.down1, graph.pool1)
        x1 = self.enc1(x1, pos1, graph.knn1)
        x2, pos2 = self.down2.pool(x1, pos1, graph.down2, graph.pool2)
        x2 = self.enc2(x2, pos2, graph.knn2)
        for block in self.global_blocks:
            x2 = block(x2)
        code = x2.max(dim=1).values.reshape(b, 2, self.dims[2])
        code = code * present[..., None].to(code.dtype)  # absent hand: zero code

        img = self._global_image(feats, b, code)[:, None, :].expand(b, 2, -1)
        latent = self.context(torch.cat([code, code.flip(1), img], dim=-1))
        return RefinementContext(
            anchors=pos, features=f0.reshape(b, 2, a, self.dims[0]), latent=latent, present=present
        )

    def anchor_graph(self, pos: Tensor) -> AnchorGraph:
        """The encoder's neighbourhoods of normalised anchors ``pos [M, A, 3]`` (one cloud per
        hand, ``M = 2B``): kNN at every level and the farthest-point samples between levels.
        Geometry only, no weights (see :class:`AnchorGraph`)."""
        a = pos.shape[1]
        _, knn0 = knn(pos, pos, min(self.k_enc, a))
        down1, pool1 = self.down1.indices(pos, a // 2)
        pos1 = gather_points(pos, down1)
        _, knn1 = knn(pos1, pos1, min(self.k_enc, pos1.shape[1]))
        down2, pool2 = self.down2.indices(pos1, a // 4)
        pos2 = gather_points(pos1, down2)
        _, knn2 = knn(pos2, pos2, min(self.k_enc, pos2.shape[1]))
        return AnchorGraph(knn0, down1, pool1, knn1, down2, pool2, knn2)

    # ------------------------------------------------------------------ decoder
    def decode(
        self,
        queries: Tensor,
        init_logits: Tensor,
        ctx: RefinementContext,
        K: Tensor,
        feats: ImageFeatures | None,
        center: Tensor,
        hand: int | None = None,
        neighbours: Tensor | None = None,
        return_features: bool = False,
        kernels: RefinementKernels | None = None,
    ) -> Tensor:
        """Refined logits of both hands at the queries.

        Args:
            queries: ``[B, Q, 3]`` camera frame (metres), scored for both hands; or
                ``[B, 2, Q, 3]``: hand ``h`` scored at its own queries ``queries[:, h]`` only
                (inference: each hand's mesh needs only its own occupancy, half the work).
            init_logits: ``[B, 2, Q]`` I's logit of each hand at its queries.
            ctx: from :meth:`encode_context` (same ``center``).
            K: ``[B, 3, 3]``; feats: the same image features as for the context.
            center: ``[B, 3]``.
            hand: score only this hand (0 or 1): ``queries [B, 1, Q, 3]``,
                ``init_logits [B, 1, Q]``, result ``[B, 1, Q]``.
            neighbours: each query's ``k_dec`` nearest anchors of its hand ``[B * H, Q, k]``
                (``H`` hands scored), when the caller computed them already; ``None``: here.
            return_features: return the smooth decoder features ``[B, H, Q, D]`` instead,
                for :meth:`decode_head`.
            kernels: who runs the weighted parts (:class:`RefinementKernels`; default: this
                network's own layers).

        Returns:
            ``[B, 2, Q]`` refined logits (= ``init_logits`` for absent hands).
        """
        if hand is not None:
            sl = slice(hand, hand + 1)
            ctx = RefinementContext(
                ctx.anchors[:, sl], ctx.features[:, sl], ctx.latent[:, sl], ctx.present[:, sl]
            )
        nh = ctx.latent.shape[1]
        per_hand = queries.dim() == 4
        b, q = queries.shape[0], queries.shape[-2]
        shape = (b, nh, q, 3) if per_hand else (b, q, 3)
        if queries.shape != shape or init_logits.shape != (b, nh, q):
            raise ValueError(
                f"queries [B, Q, 3] or [B, 2, Q, 3] and init_logits [B, 2, Q] expected, got "
                f"{tuple(queries.shape)} and {tuple(init_logits.shape)}"
            )
        if ctx.latent.shape[0] != b:
            raise ValueError("context and queries have different batch sizes")
        if q == 0 or b == 0:
            return init_logits.clone()
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN/inf")
        if neighbours is None:
            a = ctx.anchors.shape[2]
            qpos = self._normalize(queries, center)  # [B, Q, 3] or [B, nh, Q, 3]
            qpos = (qpos if per_hand else qpos[:, None].expand(b, nh, q, 3)).reshape(b * nh, q, 3)
            _, neighbours = knn(qpos, ctx.anchors.reshape(b * nh, a, 3), min(self.k_dec, a))
        run = kernels or self
        smooth = run.decode_features(queries, neighbours, ctx, K, feats, center)
        if return_features:
            return smooth
        return run.decode_head(smooth, init_logits, ctx.present)

    def decode_features(self, queries: Tensor, neighbours: Tensor, ctx: RefinementContext,
                        K: Tensor, feats: ImageFeatures | None, center: Tensor,
                        ) -> Tensor:  # fmt: skip
        """The decoder up to its head (a :class:`RefinementKernels` step): smooth features
        ``[B, H, Q, D]`` of checked queries ``[B, H, Q, 3]`` (or shared ``[B, Q, 3]``) whose
        ``neighbours [B * H, Q, k]`` among their hand's anchors are given."""
        nh = ctx.latent.shape[1]
        per_hand = queries.dim() == 4
        b, q = queries.shape[0], queries.shape[-2]
        a = ctx.anchors.shape[2]
        m = b * nh
        qpos = self._normalize(queries, center)  # [B, Q, 3] or [B, nh, Q, 3]
        qpos2 = (qpos if per_hand else qpos[:, None].expand(b, nh, q, 3)).reshape(m, q, 3)
        apos = ctx.anchors.reshape(m, a, 3)
        idx = neighbours

        latent = ctx.latent  # [B, 2, L]
        tok = self.query_pos(qpos2).reshape(b, nh, q, -1) + self.query_latent(latent)[:, :, None]
        tok = tok.reshape(m, q, -1)
        att = self.cross(tok, qpos2, ctx.features.reshape(m, a, self.dims[0]), apos, idx)
        h_att = self.cross_norm(tok + att).reshape(b, nh, q, -1)

        if per_hand:
            pix = self._pixel_features(feats, queries.reshape(b, nh * q, 3), K)
            pix = self.dec_pix(pix).reshape(b, nh, q, -1)
        else:  # [B, Q, C], shared by both hands
            pix = self.dec_pix(self._pixel_features(feats, queries, K))[:, None]
        return self.dec_att(h_att) + self.dec_latent(latent)[:, :, None] + pix

    def decode_head(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        """The decoder's last layers: features ``[B, H, Q, D]`` from ``decode(...,
        return_features=True)`` and I's logits ``[B, H, Q]`` -> refined logits ``[B, H, Q]``.

        Everything before this point varies smoothly with the query's position (attention over
        nearby anchors, bilinear image features); only I's occupancy enters sharply, here. So
        the features may be interpolated between nearby queries (the pipeline evaluates them
        on a coarser grid) while this head runs at every query.
        """
        occ = torch.sigmoid(init_logits.detach()).to(features.dtype)[..., None]  # [B, H, Q, 1]
        h = features + self.dec_occ(occ)
        for block in self.dec_blocks:
            h = block(h)
        delta = self.dec_out(F.relu(h))[..., 0]  # [B, H, Q]
        out = init_logits + delta.to(init_logits.dtype)
        return torch.where(present[:, :, None], out, init_logits)

    def forward(
        self,
        queries: Tensor,
        init_logits: Tensor,
        anchors: Tensor,
        hand_present: Tensor,
        K: Tensor,
        feats: ImageFeatures | None,
        center: Tensor,
    ) -> Tensor:
        """``encode_context`` + ``decode``: refined logits ``[B, 2, Q]`` (see both)."""
        ctx = self.encode_context(anchors, hand_present, K, feats, center)
        return self.decode(queries, init_logits, ctx, K, feats, center)


def penetration_loss(logits: Tensor, hand_of_query: Tensor, present: Tensor) -> Tensor:
    """Penetration penalty: occupancy of one hand times the other's at the training points.

    For every scene with both hands present and every hand ``h``, the mean of
    ``sigmoid(logits[:, 0]) * sigmoid(logits[:, 1])`` over the queries that are ``h``'s training
    points (``hand_of_query == h``); the loss is the mean of these per-(scene, hand) terms (0 when
    no scene has both hands; still differentiable).

    Args:
        logits: ``[B, 2, Q]`` refined logits of both hands at every query.
        hand_of_query: ``[B, Q]`` int64, the hand whose training point each query is (0 left,
            1 right; any other value = ignore).
        present: ``[B, 2]`` bool.

    Returns:
        Scalar.
    """
    b, two, q = logits.shape
    if two != 2 or hand_of_query.shape != (b, q) or present.shape != (b, 2):
        raise ValueError(
            f"penetration_loss: logits [B,2,Q], hand_of_query [B,Q], present [B,2] expected, got "
            f"{tuple(logits.shape)}, {tuple(hand_of_query.shape)}, {tuple(present.shape)}"
        )
    occ = torch.sigmoid(logits)
    prod = occ[:, 0] * occ[:, 1]  # [B, Q]
    both = present.to(torch.bool).all(dim=1)  # [B]
    terms = []
    for h in (0, 1):
        sel = (hand_of_query == h) & both[:, None]  # [B, Q]
        count = sel.sum(dim=1)  # [B]
        mean_h = (prod * sel).sum(dim=1) / count.clamp_min(1)
        terms.append((mean_h, count > 0))
    num = sum(m * v for m, v in terms)
    den = sum(v.to(prod.dtype) for _, v in terms)
    total = den.sum()
    if float(total) == 0.0:
        return logits.sum() * 0.0
    return num.sum() / total


@torch.no_grad()
def overlap_indices(init_logits: Tensor, present: Tensor, num: int) -> Tensor:
    """Each hand's candidates where I's two hands overlap most (the training-time sampler of
    R's penetration points).

    R's penetration loss sees an overlap only at training points inside both hands, which the
    stored points (near each hand's own surface or uniform in its box) rarely are. Among each
    hand's candidates this keeps the ``num`` with the largest ``sigmoid(I_0) * sigmoid(I_1)``:
    points inside both of I's hands, and next to them the other hand's surface where it runs
    inside this one -- where R has to move a surface apart.

    Args:
        init_logits: ``[B, 2, 2C]`` I's logits of both hands at both hands' ``C`` candidates
            (hand 0's first, as :meth:`RefinedOccupancy.init_logits` gives them).
        present: ``[B, 2]`` bool; scenes without both hands get arbitrary (valid) indices.
        num: points per hand (``<= C``).

    Returns:
        ``[B, 2, num]`` int64 indices into each hand's ``C`` candidates.
    """
    b, two, q = init_logits.shape
    if two != 2 or q % 2 or not 0 < num <= q // 2:
        raise ValueError(f"overlap_indices: logits [B, 2, 2C] and 0 < num <= C expected, got "
                         f"{tuple(init_logits.shape)} and num={num}")  # fmt: skip
    prob = torch.sigmoid(init_logits)
    both = (prob[:, 0] * prob[:, 1]).view(b, 2, q // 2)  # [B, hand whose candidate, C]
    return both.topk(num, dim=-1).indices


@torch.no_grad()
def sample_anchors(
    points: Tensor,
    init_logits_own: Tensor,
    present: Tensor,
    num: int = 512,
    band: float = 2.0,
    start: Literal["first", "random"] = "first",
    gen: torch.Generator | None = None,
) -> Tensor:
    """Anchors on I's initial surface without meshing (the training-time sampler).

    Among each hand's candidate points, keeps those near I's 0.5 level -- ``|logit| <= band``
    (``band = 2`` keeps occupancies in about [0.12, 0.88]), and always at least the ``num``
    candidates with the lowest ``|logit|`` -- then spreads ``num`` anchors over them by
    farthest-point sampling. With near-surface training samples as candidates this gives points
    close to and evenly along the initial surface. At inference the pipeline instead samples the
    initial mesh evenly.

    Args:
        points: ``[B, 2, P, 3]`` candidates (camera frame), e.g. each hand's occupancy points.
        init_logits_own: ``[B, 2, P]`` I's logit of hand ``h`` at ``points[:, h]``.
        present: ``[B, 2]`` bool; absent hands get finite dummy anchors (all candidates allowed,
            NaN replaced by 0) -- R ignores them.
        num: anchors per hand (``<= P``).
        band: logit half-width of the kept band.
        start, gen: FPS start (see :func:`farthest_point_sample`).

    Returns:
        ``[B, 2, num, 3]`` anchors.
    """
    if points.dim() != 4 or points.shape[1] != 2 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, 2, P, 3], got {tuple(points.shape)}")
    b, _, p, _ = points.shape
    if init_logits_own.shape != (b, 2, p):
        raise ValueError(f"init_logits_own must be [B, 2, P], got {tuple(init_logits_own.shape)}")
    if not 1 <= num <= p:
        raise ValueError(f"num={num} anchors needs 1 <= num <= P={p} candidates")
    pres = present.to(device=points.device, dtype=torch.bool)[:, :, None]  # [B, 2, 1]
    finite = torch.isfinite(points).all(-1) & torch.isfinite(init_logits_own)
    score = torch.where(finite, init_logits_own.abs(), torch.full_like(init_logits_own, 1e30))
    rank_cut = score.kthvalue(num, dim=-1, keepdim=True).values
    keep = finite & ((score <= band) | (score <= rank_cut))
    keep = torch.where(pres, keep, torch.ones_like(keep))
    # A present hand without any finite candidate: FPS raises (no valid point).
    pts = torch.where(torch.isfinite(points), points, torch.zeros_like(points))
    sel = farthest_point_sample(
        pts.reshape(b * 2, p, 3), num, keep.reshape(b * 2, p), start=start, gen=gen
    )
    return gather_points(pts.reshape(b * 2, p, 3), sel).reshape(b, 2, num, 3)


def mesh_anchors(
    meshes: Sequence[Any | None], num: int = 512, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Anchors spread evenly over I's meshes (the inference sampler; training picks them with
    :func:`sample_anchors` without meshing).

    Args:
        meshes: ``[left, right]`` camera-frame meshes (``vertices``/``faces``) or ``None``.
        num: anchors per hand; seed: seed of the area-weighted surface sampling (fixed: the same
            meshes give the same anchors).

    Returns:
        ``(anchors [1, 2, num, 3], has_mesh [1, 2] bool)``; hands without a mesh get zeros.
    """
    from im2hands_model.metrics import sample_surface_points

    rng = np.random.default_rng(seed)
    anchors = torch.zeros(1, len(meshes), num, 3, device=device)
    for h, mesh in enumerate(meshes):
        if mesh is not None:
            pts = sample_surface_points(mesh.vertices, mesh.faces, num, rng)
            anchors[0, h] = torch.as_tensor(pts, dtype=torch.float32, device=device)
    has_mesh = torch.tensor([[m is not None for m in meshes]], device=device)
    return anchors, has_mesh


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

    @classmethod
    def from_config(
        cls, cfg: dict, init: TwoHandInitialOccupancy | None = None
    ) -> RefinedOccupancy:
        """I+R from a whole ``ref_occ`` run config (``model`` and ``init``); without ``init``,
        I is built untrained from ``init.init_occ_model`` (its weights then come from elsewhere)."""
        if init is None:
            model_cfg = (cfg.get("init") or {}).get("init_occ_model")
            if model_cfg is None:
                raise ValueError("this ref_occ config does not record I's architecture")
            init = TwoHandInitialOccupancy.from_config(model_cfg)
        m = cfg.get("model") or {}
        return cls(
            init,
            encoder=dict(m.get("encoder", {})),
            refine=dict(m.get("refine", {})),
            anchor_candidates=int(m.get("anchor_candidates", 2048)),
        )

    def train(self, mode: bool = True) -> RefinedOccupancy:
        super().train(mode)
        self.init.eval()  # I stays frozen, also in training mode
        return self

    @torch.no_grad()
    def init_logits(
        self, state: RefinementState, points_norm: Tensor, shortcuts: Shortcuts = EXACT
    ) -> tuple[Tensor, Tensor]:
        """I's logits of both hands at both hands' points.

        Args:
            state: from :meth:`prepare`.
            points_norm: ``[B, 2, P, 3]`` each hand's points in its own normalised space.
            shortcuts: I's inference shortcuts (:class:`~.init_occ.Shortcuts`).

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
            both, state.joints, state.K, state.init_ctx, state.present, poses, shortcuts=shortcuts
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
            poses = self.init.poses(joints)
            init_ctx = self.init.encode(image) if self.init.image_conditioning else None
            if anchors is None:
                if candidates_norm is None:
                    raise ValueError("prepare needs candidates_norm or anchors")
                # each hand's candidates are scored by that hand's I only
                own = self.init.forward_normalized(
                    candidates_norm, joints, K, init_ctx, present, poses
                )
                cam = torch.stack(
                    [from_normalized(candidates_norm[:, h], poses[h].rot, poses[h].origin)
                     for h in (0, 1)],
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
        return refinement_state(self.init, self.encoder, self.refine, joints, K, image, present,
                                anchors, poses, init_ctx)  # fmt: skip

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
        overlap_pool: Tensor | None = None,
        overlap_num: int = 0,
    ) -> tuple[Tensor, ...]:
        """The training computation: anchors among ``candidates_norm [B, 2, C, 3]`` (default:
        the first ``anchor_candidates`` of ``points_norm``), then :meth:`score` at
        ``points_norm`` (shapes as in :meth:`score`).

        With ``overlap_pool [B, 2, C', 3]`` (each hand's points, its normalised space) and
        ``overlap_num``, each hand's ``overlap_num`` pool points where I's hands overlap most
        (:func:`overlap_indices`) are scored too, after that hand's ``points_norm``; the third
        item returned is their ``[B, 2, overlap_num]`` indices into the pool.
        """
        if candidates_norm is None:
            candidates_norm = points_norm
        candidates_norm = candidates_norm[:, :, : self.anchor_candidates]
        state = self.prepare(joints, K, image, present, candidates_norm=candidates_norm, gen=gen)
        if overlap_pool is None or overlap_num <= 0:
            return self.score(state, points_norm)
        _, pool_logits = self.init_logits(state, overlap_pool)
        picked = overlap_indices(pool_logits, present, overlap_num)
        extra = torch.gather(overlap_pool, 2, picked[..., None].expand(-1, -1, -1, 3))
        init_logits, refined = self.score(state, torch.cat([points_norm, extra], 2))
        return init_logits, refined, picked


def refinement_state(
    init: Any,
    encoder: Any,
    refine: Any,
    joints: Tensor,
    K: Tensor,
    image: Tensor,
    present: Tensor,
    anchors: Tensor,
    poses: list | None = None,
    init_ctx: Any = None,
) -> RefinementState:
    """The per-image state of I+R from anchors on I's surface: I's poses and image context, R's
    image features, the hands' centre and R's context. ``init``, ``encoder`` and ``refine`` are
    the torch networks or a backend's drop-ins (the one place this sequence is written)."""
    if poses is None:
        poses = init.poses(joints)
    if init_ctx is None and init.image_conditioning:
        init_ctx = init.encode(image)
    state = RefinementState(joints=joints, K=K, present=present, poses=poses, init_ctx=init_ctx)
    state.feats = encoder(image)
    state.center = hands_center(joints, present)
    state.ctx = refine.encode_context(anchors, present, K, state.feats, state.center)
    return state


def own_points(logits: Tensor) -> Tensor:
    """``[B, 2, 2P] -> [B, 2, P]``: each hand's logits at its own points (hand 0's come first)."""
    p = logits.shape[-1] // 2
    return torch.stack([logits[:, 0, :p], logits[:, 1, p:]], 1)
