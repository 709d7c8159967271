"""Headless EGL renderer: geometry conventions, mask / depth / background, occlusion (real EGL)."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import trimesh

from im2hands_model.data.render import (
    Light,
    Renderer,
    RenderUnavailableError,
    project_points,
    random_background,
    vertex_normals,
)

SPHERE = trimesh.creation.icosphere(subdivisions=4, radius=1.0)


def sphere(centre: tuple[float, float, float], radius: float) -> tuple[np.ndarray, np.ndarray]:
    return SPHERE.vertices * radius + np.asarray(centre), SPHERE.faces


def intrinsics(fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
    return np.array([[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]])


def sphere_image_ellipse(
    centre: np.ndarray, radius: float, K: np.ndarray
) -> tuple[np.ndarray, float]:
    """Exact image of a sphere (the conic of its tangent cone): centre (u, v) and area in px²."""
    c = np.asarray(centre, dtype=np.float64)
    Kinv = np.linalg.inv(K)
    Q = np.outer(c, c) - (c @ c - radius**2) * np.eye(3)  # d^T Q d = 0 on the tangent cone
    C = -(Kinv.T @ Q @ Kinv)  # conic in homogeneous pixels, positive definite 2×2 block
    A, b, f = C[:2, :2], C[:2, 2], C[2, 2]
    x0 = -np.linalg.solve(A, b)
    k = b @ np.linalg.solve(A, b) - f
    return x0, float(np.pi * k / np.sqrt(np.linalg.det(A)))


@pytest.fixture(scope="module")
def renderer() -> Renderer:
    r = Renderer(256, 256)
    yield r
    r.release()


# (width, height, K): non-square image / non-centred principal point / fx != fy
CAMERAS = [
    (640, 480, intrinsics(520.0, 470.0, 300.0, 260.0)),
    (256, 256, intrinsics(300.0, 340.0, 140.0, 110.0)),
]


@pytest.mark.parametrize("width,height,K", CAMERAS)
def test_on_axis_sphere_centre_radius_and_depth(renderer, width, height, K):
    z, r = 0.6, 0.08
    res = renderer.render([(*sphere((0.0, 0.0, z), r), (0.8, 0.6, 0.5))], K, width, height)
    assert res.rgb.shape == (height, width, 3) and res.rgb.dtype == np.uint8
    assert res.mask.shape == (height, width) and res.depth.shape == (height, width)
    assert res.depth.dtype == np.float32
    rows, cols = np.nonzero(res.mask == 0)
    centroid = np.array([cols.mean() + 0.5, rows.mean() + 0.5])  # pixel centres at +0.5
    expected = project_points(np.array([[0.0, 0.0, z]]), K)[0]
    np.testing.assert_allclose(expected, K[:2, 2])
    assert np.abs(centroid - expected).max() < 1.0
    # On the optical axis the outline is an axis-aligned ellipse with semi-axes f * tan(asin(r/z)).
    tan_a = r / np.sqrt(z**2 - r**2)
    half_w = (cols.max() - cols.min() + 1) / 2.0
    half_h = (rows.max() - rows.min() + 1) / 2.0
    assert abs(half_w - K[0, 0] * tan_a) < 1.5
    assert abs(half_h - K[1, 1] * tan_a) < 1.5
    eq_radius = np.sqrt(len(rows) / np.pi)
    assert abs(eq_radius - np.sqrt(K[0, 0] * K[1, 1]) * tan_a) < 1.5
    # Depth: camera z of the surface; nearest point z - r at the principal point; 0 on background.
    u, v = np.floor(expected).astype(int)
    assert res.depth[v, u] == pytest.approx(z - r, abs=1e-3)
    assert np.all(res.depth[res.mask < 0] == 0.0)
    assert np.all((res.depth[res.mask == 0] > z - r - 1e-3) & (res.depth[res.mask == 0] < z))


@pytest.mark.parametrize("width,height,K", CAMERAS)
def test_off_axis_sphere_matches_exact_projection(renderer, width, height, K):
    centre = np.array([0.07, -0.05, 0.5])
    r = 0.03
    res = renderer.render([(*sphere(centre, r), (0.8, 0.6, 0.5))], K, width, height)
    rows, cols = np.nonzero(res.mask == 0)
    centroid = np.array([cols.mean() + 0.5, rows.mean() + 0.5])
    assert np.abs(centroid - project_points(centre[None], K)[0]).max() < 1.0
    ellipse_centre, area = sphere_image_ellipse(centre, r, K)
    assert np.abs(centroid - ellipse_centre).max() < 0.3
    assert abs(np.sqrt(len(rows) / np.pi) - np.sqrt(area / np.pi)) < 1.5


def test_pixel_convention_floor_of_projection(renderer):
    """A square spanning u in [10.2, 12.8], v in [5.2, 7.8] covers columns 10-12 and rows 5-7."""
    K = intrinsics(100.0, 120.0, 20.0, 15.0)
    z = 1.0
    u0, u1, v0, v1 = 10.2, 12.8, 5.2, 7.8
    x0, x1 = (u0 - K[0, 2]) * z / K[0, 0], (u1 - K[0, 2]) * z / K[0, 0]
    y0, y1 = (v0 - K[1, 2]) * z / K[1, 1], (v1 - K[1, 2]) * z / K[1, 1]
    verts = np.array([[x0, y0, z], [x1, y0, z], [x1, y1, z], [x0, y1, z]])
    faces = np.array([[0, 1, 2], [0, 2, 3]])
    res = renderer.render([(verts, faces, (1.0, 1.0, 1.0))], K, 32, 24)
    expected = np.full((24, 32), -1)
    expected[5:8, 10:13] = 0
    np.testing.assert_array_equal(res.mask, expected)
    np.testing.assert_allclose(project_points(verts, K), [[u0, v0], [u1, v0], [u1, v1], [u0, v1]])


def test_background_colour_and_image(renderer):
    K = intrinsics(300.0, 300.0, 128.0, 128.0)
    mesh = (*sphere((0.0, 0.0, 0.5), 0.05), (0.9, 0.7, 0.6))
    res = renderer.render([mesh], K, background=(0.2, 0.4, 0.6))
    far_from_mesh = res.mask < 0
    far_from_mesh[60:196, 60:196] = False
    assert np.all(res.rgb[far_from_mesh] == np.array([51, 102, 153], dtype=np.uint8))
    assert not np.all(res.rgb[res.mask == 0] == np.array([51, 102, 153], dtype=np.uint8))

    res_int = renderer.render([mesh], K, background=(51, 102, 153))  # 0..255 form
    np.testing.assert_array_equal(res_int.rgb, res.rgb)

    bg = random_background(np.random.default_rng(7), 256, 256)
    empty = renderer.render([], K, background=bg)
    np.testing.assert_array_equal(empty.rgb, bg)
    assert np.all(empty.mask == -1) and np.all(empty.depth == 0.0)
    res = renderer.render([mesh], K, background=bg)
    # Exact background wherever no (anti-aliased) mesh sample can reach: 1 px away from the mask.
    near = np.zeros_like(res.mask, dtype=bool)
    fg = res.mask >= 0
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            near |= np.roll(np.roll(fg, dy, axis=0), dx, axis=1)
    np.testing.assert_array_equal(res.rgb[~near], bg[~near])


@pytest.mark.parametrize("near_first", [True, False])
def test_two_meshes_ids_and_occlusion(renderer, near_first):
    K = intrinsics(300.0, 320.0, 120.0, 130.0)
    near = (*sphere((-0.02, 0.0, 0.45), 0.05), (0.9, 0.7, 0.6))
    far = (*sphere((0.04, 0.01, 0.6), 0.07), (0.5, 0.35, 0.25))
    meshes = [near, far] if near_first else [far, near]
    near_id, far_id = (0, 1) if near_first else (1, 0)
    both = renderer.render(meshes, K)
    alone_near = renderer.render([near], K)
    alone_far = renderer.render([far], K)
    assert set(np.unique(both.mask)) == {-1, 0, 1}
    overlap = (alone_near.mask == 0) & (alone_far.mask == 0)
    assert overlap.sum() > 100
    assert np.all(both.mask[overlap] == near_id)
    np.testing.assert_allclose(both.depth[overlap], alone_near.depth[overlap], atol=1e-6)
    only_far = (alone_far.mask == 0) & (alone_near.mask < 0)
    assert np.all(both.mask[only_far] == far_id)
    assert np.all(both.mask[(alone_near.mask < 0) & (alone_far.mask < 0)] == -1)


def test_shading_headlight_and_winding(renderer):
    K = intrinsics(300.0, 300.0, 128.0, 128.0)
    v, f = sphere((0.0, 0.0, 0.5), 0.08)
    lights = [Light(direction=(0.0, 0.0, 1.0), intensity=0.9)]
    a = renderer.render([(v, f, (0.8, 0.6, 0.5))], K, lights=lights, background=(0, 0, 0))
    lum = a.rgb.astype(np.float64).sum(axis=2)
    rows, cols = np.nonzero(a.mask == 0)
    rim = np.argmax((cols - 128.0) ** 2 + (rows - 128.0) ** 2)
    assert lum[128, 128] > lum[rows[rim], cols[rim]] + 100  # faces the light -> brightest
    # Reversed winding (inward normals) shades the same: lighting is two-sided.
    b = renderer.render([(v, f[:, ::-1], (0.8, 0.6, 0.5))], K, lights=lights, background=(0, 0, 0))
    assert np.abs(a.rgb.astype(int) - b.rgb.astype(int)).max() <= 1
    # Lights as dicts, several of them, and per-vertex colour variation.
    c = renderer.render(
        [(v, f, (0.8, 0.6, 0.5), np.full((len(v), 3), 0.5))],
        K,
        lights=[{"direction": (0.0, 0.0, 1.0), "intensity": 0.9}, {"position": (0.0, -0.5, 0.0)}],
    )
    assert c.rgb[128, 128].sum() > 0 and np.array_equal(c.mask, a.mask)


def test_per_pixel_lighting_and_two_renderers_in_one_process(renderer):
    """A second context in the same process; per-pixel and per-vertex lighting look alike."""
    K = intrinsics(300.0, 300.0, 128.0, 128.0)
    mesh = (*sphere((0.01, -0.01, 0.5), 0.08), (0.8, 0.6, 0.5))
    first = renderer.render([mesh], K)
    other = Renderer(256, 256, per_pixel_lighting=True, supersample=1, msaa=4)
    try:
        pixel_lit = other.render([mesh], K)
        again = renderer.render([mesh], K)  # switching back to the first context
        np.testing.assert_array_equal(again.rgb, first.rgb)
        np.testing.assert_array_equal(pixel_lit.mask, first.mask)
        inside = first.mask == 0
        diff = np.abs(pixel_lit.rgb.astype(int) - first.rgb.astype(int))[inside]
        assert diff.mean() < 2.0
    finally:
        other.release()


def _plane(half: float, z: float, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """A finely tessellated square facing the camera (shadows are read per vertex)."""
    xs = np.linspace(-half, half, n)
    X, Y = np.meshgrid(xs, xs)
    v = np.c_[X.ravel(), Y.ravel(), np.full(X.size, z)]
    a = (np.arange(n - 1)[:, None] * n + np.arange(n - 1)[None]).ravel()
    f = np.concatenate([np.c_[a, a + n + 1, a + 1], np.c_[a, a + n, a + n + 1]])
    return v, f


@pytest.mark.parametrize("per_pixel", [False, True])
def test_key_light_casts_a_soft_shadow_where_geometry_puts_it(renderer, per_pixel):
    K = intrinsics(200.0, 200.0, 64.0, 64.0)
    card = (np.array([[-0.03, -0.03, 0.5], [0.03, -0.03, 0.5], [0.03, 0.03, 0.5],
                      [-0.03, 0.03, 0.5]]), np.array([[0, 2, 1], [0, 3, 2]]))  # fmt: skip
    meshes = [(*_plane(0.2, 0.6), (0.8, 0.8, 0.8)), (*card, (0.8, 0.2, 0.2))]
    lights = [Light(direction=(0.3, 0.0, 1.0), intensity=0.9)]
    r = renderer if not per_pixel else Renderer(128, 128, per_pixel_lighting=True)
    try:
        plain = r.render(meshes, K, 128, 128, lights=lights, ambient=0.1)
        lit = r.render(meshes, K, 128, 128, lights=lights, ambient=0.1, shadows=True)
        sharp = r.render(meshes, K, 128, 128, lights=lights, ambient=0.1, shadows=True,
                         shadow_softness_m=0.001)  # fmt: skip
    finally:
        if per_pixel:
            r.release()
    darker = plain.rgb.astype(int).sum(2) - lit.rgb.astype(int).sum(2)
    assert darker.min() >= -3  # a shadow only ever takes light away
    rows, cols = np.nonzero(darker > 60)
    # light travelling 0.3 m sideways per metre: the card (z 0.5, 6 cm) shades the back plane
    # (z 0.6) 3 cm to the right, 10 px at f = 200 px; the visible part is right of the card
    assert len(rows) > 100 and 74 <= cols.min() and cols.max() <= 88
    assert abs(rows.mean() - 64) < 3
    assert np.array_equal(plain.mask, lit.mask)  # shadows change the shading only
    # the penumbra: a softer shadow has more partly lit pixels than a sharp one
    sharp_darker = plain.rgb.astype(int).sum(2) - sharp.rgb.astype(int).sum(2)
    partial = (darker > 20) & (darker < 0.8 * darker.max())
    partial_sharp = (sharp_darker > 20) & (sharp_darker < 0.8 * sharp_darker.max())
    assert partial.sum() > partial_sharp.sum()


def test_wrapped_light_reaches_past_the_terminator(renderer):
    K = intrinsics(300.0, 300.0, 128.0, 128.0)
    v, f = sphere((0.0, 0.0, 0.5), 0.08)
    lights = [Light(direction=(1.0, 0.0, 0.0), intensity=0.9)]  # from the left, grazing
    args = dict(lights=lights, ambient=0.0, background=(0, 0, 0), specular=0.0)
    hard = renderer.render([(v, f, (0.8, 0.6, 0.5))], K, **args)
    soft = renderer.render([(v, f, (0.8, 0.6, 0.5))], K, wrap=0.4, **args)
    same = renderer.render([(v, f, (0.8, 0.6, 0.5))], K, wrap=0.0, shadows=False, **args)
    np.testing.assert_array_equal(same.rgb, hard.rgb)  # defaults leave images unchanged
    # just past the terminator (the right half faces away from the light): dark without wrap
    assert hard.rgb[128, 132:140].max() <= 2 and soft.rgb[128, 132:140].min() > 10


def test_vertex_normals_of_sphere_are_radial():
    n = vertex_normals(SPHERE.vertices, SPHERE.faces)
    radial = SPHERE.vertices / np.linalg.norm(SPHERE.vertices, axis=1, keepdims=True)
    assert np.min(np.sum(n * radial, axis=1)) > 0.999


def test_random_background_is_varied_and_deterministic():
    imgs = [random_background(np.random.default_rng(s), 64, 48) for s in range(12)]
    assert all(i.shape == (48, 64, 3) and i.dtype == np.uint8 for i in imgs)
    np.testing.assert_array_equal(imgs[3], random_background(np.random.default_rng(3), 64, 48))
    means = np.array([i.reshape(-1, 3).mean(axis=0) for i in imgs])
    assert means.std(axis=0).min() > 5.0  # different colours across seeds
    assert sum(float(i.std()) > 3.0 for i in imgs) >= 10  # textured, not flat


def test_render_unavailable_error_explains_install():
    err = RenderUnavailableError("eglGetDisplay failed")
    assert isinstance(err, RuntimeError)
    msg = str(err)
    assert "apt-get install" in msg and "libegl1" in msg and "libgl1-mesa-dri" in msg
    assert "make setup" in msg and "eglGetDisplay failed" in msg


def _render_in_child(size: int) -> int:
    r = Renderer(size, size)
    res = r.render(
        [(*sphere((0.0, 0.0, 0.5), 0.05), (0.8, 0.6, 0.5))], intrinsics(100, 100, 32, 32)
    )
    r.release()
    return int((res.mask == 0).sum())


def test_renderer_in_spawned_worker(renderer):
    """A renderer in a 'spawn' worker works while the parent holds one (fork would hang)."""
    with mp.get_context("spawn").Pool(1) as pool:
        n = pool.apply_async(_render_in_child, (64,)).get(timeout=120)
    assert n > 100


def test_forked_child_of_a_rendering_process_is_refused(renderer):
    """Forking after a context exists would hang in Mesa: the child gets a clear error instead."""
    with mp.get_context("fork").Pool(1) as pool:
        with pytest.raises(RuntimeError, match="spawn"):
            pool.apply_async(_render_in_child, (64,)).get(timeout=60)
