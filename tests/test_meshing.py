"""Hierarchical meshing (MISE) on analytic occupancies, and the evaluation helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial import cKDTree

from im2hands_model.evaluation import (
    HAND_RGB,
    MetricTable,
    comparison_picture,
    hand_metrics,
    load_summary,
    scene_penetration_cm3,
    summary_markdown,
)
from im2hands_model.hands import BOX_HALF, NORM_SCALE, from_normalized, root_frame
from im2hands_model.meshing import (
    Mesh,
    dense_mesh,
    dense_mesh_with_stats,
    extract_meshes,
    extract_meshes_with_stats,
    mesh_to_camera,
)

SPHERE_C = (0.05, -0.03, 0.02)
SPHERE_R = 0.2
STEEP = 100.0  # sigmoid steepness: probability = sigmoid(-STEEP * signed distance)


def sdf_sphere(p: torch.Tensor, centre=SPHERE_C, radius=SPHERE_R) -> torch.Tensor:
    return (p - torch.tensor(centre)).norm(dim=-1) - radius


def sdf_box(p: torch.Tensor, centre, half) -> torch.Tensor:
    q = (p - torch.tensor(centre)).abs() - torch.tensor(half)
    return q.clamp_min(0).norm(dim=-1) + q.max(dim=-1).values.clamp_max(0)


# A hand-like shape: a palm slab, four finger rods 0.04 units (16 mm) thick, and a thumb rod.
HAND_BOXES = torch.tensor(
    [  # centre (3), half extents (3)
        [0.0, 0.0, 0.0, 0.2, 0.2, 0.04],
        [-0.16, 0.32, 0.0, 0.02, 0.12, 0.02],
        [-0.16 / 3, 0.32, 0.0, 0.02, 0.14, 0.02],
        [0.16 / 3, 0.32, 0.0, 0.02, 0.12, 0.02],
        [0.16, 0.32, 0.0, 0.02, 0.14, 0.02],
        [0.3, -0.05, 0.0, 0.1, 0.02, 0.02],
    ]
)


def sdf_hand(p: torch.Tensor) -> torch.Tensor:
    """Signed distance to the union of :data:`HAND_BOXES` (exact outside, a bound inside)."""
    x, y, z = p.unbind(-1)
    d = None
    for cx, cy, cz, hx, hy, hz in HAND_BOXES.tolist():
        qx, qy, qz = (x - cx).abs() - hx, (y - cy).abs() - hy, (z - cz).abs() - hz
        outside = torch.sqrt(qx.clamp_min(0) ** 2 + qy.clamp_min(0) ** 2 + qz.clamp_min(0) ** 2)
        box = outside + torch.maximum(torch.maximum(qx, qy), qz).clamp_max(0)
        d = box if d is None else torch.minimum(d, box)
    return d


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These small tensor ops run faster on one thread on a shared, busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Recorder:
    """Occupancy of two "hands" (sphere, hand-like rods) that records every call's shape."""

    def __init__(self, fields=(sdf_sphere, sdf_hand)) -> None:
        self.fields = fields
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, points: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(points.shape))
        return torch.stack(
            [torch.sigmoid(-STEEP * f(points[h])) for h, f in enumerate(self.fields)]
        )


def max_vertex_distance(a: Mesh, b: Mesh) -> float:
    """Symmetric Hausdorff distance between the vertex sets."""
    d1 = cKDTree(b.vertices).query(a.vertices)[0].max()
    d2 = cKDTree(a.vertices).query(b.vertices)[0].max()
    return float(max(d1, d2))


@pytest.fixture(scope="module")
def mise_and_dense():
    rec = Recorder()
    meshes, stats = extract_meshes_with_stats(
        rec, 2, resolution=32, upsampling_steps=2, max_points=50_000
    )
    dense, dense_stats = dense_mesh_with_stats(Recorder(), 2, resolution=128)
    return rec, meshes, stats, dense, dense_stats


