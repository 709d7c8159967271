"""Augmentation of training crops: photometric jitter, and mirror / in-plane rotation.

Synthetic renders are cleaner and more uniform than camera images; jittering brightness,
contrast and colour balance and adding pixel noise keeps image networks from keying on the
renderer's exact colours (:func:`photometric`, geometry untouched).

:func:`mirror_rotate` makes new, exactly labelled views of a scene for the keypoint predictor,
which overfits a few thousand scenes (docs/measurements.md). Both transforms are exact camera
geometry, not image tricks:

* **mirror** flips the crop left-right. The flipped picture is what a camera sees of the mirror
  image of the scene (``x -> -x`` in the camera frame, principal point ``cx -> W - cx``). The
  mirror image of a left hand is a right hand, so the two hands also swap places.
* **rotation** by ``theta`` about the crop centre ``c`` is a rotation ``Rz(theta)`` of the camera
  about its optical axis plus a shift of the principal point: with square pixels,
  ``R2 (p - c) + c = K' Rz K^-1 p`` for ``K'`` = ``K`` with principal point
  ``pp + (I - R2)(c - pp)``. Joints rotate by ``Rz`` in the camera frame.

Pixel coordinates are continuous with pixel ``i`` covering ``[i, i + 1)`` (the datasets'
``joints_2d`` convention). Every draw comes from the step's generator, so a resumed run sees
the same augmented batches as an uninterrupted one.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
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


def _inside(uv: Tensor, present: Tensor, height: int, width: int) -> Tensor:
    """``[B]``: every present joint of ``uv [B, 2, 21, 2]`` lies inside the crop."""
    ok = (uv[..., 0] >= 0) & (uv[..., 0] <= width) & (uv[..., 1] >= 0) & (uv[..., 1] <= height)
    return (ok.all(-1) | ~present).all(-1)


def mirror_rotate(
    image: Tensor,
    K: Tensor,
    joints_3d: Tensor,
    joints_2d: Tensor,
    present: Tensor,
    gen: torch.Generator,
    mirror: float = 0.0,
    rotate_deg: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Random mirror and in-plane rotation of two-hand crops with their labels (module docstring).

    Each crop is mirrored with probability ``mirror`` and rotated about its centre by an angle
    drawn uniformly in ``[-rotate_deg, rotate_deg]``. A crop whose present joints would leave the
    picture keeps angle 0 (its labels stay inside the crop); uncovered corners get the crop's
    mean colour.

    Args:
        image: ``[B, 3, H, W]`` crops.
        K: ``[B, 3, 3]`` their intrinsics (square pixels and no skew when rotating).
        joints_3d: ``[B, 2, 21, 3]`` camera frame (left hand first).
        joints_2d: ``[B, 2, 21, 2]`` crop pixels.
        present: ``[B, 2]`` hand presence.
        gen: random generator (CPU) of the step.
        mirror: probability of mirroring a crop, in ``[0, 1]``.
        rotate_deg: largest rotation, degrees, in ``[0, 180]``.

    Returns:
        ``(image, K, joints_3d, joints_2d, present)`` of the new views (inputs not modified).

    Raises:
        ValueError: a probability or angle out of range, or rotation of a camera with
            non-square pixels or skew (the rotated camera would not be a pinhole ``K``).
    """
    if not 0.0 <= mirror <= 1.0:
        raise ValueError(f"mirror must be a probability in [0, 1], got {mirror}")
    if not 0.0 <= rotate_deg <= 180.0:
        raise ValueError(f"rotate_deg must lie in [0, 180], got {rotate_deg}")
    if mirror <= 0 and rotate_deg <= 0:
        return image, K, joints_3d, joints_2d, present
    b, _, height, width = image.shape
    dev, dt = image.device, image.dtype
    K = K.to(torch.float64)
    if rotate_deg > 0:
        fx, fy, skew = K[:, 0, 0], K[:, 1, 1], K[:, 0, 1]
        if bool(((fx - fy).abs() > 1e-6 * fx.abs()).any() or (skew != 0).any()):
            raise ValueError("rotation needs square pixels and no skew (K[0,0] == K[1,1], "
                             "K[0,1] == 0); use rotate_deg=0 for this camera")  # fmt: skip
    flip = (torch.rand(b, generator=gen) < mirror).to(dev)
    theta = (torch.rand(b, generator=gen, dtype=torch.float64) * 2 - 1) * math.radians(rotate_deg)
    theta = theta.to(dev)
    swap = torch.tensor([1, 0], device=dev)

    # mirror: u -> W - u, x -> -x, cx -> W - cx (and skew -> -skew), hands swap
    sign = torch.where(flip, -1.0, 1.0).to(torch.float64)
    j3 = joints_3d.to(torch.float64).clone()
    j2 = joints_2d.to(torch.float64).clone()
    j3[..., 0] = j3[..., 0] * sign[:, None, None]
    j2[..., 0] = torch.where(flip[:, None, None], width - j2[..., 0], j2[..., 0])
    K = K.clone()
    K[:, 0, 2] = torch.where(flip, width - K[:, 0, 2], K[:, 0, 2])
    K[:, 0, 1] = K[:, 0, 1] * sign
    pick = flip[:, None]
    j3 = torch.where(pick[..., None, None], j3[:, swap], j3)
    j2 = torch.where(pick[..., None, None], j2[:, swap], j2)
    present = torch.where(pick, present[:, swap], present)

    # rotation about the crop centre; crops that would lose a joint keep angle 0
    centre = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=dev)
    cos, sin = theta.cos(), theta.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B,2,2]
    j2_rot = (j2 - centre) @ rot.transpose(1, 2)[:, None] + centre
    keep = _inside(j2_rot, present.bool(), height, width)
    theta = torch.where(keep, theta, torch.zeros_like(theta))
    cos, sin = theta.cos(), theta.sin()
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    j2 = (j2 - centre) @ rot.transpose(1, 2)[:, None] + centre
    j3 = torch.cat([j3[..., :2] @ rot.transpose(1, 2)[:, None], j3[..., 2:]], dim=-1)
    pp = K[:, :2, 2]
    K[:, :2, 2] = pp + ((centre - pp)[:, None, :] @ (torch.eye(2, dtype=K.dtype, device=dev)
                                                     - rot).transpose(1, 2))[:, 0]  # fmt: skip

    # image: mirrored crops are flipped exactly; a rotated one's output pixel p' samples the
    # input at m(R2^T (p' - c) + c), in affine_grid's coordinates (crop centre 0, edges +-1)
    # diag(2/W, 2/H) S R2^T diag(W/2, H/2) with S = diag(-1, 1) when mirrored, no translation
    warped = torch.where(flip[:, None, None, None], image.flip(-1), image)
    turned = torch.nonzero(theta != 0)[:, 0]
    if len(turned):
        half = torch.tensor([width / 2.0, height / 2.0], dtype=torch.float64, device=dev)
        rt = rot[turned].transpose(1, 2)
        mat = rt * half  # R2^T diag(W/2, H/2)
        mat[:, 0] = mat[:, 0] * sign[turned, None]  # S flips the x row
        mat = mat / half[None, :, None]
        aff = torch.cat([mat, torch.zeros(len(turned), 2, 1, dtype=mat.dtype, device=dev)], -1)
        grid = F.affine_grid(aff.to(dt), [len(turned), 1, height, width], align_corners=False)
        src = image[turned]
        both = torch.cat([src, torch.ones_like(src[:, :1])], 1)  # colour + coverage
        both = F.grid_sample(both, grid, mode="bilinear", padding_mode="zeros",
                             align_corners=False)  # fmt: skip
        fill = (1 - both[:, -1:]) * src.mean(dim=(2, 3), keepdim=True)
        warped = warped.index_copy(0, turned, both[:, :-1] + fill)
    return (warped, K.to(dt), j3.to(joints_3d.dtype), j2.to(joints_2d.dtype), present)


def augment_options(cfg: dict) -> tuple[float, float]:
    """``(colour, noise)`` from a config's ``data.augment`` (0, 0 when absent)."""
    aug = (cfg.get("data", {}) or {}).get("augment", {}) or {}
    return float(aug.get("colour", 0.0)), float(aug.get("noise", 0.0))


def geometric_options(cfg: dict) -> tuple[float, float]:
    """``(mirror, rotate)`` from a config's ``data.augment`` (0, 0 when absent)."""
    aug = (cfg.get("data", {}) or {}).get("augment", {}) or {}
    return float(aug.get("mirror", 0.0)), float(aug.get("rotate", 0.0))
