"""Image encoder shared by the keypoint and occupancy networks (SPEC §3.2, §3.3, §3.4).

* :class:`ImageEncoder`: a ResNet encoder (ResNet-18/34 with basic blocks, ResNet-50 with
  bottlenecks; stem conv 7x7 stride 2 + max-pool) and a light U-Net-style decoder (upsample,
  skip connection, conv) back to stride 4. It returns :class:`ImageFeatures`: a feature map
  ``[B, feature_dim, H/4, W/4]`` and a global code ``[B, global_dim]`` (pooled bottleneck ->
  linear).
* :class:`PatchTokenizer`: a feature map -> a small grid of tokens with a learned position
  embedding and one self-attention block (the "patch tokens" that joints or query points
  attend to).
* :func:`pixel_aligned`: bilinear feature lookup at the projection of camera-frame points.

torchvision has no CPU build that can be installed in this environment, so the ResNet is
written out here (the standard layout of He et al., "Deep Residual Learning for Image
Recognition", CVPR 2016). There are no pretrained weights: the networks train from scratch.

Pixel convention (as in the datasets): pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``, so its
centre is at ``(c + 0.5, r + 0.5)``. The stem and every down-sampling layer are "same"-padded,
so feature cell ``(i, j)`` of a stride-``s`` map covers pixels ``[s j, s (j+1))`` and a pixel
coordinate ``u`` maps to the feature coordinate ``u / s``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Per depth: block type and number of blocks in each of the four stages.
_LAYOUTS: dict[str, tuple[str, tuple[int, int, int, int]]] = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


@dataclass
class ImageFeatures:
    """Output of :class:`ImageEncoder`.

    Attributes:
        fmap: ``[B, C, H/4, W/4]`` decoder feature map (stride 4 w.r.t. the input crop).
        global_code: ``[B, G]`` pooled bottleneck feature.
        stride: pixels of the input per feature cell.
    """

    fmap: Tensor
    global_code: Tensor
    stride: int = 4


def _num_groups(channels: int) -> int:
    """Groups for GroupNorm: at most 32, at least 4 channels per group where possible."""
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0 and channels // g >= 4:
            return g
    return 1


def _norm2d(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(_num_groups(channels), channels)
    raise ValueError(f"norm must be 'batch' or 'group', got {kind!r}")


class _BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.n1 = _norm2d(norm, width)
        self.conv2 = nn.Conv2d(width, out_ch, 3, 1, 1, bias=False)
        self.n2 = _norm2d(norm, out_ch)
        self.last_norm = self.n2
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm2d(norm, out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.n1(self.conv1(x)))
        y = self.n2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, residual (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.n1 = _norm2d(norm, width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.n2 = _norm2d(norm, width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.n3 = _norm2d(norm, out_ch)
        self.last_norm = self.n3
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _norm2d(norm, out_ch)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.n1(self.conv1(x)))
        y = F.relu(self.n2(self.conv2(y)))
        y = self.n3(self.conv3(y))
        return F.relu(y + self.shortcut(x))


class _UpBlock(nn.Module):
    """Decoder step: project, upsample x2 to the skip's size, concatenate the skip, 3x3 conv."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str) -> None:
        super().__init__()
        self.lateral = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.skip = nn.Conv2d(skip_ch, out_ch, 1, bias=False)
        self.fuse = nn.Sequential(
            nn.Conv2d(2 * out_ch, out_ch, 3, 1, 1, bias=False),
            _norm2d(norm, out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(self.lateral(x), size=skip.shape[-2:], mode="bilinear",
                          align_corners=False)  # fmt: skip
        return self.fuse(torch.cat([x, self.skip(skip)], dim=1))


class ImageEncoder(nn.Module):
    """ResNet encoder + light U-Net decoder to stride 4 (see the module docstring).

    Args:
        depth: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        base_width: channels of the first stage (64 in the standard ResNet; 16 is a CPU size).
        feature_dim: channels ``C`` of the output feature map.
        global_dim: size ``G`` of the global code.
        norm: ``"group"`` (default: GroupNorm, independent of the batch size and identical in
            training and evaluation, which suits small batches and training from scratch) or
            ``"batch"`` (BatchNorm, the original ResNet).

    The input ``[B, 3, H, W]`` is an RGB image in ``[0, 1]``; it is normalised with the
    ImageNet mean and standard deviation (buffers). Any size works; multiples of 32 keep every
    stage exact. Output feature maps are ``ceil(H / 4) x ceil(W / 4)``.
    """

    def __init__(
        self,
        depth: str = "resnet18",
        base_width: int = 64,
        feature_dim: int = 64,
        global_dim: int = 256,
        norm: str = "group",
    ) -> None:
        super().__init__()
        if depth not in _LAYOUTS:
            raise ValueError(f"depth must be one of {sorted(_LAYOUTS)}, got {depth!r}")
        if min(base_width, feature_dim, global_dim) < 1:
            raise ValueError("base_width, feature_dim and global_dim must be positive")
        self.depth = depth
        self.feature_dim = feature_dim
        self.global_dim = global_dim
        self.stride = 4
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

        kind, counts = _LAYOUTS[depth]
        block = _BasicBlock if kind == "basic" else _Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(3, base_width, 7, 2, 3, bias=False),
            _norm2d(norm, base_width),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
        stages = []
        channels = []  # output channels of each stage (strides 4, 8, 16, 32)
        in_ch = base_width
        for i, n in enumerate(counts):
            width = base_width * 2**i
            blocks = []
            for b in range(n):
                blocks.append(block(in_ch, width, 2 if (b == 0 and i > 0) else 1, norm))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*blocks))
            channels.append(in_ch)
        self.stages = nn.ModuleList(stages)

        c2, c3, c4, c5 = channels
        d16, d8, d4 = 4 * base_width, 2 * base_width, max(base_width, feature_dim)
        self.up16 = _UpBlock(c5, c4, d16, norm)
        self.up8 = _UpBlock(d16, c3, d8, norm)
        self.up4 = _UpBlock(d8, c2, d4, norm)
        self.head = nn.Conv2d(d4, feature_dim, 1)
        self.global_head = nn.Linear(c5, global_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Each residual branch starts as zero so every block is the identity at init
        # (Goyal et al. 2017): stable training from scratch.
        for m in self.modules():
            if isinstance(m, _BasicBlock | _Bottleneck):
                nn.init.zeros_(m.last_norm.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, image: Tensor) -> ImageFeatures:
        """Encode ``image`` ``[B, 3, H, W]`` (RGB in ``[0, 1]``) into :class:`ImageFeatures`."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be [B, 3, H, W], got {tuple(image.shape)}")
        x = (image - self.mean) / self.std
        x = self.stem(x)
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        c2, c3, c4, c5 = feats
        y = self.up4(self.up8(self.up16(c5, c4), c3), c2)
        fmap = self.head(y)
        global_code = self.global_head(c5.mean(dim=(2, 3)))
        return ImageFeatures(fmap=fmap, global_code=global_code, stride=self.stride)


class _SelfAttentionBlock(nn.Module):
    """Pre-norm transformer block: multi-head self-attention and an MLP, both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = max(1, int(dim * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class PatchTokenizer(nn.Module):
    """Turn a feature map into ``grid x grid`` tokens with position embedding + self-attention.

    Each ``patch x patch``-pixel patch of the input crop (``patch / stride`` feature cells) is
    embedded linearly (a convolution with kernel = stride = ``patch / stride``, ViT style); the
    patch embeddings are then average-pooled to a fixed ``grid x grid`` layout so that any
    input size gives the same tokens (at ``grid * patch`` pixels each token is one patch), a
    learned position embedding is added and one self-attention block mixes the tokens.

    Args:
        in_channels: channels ``C`` of the feature map.
        dim: token size.
        patch: patch side in input pixels.
        grid: tokens per side; ``T = grid * grid``.
        stride: pixels per feature cell of the input feature map.
        heads: attention heads (must divide ``dim``).
    """

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch: int = 16,
        grid: int = 4,
        stride: int = 4,
        heads: int = 2,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide dim ({dim})")
        if grid < 1 or patch < 1 or stride < 1:
            raise ValueError("patch, grid and stride must be positive")
        self.cells = max(1, patch // stride)
        self.grid = grid
        self.dim = dim
        self.embed = nn.Conv2d(in_channels, dim, self.cells, self.cells)
        self.pos = nn.Parameter(torch.randn(1, grid * grid, dim) * 0.02)
        self.block = _SelfAttentionBlock(dim, heads)
        self.norm = nn.LayerNorm(dim)

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    def forward(self, fmap: Tensor) -> Tensor:
        """``fmap`` ``[B, C, h, w]`` -> tokens ``[B, grid * grid, dim]``."""
        if fmap.dim() != 4:
            raise ValueError(f"fmap must be [B, C, h, w], got {tuple(fmap.shape)}")
        h, w = fmap.shape[-2:]
        k = self.cells
        if h % k or w % k:  # resample to a whole number of patches (at least one)
            size = (max(1, round(h / k)) * k, max(1, round(w / k)) * k)
            fmap = F.adaptive_avg_pool2d(fmap, size)
        x = F.adaptive_avg_pool2d(self.embed(fmap), self.grid)  # [B, dim, g, g]
        x = x.flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.block(x))


def project_points(points: Tensor, K: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Project camera-frame points with intrinsics ``K``.

    Args:
        points: ``[B, P, 3]`` camera frame (metres).
        K: ``[B, 3, 3]``.
        eps: smallest depth counted as in front of the camera.

    Returns:
        ``(uv, valid)``: pixel coordinates ``[B, P, 2]`` (0 where invalid) and ``[B, P]`` bool,
        False for non-finite points and points with ``z <= eps``.
    """
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be [B, P, 3], got {tuple(points.shape)}")
    if K.shape != (points.shape[0], 3, 3):
        raise ValueError(f"K must be [{points.shape[0]}, 3, 3], got {tuple(K.shape)}")
    finite = torch.isfinite(points).all(dim=-1)
    pts = torch.where(finite[..., None], points, torch.zeros_like(points))
    valid = finite & (pts[..., 2] > eps)
    uvw = pts @ K.transpose(1, 2).to(pts.dtype)
    w = torch.where(valid, uvw[..., 2], torch.ones_like(uvw[..., 2]))
    uv = uvw[..., :2] / w[..., None]
    uv = torch.where(valid[..., None], uv, torch.zeros_like(uv))
    return uv, valid


def pixel_aligned(fmap: Tensor, points: Tensor, K: Tensor, stride: int = 4) -> Tensor:
    """Bilinearly sample ``fmap`` at the projections of camera-frame ``points``.

    A point projecting to pixel coordinates ``(u, v)`` reads the feature map at feature
    coordinates ``(u / stride, v / stride)``, where feature cell ``j`` covers ``[j, j+1)``
    (``F.grid_sample`` with ``align_corners=False``; values within half a cell of the border
    are clamped to the border cells). Points behind the camera (``z <= 0``), non-finite points
    and points projecting outside the map get zeros.

    Args:
        fmap: ``[B, C, h, w]`` feature map of a crop with intrinsics ``K``.
        points: ``[B, P, 3]`` camera frame (metres).
        K: ``[B, 3, 3]`` intrinsics of the crop.
        stride: crop pixels per feature cell.

    Returns:
        ``[B, P, C]`` features.
    """
    if fmap.dim() != 4:
        raise ValueError(f"fmap must be [B, C, h, w], got {tuple(fmap.shape)}")
    if points.shape[0] != fmap.shape[0]:
        raise ValueError("fmap and points must have the same batch size")
    h, w = fmap.shape[-2:]
    uv, valid = project_points(points, K)
    fx = uv[..., 0] / stride
    fy = uv[..., 1] / stride
    valid = valid & (fx >= 0) & (fx <= w) & (fy >= 0) & (fy <= h)
    grid = torch.stack([2 * fx / w - 1, 2 * fy / h - 1], dim=-1)
    grid = torch.where(valid[..., None], grid, torch.zeros_like(grid))
    out = F.grid_sample(fmap, grid[:, None].to(fmap.dtype), mode="bilinear",
                        padding_mode="border", align_corners=False)  # fmt: skip
    out = out[:, :, 0].transpose(1, 2)  # [B, P, C]
    return out * valid[..., None].to(out.dtype)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageEncoder",
    "ImageFeatures",
    "PatchTokenizer",
    "count_parameters",
    "pixel_aligned",
    "project_points",
]
