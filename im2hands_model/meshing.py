"""Hierarchical mesh extraction from occupancy functions (Occupancy Networks' MISE, SPEC §3.6).

An occupancy function is evaluated for all hands at once::

    occ_fn(points: Tensor[H, P, 3]) -> Tensor[H, P]   # probabilities in [0, 1]

where ``points[h]`` are query points of hand ``h`` in that hand's box coordinates (e.g. its
normalised hand space, box ``[-box_half, box_half]^3``). Hand ``h``'s answers are read from row
``h`` only, so one call serves both hands of a scene (and every image feature is computed once by
the caller, outside ``occ_fn``).

Algorithm (multiresolution iso-surface extraction, Mescheder et al. 2019)
------------------------------------------------------------------------
With ``resolution = r`` and ``upsampling_steps = s`` the final grid has ``N = r 2^s + 1`` points
per axis spanning the box (spacing ``2 box_half / (N - 1)``; the paper protocol is 32³ with 3
steps, 256³ cells, in the ±0.55 box = ±0.22 m).

1. Level 0: evaluate the ``(r + 1)^3`` corners of the coarse grid.
2. At each level, a cell is *active* when its 8 corners are not all on the same side of the
   threshold (``p >= threshold`` is inside). Active cells are dilated by one cell (26-neighbours),
   so thin parts whose surface only touches a neighbouring cell's corner are not lost, and are
   split in 2×2×2. Values of the finer grid are first filled by trilinear interpolation of the
   coarser grid; then every grid point of a split cell whose value is not yet known (new
   mid-points, and corners that were only interpolated) is evaluated. Known values are reused.
3. After the last level the dense ``N^3`` grid holds true values in every split cell and
   trilinearly interpolated values elsewhere. A cell that was never split has all its coarse
   corners on one side, and trilinear interpolation of same-side values stays on that side, so
   unknown regions are consistently inside or outside and introduce no spurious surface; the only
   sign changes are where values were evaluated.
4. Marching cubes (PyMCubes) on that grid, cropped to the inside points' bounding box and padded
   with one layer of outside values, so every mesh is closed (watertight) even where the shape
   touches the box. Vertices are mapped back to box coordinates (and clipped to the box); faces
   are oriented outward (counter-clockwise seen from outside: positive signed volume).

A hand whose values never cross the threshold (all outside, or the whole box inside) gets
``None``. Hands can be excluded with ``valid``: they are never queried and get ``None``.

Batching: at every level hands need different numbers of points; each level's points are padded
to the longest hand (padding points sit at the box centre and their answers are discarded) and
split into chunks of at most ``max_points`` points per hand, so each chunk is **one** ``occ_fn``
call for all hands. All bookkeeping runs in torch on ``device`` (the occupancy network's device);
only the final grid goes to the CPU for marching cubes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import mcubes
import numpy as np
import torch
from torch import Tensor

from im2hands_model.hands import BOX_HALF, flip_faces, from_normalized, mirror_normalized

__all__ = [
    "DEFAULT_MAX_POINTS",
    "Grid",
    "band_refined_grid",
    "LevelStats",
    "Mesh",
    "MeshingStats",
    "OccupancyFn",
    "dense_mesh",
    "dense_mesh_with_stats",
    "extract_meshes",
    "extract_meshes_with_stats",
    "grid_meshes",
    "mesh_to_camera",
    "mise_grid",
    "synchronize",
]

OccupancyFn = Callable[[Tensor], Tensor]
"""``occ_fn(points [H, P, 3]) -> probabilities [H, P]`` (see module docstring)."""

DEFAULT_MAX_POINTS = 131_072
"""Default largest number of points per hand in one ``occ_fn`` call."""


@dataclass
class Mesh:
    """A triangle mesh.

    Attributes:
        vertices: float32 ``[V, 3]`` (box coordinates from the extractors; see
            :func:`mesh_to_camera` for the camera frame).
        faces: int64 ``[F, 3]`` vertex indices, counter-clockwise seen from outside.
    """

    vertices: np.ndarray
    faces: np.ndarray

    def __post_init__(self) -> None:
        self.vertices = np.ascontiguousarray(self.vertices, dtype=np.float32)
        self.faces = np.ascontiguousarray(self.faces, dtype=np.int64)
        if self.vertices.ndim != 2 or self.vertices.shape[1] != 3:
            raise ValueError(f"vertices must be [V, 3], got {self.vertices.shape}")
        if self.faces.ndim != 2 or self.faces.shape[1] != 3:
            raise ValueError(f"faces must be [F, 3], got {self.faces.shape}")

    @property
    def num_vertices(self) -> int:
        return len(self.vertices)

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    def volume(self) -> float:
        """Signed enclosed volume (divergence theorem), positive for outward faces; units³."""
        tri = self.vertices.astype(np.float64)[self.faces]
        return float(np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0)

    def to_trimesh(self, process: bool = False):  # -> trimesh.Trimesh (imported lazily)
        """The mesh as a :class:`trimesh.Trimesh` (``process=False`` keeps it as is)."""
        import trimesh

        return trimesh.Trimesh(self.vertices, self.faces, process=process)


@dataclass
class LevelStats:
    """What one level of the extraction cost.

    Attributes:
        level: 0 for the coarse grid, then 1..upsampling_steps.
        grid_points: points per axis of this level's grid (``r 2^level + 1``).
        points_per_hand: occupancy points actually needed per hand (``H`` ints).
        padded_points: points per hand after padding to the longest hand (what was evaluated).
        calls: number of ``occ_fn`` calls (chunks) at this level.
        seconds: wall time of the level (bookkeeping + evaluations; CUDA synchronised).
    """

    level: int
    grid_points: int
    points_per_hand: list[int]
    padded_points: int
    calls: int
    seconds: float

    @property
    def evaluated(self) -> int:
        """Points passed to ``occ_fn`` at this level over all hands (padding included)."""
        return self.padded_points * len(self.points_per_hand)


@dataclass
class MeshingStats:
    """Cost of one extraction: per-level evaluation counts and times.

    Attributes:
        levels: one :class:`LevelStats` per level.
        grid_points: points per axis of the final grid.
        marching_cubes_seconds: time of the final marching cubes (all hands).
        total_seconds: wall time of the whole extraction.
    """

    levels: list[LevelStats] = field(default_factory=list)
    grid_points: int = 0
    marching_cubes_seconds: float = 0.0
    total_seconds: float = 0.0

    @property
    def points_per_hand(self) -> list[int]:
        """Needed points per hand summed over levels."""
        if not self.levels:
            return []
        return [int(sum(x)) for x in zip(*(lv.points_per_hand for lv in self.levels), strict=True)]

    @property
    def evaluated(self) -> int:
        """Points passed to ``occ_fn`` over all levels and hands (padding included)."""
        return sum(lv.evaluated for lv in self.levels)

    @property
    def calls(self) -> int:
        return sum(lv.calls for lv in self.levels)

    @property
    def dense_points_per_hand(self) -> int:
        """Points a plain dense grid of the same final resolution evaluates per hand."""
        return self.grid_points**3

    def summary(self) -> str:
        """A few human-readable lines (one per level) for benchmark logs."""
        lines = []
        for lv in self.levels:
            lines.append(
                f"level {lv.level} ({lv.grid_points}^3 grid): points/hand "
                f"{lv.points_per_hand} padded {lv.padded_points} calls {lv.calls} "
                f"{lv.seconds * 1e3:.1f} ms"
            )
        lines.append(
            f"total points/hand {self.points_per_hand} (dense {self.dense_points_per_hand}), "
            f"marching cubes {self.marching_cubes_seconds * 1e3:.1f} ms, "
            f"total {self.total_seconds * 1e3:.1f} ms"
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


#: Iso-levels of the paper protocol: 0.5 for I (and HALO), 0.45 for I+R.
THRESHOLD_I = 0.5
THRESHOLD_R = 0.45

def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _valid_mask(valid: Sequence[bool] | Tensor | None, num_hands: int) -> list[bool]:
    if valid is None:
        return [True] * num_hands
    vals = valid.tolist() if isinstance(valid, Tensor) else list(valid)
    if len(vals) != num_hands:
        raise ValueError(f"valid must have {num_hands} entries, got {len(vals)}")
    return [bool(v) for v in vals]


def _check_args(
    num_hands: int, resolution: int, threshold: float, box_half: float, max_points: int
) -> None:
    if num_hands < 1:
        raise ValueError(f"num_hands must be >= 1, got {num_hands}")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be a probability in (0, 1), got {threshold}")
    if not box_half > 0:
        raise ValueError(f"box_half must be positive, got {box_half}")
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")


def _evaluate(
    occ_fn: OccupancyFn,
    values: Tensor,
    known: Tensor,
    need: Tensor,
    spacing: float,
    box_half: float,
    max_points: int,
    valid: list[bool],
) -> tuple[list[int], int, int]:
    """Evaluate ``occ_fn`` at the grid points marked in ``need`` and store them in place.

    Args:
        values: ``[H, n, n, n]`` float32 grid values (updated in place).
        known: ``[H, n, n, n]`` bool, True where ``values`` is a true evaluation (updated).
        need: ``[H, n, n, n]`` bool, points to evaluate (invalid hands must be all False).

    Returns:
        (points per hand, padded points per hand, number of calls).
    """
    H, n = values.shape[0], values.shape[1]
    device = values.device
    flat_idx = [need[h].reshape(-1).nonzero().squeeze(1) for h in range(H)]
    counts = [int(ix.numel()) for ix in flat_idx]
    P = max(counts)
    if P == 0:
        return counts, 0, 0
    # Padded flat indices: padding points are the grid centre; their answers are dropped.
    centre = (n // 2) * n * n + (n // 2) * n + n // 2
    padded = torch.full((H, P), centre, dtype=torch.long, device=device)
    for h, ix in enumerate(flat_idx):
        padded[h, : counts[h]] = ix
    points = _grid_ijk(padded, n).to(torch.float32) * spacing - box_half  # [H, P, 3]
    out = torch.empty((H, P), dtype=torch.float32, device=device)
    calls = 0
    for start in range(0, P, max_points):
        chunk = points[:, start : start + max_points]
        res = occ_fn(chunk)
        if not isinstance(res, Tensor) or tuple(res.shape) != tuple(chunk.shape[:2]):
            shape = tuple(res.shape) if isinstance(res, Tensor) else type(res).__name__
            raise ValueError(
                f"occ_fn must return a tensor of shape {tuple(chunk.shape[:2])}, got {shape}"
            )
        out[:, start : start + max_points] = res.detach().to(device=device, dtype=torch.float32)
        calls += 1
    flat_values = values.view(H, -1)
    flat_known = known.view(H, -1)
    for h in range(H):
        if counts[h] == 0:
            continue
        got = out[h, : counts[h]]
        if valid[h] and not bool(torch.isfinite(got).all()):
            raise ValueError(f"occ_fn returned non-finite occupancy for hand {h}")
        flat_values[h, flat_idx[h]] = got
        flat_known[h, flat_idx[h]] = True
    return counts, P, calls


def _axis_slice(dim: int, start: int | None, stop: int | None, step: int) -> tuple[slice, ...]:
    """Index selecting ``start:stop:step`` along ``dim`` and everything along the other axes."""
    return (slice(None),) * dim + (slice(start, stop, step),)


def _grid_ijk(flat: Tensor, n: int) -> Tensor:
    """``[..., 3]`` integer (i, j, k) of flat indices into an ``n x n x n`` grid."""
    return torch.stack((flat // (n * n), (flat // n) % n, flat % n), dim=-1)


def _pairs(x: Tensor, dim: int, op: str) -> Tensor:
    """Combine neighbours along ``dim`` (size n -> n - 1) with ``op`` ("or" / "and")."""
    a, b = x.narrow(dim, 0, x.shape[dim] - 1), x.narrow(dim, 1, x.shape[dim] - 1)
    return a | b if op == "or" else a & b


def _dilate_axis(x: Tensor, dim: int) -> Tensor:
    """One-cell binary dilation of a bool grid along ``dim`` (separable part of a 3×3×3 cube)."""
    out = x.clone()
    n = x.shape[dim]
    if n > 1:
        out.narrow(dim, 1, n - 1).logical_or_(x.narrow(dim, 0, n - 1))
        out.narrow(dim, 0, n - 1).logical_or_(x.narrow(dim, 1, n - 1))
    return out


def _cells_to_fine_points(cells: Tensor, dim: int) -> Tensor:
    """Along ``dim``, map ``r`` cells to the ``2r + 1`` points of the 2x finer grid they contain.

    Fine point ``2i + 1`` is inside coarse cell ``i``; fine point ``2i`` lies on the boundary of
    cells ``i - 1`` and ``i``. Applied along the three axes this marks exactly the fine points in
    the closure of the marked cells.
    """
    r = cells.shape[dim]
    shape = list(cells.shape)
    shape[dim] = 2 * r + 1
    out = torch.zeros(shape, dtype=torch.bool, device=cells.device)
    out[_axis_slice(dim, 1, None, 2)] = cells
    out[_axis_slice(dim, 0, 2 * r, 2)] |= cells
    out[_axis_slice(dim, 2, None, 2)] |= cells
    return out


def _active_points(values: Tensor, threshold: float, dilate: bool) -> Tensor:
    """Grid points of the next (2x finer) level that lie in cells to be split.

    Args:
        values: ``[H, n, n, n]`` values of the current level (``n = r + 1``).

    Returns:
        ``[H, 2r + 1, 2r + 1, 2r + 1]`` bool: points of the finer grid in (or on the boundary of)
        an active cell, after the optional one-cell dilation.
    """
    active = _straddling_cells(values, threshold)  # [H, r, r, r]
    if dilate:
        for dim in (1, 2, 3):
            active = _dilate_axis(active, dim)
    for dim in (1, 2, 3):
        active = _cells_to_fine_points(active, dim)
    return active


def _upsample(values: Tensor, known: Tensor) -> tuple[Tensor, Tensor]:
    """Trilinear 2x refinement of a grid ``[H, n, n, n]`` -> ``[H, 2n - 1, 2n - 1, 2n - 1]``.

    Separable: along each axis, new mid-points are the mean of their two neighbours (exactly
    trilinear interpolation on a 2x grid). Existing points keep their values and known flags;
    new points are interpolated and not known.
    """
    fine = values
    for dim in (1, 2, 3):
        n = fine.shape[dim]
        shape = list(fine.shape)
        shape[dim] = 2 * n - 1
        out = torch.empty(shape, dtype=fine.dtype, device=fine.device)
        out[_axis_slice(dim, 0, None, 2)] = fine
        mid = out[_axis_slice(dim, 1, None, 2)]
        torch.add(fine.narrow(dim, 0, n - 1), fine.narrow(dim, 1, n - 1), out=mid)
        mid.mul_(0.5)
        fine = out
    m = fine.shape[1]
    fine_known = torch.zeros((values.shape[0], m, m, m), dtype=torch.bool, device=values.device)
    fine_known[:, ::2, ::2, ::2] = known
    return fine, fine_known


def _marching_cubes(grid: np.ndarray, threshold: float, box_half: float) -> Mesh | None:
    """Closed iso-surface ``grid = threshold`` of a dense ``[N, N, N]`` grid spanning the box.

    The grid is cropped to the bounding box of its inside points (plus one point; nothing outside
    that can hold a surface) and padded with one layer of outside values, so the mesh is closed
    even where the shape touches the box; vertices are clipped to the box.
    """
    inside = grid >= threshold
    if not inside.any() or inside.all():
        return None
    N = grid.shape[0]
    lo = [0, 0, 0]
    hi = [N, N, N]
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        occupied = np.flatnonzero(inside.any(axis=other))
        lo[ax] = max(int(occupied[0]) - 1, 0)
        hi[ax] = min(int(occupied[-1]) + 2, N)
    crop = grid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float64)
    crop = np.pad(crop, 1, mode="constant", constant_values=threshold - 1.0)
    verts, faces = mcubes.marching_cubes(crop, threshold)
    if len(faces) == 0:
        return None
    spacing = 2.0 * box_half / (N - 1)
    verts = (verts - 1.0 + np.asarray(lo, dtype=np.float64)) * spacing - box_half
    verts = np.clip(verts, -box_half, box_half)
    # PyMCubes orients triangles counter-clockwise seen from the low-value side, i.e. outward
    # for "inside = high values" (checked by the tests through the signed volume).
    return Mesh(verts.astype(np.float32), faces.astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


@dataclass
class Grid:
    """The final grid of a MISE extraction (see :func:`mise_grid`).

    Attributes:
        values: ``[H, N, N, N]`` float32 probabilities on ``device``: true evaluations where
            ``known``, trilinear interpolation elsewhere.
        known: ``[H, N, N, N]`` bool.
        valid: per hand, whether it was queried.
        box_half: half side of the box the grid spans.
    """

    values: Tensor
    known: Tensor
    valid: list[bool]
    box_half: float

    @property
    def points_per_axis(self) -> int:
        return int(self.values.shape[1])

    @property
    def spacing(self) -> float:
        return 2.0 * self.box_half / (self.points_per_axis - 1)


@torch.no_grad()
def mise_grid(
    occ_fn: OccupancyFn,
    num_hands: int,
    resolution: int = 32,
    upsampling_steps: int = 3,
    threshold: float = 0.5,
    box_half: float = BOX_HALF,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
    valid: Sequence[bool] | Tensor | None = None,
    dilate: bool = True,
    dilate_final: bool = True,
    prior: OccupancyFn | None = None,
) -> tuple[Grid, MeshingStats]:
    """The MISE evaluations of :func:`extract_meshes_with_stats` without the marching cubes:
    ``(grid, stats)`` (same arguments).

    ``dilate_final=False`` skips the one-cell dilation before the last split only: the coarser
    levels have already caught thin parts, and the last level then evaluates about half as many
    points (the inference pipeline's setting; the paper protocol dilates every level).

    ``prior``: an occupancy function (same contract as ``occ_fn``, e.g. the previous frame's
    occupancy carried to this pose) that answers the coarse level instead of ``occ_fn``: the
    finer levels then evaluate ``occ_fn`` on the band around the prior's surface, where every
    point is computed anew (coarse points included), so only a surface that moved more than a
    coarse cell from the prior's is missed."""
    _check_args(num_hands, resolution, threshold, box_half, max_points)
    if upsampling_steps < 0:
        raise ValueError(f"upsampling_steps must be >= 0, got {upsampling_steps}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ok = _valid_mask(valid, num_hands)
    ok_t = torch.tensor(ok, device=dev).view(-1, 1, 1, 1)
    stats = MeshingStats(grid_points=resolution * 2**upsampling_steps + 1)
    t_start = time.perf_counter()

    n = resolution + 1
    values = torch.zeros((num_hands, n, n, n), dtype=torch.float32, device=dev)
    known = torch.zeros_like(values, dtype=torch.bool)
    need = ok_t.expand(-1, n, n, n).clone()
    for level in range(upsampling_steps + 1):
        t0 = time.perf_counter()
        if level > 0:
            last = level == upsampling_steps
            need = _active_points(values, threshold, dilate and (dilate_final or not last))
            values, known = _upsample(values, known)
            need &= ~known
            need &= ok_t
        n = values.shape[1]
        spacing = 2.0 * box_half / (n - 1)
        fn = prior if (level == 0 and prior is not None) else occ_fn
        counts, padded, calls = _evaluate(
            fn, values, known, need, spacing, box_half, max_points, ok
        )
        if fn is prior:  # the prior's answers are guesses: the finer levels evaluate again
            known.zero_()
            counts = [0] * len(counts)
        synchronize(dev)
        stats.levels.append(LevelStats(level, n, counts, padded, calls, time.perf_counter() - t0))
    stats.total_seconds = time.perf_counter() - t_start
    return Grid(values, known, ok, box_half), stats


def grid_meshes(grid: Grid, threshold: float) -> list[Mesh | None]:
    """Closed meshes of the ``threshold`` level of each valid hand of a :class:`Grid`."""
    values = grid.values.cpu().numpy()
    return [
        _marching_cubes(values[h], threshold, grid.box_half) if grid.valid[h] else None
        for h in range(len(grid.valid))
    ]


def extract_meshes_with_stats(
    occ_fn: OccupancyFn,
    num_hands: int,
    resolution: int = 32,
    upsampling_steps: int = 3,
    threshold: float = 0.5,
    box_half: float = BOX_HALF,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
    valid: Sequence[bool] | Tensor | None = None,
    dilate: bool = True,
) -> tuple[list[Mesh | None], MeshingStats]:
    """Hierarchical (MISE) meshes of ``num_hands`` occupancy fields, with evaluation statistics.

    Args:
        occ_fn: ``points [H, P, 3] -> probabilities [H, P]`` (module docstring); called once per
            chunk with all hands, points in each hand's box coordinates (float32 on ``device``).
        num_hands: ``H``.
        resolution: coarse grid cells per axis (paper: 32).
        upsampling_steps: number of 2x refinements (paper: 3 -> 256³ cells).
        threshold: iso-level on the probability (paper: 0.5 for I, 0.45 for R); ``p >= threshold``
            is inside.
        box_half: half side of the box ``[-box_half, box_half]^3`` (normalised units: 0.55).
        max_points: largest number of points per hand in one ``occ_fn`` call.
        device: where query points are made and bookkeeping runs (default CPU).
        valid: optional ``[H]`` bools; hands marked False are not queried and get ``None``.
        dilate: dilate the active cells by one cell before splitting (recommended).

    Returns:
        ``(meshes, stats)``: ``H`` entries, each a :class:`Mesh` in box coordinates or ``None``
        (no surface, or invalid hand), and a :class:`MeshingStats`.
    """
    t_start = time.perf_counter()
    grid, stats = mise_grid(
        occ_fn, num_hands, resolution, upsampling_steps, threshold, box_half, max_points,
        device, valid, dilate,
    )  # fmt: skip
    t0 = time.perf_counter()
    meshes = grid_meshes(grid, threshold)
    stats.marching_cubes_seconds = time.perf_counter() - t0
    stats.total_seconds = time.perf_counter() - t_start
    return meshes, stats


def _straddling_cells(values: Tensor, threshold: float) -> Tensor:
    """``[H, r, r, r]`` cells of a ``[H, r+1, r+1, r+1]`` grid whose corners straddle the level."""
    any_in = all_in = values >= threshold
    for dim in (1, 2, 3):
        any_in = _pairs(any_in, dim, "or")
        all_in = _pairs(all_in, dim, "and")
    return any_in & ~all_in


def _cell_corners(cells: Tensor) -> Tensor:
    """``[H, r, r, r]`` cells -> ``[H, r+1, r+1, r+1]`` grid points that are corners of them."""
    out = cells
    for dim in (1, 2, 3):
        r = out.shape[dim]
        shape = list(out.shape)
        shape[dim] = r + 1
        pts = torch.zeros(shape, dtype=torch.bool, device=cells.device)
        pts.narrow(dim, 0, r).logical_or_(out)
        pts.narrow(dim, 1, r).logical_or_(out)
        out = pts
    return out


def _padded_rows(mask: Tensor) -> tuple[list[Tensor], Tensor]:
    """Per hand, the flat indices of the True points of ``mask [H, n, n, n]``, and all of them
    ``[H, P]`` padded with index 0 to the longest hand's count ``P``."""
    flat = [mask[h].reshape(-1).nonzero().squeeze(1) for h in range(mask.shape[0])]
    rows = max((len(f) for f in flat), default=0)
    return flat, torch.stack([torch.cat([f, f.new_zeros(rows - len(f))]) for f in flat])


def _chunked(fn: Callable, inputs: list[Tensor], rows: int, max_points: int) -> Tensor:
    """``fn(*[x[:, a:b] for x in inputs])`` over chunks of at most ``max_points`` rows, joined."""
    parts = [fn(*[x[:, a : a + max_points] for x in inputs]) for a in range(0, rows, max_points)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def band_refined_grid(
    grid: Grid,
    threshold: float,
    features_fn: Callable[[Tensor], Tensor],
    head_fn: Callable[[Tensor, Tensor], Tensor],
    coarse: bool = True,
    max_points: int = DEFAULT_MAX_POINTS,
    near_fn: Callable[[int, Tensor], Tensor] | None = None,
    out_threshold: float | None = None,
) -> tuple[Grid, LevelStats]:
    """A refinement of a MISE grid evaluated only in a band around its surface.

    For refinements like R whose output near the surface depends on the query through features
    that vary smoothly in space and, sharply, only through the refined field itself:
    ``features_fn(points [H, P, 3]) -> [H, P, C]`` (box points) and
    ``head_fn(features [H, P, C], probabilities [H, P]) -> refined probabilities [H, P]``.

    The band is the corners of the cells whose corners straddle ``threshold``. With ``coarse`` the
    features are computed only at the corners of the 2x coarser cells that hold the band (about a
    quarter of the points) and interpolated trilinearly; the head then runs at every band point with
    the grid's own probability there. Outside the band the result is the grid's inside/outside
    decision (0 or 1), so no spurious surface appears at a different iso-level.

    ``near_fn(hand, box points [K, 3]) -> bool [K]`` limits the refinement to the band cells
    (of the feature level) where it says True, e.g. near the other hand, which is all that R
    changes much; the rest of the band keeps the grid's own values shifted by
    ``out_threshold - threshold``, so its ``out_threshold`` level is the grid's surface there,
    exactly, and one closed surface runs through both parts.

    Returns:
        ``(refined grid of probabilities, statistics of the feature evaluation)``; mesh it with
        :func:`grid_meshes` at the refinement's own threshold.
    """
    t0 = time.perf_counter()
    values = grid.values
    H, n = values.shape[0], values.shape[1]
    dev = values.device
    ok_t = torch.tensor(grid.valid, device=dev).view(-1, 1, 1, 1)
    cells = _straddling_cells(values, threshold) & ok_t
    use_coarse = coarse and (n - 1) % 2 == 0 and n > 3
    refined = (values >= threshold).float()
    if near_fn is not None:
        if out_threshold is None:
            raise ValueError("near_fn needs out_threshold, the refinement's iso-level")
        far = cells & ~_near_cells(cells, near_fn, grid, 2 if use_coarse else 1)
        cells = cells & ~far
        kept = _cell_corners(far) & ~_cell_corners(cells)
        refined[kept] = values[kept] + (out_threshold - threshold)
    band = _cell_corners(cells)  # [H, n, n, n]
    if use_coarse:
        r = (n - 1) // 2
        need = _cell_corners(cells.view(H, r, 2, r, 2, r, 2).any(6).any(4).any(2))
        nc, spacing = r + 1, 2.0 * grid.spacing
    else:
        need, nc, spacing = band, n, grid.spacing

    # features at the (coarse) band points
    flat_c, pad_c = _padded_rows(need)
    fine_idx, pad_f = _padded_rows(band)
    rows_c, rows_f = pad_c.shape[1], pad_f.shape[1]
    if rows_c == 0 or rows_f == 0:
        return Grid(refined, band, list(grid.valid), grid.box_half), LevelStats(
            -1, nc, [0] * H, 0, 0, time.perf_counter() - t0
        )
    points = _grid_ijk(pad_c, nc).float() * spacing - grid.box_half
    feats = _chunked(features_fn, [points], rows_c, max_points)
    lookup = torch.zeros((H, nc**3), dtype=torch.long, device=dev)
    for h, f in enumerate(flat_c):
        lookup[h, f] = torch.arange(len(f), device=dev)

    # interpolated features and the head at the fine band points
    ijk = _grid_ijk(pad_f, n)  # [H, Pf, 3]
    if use_coarse:
        lo, hi = ijk // 2, (ijk + 1) // 2
        corner_feats = 0.0
        for cx in (lo[..., 0], hi[..., 0]):
            for cy in (lo[..., 1], hi[..., 1]):
                for cz in (lo[..., 2], hi[..., 2]):
                    row = torch.gather(lookup, 1, (cx * nc + cy) * nc + cz)  # [H, Pf]
                    corner_feats = corner_feats + torch.gather(
                        feats, 1, row[..., None].expand(-1, -1, feats.shape[-1])
                    )
        fine_feats = corner_feats / 8.0
    else:
        row = torch.gather(lookup, 1, pad_f)
        fine_feats = torch.gather(feats, 1, row[..., None].expand(-1, -1, feats.shape[-1]))
    probs = torch.gather(values.view(H, -1), 1, pad_f)
    out = _chunked(head_fn, [fine_feats, probs], rows_f, max_points)
    flat_refined = refined.view(H, -1)
    for h, f in enumerate(fine_idx):
        flat_refined[h, f] = out[h, : len(f)].float()
    synchronize(dev)
    counts = [len(f) for f in flat_c]
    stats = LevelStats(-1, nc, counts, rows_c, -(-rows_c // max_points), time.perf_counter() - t0)
    return Grid(refined, band, list(grid.valid), grid.box_half), stats


def _near_cells(cells: Tensor, near_fn: Callable[[int, Tensor], Tensor], grid: Grid,
                group: int) -> Tensor:  # fmt: skip
    """The cells of ``cells`` ``[H, r, r, r]`` in blocks of ``group`` cells per axis whose centre
    ``near_fn(hand, box points)`` calls near (one test per block)."""
    H, r = cells.shape[0], cells.shape[1]
    g = r // group
    blocks = cells.view(H, g, group, g, group, g, group).any(6).any(4).any(2) if group > 1 \
        else cells
    keep = torch.zeros_like(blocks)
    step = grid.spacing * group
    for h in range(H):
        ijk = blocks[h].nonzero()
        if len(ijk):
            centres = (ijk.to(torch.float32) + 0.5) * step - grid.box_half
            hit = ijk[near_fn(h, centres).to(torch.bool)]
            keep[h][hit[:, 0], hit[:, 1], hit[:, 2]] = True
    for dim in (1, 2, 3):
        keep = keep.repeat_interleave(group, dim)
    return keep


def extract_meshes(
    occ_fn: OccupancyFn,
    num_hands: int,
    resolution: int = 32,
    upsampling_steps: int = 3,
    threshold: float = 0.5,
    box_half: float = BOX_HALF,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
    valid: Sequence[bool] | Tensor | None = None,
    dilate: bool = True,
) -> list[Mesh | None]:
    """:func:`extract_meshes_with_stats` without the statistics: ``H`` meshes (or ``None``)."""
    meshes, _ = extract_meshes_with_stats(
        occ_fn,
        num_hands,
        resolution,
        upsampling_steps,
        threshold,
        box_half,
        max_points,
        device,
        valid,
        dilate,
    )
    return meshes


@torch.no_grad()
def dense_mesh_with_stats(
    occ_fn: OccupancyFn,
    num_hands: int,
    resolution: int,
    threshold: float = 0.5,
    box_half: float = BOX_HALF,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
    valid: Sequence[bool] | Tensor | None = None,
) -> tuple[list[Mesh | None], MeshingStats]:
    """Meshes from a plain dense grid of ``(resolution + 1)^3`` points (reference for MISE).

    Same arguments and outputs as :func:`extract_meshes_with_stats` (one level, every point
    evaluated); ``dense_mesh(..., resolution=r 2^s)`` is the grid MISE with ``(r, s)`` refines.
    """
    return extract_meshes_with_stats(
        occ_fn, num_hands, resolution, 0, threshold, box_half, max_points, device, valid
    )


def dense_mesh(
    occ_fn: OccupancyFn,
    num_hands: int,
    resolution: int,
    threshold: float = 0.5,
    box_half: float = BOX_HALF,
    max_points: int = DEFAULT_MAX_POINTS,
    device: torch.device | str | None = None,
    valid: Sequence[bool] | Tensor | None = None,
) -> list[Mesh | None]:
    """:func:`dense_mesh_with_stats` without the statistics."""
    meshes, _ = dense_mesh_with_stats(
        occ_fn, num_hands, resolution, threshold, box_half, max_points, device, valid
    )
    return meshes


def mesh_to_camera(
    mesh: Mesh | None,
    rot: np.ndarray | Tensor,
    origin: np.ndarray | Tensor,
    mirrored: bool = False,
) -> Mesh | None:
    """Map a mesh from a hand's normalised space to the camera frame (metres).

    Args:
        mesh: mesh in normalised hand space (or ``None``, returned unchanged).
        rot: ``[3, 3]`` root frame of the hand (rows = axes; see
            :func:`~im2hands_model.hands.root_frame`).
        origin: ``[3]`` wrist position in the camera frame (metres).
        mirrored: True when the mesh was extracted in the *mirrored* normalised space of a left
            hand (the right-hand space of the per-hand networks): its vertices are mapped back with
            :func:`~im2hands_model.hands.mirror_normalized` and the faces are flipped so they stay
            outward.

    Returns:
        The mesh in the camera frame (float32 vertices, outward faces), or ``None``.
    """
    if mesh is None:
        return None
    r = rot.detach().cpu().numpy() if isinstance(rot, Tensor) else np.asarray(rot)
    o = origin.detach().cpu().numpy() if isinstance(origin, Tensor) else np.asarray(origin)
    verts = mesh.vertices.astype(np.float64)
    faces = mesh.faces
    if mirrored:
        verts = mirror_normalized(verts)
        faces = flip_faces(faces)
    cam = from_normalized(verts, r.astype(np.float64), o.astype(np.float64))
    return Mesh(cam, faces)
