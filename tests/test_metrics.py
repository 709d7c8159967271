"""Known-answer tests for im2hands_model.metrics on spheres, boxes and shifted copies."""

from __future__ import annotations

import math

import numpy as np
import pytest
import trimesh

from im2hands_model import metrics

R = 0.05  # sphere radius, metres


def sphere(radius: float = R, center: tuple[float, float, float] = (0.0, 0.0, 0.0)):
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=radius)
    mesh.apply_translation(center)
    return mesh


def box(extent: float, center: tuple[float, float, float]):
    return trimesh.creation.box(
        extents=(extent, extent, extent),
        transform=trimesh.transformations.translation_matrix(center),
    )


def lens_volume(r: float, d: float) -> float:
    """Volume of the intersection of two spheres of radius r whose centres are d apart."""
    if d >= 2 * r:
        return 0.0
    return math.pi * (4 * r + d) * (2 * r - d) ** 2 / 12


def sphere_volume(r: float) -> float:
    return 4.0 / 3.0 * math.pi * r**3


# ---------------------------------------------------------------------------------------------
# Inside test and IoU
# ---------------------------------------------------------------------------------------------


def test_inside_mesh_matches_sphere_radius():
    s = sphere()
    pts = metrics.sample_box_points(-0.06, 0.06, 20_000, seed=1)
    r = np.linalg.norm(pts, axis=1)
    inside = metrics.inside_mesh(s.vertices, s.faces, pts)
    assert inside.dtype == bool and inside.shape == (20_000,)
    clear = np.abs(r - R) > 2e-4  # away from the polyhedral approximation of the sphere
    np.testing.assert_array_equal(inside[clear], r[clear] < R)
    # Exact winding numbers agree with the fast ones; flipped orientation reads the same.
    sub = pts[:500]
    np.testing.assert_array_equal(
        metrics.inside_mesh(s.vertices, s.faces, sub, exact=True), inside[:500]
    )
    np.testing.assert_array_equal(
        metrics.inside_mesh(s.vertices, s.faces[:, ::-1], sub), inside[:500]
    )


