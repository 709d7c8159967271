"""Point-cloud primitives for the refinement network: farthest-point sampling, kNN, gathering.

Pure PyTorch (no custom CUDA/C++ extension, unlike ``pointnet2_ops``): everything runs on any
device torch supports and needs no build step. The loops are over the number of *samples*
(farthest-point sampling) or query *chunks* (kNN), never over the batch: each step is a handful of
batched tensor ops.

Conventions: ``B`` batch, ``N``/``R`` reference points, ``Q`` queries, ``k`` samples/neighbours.
Index tensors are ``int64``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["farthest_point_sample", "gather_points", "knn"]

#: Default budget of the kNN distance matrix chunk: ``B * chunk * R`` elements (64 MiB float32).
KNN_MAX_ELEMENTS = 1 << 24


def gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """Gather rows of ``x`` per batch element.

    Args:
        x: ``[B, N, C]`` (or ``[B, N]``, which returns ``[B, ...]``).
        idx: ``[B, ...]`` int64 indices into ``N``, any trailing shape.

    Returns:
        ``[B, ..., C]`` with ``out[b, i..., :] = x[b, idx[b, i...], :]``.
    """
    if x.dim() == 2:
        return gather_points(x[..., None], idx)[..., 0]
    if x.dim() != 3:
        raise ValueError(f"gather_points expects x [B, N, C], got {tuple(x.shape)}")
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"batch mismatch: x {tuple(x.shape)} vs idx {tuple(idx.shape)}")
    b, _, c = x.shape
    flat = idx.reshape(b, math.prod(idx.shape[1:]))
    out = torch.gather(x, 1, flat[..., None].expand(b, flat.shape[1], c))
    return out.reshape(*idx.shape, c)


@torch.no_grad()
def farthest_point_sample(
    points: Tensor,
    k: int,
    mask: Tensor | None = None,
    start: Literal["first", "random"] = "first",
    gen: torch.Generator | None = None,
) -> Tensor:
    """Iterative farthest-point sampling, vectorised over the batch.

    Starts from one point (the first valid point, or a uniformly random valid one drawn from
    ``gen``) and then repeatedly adds the valid point farthest from the points chosen so far.
    Deterministic: ties go to the lowest index, and ``start="random"`` depends only on ``gen``.

    Masked-out points are never chosen. A row with fewer than ``k`` valid points returns all of
    them first and then repeats its first chosen point (so the result is still ``[B, k]``). Points
    that are masked out may hold anything (NaN included); valid points must be finite.

    Args:
        points: ``[B, N, 3]`` (any number of coordinates works).
        k: number of samples, ``>= 1``.
        mask: ``[B, N]`` bool, True = may be chosen; ``None`` = all valid.
        start: ``"first"`` (lowest valid index) or ``"random"``.
        gen: generator for ``start="random"`` (on the CPU or on ``points.device``).

    Returns:
        ``[B, k]`` int64 indices into ``N``.

    Raises:
        ValueError: bad shapes, ``k < 1``, or a row without any valid point.
    """
    if points.dim() != 3:
        raise ValueError(f"points must be [B, N, D], got {tuple(points.shape)}")
    b, n, _ = points.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    device = points.device
    if mask is None:
        mask = torch.ones(b, n, dtype=torch.bool, device=device)
    elif mask.shape != (b, n):
        raise ValueError(f"mask must be [B, N] = {(b, n)}, got {tuple(mask.shape)}")
    mask = mask.to(device=device, dtype=torch.bool)
    if b == 0:
        return torch.zeros(0, k, dtype=torch.long, device=device)
    if n == 0 or not bool(mask.any(dim=1).all()):
        raise ValueError("farthest_point_sample: a batch row has no valid point to sample")
    # Masked points may be NaN: zero them so that no NaN reaches the distance updates.
    pts = torch.where(mask[..., None], points, torch.zeros((), dtype=points.dtype, device=device))

    if start == "first":
        current = mask.to(torch.uint8).argmax(dim=1)  # first True
    elif start == "random":
        weights = mask.to(torch.float32)
        if gen is not None:
            weights = weights.to(gen.device)
        current = torch.multinomial(weights, 1, generator=gen)[:, 0].to(device)
    else:
        raise ValueError(f"start must be 'first' or 'random', got {start!r}")

    neg_inf = torch.tensor(float("-inf"), dtype=pts.dtype, device=device)
    # Distance of every point to the chosen set; masked points sit at -inf and are never argmax.
    min_d2 = torch.where(mask, torch.tensor(float("inf"), dtype=pts.dtype, device=device), neg_inf)
    out = torch.empty(b, k, dtype=torch.long, device=device)
    rows = torch.arange(b, device=device)
    for i in range(k):
        out[:, i] = current
        chosen = pts[rows, current]  # [B, D]
        d2 = (pts - chosen[:, None, :]).square().sum(-1)
        min_d2 = torch.minimum(min_d2, d2)
        min_d2 = torch.where(mask, min_d2, neg_inf)
        current = min_d2.argmax(dim=1)
    return out


def knn(
    query: Tensor,
    ref: Tensor,
    k: int,
    ref_mask: Tensor | None = None,
    chunk: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The ``k`` nearest reference points of every query (Euclidean), nearest first.

    Indices come from ``topk`` of ``torch.cdist`` computed chunk by chunk over the queries, so
    memory stays at about ``B * chunk * R`` elements; the returned squared distances are then
    recomputed exactly from the gathered points (differentiable w.r.t. both inputs).

    Args:
        query: ``[B, Q, D]``.
        ref: ``[B, R, D]``.
        k: neighbours per query, ``1 <= k <= R``.
        ref_mask: ``[B, R]`` bool, True = may be a neighbour. If a row has fewer than ``k``
            valid references, the missing slots hold masked indices with ``dist2 = inf``.
        chunk: queries per chunk (default: keep ``B * chunk * R`` under 2**24).

    Returns:
        ``(dist2 [B, Q, k], idx [B, Q, k])``; ``idx`` is int64 into ``R``.
    """
    if query.dim() != 3 or ref.dim() != 3 or query.shape[0] != ref.shape[0]:
        raise ValueError(f"knn expects query [B,Q,D] and ref [B,R,D], got "
                         f"{tuple(query.shape)} and {tuple(ref.shape)}")  # fmt: skip
    b, q, _ = query.shape
    r = ref.shape[1]
    if not 1 <= k <= r:
        raise ValueError(f"knn: k={k} must be in [1, R={r}]")
    if ref_mask is not None and ref_mask.shape != (b, r):
        raise ValueError(f"ref_mask must be [B, R] = {(b, r)}, got {tuple(ref_mask.shape)}")
    if chunk is None:
        chunk = max(1, KNN_MAX_ELEMENTS // max(1, b * r))
    idx_parts = []
    with torch.no_grad():
        qd, rd = query.detach(), ref.detach()
        if ref_mask is not None:
            rd = torch.where(
                ref_mask[..., None], rd, torch.zeros((), dtype=rd.dtype, device=rd.device)
            )
        for s in range(0, q, chunk):
            d = torch.cdist(qd[:, s : s + chunk], rd)
            if ref_mask is not None:
                d = d.masked_fill(~ref_mask[:, None, :], float("inf"))
            idx_parts.append(d.topk(k, dim=-1, largest=False, sorted=True).indices)
    idx = torch.cat(idx_parts, dim=1) if idx_parts else query.new_zeros(b, 0, k, dtype=torch.long)
    nb = gather_points(ref, idx)  # [B, Q, k, D]
    dist2 = (query[:, :, None, :] - nb).square().sum(-1)
    if ref_mask is not None:
        valid = gather_points(ref_mask, idx)
        dist2 = dist2.masked_fill(~valid, float("inf"))
    return dist2, idx
