"""Keypoint refinement **K** (SPEC §3.4): a two-hand skeleton GCN attending to image patches.

* Joint tokens (42: left hand's 21, then the right hand's): a learned joint-id embedding plus an
  MLP of the joint's coordinates relative to a common root (the mean of the present wrists),
  in decimetres (``coord_scale``) so values are O(1). Optionally (``pixel_features``, when
  ``K`` is given) the joint's pixel-aligned image feature and its normalised crop position are
  added, which tells each token where it lies in the picture; the image's global code is added
  to every token too.
* Graph: the 20 bones of each hand plus a link between the two wrists, with self-loops and
  symmetric normalisation ``D^-1/2 (A + I) D^-1/2`` computed per sample over the present hands
  only; each of the 4 layers also learns a dense adjacency offset (zero at init) so joints far
  apart in the tree can exchange information.
* After each GCN layer (pre-norm, residual) the joint tokens cross-attend (multi-head) to the
  image patch tokens of a :class:`~im2hands_model.networks.backbone.PatchTokenizer`, then pass a
  residual MLP. Without image features (``feats=None`` or ``use_image=False``) the cross
  attention is skipped: a keypoint-only refiner.
* A zero-initialised linear layer regresses per-joint offsets, so an untrained K is the
  identity. Hands that are absent (or whose input is not finite) are masked out of the graph and
  the attention, and their output is their input, unchanged.

In keypoint-only mode K is translation-equivariant: it sees only root-relative coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from im2hands_model.hands import MID_JOINT, NUM_JOINTS, SKELETON_EDGES
from im2hands_model.networks.backbone import (
    ImageEncoder,
    ImageFeatures,
    PatchTokenizer,
    pixel_aligned,
)

NUM_NODES = 2 * NUM_JOINTS


def two_hand_edges() -> list[tuple[int, int]]:
    """The 41 edges of the two-hand skeleton graph (node ``21 h + j`` is joint ``j`` of hand ``h``):
    the 20 bones of each hand and the wrist-to-wrist link."""
    edges = [(p, c) for p, c in SKELETON_EDGES]
    edges += [(p + NUM_JOINTS, c + NUM_JOINTS) for p, c in SKELETON_EDGES]
    edges.append((0, NUM_JOINTS))
    return edges


def two_hand_adjacency() -> Tensor:
    """Symmetric 0/1 adjacency ``[42, 42]`` of :func:`two_hand_edges` (no self-loops)."""
    adj = torch.zeros(NUM_NODES, NUM_NODES)
    for a, b in two_hand_edges():
        adj[a, b] = adj[b, a] = 1.0
    return adj


def normalized_adjacency(adj: Tensor, node_mask: Tensor) -> Tensor:
    """``D^-1/2 (A_m + I) D^-1/2`` per sample, where ``A_m`` keeps edges between valid nodes.

    Args:
        adj: ``[N, N]`` 0/1 adjacency.
        node_mask: ``[B, N]`` bool.

    Returns:
        ``[B, N, N]``; a masked node only keeps its self-loop (weight 1).
    """
    m = node_mask.to(adj.dtype)
    a = adj[None] * m[:, :, None] * m[:, None, :]
    a = a + torch.eye(adj.shape[0], dtype=adj.dtype, device=adj.device)
    d = a.sum(-1).rsqrt()
    return d[:, :, None] * a * d[:, None, :]


class _GraphLayer(nn.Module):
    """Pre-norm residual graph convolution with a learned adjacency offset."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.lin = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.adj_offset = nn.Parameter(torch.zeros(NUM_NODES, NUM_NODES))

    def forward(self, h: Tensor, adj: Tensor, pair_mask: Tensor) -> Tensor:
        a = adj + self.adj_offset * pair_mask
        y = a @ self.lin(self.norm(h))
        return h + self.out(F.gelu(y))


