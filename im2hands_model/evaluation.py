"""Paper-protocol evaluation helpers (SPEC §5) on top of :mod:`im2hands_model.metrics`.

* :func:`hand_metrics` -- IoU (%), Chamfer-L1 (mm) and MPJPE (mm) of one predicted hand.
* :func:`scene_penetration_cm3` -- volume shared by the two predicted hands of a scene (cm³).
* :func:`scene_contact_cm2` -- area where the two hands touch or overlap (cm²).
* :class:`MetricTable` -- accumulates per-hand / per-scene values per method variant and writes
  the JSON summary and a Markdown table.
* :func:`comparison_picture` -- GT and each variant's meshes rendered over the input crops.

Everything is in metres in the camera frame unless a name says otherwise; meshes are any object
with ``vertices``/``faces`` (e.g. :class:`~im2hands_model.meshing.Mesh`, ``trimesh.Trimesh``) or
``(vertices, faces)`` tuples, closed and (for the predictions) mapped to the camera frame, e.g. with
:func:`~im2hands_model.meshing.mesh_to_camera`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike
from PIL import Image, ImageDraw

from im2hands_model.hands import BOX_HALF, HAND_COLOURS, NUM_JOINTS, from_normalized, root_frame
from im2hands_model.metrics import (
    chamfer_l1_mm,
    contact_area,
    inside_mesh,
    iou,
    mpjpe_mm,
    penetration_volume_cm3,
)

__all__ = [
    "HAND_METRICS",
    "HAND_RGB",
    "SCENE_METRICS",
    "MetricTable",
    "comparison_picture",
    "hand_box_points",
    "hand_metrics",
    "load_summary",
    "scene_contact_cm2",
    "scene_penetration_cm3",
    "summary_markdown",
]

HAND_METRICS: tuple[str, ...] = ("iou", "iou_j9", "chamfer_mm", "mpjpe_mm")
"""Per-hand metrics: IoU in percent (in the camera frame, and with the predicted hand moved to
the GT's joint 9 like Chamfer and MPJPE: its shape without its placement), Chamfer-L1 in mm,
MPJPE in mm."""

SCENE_METRICS: tuple[str, ...] = ("penetration_cm3", "contact_cm2")
"""Per-scene metrics: penetration volume between the two hands in cm³, and contact area (the
mean over both hands of the surface touching or inside the other hand) in cm²."""

HAND_RGB: tuple[tuple[int, int, int], ...] = HAND_COLOURS
"""Display colours of the left (blue) and right (orange) hand, as in the dataset contact sheet."""

_COLUMNS: tuple[tuple[str, str, int], ...] = (
    ("iou", "IoU (%)", 1),
    ("iou_j9", "IoU at j9 (%)", 1),
    ("chamfer_mm", "CD (mm)", 2),
    ("mpjpe_mm", "MPJPE (mm)", 2),
    ("penetration_cm3", "Pen. (cm³)", 3),
    ("contact_cm2", "Contact (cm²)", 2),
)


def _vf(mesh: Any) -> tuple[np.ndarray, np.ndarray]:
    if hasattr(mesh, "vertices") and hasattr(mesh, "faces"):
        v, f = mesh.vertices, mesh.faces
    elif isinstance(mesh, (tuple, list)) and len(mesh) == 2:
        v, f = mesh
    else:
        raise TypeError("a mesh must have .vertices/.faces or be a (vertices, faces) tuple")
    return np.asarray(v, dtype=np.float64), np.asarray(f, dtype=np.int64)


def _joints(joints: ArrayLike, name: str) -> np.ndarray:
    j = np.asarray(joints, dtype=np.float64)
    if j.shape != (NUM_JOINTS, 3):
        raise ValueError(f"{name} must have shape ({NUM_JOINTS}, 3), got {j.shape}")
    if not np.all(np.isfinite(j)):
        raise ValueError(f"{name} contains non-finite values")
    return j


# ----------------------------------------------------------------------------------------------
# Per-hand and per-scene metrics
# ----------------------------------------------------------------------------------------------


def hand_box_points(gt_joints: ArrayLike, n: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform points of a hand's occupancy box, in the camera frame.

    The box is ``[-BOX_HALF, BOX_HALF]^3`` in the hand's normalised space (±0.22 m around the
    wrist, axes of :func:`~im2hands_model.hands.root_frame` of the GT joints), the space in which
    occupancy is defined and meshes are extracted.

    Args:
        gt_joints: ``[21, 3]`` ground-truth joints in metres.
        n: number of points.
        rng: numpy generator.

    Returns:
        ``[n, 3]`` float64 points in metres.
    """
    j = _joints(gt_joints, "gt_joints")
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    rot, origin = root_frame(j)
    return from_normalized(rng.uniform(-BOX_HALF, BOX_HALF, size=(n, 3)), rot, origin)


def hand_metrics(
    pred_mesh: Any | None,
    gt_vertices: ArrayLike,
    gt_faces: ArrayLike,
    pred_joints: ArrayLike | None,
    gt_joints: ArrayLike,
    rng: np.random.Generator,
    n_iou: int = 100_000,
    n_chamfer: int = 100_000,
) -> dict[str, float]:
    """IoU, Chamfer-L1 and MPJPE of one predicted hand (paper protocol, SPEC §5).

    * ``iou``: percent. ``n_iou`` uniform points of the hand's box (:func:`hand_box_points`, the
      GT joints' normalised frame, ±0.22 m) are tested against the predicted mesh and the GT
      mesh (GT occupancy = inside the closed GT mesh; generalised winding numbers).
    * ``chamfer_mm``: Chamfer-L1 in mm with ``n_chamfer`` surface samples each way, after
      translating each mesh so its own hand's joint 9 is at the origin (the prediction uses
      ``pred_joints``; without them, the GT joints, i.e. no relative shift).
    * ``mpjpe_mm``: mean joint error in mm after joint-9 alignment (NaN without ``pred_joints``).

    A missing prediction (``pred_mesh is None``, e.g. no surface found) scores IoU 0 and Chamfer
    NaN (skipped by :class:`MetricTable`, which counts it).

    Args:
        pred_mesh: predicted closed mesh in the camera frame (metres), or ``None``.
        gt_vertices: ``[V, 3]`` GT mesh vertices in metres (closed, e.g. the dataset's sealed mesh).
        gt_faces: ``[F, 3]`` GT triangles.
        pred_joints: ``[21, 3]`` predicted joints in metres, or ``None``.
        gt_joints: ``[21, 3]`` GT joints in metres.
        rng: numpy generator (box points and surface-sample seed are drawn from it).
        n_iou: uniform box points for IoU (paper: 100k).
        n_chamfer: surface samples per mesh for Chamfer (paper: 100k).

    Returns:
        ``{"iou": %, "iou_j9": %, "chamfer_mm": mm, "mpjpe_mm": mm}``.
    """
    gj = _joints(gt_joints, "gt_joints")
    pj = None if pred_joints is None else _joints(pred_joints, "pred_joints")
    gv = np.asarray(gt_vertices, dtype=np.float64)
    gf = np.asarray(gt_faces, dtype=np.int64)
    points = hand_box_points(gj, n_iou, rng)
    chamfer_seed = int(rng.integers(0, 2**31 - 1))
    gt_occ = inside_mesh(gv, gf, points)
    if pred_mesh is None:
        iou_pct, chamfer = 0.0 if gt_occ.any() else 100.0, math.nan
        iou_j9 = iou_pct
    else:
        pv, pf = _vf(pred_mesh)
        iou_pct = 100.0 * iou(inside_mesh(pv, pf, points), gt_occ)
        chamfer = chamfer_l1_mm(
            pv, pf, gv, gf, gj if pj is None else pj, gj, n_samples=n_chamfer, seed=chamfer_seed
        )
        shift = np.zeros(3) if pj is None else gj[9] - pj[9]
        iou_j9 = iou_pct if not shift.any() else 100.0 * iou(
            inside_mesh(pv + shift, pf, points), gt_occ)
    mpjpe = math.nan if pj is None else mpjpe_mm(pj, gj)
    return {"iou": float(iou_pct), "iou_j9": float(iou_j9), "chamfer_mm": float(chamfer),
            "mpjpe_mm": float(mpjpe)}  # fmt: skip


def scene_penetration_cm3(meshes: Sequence[Any | None], voxel_size: float = 0.001) -> float:
    """Penetration volume between the two predicted hands of a scene, in cm³.

    Voxel count (edge ``voxel_size``, default 1 mm) of the region inside both meshes times the
    voxel volume (:func:`~im2hands_model.metrics.penetration_volume_cm3`). A scene with fewer than
    two meshes (absent hand or no surface) has 0.

    Args:
        meshes: the hands' closed meshes in the camera frame (``[left, right]``, ``None`` allowed).
        voxel_size: voxel edge in metres.
    """
    present = [m for m in meshes if m is not None]
    if len(present) > 2:
        raise ValueError(f"expected at most two hands, got {len(present)} meshes")
    if len(present) < 2:
        return 0.0
    return float(penetration_volume_cm3(_vf(present[0]), _vf(present[1]), voxel_size=voxel_size))


def scene_contact_cm2(meshes: Sequence[Any | None], contact_distance: float = 0.003) -> float:
    """Contact area between the two hands of a scene in cm²: the mean over both hands of the
    surface within ``contact_distance`` of, or inside, the other hand
    (:func:`~im2hands_model.metrics.contact_area`). Fewer than two meshes: 0."""
    present = [m for m in meshes if m is not None]
    if len(present) > 2:
        raise ValueError(f"expected at most two hands, got {len(present)} meshes")
    if len(present) < 2:
        return 0.0
    return float(contact_area(_vf(present[0]), _vf(present[1]), contact_distance).mean_cm2)


# ----------------------------------------------------------------------------------------------
# Accumulation and reports
# ----------------------------------------------------------------------------------------------


class MetricTable:
    """Per-variant accumulator of hand and scene metrics.

    ``add_hand(variant, values)`` records one present hand (``values`` as returned by
    :func:`hand_metrics`; ``None`` = absent hand, skipped); ``add_scene(variant, penetration_cm3,
    contact_cm2)`` records one scene. Means are over finite values; non-finite values (e.g. the
    Chamfer distance of a hand without a predicted mesh) are skipped and show as a smaller count.

    The summary (``summary()``, ``write_json``) is::

        {"variants": {name: {"iou": %, "chamfer_mm": mm, "mpjpe_mm": mm,
                             "penetration_cm3": cm³, "contact_cm2": cm², "n_hands": int,
                             "n_scenes": int,
                             "counts": {metric: number of finite values}}}}

    with ``null`` for a metric a variant never reported. Variants keep insertion order.
    """

    def __init__(self) -> None:
        self._values: dict[str, dict[str, list[float]]] = {}
        self._n_hands: dict[str, int] = {}
        self._n_scenes: dict[str, int] = {}

    def _variant(self, variant: str) -> dict[str, list[float]]:
        if variant not in self._values:
            self._values[variant] = {m: [] for m in (*HAND_METRICS, *SCENE_METRICS)}
            self._n_hands[variant] = 0
            self._n_scenes[variant] = 0
        return self._values[variant]

    def add_variant(self, variant: str) -> None:
        """Reserve a row (rows keep the order they were first added in)."""
        self._variant(variant)

    @property
    def variants(self) -> list[str]:
        return list(self._values)

    def add_hand(self, variant: str, values: Mapping[str, float] | None) -> None:
        """Record one hand's metrics (keys of :data:`HAND_METRICS`; missing keys are skipped)."""
        if values is None:
            return
        unknown = set(values) - set(HAND_METRICS)
        if unknown:
            raise KeyError(f"unknown hand metrics {sorted(unknown)}; expected {HAND_METRICS}")
        store = self._variant(variant)
        self._n_hands[variant] += 1
        for key, value in values.items():
            store[key].append(float(value))

    def add_scene(
        self, variant: str, penetration_cm3: float, contact_cm2: float = math.nan
    ) -> None:
        """Record one scene's penetration volume (cm³) and contact area (cm², NaN: unmeasured)."""
        store = self._variant(variant)
        store["penetration_cm3"].append(float(penetration_cm3))
        store["contact_cm2"].append(float(contact_cm2))
        self._n_scenes[variant] += 1

    def summary(self) -> dict[str, Any]:
        """The JSON-ready summary (class docstring)."""
        out: dict[str, Any] = {}
        for variant, store in self._values.items():
            entry: dict[str, Any] = {}
            counts: dict[str, int] = {}
            for metric, vals in store.items():
                finite = [v for v in vals if math.isfinite(v)]
                counts[metric] = len(finite)
                entry[metric] = float(np.mean(finite)) if finite else None
            entry["n_hands"] = self._n_hands[variant]
            entry["n_scenes"] = self._n_scenes[variant]
            entry["counts"] = counts
            out[variant] = entry
        return {"variants": out}

    def to_markdown(self) -> str:
        """The summary as a Markdown table (:func:`summary_markdown`)."""
        return summary_markdown(self.summary())

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write the summary as JSON (parent folders created); returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.summary(), indent=2, allow_nan=False) + "\n")
        return p

    def write_markdown(self, path: str | os.PathLike) -> Path:
        """Write the Markdown table; returns the path."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(self.to_markdown())
        return p


def load_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Read a summary written by :meth:`MetricTable.write_json`."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("variants"), dict):
        raise ValueError(f"{path} is not a metric summary (no 'variants' object)")
    return data


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """Markdown table of a summary: IoU in % (1 decimal), CD and MPJPE in mm (2 decimals),
    penetration in cm³ (3 decimals), hand and scene counts; "–" where a metric is missing.
    The IoU at joint 9 has a column only when some row measured it (tables from before it)."""
    rows = summary["variants"].values()
    columns = [c for c in _COLUMNS
               if c[0] != "iou_j9" or any(e.get("iou_j9") is not None for e in rows)]  # fmt: skip
    header = ["Variant", *(title for _, title, _ in columns), "Hands", "Scenes"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "---|" + "---:|" * (len(header) - 1),
    ]
    for name, entry in summary["variants"].items():
        cells = [str(name)]
        for key, _, digits in columns:
            value = entry.get(key)
            cells.append("–" if value is None else f"{value:.{digits}f}")
        cells += [str(entry.get("n_hands", 0)), str(entry.get("n_scenes", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Published numbers on InterHand2.6M (test set, interacting hands), the paper's table layout:
#: meshes with GT keypoints (Im2Hands, CVPR 2023, Tab. 1: HALO and Im2Hands = I+R) and
#: keypoint MPJPE (IntagHand; DIGIT without and with Im2Hands' refinement K). SPEC §5.
PUBLISHED_MESHES: dict[str, dict[str, float]] = {
    "HALO": {"iou": 74.7, "chamfer_mm": 2.62},
    "I+R": {"iou": 77.8, "chamfer_mm": 2.30},
}
PUBLISHED_KEYPOINTS: dict[str, float] = {
    "IntagHand": 8.79,
    "DIGIT": 16.75,
    "DIGIT + K": 10.70,
}
#: Our variant names shown in the paper's layout, with the paper's names.
PAPER_ROWS: tuple[tuple[str, str], ...] = (
    ("HALO", "HALO (keypoint-only I)"),
    ("I", "Im2Hands I (no R)"),
    ("I+R", "Im2Hands (I+R)"),
)


def paper_table_markdown(summary: Mapping[str, Any]) -> str:
    """The paper's layout: IoU and Chamfer-L1 with GT keypoints per method, ours beside the
    published InterHand2.6M numbers, then keypoint MPJPE (``summary["keypoints"]``, if any)
    beside the published keypoint numbers. Ours are comparable to the published ones only
    when the evaluated data is InterHand2.6M's test split (``im2hands-data interhand``)."""
    fmt = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    variants = summary.get("variants", {})
    lines = [
        "| Method (GT keypoints) | IoU % (ours) | IoU % (paper) | CD mm (ours) | CD mm (paper) |",
        "|---|---:|---:|---:|---:|",
    ]
    for key, label in PAPER_ROWS:
        ours = variants.get(key, {})
        paper = PUBLISHED_MESHES.get(key, {})
        lines.append(
            f"| {label} | {fmt(ours.get('iou'), 1)} | {fmt(paper.get('iou'), 1)} | "
            f"{fmt(ours.get('chamfer_mm'), 2)} | {fmt(paper.get('chamfer_mm'), 2)} |"
        )
    sources = summary.get("keypoints", {}).get("sources", {})
    lines += ["", "| Keypoints | MPJPE mm (joint 9 aligned) |", "|---|---:|"]
    for name, value in PUBLISHED_KEYPOINTS.items():
        lines.append(f"| {name} (paper) | {value:.2f} |")
    for name, row in sources.items():
        lines.append(f"| {name} (ours) | {fmt(row.get('mpjpe_mm'), 2)} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Pictures
# ----------------------------------------------------------------------------------------------


def _render_hands(
    renderer: Any, image: np.ndarray, meshes: Sequence[Any | None], K: np.ndarray
) -> np.ndarray:
    items = []
    for h, mesh in enumerate(meshes):
        if mesh is None:
            continue
        v, f = _vf(mesh)
        if len(f):
            items.append((v, f, np.asarray(HAND_RGB[h % 2], dtype=np.float64) / 255.0))
    if not items:
        return image.copy()
    H, W = image.shape[:2]
    return renderer.render(items, K, W, H, background=image).rgb


def _label_strip(labels: Sequence[str], tile_width: int, height: int) -> np.ndarray:
    strip = Image.new("RGB", (tile_width * len(labels), height), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for i, label in enumerate(labels):
        left, top, right, bottom = draw.textbbox((0, 0), label)
        x = i * tile_width + max((tile_width - (right - left)) // 2, 2)
        y = max((height - (bottom - top)) // 2 - top, 0)
        draw.text((x, y), label, fill=(0, 0, 0))
    return np.asarray(strip)


def comparison_picture(
    rows: Sequence[tuple[np.ndarray, Sequence[Any | None], Mapping[str, Sequence[Any | None]]]],
    K: ArrayLike | Sequence[ArrayLike],
    renderer: Any | None = None,
    label_height: int = 16,
) -> np.ndarray:
    """GT and each variant's hand meshes rendered over the input crops, one scene per row.

    Columns: the input crop, the GT meshes, then each variant (in order of first appearance);
    left hands are drawn blue, right hands orange (:data:`HAND_RGB`), opaque over the crop. A white
    strip on top names the columns.

    Args:
        rows: ``(image [H, W, 3] uint8, gt_meshes, {variant: meshes})`` per scene, where
            ``*meshes`` are ``[left, right]`` camera-frame meshes (``None`` for an absent hand).
            All images must have the same size.
        K: ``[3, 3]`` crop intrinsics shared by all rows, or one ``[3, 3]`` per row.
        renderer: a :class:`~im2hands_model.data.render.Renderer` to reuse (one is created and
            released otherwise).
        label_height: height of the label strip in pixels (0: none).

    Returns:
        uint8 ``[label_height + len(rows) H, (2 + n_variants) W, 3]`` picture.
    """
    if not rows:
        raise ValueError("comparison_picture needs at least one row")
    images = [np.asarray(r[0]) for r in rows]
    shape = images[0].shape
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"images must be [H, W, 3], got {shape}")
    if any(im.shape != shape for im in images):
        raise ValueError("all images must have the same shape")
    images = [np.ascontiguousarray(im, dtype=np.uint8) for im in images]
    Ks = np.asarray(K, dtype=np.float64)
    if Ks.shape == (3, 3):
        Ks = np.broadcast_to(Ks, (len(rows), 3, 3))
    if Ks.shape != (len(rows), 3, 3):
        raise ValueError(f"K must be [3, 3] or [{len(rows)}, 3, 3], got {Ks.shape}")
    variants: list[str] = []
    for _, _, by_variant in rows:
        variants += [v for v in by_variant if v not in variants]

    own = renderer is None
    if own:
        from im2hands_model.data.render import Renderer

        renderer = Renderer(shape[1], shape[0])
    try:
        tiles = []
        for (_, gt, by_variant), image, k in zip(rows, images, Ks, strict=True):
            row = [image, _render_hands(renderer, image, gt, k)]
            row += [_render_hands(renderer, image, by_variant.get(v, ()), k) for v in variants]
            tiles.append(np.concatenate(row, axis=1))
    finally:
        if own:
            renderer.release()
    picture = np.concatenate(tiles, axis=0)
    if label_height > 0:
        strip = _label_strip(["input", "GT", *variants], shape[1], label_height)
        picture = np.concatenate([strip, picture], axis=0)
    return np.ascontiguousarray(picture, dtype=np.uint8)