def test_mise_meshes_are_watertight_outward_and_accurate(mise_and_dense):
    _, meshes, _, _, _ = mise_and_dense
    sphere, hand = meshes
    for mesh in meshes:
        assert mesh.vertices.dtype == np.float32 and mesh.faces.dtype == np.int64
        tm = mesh.to_trimesh()
        assert tm.is_watertight and tm.is_winding_consistent
        assert tm.volume > 0  # outward faces
        assert np.all(np.abs(mesh.vertices) <= BOX_HALF)
    radius = np.linalg.norm(sphere.vertices - np.array(SPHERE_C), axis=1)
    assert abs(radius.mean() - SPHERE_R) < 1e-3 and radius.std() < 1e-3
    assert sphere.volume() == pytest.approx(4 / 3 * math.pi * SPHERE_R**3, rel=0.01)
    # Palm 0.4 x 0.4 x 0.08, fingers 2 x (0.04 x 0.24 x 0.04) + 2 x (0.04 x 0.28 x 0.04),
    # thumb 0.2 x 0.04 x 0.04 (overlaps with the palm: fingers 0.04, thumb 0.1 inside).
    palm = 0.4 * 0.4 * 0.08
    fingers = 0.04 * 0.04 * (2 * (0.24 - 0.04) + 2 * (0.28 - 0.04))
    thumb = 0.04 * 0.04 * (0.2 - 0.1)
    assert hand.volume() == pytest.approx(palm + fingers + thumb, rel=0.03)
    # One connected component: the thin fingers were neither lost nor cut off.
    assert len(hand.to_trimesh().split(only_watertight=False)) == 1


def test_mise_matches_dense_with_far_fewer_points(mise_and_dense):
    rec, meshes, stats, dense, dense_stats = mise_and_dense
    spacing = 2 * BOX_HALF / 128
    for mise_mesh, dense_mesh_ in zip(meshes, dense, strict=True):
        assert max_vertex_distance(mise_mesh, dense_mesh_) < 0.1 * spacing
        assert mise_mesh.volume() == pytest.approx(dense_mesh_.volume(), rel=1e-4)
    assert stats.grid_points == dense_stats.grid_points == 129
    assert dense_stats.points_per_hand == [129**3, 129**3]
    assert all(n < 0.1 * 129**3 for n in stats.points_per_hand)
    # Level 0 is the whole coarse grid; later levels only refine near the surface.
    assert stats.levels[0].points_per_hand == [33**3, 33**3]
    assert [lv.grid_points for lv in stats.levels] == [33, 65, 129]
    # Every call is one batched call for both hands, chunked at max_points.
    assert len(rec.shapes) == stats.calls
    assert all(s[0] == 2 and s[1] <= 50_000 and s[2] == 3 for s in rec.shapes)
    assert sum(s[1] for s in rec.shapes) * 2 == stats.evaluated
    assert "level 2" in stats.summary()


def test_without_dilation_smooth_shapes_still_match_dense(mise_and_dense):
    _, with_dilation, stats, dense, _ = mise_and_dense
    meshes, plain = extract_meshes_with_stats(Recorder(), 2, 32, 2, dilate=False)
    for mesh, reference in zip(meshes, dense, strict=True):
        assert mesh.to_trimesh().is_watertight
        assert max_vertex_distance(mesh, reference) < 0.1 * (2 * BOX_HALF / 128)
    assert all(a < b for a, b in zip(plain.points_per_hand, stats.points_per_hand, strict=True))


def test_no_point_is_evaluated_twice():
    seen: list[set] = [set(), set()]

    def occ(points: torch.Tensor) -> torch.Tensor:
        out = Recorder()(points)
        for h in range(2):
            keys = {tuple(p) for p in np.round(points[h].numpy() / (2 * BOX_HALF / 64)).astype(int)}
            seen[h] |= keys
        return out

    _, stats = extract_meshes_with_stats(occ, 2, resolution=16, upsampling_steps=2)
    # All needed points are distinct grid points (padding only repeats the centre point)
    for h in range(2):
        assert stats.points_per_hand[h] <= len(seen[h])