class _CrossAttention(nn.Module):
    """Pre-norm residual multi-head cross-attention (joints -> patch tokens) and MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, h: Tensor, tokens: Tensor) -> Tensor:
        h = h + self.attn(self.norm_q(h), tokens, tokens, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class KeypointRefiner(nn.Module):
    """Two-hand keypoint refinement network K (see the module docstring).

    Args:
        dim: token size.
        layers: GCN layers (each followed by cross-attention when image features are used).
        heads: attention heads (must divide ``dim``).
        encoder: keyword arguments of an own :class:`ImageEncoder` (used by :meth:`encode`);
            ``None`` for no encoder (features can still be passed to :meth:`forward`).
        feature_dim: channels of the feature maps given to :meth:`forward`; defaults to the
            own encoder's ``feature_dim`` (required when ``use_image`` and no encoder).
        global_dim: size of the features' global code, added (projected) to every joint token;
            defaults to the own encoder's; ``None`` without an encoder ignores the global code.
        use_image: ``False`` builds the keypoint-only refiner (no tokenizer, no attention).
        token_grid: patch tokens per side (``token_grid**2`` tokens).
        patch: patch side in crop pixels for the tokenizer.
        pixel_features: add each joint's pixel-aligned feature and crop position to its token
            when ``K`` is given.
        coord_scale: metres per unit of the token coordinates (0.1: decimetres, O(1) values).
        offset_scale: metres per unit of the regressed offsets (0.01: centimetres).
    """

    @classmethod
    def from_config(cls, model_cfg: dict) -> KeypointRefiner:
        """K from a run config's ``model`` section (missing keys: defaults)."""
        use_image = bool(model_cfg.get("use_image", True))
        return cls(
            dim=int(model_cfg.get("dim", 64)),
            layers=int(model_cfg.get("layers", 4)),
            heads=int(model_cfg.get("heads", 4)),
            encoder=dict(model_cfg.get("encoder", {})) if use_image else None,
            use_image=use_image,
            token_grid=int(model_cfg.get("token_grid", 4)),
            patch=int(model_cfg.get("patch", 16)),
            pixel_features=bool(model_cfg.get("pixel_features", True)),
        )

    def __init__(
        self,
        dim: int = 64,
        layers: int = 4,
        heads: int = 4,
        encoder: dict | None = None,
        feature_dim: int | None = None,
        global_dim: int | None = None,
        use_image: bool = True,
        token_grid: int = 4,
        patch: int = 16,
        pixel_features: bool = True,
        coord_scale: float = 0.1,
        offset_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        self.dim = dim
        self.coord_scale = float(coord_scale)
        self.offset_scale = float(offset_scale)
        self.use_image = use_image
        self.pixel_features = pixel_features and use_image
        self.encoder = ImageEncoder(**encoder) if (encoder is not None and use_image) else None
        if feature_dim is None and self.encoder is not None:
            feature_dim = self.encoder.feature_dim
        if use_image and feature_dim is None:
            raise ValueError("use_image needs an encoder config or feature_dim")
        self.feature_dim = feature_dim
        if global_dim is None and self.encoder is not None:
            global_dim = self.encoder.global_dim
        self.global_proj = nn.Linear(global_dim, dim) if (use_image and global_dim) else None

        self.joint_embed = nn.Parameter(torch.randn(NUM_NODES, dim) * 0.02)
        self.coord_mlp = nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))
        self.register_buffer("adjacency", two_hand_adjacency())
        self.gcn = nn.ModuleList(_GraphLayer(dim) for _ in range(layers))
        if use_image:
            self.tokenizer = PatchTokenizer(feature_dim, dim, patch=patch, grid=token_grid,
                                            heads=heads)  # fmt: skip
            self.cross = nn.ModuleList(_CrossAttention(dim, heads) for _ in range(layers))
        if self.pixel_features:
            self.pixel_proj = nn.Linear(feature_dim + 2, dim)
        self.out_norm = nn.LayerNorm(dim)
        self.offset = nn.Linear(dim, 3)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def encode(self, image: Tensor) -> ImageFeatures | None:
        """Image features from the own encoder (``None`` without one)."""
        if self.encoder is None:
            return None
        return self.encoder(image)

    def forward(
        self,
        joints: Tensor,
        present: Tensor,
        feats: ImageFeatures | None = None,
        image: Tensor | None = None,
        K: Tensor | None = None,
    ) -> Tensor:
        """Refine two-hand keypoints.

        Args:
            joints: ``[B, 2, 21, 3]`` camera frame, metres (left hand first).
            present: ``[B, 2]`` bool; absent hands pass through unchanged.
            feats: image features of the crop (``feature_dim`` channels); ``None`` with no
                ``image`` runs keypoint-only.
            image: ``[B, 3, H, W]`` crop, encoded with the own encoder when ``feats`` is None
                (so a single call, e.g. through DDP, covers encoder and refiner).
            K: ``[B, 3, 3]`` crop intrinsics, for the pixel-aligned joint features.

        Returns:
            ``[B, 2, 21, 3]`` refined joints. Hands that are absent or not finite are returned
            as given (the output never takes NaN from them).
        """
        if joints.dim() != 4 or joints.shape[1:] != (2, NUM_JOINTS, 3):
            raise ValueError(f"joints must be [B, 2, 21, 3], got {tuple(joints.shape)}")
        b = joints.shape[0]
        if present.shape != (b, 2):
            raise ValueError(f"present must be [{b}, 2], got {tuple(present.shape)}")
        if feats is None and image is not None:
            feats = self.encode(image)
        valid = present.bool() & torch.isfinite(joints).flatten(2).all(-1)  # [B, 2]
        clean = torch.where(valid[..., None, None], joints, torch.zeros_like(joints)).float()

        wrists = clean[:, :, 0]  # [B, 2, 3]
        count = valid.sum(1, keepdim=True).clamp_min(1)
        root = (wrists * valid[..., None]).sum(1) / count  # [B, 3]
        rel = (clean - root[:, None, None]) / self.coord_scale
        rel = torch.where(valid[..., None, None], rel, torch.zeros_like(rel))
        node_mask = valid[:, :, None].expand(b, 2, NUM_JOINTS).reshape(b, NUM_NODES)

        h = self.joint_embed[None] + self.coord_mlp(rel.reshape(b, NUM_NODES, 3))
        use_img = self.use_image and feats is not None
        if use_img and self.pixel_features and K is not None:
            fmap = feats.fmap.float()
            pix = pixel_aligned(fmap, clean.reshape(b, NUM_NODES, 3), K.float(), feats.stride)
            size = torch.tensor(fmap.shape[-1:-3:-1], device=fmap.device) * feats.stride
            uvw = clean.reshape(b, NUM_NODES, 3) @ K.float().transpose(1, 2)
            uv = uvw[..., :2] / uvw[..., 2:3].clamp_min(1e-6)
            uv = (2 * uv / size - 1).clamp(-2.0, 2.0)
            uv = torch.where(node_mask[..., None], uv, torch.zeros_like(uv))
            h = h + self.pixel_proj(torch.cat([pix, uv], dim=-1))
        if use_img and self.global_proj is not None:
            h = h + self.global_proj(feats.global_code.float())[:, None]
        tokens = self.tokenizer(feats.fmap.float()) if use_img else None

        adj = normalized_adjacency(self.adjacency, node_mask)
        pair = (node_mask[:, :, None] & node_mask[:, None, :]).to(h.dtype)
        for i, layer in enumerate(self.gcn):
            h = layer(h, adj, pair)
            if tokens is not None:
                h = self.cross[i](h, tokens)
        offset = self.offset(self.out_norm(h)).view(b, 2, NUM_JOINTS, 3) * self.offset_scale
        refined = clean + offset
        return torch.where(valid[..., None, None], refined.to(joints.dtype), joints)


