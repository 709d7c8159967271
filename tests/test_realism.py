"""Realistic renders (``im2hands_model.data.realism``): forearms, photo backgrounds, camera effects,
on the real generator and renderer."""

from __future__ import annotations

import numpy as np
import pytest

from im2hands_model.data.realism import (
    BODY_VIEW_SHARE,
    PhotoBackgrounds,
    arm_meshes,
    body_view,
    camera_effects,
    depth_camera,
    light_colour,
    realism_rng,
    scene_lights,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def generators():
    from im2hands_model.data.synthetic import SceneGenerator

    old = SceneGenerator(points_per_hand=64, full_frame=True)
    new = SceneGenerator(points_per_hand=64, full_frame=True, realism=True)
    yield old, new
    old.renderer.release()
    new.renderer.release()


def _pairwise(joints: np.ndarray) -> np.ndarray:
    return np.linalg.norm(joints[:, None] - joints[None], axis=-1)


def test_realism_keeps_the_hands_and_changes_the_view_and_looks(generators):
    old, new = generators
    for index in (3, 5):
        a, b = old.generate(300, index), new.generate(300, index)
        for key in ("pose", "phenotype", "layout", "hand_present"):
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
        present = np.flatnonzero(a.arrays["hand_present"])
        # the same hands in the same relative placement, seen from another view
        ja, jb = (np.concatenate(x.arrays["joints_3d"][present]) for x in (a, b))
        np.testing.assert_allclose(_pairwise(ja), _pairwise(jb), atol=2e-6)
        assert b.info["view"]["view"] in ("body", "any")
        record = b.info["realism"]
        assert {"camera", "camera_crop", "light"} <= set(record)
        assert {f"arm_{h}" for h in present} <= set(record)
        again = new.generate(300, index)  # deterministic from the seed
        np.testing.assert_array_equal(again.arrays["image_full"], b.arrays["image_full"])
        # the occupancy labels belong to the hands, in each hand's own box
        assert 0.05 < b.arrays["occ_labels"][present].mean() < 0.95


def test_body_views_bring_the_arms_in_from_below_or_the_sides(generators):
    _, new = generators
    scene = new.generate(300, 0)
    joints = [scene.arrays["joints_3d"][h] for h in np.flatnonzero(scene.arrays["hand_present"])]
    rng = np.random.default_rng(0)
    kinds = []
    for _ in range(200):
        R, record = body_view(rng, joints)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-9)
        kinds.append(record["view"])
        if record["view"] == "body" and record["fits"]:
            for j in joints:
                d = (j[0] - j[9]) @ R.T
                d = d / np.linalg.norm(d)
                assert d[1] > -0.1 and abs(d[2]) < 0.8  # image y points down
    assert abs(kinds.count("body") / 200 - BODY_VIEW_SHARE) < 0.08


def test_arm_leaves_the_wrist_away_from_the_fingers_and_bends_at_the_elbow(generators):
    _, new = generators
    scene = new.generate(300, 0)
    joints = scene.arrays["joints_3d"][int(np.flatnonzero(scene.arrays["hand_present"])[0])]
    meshes, record = arm_meshes(joints, realism_rng(1, 2), np.array([0.8, 0.6, 0.5]))
    axis = (joints[0] - joints[9]) / np.linalg.norm(joints[0] - joints[9])
    forearm = np.concatenate([m[0] for m in meshes[:-1]])  # the last mesh is the upper arm
    along = (forearm - joints[0]) @ axis
    assert along.min() > -0.02  # starts at the wrist (1-2 cm inside it)
    assert 0.15 < along.max() < 0.33 and 0.18 <= record["length_m"] <= 0.30
    width = np.linalg.norm(joints[5] - joints[17])
    near = forearm[along < 0.01]
    radius = np.linalg.norm(near - near.mean(0), axis=1).max()
    assert 0.2 * width < radius < 0.6 * width  # about as wide as the palm
    upper = meshes[-1][0]
    elbow = forearm[np.argmax(along)]
    reach = np.linalg.norm(upper - elbow, axis=1).max()
    assert 0.2 < reach < 0.4 and 20 <= record["upper_arm"]["elbow_deg"] <= 100
    for v, f, rgb, jitter in meshes:
        assert f.max() < len(v) and jitter.shape == v.shape and (0 <= rgb).all()


