"""Photometric augmentation of training crops (geometry untouched, so intrinsics stay valid).

Synthetic renders are cleaner and more uniform than camera images; jittering brightness,
contrast and colour balance and adding pixel noise keeps image networks from keying on the
renderer's exact colours. Every draw comes from the step's generator, so a resumed run sees
the same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

import torch
from torch import Tensor


def photometric(images: Tensor, gen: torch.Generator, colour: float = 0.0,
                noise: float = 0.0) -> Tensor:  # fmt: skip
    """``[B, 3, H, W]`` images in ``[0, 1]`` with per-image random jitter, clamped to ``[0, 1]``.

    Args:
        images: the batch (not modified).
        gen: random generator (CPU) of the step.
        colour: relative size of the brightness, contrast and per-channel gain jitter
            (each drawn uniformly in ``[-colour, colour]``; 0 = off).
        noise: standard deviation of additive Gaussian pixel noise (0 = off).
    """
    if colour <= 0 and noise <= 0:
        return images
    b = images.shape[0]

    def uniform(*shape: int) -> Tensor:
        u = torch.rand(shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0
        return u.to(images.device, images.dtype)

    out = images
    if colour > 0:
        mean = out.mean(dim=(1, 2, 3), keepdim=True)
        contrast = 1.0 + colour * uniform(b, 1, 1, 1)
        brightness = 1.0 + colour * uniform(b, 1, 1, 1)
        gain = 1.0 + 0.5 * colour * uniform(b, 3, 1, 1)
        out = ((out - mean) * contrast + mean) * brightness * gain
    if noise > 0:
        eps = torch.randn(out.shape, generator=gen, dtype=torch.float32).to(out.device, out.dtype)
        out = out + noise * eps
    return out.clamp(0.0, 1.0)


def augment_options(cfg: dict) -> tuple[float, float]:
    """``(colour, noise)`` from a config's ``data.augment`` (0, 0 when absent)."""
    aug = (cfg.get("data", {}) or {}).get("augment", {}) or {}
    return float(aug.get("colour", 0.0)), float(aug.get("noise", 0.0))