def test_iou_labels():
    a = np.array([1, 1, 0, 0, 1], dtype=bool)
    b = np.array([1, 0, 1, 0, 1], dtype=bool)
    assert metrics.iou(a, b) == pytest.approx(2 / 4)
    assert metrics.iou(a, a) == 1.0
    assert metrics.iou(a, ~a) == 0.0
    assert metrics.iou(np.zeros(7, bool), np.zeros(7, bool)) == 1.0  # empty union
    assert metrics.iou(a.astype(np.int64), b.astype(np.uint8)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        metrics.iou(a, b[:4])
    with pytest.raises(ValueError):
        metrics.iou(a.astype(float) * 0.7, b)  # probabilities must be thresholded first


@pytest.mark.parametrize("d", [0.04, 0.07])
def test_iou_from_meshes_two_spheres_vs_lens_formula(d):
    a, b = sphere(), sphere(center=(d, 0.0, 0.0))
    lens = lens_volume(R, d)
    expected = lens / (2 * sphere_volume(R) - lens)
    got = metrics.iou_from_meshes(a, b, (-R, -R, -R), (d + R, R, R), n_points=100_000, seed=0)
    assert got == pytest.approx(expected, abs=0.01)
    # Identical meshes, given as (vertices, faces) tuples.
    assert metrics.iou_from_meshes((a.vertices, a.faces), a, -R, R, n_points=5_000) == 1.0


def test_iou_from_meshes_apart_is_zero():
    a, b = sphere(), sphere(center=(0.11, 0.0, 0.0))
    assert metrics.iou_from_meshes(a, b, (-R, -R, -R), (0.16, R, R), n_points=20_000) == 0.0


def test_mesh_iou_against_analytic_labels():
    d = 0.03
    pts = metrics.sample_box_points((-R, -R, -R), (d + R, R, R), 50_000, seed=3)
    gt = np.linalg.norm(pts - np.array([d, 0.0, 0.0]), axis=1) < R  # exact sphere labels
    got = metrics.mesh_iou(sphere(), gt, pts)
    lens = lens_volume(R, d)
    assert got == pytest.approx(lens / (2 * sphere_volume(R) - lens), abs=0.01)
    # Perfect prediction of exact labels, up to the polyhedral approximation.
    assert metrics.mesh_iou(sphere(), np.linalg.norm(pts, axis=1) < R, pts) > 0.99


# ---------------------------------------------------------------------------------------------
# Chamfer-L1
# ---------------------------------------------------------------------------------------------


def test_chamfer_self_is_near_zero_and_shift_is_not():
    s = sphere()
    self_cd = metrics.chamfer_l1_mm(s.vertices, s.faces, s.vertices, s.faces, n_samples=100_000)
    # Independent sample sets: a floor of ~0.5/sqrt(density) = 0.28 mm for this sphere.
    assert 0.0 < self_cd < 0.4
    t = np.array([0.01, -0.004, 0.002])  # 10.9 mm
    shifted = s.vertices + t
    cd_shift = metrics.chamfer_l1_mm(shifted, s.faces, s.vertices, s.faces, n_samples=20_000)
    assert cd_shift > 3.0


def test_chamfer_mid_joint_alignment_removes_translation():
    s = sphere()
    rng = np.random.default_rng(0)
    gt_joints = rng.normal(scale=0.03, size=(21, 3))
    t = np.array([0.02, 0.15, -0.3])
    cd = metrics.chamfer_l1_mm(
        s.vertices + t,
        s.faces,
        s.vertices,
        s.faces,
        pred_joints=gt_joints + t,
        gt_joints=gt_joints,
        n_samples=20_000,
    )
    # Same as comparing the unmoved mesh with itself (the sampling floor, ~0.6 mm at 20k).
    self_cd = metrics.chamfer_l1_mm(s.vertices, s.faces, s.vertices, s.faces, n_samples=20_000)
    assert cd == pytest.approx(self_cd, abs=1e-6) and cd < 0.8
    # Joint 9 alone drives the alignment: moving another joint changes nothing, moving 9 does.
    moved = gt_joints + t
    moved[0] += 0.05
    cd_other = metrics.chamfer_l1_mm(
        s.vertices + t, s.faces, s.vertices, s.faces, moved, gt_joints, n_samples=20_000
    )
    assert cd_other == pytest.approx(cd)
    moved[9] += 0.02
    cd_mid = metrics.chamfer_l1_mm(
        s.vertices + t, s.faces, s.vertices, s.faces, moved, gt_joints, n_samples=20_000
    )
    assert cd_mid > 5.0


def test_chamfer_concentric_spheres():
    inner, outer = sphere(0.04), sphere(0.05)
    acc, comp = metrics.chamfer_terms_mm(
        inner.vertices, inner.faces, outer.vertices, outer.faces, n_samples=20_000
    )
    assert acc == pytest.approx(10.0, abs=0.1)
    assert comp == pytest.approx(10.0, abs=0.1)
    cd = metrics.chamfer_l1_mm(
        inner.vertices, inner.faces, outer.vertices, outer.faces, n_samples=20_000
    )
    assert cd == pytest.approx(0.5 * (acc + comp))


def test_chamfer_terms_are_directional():
    # GT = pred sphere (r 30 mm) plus a concentric sphere of r 40 mm: every predicted point is on
    # the GT, but 16/25 of the GT area (the outer sphere) is 10 mm from the prediction.
    inner, outer = sphere(0.03), sphere(0.04)
    gt_v = np.concatenate([inner.vertices, outer.vertices])
    gt_f = np.concatenate([inner.faces, outer.faces + len(inner.vertices)])
    acc, comp = metrics.chamfer_terms_mm(inner.vertices, inner.faces, gt_v, gt_f, n_samples=20_000)
    assert acc < 1.0
    assert comp == pytest.approx(10.0 * 16 / 25, abs=0.4)


def test_chamfer_is_deterministic_and_validates():
    s = sphere(0.03)
    args = (s.vertices * 1.1, s.faces, s.vertices, s.faces)
    assert metrics.chamfer_l1_mm(*args, n_samples=2_000, seed=5) == metrics.chamfer_l1_mm(
        *args, n_samples=2_000, seed=5
    )
    with pytest.raises(ValueError):
        metrics.chamfer_l1_mm(*args, pred_joints=np.zeros((21, 3)))  # gt_joints missing
    with pytest.raises(ValueError):
        metrics.chamfer_l1_mm(*args, pred_joints=np.zeros((20, 3)), gt_joints=np.zeros((20, 3)))
    with pytest.raises(ValueError):
        metrics.chamfer_l1_mm(np.zeros((0, 3)), np.zeros((0, 3), int), s.vertices, s.faces)


def test_sample_surface_points_lie_on_surface_and_are_area_weighted():
    b = box(0.02, (0.0, 0.0, 0.0))
    pts = metrics.sample_surface_points(b.vertices, b.faces, 60_000, rng=2)
    assert np.allclose(np.abs(pts).max(axis=1), 0.01)  # every point on a face of the cube
    # Equal-area faces get equal shares: each of the 6 faces holds ~1/6 of the samples.
    axis = np.argmax(np.abs(pts), axis=1)
    face = axis * 2 + (pts[np.arange(len(pts)), axis] > 0)
    counts = np.bincount(face, minlength=6)
    assert np.allclose(counts / len(pts), 1 / 6, atol=0.01)
    # A face twice as large (stretched box) gets twice the samples.
    tall = metrics.sample_surface_points(b.vertices * [1.0, 1.0, 2.0], b.faces, 60_000, rng=3)
    on_top = np.isclose(np.abs(tall[:, 2]), 0.02)
    assert on_top.mean() == pytest.approx(2 * 0.02**2 / (2 * 0.02**2 + 4 * 0.02 * 0.04), abs=0.01)


def test_sample_surface_points_uniform_inside_triangle():
    tri_v = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    pts = metrics.sample_surface_points(tri_v, np.array([[0, 1, 2]]), 40_000, rng=4)
    assert np.all(pts[:, :2] >= 0.0) and np.all(pts[:, :2].sum(axis=1) <= 1.0 + 1e-12)
    # Uniform density: the corner triangle x + y < 1/2 holds a quarter of the area.
    assert np.mean(pts[:, :2].sum(axis=1) < 0.5) == pytest.approx(0.25, abs=0.01)
    assert pts[:, 0].mean() == pytest.approx(1 / 3, abs=0.01)


# ---------------------------------------------------------------------------------------------
# MPJPE
# ---------------------------------------------------------------------------------------------


def test_mpjpe_known_offsets():
    rng = np.random.default_rng(0)
    gt = rng.normal(scale=0.05, size=(4, 2, 21, 3))
    # Pure translation per hand: zero error after joint-9 alignment.
    assert metrics.mpjpe_mm(gt + rng.normal(size=(4, 2, 1, 3)), gt) == pytest.approx(0.0, abs=1e-9)
    # Every joint but 9 offset by v (|v| = 5 mm): error 5 mm on 20 of 21 joints.
    v = np.array([0.003, 0.0, -0.004])
    pred = gt + v
    pred[..., 9, :] = gt[..., 9, :]
    assert metrics.mpjpe_mm(pred, gt) == pytest.approx(5.0 * 20 / 21)
    err = metrics.joint_errors_mm(pred, gt)
    assert err.shape == (4, 2, 21)
    assert np.allclose(err[..., 9], 0.0) and np.allclose(np.delete(err, 9, axis=-1), 5.0)
    # Aligning at the wrist instead: only joint 9 is now off (by -v), the others match.
    assert metrics.mpjpe_mm(pred, gt, align_joint=0) == pytest.approx(5.0 / 21)


def test_mpjpe_mask_and_nan():
    gt = np.zeros((3, 21, 3))
    gt[:, :, 0] = np.linspace(0, 0.1, 21)
    pred = gt.copy()
    pred[1, 3] += [0.0, 0.021, 0.0]  # hand 1: one joint 21 mm off -> 1 mm mean
    pred[2] = np.nan  # hand 2 absent
    mask = np.array([True, True, False])
    assert metrics.mpjpe_mm(pred, gt, mask=mask) == pytest.approx(0.5)
    assert metrics.mpjpe_mm(pred, gt, mask=np.array([0, 1, 0])) == pytest.approx(1.0)
    assert math.isnan(metrics.mpjpe_mm(pred, gt, mask=np.zeros(3, bool)))
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(pred, gt)  # NaN in a valid hand
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(pred, gt, mask=np.ones(2, bool))


def test_mpjpe_shape_errors():
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(np.zeros((2, 21, 3)), np.zeros((1, 21, 3)))
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(np.zeros((42, 3)), np.zeros((42, 3)))
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(np.zeros((21, 2)), np.zeros((21, 2)))
    with pytest.raises(ValueError):
        metrics.mpjpe_mm(np.zeros((21, 3)), np.zeros((21, 3)), align_joint=21)


# ---------------------------------------------------------------------------------------------
# Penetration volume
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d", [0.06, 0.085])
def test_penetration_volume_spheres_vs_lens(d):
    a, b = sphere(), sphere(center=(d, 0.0, 0.0))
    got = metrics.penetration_volume(a, b, voxel_size=0.0015)
    assert got == pytest.approx(lens_volume(R, d), rel=0.02)
    assert metrics.penetration_volume_cm3(a, b, voxel_size=0.0015) == pytest.approx(got * 1e6)


def test_penetration_volume_zero_when_apart():
    a = sphere()
    assert metrics.penetration_volume(a, sphere(center=(0.101, 0.0, 0.0))) == 0.0
    # Bounding boxes overlap at a corner but the spheres do not.
    assert metrics.penetration_volume(a, sphere(center=(0.06, 0.06, 0.06))) == 0.0


def test_penetration_volume_boxes_slab():
    a = box(0.04, (0.0, 0.0, 0.0))
    b = box(0.04, (0.03, 0.005, -0.002))  # overlap 10 x 35 x 38 mm
    expected = 0.010 * 0.035 * 0.038
    assert metrics.penetration_volume(a, b, voxel_size=0.001) == pytest.approx(expected, rel=1e-6)
    # Clipping the evaluation box to x < 0.015 keeps half the slab.
    half = metrics.penetration_volume(a, b, box_min=-1.0, box_max=(0.015, 1.0, 1.0))
    assert half == pytest.approx(expected / 2, rel=1e-6)
    assert metrics.penetration_volume(a, a, voxel_size=0.002) == pytest.approx(0.04**3, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# Contact area and contacts
# ---------------------------------------------------------------------------------------------


def test_contact_area_boxes_face_to_face():
    a = box(0.04, (0.0, 0.0, 0.0))
    b = box(0.04, (0.041, 0.0, 0.0))  # 1 mm gap
    area = metrics.contact_area(a, b, contact_distance=0.003)
    assert area.a == pytest.approx(0.04**2)
    assert area.b == pytest.approx(0.04**2)
    assert area.mean == pytest.approx(0.04**2)
    # Gap wider than the contact distance: no contact.
    far = metrics.contact_area(a, box(0.04, (0.045, 0.0, 0.0)), contact_distance=0.003)
    assert far.a == 0.0 and far.b == 0.0


def test_contact_area_overlapping_spheres_is_a_cap():
    d, delta = 0.08, 0.003
    a, b = sphere(), sphere(center=(d, 0.0, 0.0))
    area = metrics.contact_area(a, b, contact_distance=delta)
    # Points p on A with |p - c_B| <= R + delta form a cap of A starting at x0.
    x0 = (R**2 + d**2 - (R + delta) ** 2) / (2 * d)
    cap = 2 * math.pi * R * (R - x0)
    assert area.a == pytest.approx(cap, rel=0.05)
    assert area.b == pytest.approx(cap, rel=0.05)


def test_contacts_vertices_depth_and_distance():
    d = 0.09  # spheres overlap by 10 mm along x
    a, b = sphere(), sphere(center=(d, 0.0, 0.0))
    c = metrics.contacts(a, b, contact_distance=0.003)
    va = np.asarray(a.vertices)
    dist_b = np.linalg.norm(va - [d, 0.0, 0.0], axis=1) - R  # analytic signed distance to B
    # Penetrating vertices of A are those inside B, with depth ≈ R - |v - c_B|.
    expected_pen = np.flatnonzero(dist_b < -1e-4)
    assert set(expected_pen) <= set(c.a.penetrating.tolist())
    assert np.allclose(c.a.depth, -dist_b[c.a.penetrating], atol=1e-4)
    # The deepest vertex of A is its pole at x = R, 10 mm inside B (the full overlap).
    assert c.a.max_depth == pytest.approx(0.010, abs=2e-4)
    assert c.max_depth == pytest.approx(0.010, abs=2e-4) and c.penetrating
    # Touching vertices are outside B within 3 mm.
    assert len(c.a.touching) > 0
    assert np.all(c.a.distance >= 0.0) and np.all(c.a.distance <= 0.003)
    assert np.allclose(c.a.distance, dist_b[c.a.touching], atol=1e-4)
    assert not set(c.a.penetrating.tolist()) & set(c.a.touching.tolist())
    np.testing.assert_array_equal(c.a.touching_points, va[c.a.touching])
    # Symmetric configuration: B sees the same number of penetrating vertices (mirror image).
    assert abs(len(c.b.penetrating) - len(c.a.penetrating)) <= 2
    # Far apart: nothing.
    none = metrics.contacts(a, sphere(center=(0.2, 0.0, 0.0)))
    assert len(none.a.penetrating) == len(none.a.touching) == len(none.b.touching) == 0
    assert not none.penetrating and none.max_depth == 0.0


def test_contacts_with_given_inside_tests_equal_the_winding_numbers():
    """``inside=``: with the very answers of the winding-number test the contacts are the same
    to the last digit (the distance is skipped only where it cannot be reported); with an
    analytic inside test of the spheres, the same vertices up to the surface's own."""
    a, b = sphere(), sphere(center=(0.09, 0.0, 0.0))
    plain = metrics.contacts(a, b, contact_distance=0.003)

    def winding(mesh):
        return lambda q: metrics.inside_mesh(mesh.vertices, mesh.faces, q)

    calls = []

    def analytic(centre):
        def inside(q):
            calls.append(len(q))
            return np.linalg.norm(q - centre, axis=1) < R
        return inside

    same = metrics.contacts(a, b, contact_distance=0.003, inside=(winding(a), winding(b)))
    near = metrics.contacts(a, b, contact_distance=0.003,
                            inside=(analytic(np.zeros(3)), analytic(np.array([0.09, 0, 0]))))
    for got in (same, near):
        for mine, want in ((got.a, plain.a), (got.b, plain.b)):
            if got is same:
                np.testing.assert_array_equal(mine.penetrating, want.penetrating)
                np.testing.assert_array_equal(mine.touching, want.touching)
                np.testing.assert_array_equal(mine.depth, want.depth)
                np.testing.assert_array_equal(mine.distance, want.distance)
            else:  # the polygon's inside differs from the sphere's by its facets only
                assert len(set(mine.penetrating) ^ set(want.penetrating)) <= 0.1 * len(
                    want.penetrating) + 2
    assert calls  # the given test was used