def test_scene_lights_span_rooms_and_daylight():
    rng = np.random.default_rng(0)
    kinds = set()
    for _ in range(60):
        lights, ambient, shading, record = scene_lights(rng)
        kinds.add(record["kind"])
        assert len(lights) == 2 and lights[0].intensity > lights[1].intensity
        assert shading["shadows"] and 0 < shading["wrap"] < 0.5 and ambient.shape == (3,)
        if record["kind"] == "back":
            assert lights[0].direction[2] < 0  # travels toward the camera
    assert kinds == {"soft", "hard", "back"}
    warm, cool = light_colour(2700), light_colour(6500)
    assert warm[0] / warm[2] > 2 and cool[2] >= cool[0]


def test_depth_camera_measures_like_a_consumer_depth_camera():
    K = np.array([[500.0, 0, 160], [0, 500.0, 120], [0, 0, 1]])
    depth = np.zeros((240, 320), np.float32)
    depth[40:200, 60:260] = 0.5  # a board at 0.5 m
    depth[90:150, 120:200] = 0.35  # a box on it, 15 cm nearer
    depth[5:15, 5:15] = 0.1  # nearer than any such camera measures
    rng = np.random.default_rng(0)
    out, record = depth_camera(depth, K, rng)
    assert out.dtype == np.float32 and out.shape == depth.shape
    assert (out[depth == 0] == 0).all() and (out[5:15, 5:15] == 0).all()
    board = (depth == 0.5) & (out > 0)
    err = np.abs(out[board] - 0.5)
    assert 0 < np.median(err) < 0.004 and err.max() < 0.03  # mm-level noise, in steps
    assert len(np.unique(out[board])) < 40  # quantised disparity: a few depth steps
    # holes along the box's edge, few in the middle of the board
    edge = np.zeros_like(depth, bool)
    edge[88:92, 120:200] = True
    assert (out[edge] == 0).mean() > 0.3
    assert (out[60:80, 70:110] == 0).mean() < 0.2
    assert {"baseline_m", "subpixel", "sigma_px", "min_z_m"} <= set(record)


def test_camera_effects_keep_the_image_and_record_what_they_did():
    rng = np.random.default_rng(0)
    image = np.zeros((120, 160, 3), np.uint8)
    image[30:90, 40:120] = (200, 150, 120)
    kinds = set()
    for _ in range(30):
        out, rec = camera_effects(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8
        # the scene is still there: the patch stays brighter than the background
        assert out[40:80, 50:110].mean() > out[:20, :20].mean() + 40
        kinds |= set(rec)
    assert {"exposure", "noise", "jpeg_quality", "defocus_sigma_px", "vignetting"} <= kinds


def test_backgrounds_come_from_the_installed_photographs(tmp_path, monkeypatch):
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (300, 500, 3), np.uint8)).save(folder / "a.jpg")
    monkeypatch.setenv("IM2HANDS_BACKGROUNDS", str(folder))
    photos = PhotoBackgrounds()
    assert len(photos) == 1
    view, rec = photos.sample(rng, 64, 48)
    assert view.shape == (48, 64, 3) and rec["photo"] == "a.jpg"
    monkeypatch.setenv("IM2HANDS_BACKGROUNDS", str(tmp_path / "none"))
    assert len(PhotoBackgrounds()) == 0  # no package: the generator falls back to procedural


def test_a_generator_without_photographs_still_renders(monkeypatch, tmp_path):
    from im2hands_model.data.synthetic import SceneGenerator

    monkeypatch.setenv("IM2HANDS_BACKGROUNDS", str(tmp_path / "none"))
    gen = SceneGenerator(points_per_hand=64, image_size=64, realism=True)
    try:
        scene = gen.generate(1, 0)
    finally:
        gen.renderer.release()
    assert scene.arrays["image"].shape == (64, 64, 3)
    assert "background_crop" not in scene.info["realism"]