def test_threshold_moves_the_surface_the_right_way():
    radii = {}
    for threshold in (0.45, 0.5, 0.55):
        sphere = extract_meshes(Recorder(fields=(sdf_sphere,)), 1, 32, 2, threshold=threshold)[0]
        radii[threshold] = np.linalg.norm(sphere.vertices - np.array(SPHERE_C), axis=1).mean()
    # p = sigmoid(-STEEP (|x - c| - R)) >= t  <=>  |x - c| <= R + logit(1 - t) / STEEP
    for threshold, r in radii.items():
        expected = SPHERE_R + math.log((1 - threshold) / threshold) / STEEP
        assert r == pytest.approx(expected, abs=5e-4)
    assert radii[0.45] > radii[0.5] > radii[0.55]


def test_empty_and_invalid_hands_give_none():
    def occ(points: torch.Tensor) -> torch.Tensor:
        out = Recorder()(points)
        out[0] = 0.0  # hand 0: empty everywhere
        return out

    meshes, stats = extract_meshes_with_stats(occ, 2, resolution=16, upsampling_steps=2)
    assert meshes[0] is None and meshes[1] is not None
    assert stats.levels[1].points_per_hand[0] == 0  # nothing to refine for the empty hand

    full = extract_meshes(lambda p: torch.ones(p.shape[:2]), 1, 8, 1)
    assert full == [None]  # the whole box inside: no surface in the box

    def nan_for_invalid(points: torch.Tensor) -> torch.Tensor:
        out = Recorder()(points)
        out[1] = float("nan")
        return out

    meshes = extract_meshes(nan_for_invalid, 2, 16, 2, valid=[True, False])
    assert meshes[0] is not None and meshes[1] is None
    rec = Recorder()
    meshes, stats = extract_meshes_with_stats(rec, 2, 16, 2, valid=torch.tensor([False, False]))
    assert meshes == [None, None] and rec.shapes == [] and stats.calls == 0
    with pytest.raises(ValueError, match="non-finite"):
        extract_meshes(nan_for_invalid, 2, 16, 1)
    with pytest.raises(ValueError, match="shape"):
        extract_meshes(lambda p: torch.zeros(p.shape[0], 3), 2, 8, 1)


def test_shape_cut_by_the_box_is_closed():
    big = Recorder(fields=(lambda p: sdf_sphere(p, (0.3, 0.0, 0.0), 0.5),))
    (mesh,) = extract_meshes(big, 1, 16, 2)
    tm = mesh.to_trimesh()
    assert tm.is_watertight and tm.volume > 0
    assert np.isclose(mesh.vertices[:, 0].max(), BOX_HALF)
    assert tm.volume < (2 * BOX_HALF) ** 3


def test_mesh_to_camera_mirrors_and_keeps_faces_outward():
    (mesh,) = extract_meshes(Recorder(fields=(sdf_sphere,)), 1, 16, 1)
    rot = torch.tensor(root_frame(np.array(_joints([0.02, -0.01, 0.5])))[0], dtype=torch.float32)
    origin = torch.tensor([0.02, -0.01, 0.5])
    for mirrored in (False, True):
        cam = mesh_to_camera(mesh, rot, origin, mirrored=mirrored)
        assert cam.volume() == pytest.approx(mesh.volume() * NORM_SCALE**3, rel=1e-4)
        centre = np.array(SPHERE_C) * (1, 1, -1 if mirrored else 1)
        expected = from_normalized(centre[None], rot.numpy(), origin.numpy())[0]
        assert np.allclose(cam.vertices.mean(0), expected, atol=1e-3)
    assert mesh_to_camera(None, rot, origin) is None


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _joints(wrist) -> np.ndarray:
    """21 plausible joints of a flat right hand (palm in the x-y plane, fingers along +y)."""
    w = np.asarray(wrist, dtype=np.float64)
    j = np.zeros((21, 3))
    j[0] = w
    for f, x in enumerate((-0.035, -0.02, 0.0, 0.02, 0.035)):
        for k in range(4):
            j[1 + 4 * f + k] = w + (
                x * (1 + 0.2 * k),
                0.07 + 0.025 * k - (0.04 if f == 0 else 0),
                0.0,
            )
    return j