def add_keypoint_noise(
    joints: Tensor,
    present: Tensor,
    gen: torch.Generator,
    sigma_mm: float = 8.0,
    global_mm: float = 10.0,
) -> Tensor:
    """Corrupt keypoints to make training inputs for K.

    Each joint of a present hand gets isotropic Gaussian noise of ``sigma_mm`` per axis, and
    each present hand a global offset of ``global_mm`` per axis (shared by its 21 joints).
    Absent hands are returned unchanged.

    Args:
        joints: ``[B, 2, 21, 3]`` metres.
        present: ``[B, 2]`` bool.
        gen: the random generator (any device; the noise is moved to ``joints.device``).
        sigma_mm: per-joint standard deviation, mm.
        global_mm: per-hand standard deviation, mm.

    Returns:
        ``[B, 2, 21, 3]`` noisy joints.
    """
    b = joints.shape[0]
    dev = gen.device
    per_joint = torch.randn((b, 2, NUM_JOINTS, 3), generator=gen, device=dev) * (sigma_mm / 1000)
    per_hand = torch.randn((b, 2, 1, 3), generator=gen, device=dev) * (global_mm / 1000)
    noise = (per_joint + per_hand).to(device=joints.device, dtype=joints.dtype)
    return torch.where(present.bool()[..., None, None], joints + noise, joints)


def refine_loss(
    refined: Tensor,
    gt: Tensor,
    present: Tensor,
    abs_weight: float = 0.5,
    align_joint: int = MID_JOINT,
) -> Tensor:
    """Root-relative joint error of K in mm (+ a small absolute term).

    The main term is the mean Euclidean error after aligning each hand at ``align_joint``
    (joint 9, the evaluation protocol); ``abs_weight`` times the camera-frame error is added so
    the refined hands also stay where they belong (the root-relative term alone leaves the
    absolute position free to drift).

    Args:
        refined, gt: ``[B, 2, 21, 3]`` metres.
        present: ``[B, 2]`` bool; other hands (which may hold NaN) are ignored.

    Returns:
        Scalar loss in mm (0, with a graph, when no hand is present).
    """
    mask = present.bool() & torch.isfinite(gt).flatten(2).all(-1)
    mask = mask & torch.isfinite(refined).flatten(2).all(-1)
    m4 = mask[..., None, None]
    r = torch.where(m4, refined, torch.zeros_like(refined))
    g = torch.where(m4, gt, torch.zeros_like(gt))
    rel = (r - r[..., align_joint : align_joint + 1, :]) - (
        g - g[..., align_joint : align_joint + 1, :]
    )
    err = rel.norm(dim=-1).mean(-1) * 1000.0  # [B, 2]
    err = err + abs_weight * (r - g).norm(dim=-1).mean(-1) * 1000.0
    return (err * mask).sum() / mask.sum().clamp_min(1)


__all__ = [
    "KeypointRefiner",
    "add_keypoint_noise",
    "normalized_adjacency",
    "refine_loss",
    "two_hand_adjacency",
    "two_hand_edges",
]