def _box_hand(wrist, scale: float = 1.0) -> trimesh.Trimesh:
    """A closed box 9 x 16 x 3 cm over the joints, scaled about the wrist."""
    box = trimesh.creation.box(extents=(0.09, 0.16, 0.03))
    box.apply_translation(np.asarray(wrist) + (0.0, 0.07, 0.0))
    box.vertices = (box.vertices - wrist) * scale + wrist
    return box


def test_hand_metrics_identity_shift_and_scale():
    wrist = np.array([0.01, 0.02, 0.45])
    gt = _box_hand(wrist)
    joints = _joints(wrist)
    rng = np.random.default_rng(0)
    kw = dict(n_iou=20_000, n_chamfer=20_000)

    same = hand_metrics(gt, gt.vertices, gt.faces, joints, joints, rng, **kw)
    assert same["iou"] == pytest.approx(100.0)
    assert same["chamfer_mm"] < 1.0  # sampling floor only
    assert same["mpjpe_mm"] == 0.0

    shift = np.array([0.0, 0.0, 0.01])  # 1 cm towards the camera: a third of the thickness
    moved = gt.copy()
    moved.apply_translation(shift)
    shifted = hand_metrics(moved, gt.vertices, gt.faces, joints + shift, joints, rng, **kw)
    assert 35.0 < shifted["iou"] < 65.0  # overlap 2/3, union 4/3 of the volume -> 50 %
    assert shifted["iou_j9"] == pytest.approx(100.0)  # its shape, placed at the GT's joint 9
    assert same["iou_j9"] == same["iou"]
    assert shifted["chamfer_mm"] < 1.0  # mid-joint alignment removes the shift
    assert shifted["mpjpe_mm"] == pytest.approx(0.0, abs=1e-9)

    scaled = hand_metrics(_box_hand(wrist, 1.1), gt.vertices, gt.faces, joints, joints, rng, **kw)
    assert 65.0 < scaled["iou"] < 85.0  # 1 / 1.1^3 = 75 %
    assert scaled["chamfer_mm"] > 2.0

    missing = hand_metrics(None, gt.vertices, gt.faces, None, joints, rng, **kw)
    assert missing["iou"] == 0.0 == missing["iou_j9"] and math.isnan(missing["chamfer_mm"])
    assert math.isnan(missing["mpjpe_mm"])
    with pytest.raises(ValueError, match="non-finite"):
        hand_metrics(gt, gt.vertices, gt.faces, joints * np.nan, joints, rng, **kw)


def test_mise_mesh_in_camera_frame_scores_like_the_shape():
    """End to end: occupancy in normalised space -> MISE -> camera frame -> metrics."""
    wrist = np.array([0.0, 0.0, 0.5])
    joints = _joints(wrist)
    rot, origin = root_frame(joints)
    gt = trimesh.creation.icosphere(subdivisions=5, radius=SPHERE_R * NORM_SCALE)
    gt.apply_translation(from_normalized(np.array([SPHERE_C]), rot, origin)[0])
    (mesh,) = extract_meshes(Recorder(fields=(sdf_sphere,)), 1, 32, 2)
    pred = mesh_to_camera(mesh, rot, origin)
    m = hand_metrics(
        pred,
        gt.vertices,
        gt.faces,
        joints,
        joints,
        np.random.default_rng(1),
        n_iou=20_000,
        n_chamfer=20_000,
    )
    assert m["iou"] > 98.0 and m["chamfer_mm"] < 1.5  # 20k samples: ~1 mm floor on this sphere


def test_scene_penetration_of_overlapping_boxes():
    a = trimesh.creation.box(extents=(0.04, 0.04, 0.04))
    b = a.copy()
    b.apply_translation((0.02, 0.0, 0.0))  # overlap 2 x 4 x 4 cm = 32 cm³
    assert scene_penetration_cm3([a, b]) == pytest.approx(32.0, rel=0.02)
    assert scene_penetration_cm3([a, None]) == 0.0
    far = a.copy()
    far.apply_translation((0.1, 0.0, 0.0))
    assert scene_penetration_cm3([a, far]) == 0.0


def test_metric_table_json_and_markdown_round_trip(tmp_path):
    table = MetricTable()
    table.add_hand("I", {"iou": 80.0, "chamfer_mm": 2.0, "mpjpe_mm": 1.0})
    table.add_hand("I", {"iou": 70.0, "chamfer_mm": 3.0, "mpjpe_mm": 2.0})
    table.add_hand("I", None)  # absent hand: skipped
    table.add_scene("I", 0.1, 2.0)
    table.add_scene("I", 0.3)  # contact area not measured: NaN, skipped
    table.add_hand("R", {"iou": 90.0, "chamfer_mm": 1.5, "mpjpe_mm": float("nan")})
    table.add_hand("R", {"iou": 0.0, "chamfer_mm": float("nan"), "mpjpe_mm": float("nan")})
    with pytest.raises(KeyError):
        table.add_hand("R", {"iou_pct": 1.0})

    summary = table.summary()
    i, r = summary["variants"]["I"], summary["variants"]["R"]
    assert i["iou"] == pytest.approx(75.0) and i["chamfer_mm"] == pytest.approx(2.5)
    assert i["mpjpe_mm"] == pytest.approx(1.5) and i["penetration_cm3"] == pytest.approx(0.2)
    assert i["n_hands"] == 2 and i["n_scenes"] == 2
    assert i["contact_cm2"] == pytest.approx(2.0) and i["counts"]["contact_cm2"] == 1
    assert r["iou"] == pytest.approx(45.0) and r["chamfer_mm"] == pytest.approx(1.5)
    assert r["mpjpe_mm"] is None and r["penetration_cm3"] is None
    assert r["counts"]["chamfer_mm"] == 1 and r["n_hands"] == 2

    path = table.write_json(tmp_path / "sub" / "metrics.json")
    loaded = load_summary(path)
    assert loaded == json.loads(json.dumps(summary))
    md = table.to_markdown()
    assert summary_markdown(loaded) == md
    assert table.write_markdown(tmp_path / "metrics.md").read_text() == md
    lines = md.strip().splitlines()
    assert lines[0].startswith("| Variant | IoU (%) | CD (mm) | MPJPE (mm) | Pen. (cm³)")
    assert lines[2] == "| I | 75.0 | 2.50 | 1.50 | 0.200 | 2.00 | 2 | 2 |"
    assert lines[3] == "| R | 45.0 | 1.50 | – | – | – | 2 | 0 |"
    table.add_hand("R", {"iou": 50.0, "iou_j9": 60.0, "chamfer_mm": 1.0, "mpjpe_mm": 1.0})
    lines = table.to_markdown().strip().splitlines()  # a row measured it: its column shows
    assert lines[0].startswith("| Variant | IoU (%) | IoU at j9 (%) | CD (mm) |")
    assert lines[2].startswith("| I | 75.0 | – | 2.50 |")
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ValueError):
        load_summary(tmp_path / "bad.json")


def test_comparison_picture():
    size = 64
    K = np.array([[80.0, 0, size / 2], [0, 80.0, size / 2], [0, 0, 1]])
    image = np.full((size, size, 3), 30, dtype=np.uint8)
    ball = trimesh.creation.icosphere(subdivisions=2, radius=0.05)

    def at(x):
        m = ball.copy()
        m.apply_translation((x, 0.0, 0.4))
        return m

    gt = [at(-0.06), at(0.06)]
    rows = [
        (image, gt, {"I": [at(-0.05), None], "R": [at(-0.06), at(0.07)]}),
        (image, [None, gt[1]], {"R": [None, at(0.06)]}),
    ]
    pic = comparison_picture(rows, K, label_height=16)
    assert pic.dtype == np.uint8 and pic.shape == (16 + 2 * size, 4 * size, 3)
    strip, body = pic[:16], pic[16:]
    assert (strip < 128).any() and (strip == 255).any()  # black labels on white
    tile = lambda r, c: body[r * size : (r + 1) * size, c * size : (c + 1) * size]  # noqa: E731
    assert np.array_equal(tile(0, 0), image)  # the input column is untouched
    gt_tile = tile(0, 1).astype(int)
    left_half, right_half = gt_tile[:, : size // 2], gt_tile[:, size // 2 :]
    # Left hand blue on the left (camera x < 0), right hand orange on the right.
    assert (left_half[..., 2] - left_half[..., 0]).max() > 60
    assert (right_half[..., 0] - right_half[..., 2]).max() > 60
    assert np.array_equal(tile(1, 2), image)  # variant I absent from row 2: plain crop
    assert not np.array_equal(tile(1, 3), image)
    assert HAND_RGB[0][2] > HAND_RGB[0][0] and HAND_RGB[1][0] > HAND_RGB[1][2]


def test_dense_mesh_agrees_with_itself_across_chunking():
    a = dense_mesh(Recorder(), 2, 32, max_points=1_000)
    b = dense_mesh(Recorder(), 2, 32)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x.vertices, y.vertices) and np.array_equal(x.faces, y.faces)


def test_band_refinement_moves_the_surface_like_a_dense_mesh_of_the_refined_field():
    """A refinement that grows the sphere by 1.5 cells: band_refined_grid (features on the coarse
    band, interpolated; head at every fine band point) gives the mesh a dense grid of the refined
    field gives, and evaluates far fewer points than the fine band."""
    from im2hands_model.meshing import band_refined_grid, grid_meshes, mise_grid

    def grown(p):
        return torch.sigmoid(-STEEP * (sdf_sphere(p) - 0.01))

    def features(points):  # smooth in space: the distance to the centre
        return (points - torch.tensor(SPHERE_C)).norm(dim=-1, keepdim=True)

    def head(feats, probs):  # sharp: the grown sphere (ignores the initial probability)
        return torch.sigmoid(-STEEP * (feats[..., 0] - SPHERE_R - 0.01))

    grid, _ = mise_grid(Recorder((sdf_sphere, sdf_sphere)), 2, 16, 3, dilate_final=False)
    dense = dense_mesh(lambda p: torch.stack([grown(p[0]), grown(p[1])]), 2, resolution=128)
    for coarse in (True, False):
        refined, stats = band_refined_grid(grid, 0.5, features, head, coarse=coarse)
        meshes = grid_meshes(refined, 0.5)
        for h in range(2):
            radius = np.linalg.norm(meshes[h].vertices - np.array(SPHERE_C), axis=1)
            assert abs(radius.mean() - SPHERE_R - 0.01) < 0.002
            assert max_vertex_distance(meshes[h], dense[h]) < 0.01
            assert trimesh.Trimesh(meshes[h].vertices, meshes[h].faces).is_watertight
        band = int(refined.known[0].sum())
        evaluated = stats.points_per_hand[0]
        assert (evaluated < 0.5 * band) if coarse else (evaluated == band)



def test_band_refinement_near_a_region_only_keeps_the_grid_surface_elsewhere():
    """``near_fn``: the refinement (grow the sphere by 1.5 cells, meshed at its own level 0.4)
    runs where x > centre only; there the surface grows, elsewhere it is the grid's own
    surface at 0.5 (all of it with nothing near, to the float), one closed mesh through both."""
    from im2hands_model.meshing import band_refined_grid, grid_meshes, mise_grid

    def features(points):
        return (points - torch.tensor(SPHERE_C)).norm(dim=-1, keepdim=True)

    def head(feats, probs):
        return torch.sigmoid(-STEEP * (feats[..., 0] - SPHERE_R - 0.01) + math.log(0.4 / 0.6))

    grid, _ = mise_grid(Recorder((sdf_sphere, sdf_sphere)), 2, 16, 3, dilate_final=False)
    plain = grid_meshes(grid, 0.5)
    calls = []

    def right_half(h, points):
        calls.append(len(points))
        return points[:, 0] > SPHERE_C[0]

    refined, stats = band_refined_grid(grid, 0.5, features, head, near_fn=right_half,
                                       out_threshold=0.4)  # fmt: skip
    everywhere, full_stats = band_refined_grid(grid, 0.5, features, head)
    assert 0 < stats.points_per_hand[0] < 0.7 * full_stats.points_per_hand[0] and calls
    for h, mesh in enumerate(grid_meshes(refined, 0.4)):
        assert trimesh.Trimesh(mesh.vertices, mesh.faces).is_watertight
        radius = np.linalg.norm(mesh.vertices - np.array(SPHERE_C), axis=1)
        x = mesh.vertices[:, 0] - SPHERE_C[0]
        plain_r = np.linalg.norm(plain[h].vertices - np.array(SPHERE_C), axis=1).mean()
        assert abs(radius[x > 0.02].mean() - SPHERE_R - 0.01) < 0.002  # grown
        assert abs(radius[x < -0.02].mean() - plain_r) < 0.001  # the grid's own
    nothing, _ = band_refined_grid(grid, 0.5, features, head, out_threshold=0.4,
                                   near_fn=lambda h, p: torch.zeros(len(p), dtype=torch.bool))
    for a, b in zip(grid_meshes(nothing, 0.4), plain, strict=True):
        np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-5)
        np.testing.assert_array_equal(a.faces, b.faces)
    with pytest.raises(ValueError, match="out_threshold"):
        band_refined_grid(grid, 0.5, features, head, near_fn=right_half)

def test_band_refinement_of_an_empty_grid_is_empty():
    from im2hands_model.meshing import band_refined_grid, grid_meshes, mise_grid

    grid, _ = mise_grid(lambda p: torch.zeros(p.shape[:2]), 2, 8, 1)
    refined, stats = band_refined_grid(grid, 0.5, lambda p: p, lambda f, probs: probs, coarse=True)
    assert grid_meshes(refined, 0.5) == [None, None] and stats.points_per_hand == [0, 0]


def test_paper_table_puts_ours_beside_the_published_numbers():
    from im2hands_model.evaluation import PUBLISHED_MESHES, paper_table_markdown

    summary = {
        "variants": {"HALO": {"iou": 70.04, "chamfer_mm": 2.9}, "I+R": {"iou": 76.25,
                                                                        "chamfer_mm": 2.4}},
        "keypoints": {"sources": {"pred. kpts + K": {"mpjpe_mm": 11.5}}},
    }  # fmt: skip
    md = paper_table_markdown(summary)
    rows = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "| 76.2 | 77.8 | 2.40 | 2.30 |" in rows["Im2Hands (I+R)"]
    assert f"| 70.0 | {PUBLISHED_MESHES['HALO']['iou']:.1f} |" in rows["HALO (keypoint-only I)"]
    assert "| – | – | – | – |" in rows["Im2Hands I (no R)"]  # not evaluated, not published
    assert "| 8.79 |" in rows["IntagHand (paper)"] and "| 11.50 |" in rows["pred. kpts + K (ours)"]


def test_a_prior_answers_the_coarse_level_and_the_surface_is_still_the_fields():
    """MISE from a prior (a slightly moved sphere: last frame's shape): the coarse level asks the
    prior, not the field; the finer levels evaluate the field on the prior's band, and the mesh
    is the field's own, as without the prior."""
    from im2hands_model.meshing import grid_meshes, mise_grid

    moved = (SPHERE_C[0] + 0.01, SPHERE_C[1], SPHERE_C[2])

    def prior(points: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(-STEEP * sdf_sphere(points, centre=moved))

    field = Recorder(fields=(sdf_sphere,))
    grid, stats = mise_grid(field, 1, 32, 2, prior=prior)
    plain, plain_stats = mise_grid(Recorder(fields=(sdf_sphere,)), 1, 32, 2)
    assert stats.levels[0].points_per_hand == [0]  # the coarse level came from the prior
    assert sum(stats.points_per_hand) < sum(plain_stats.points_per_hand)
    got, want = grid_meshes(grid, 0.5)[0], grid_meshes(plain, 0.5)[0]
    assert max_vertex_distance(got, want) < 1e-4
    radius = np.linalg.norm(got.vertices - np.array(SPHERE_C), axis=1).mean()
    assert radius == pytest.approx(SPHERE_R, abs=1e-3)  # the field's sphere, not the prior's
