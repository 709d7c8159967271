"""Realistic renders (``im2hands_model.data.realism``): forearms, photo backgrounds, camera effects,
on the real generator and renderer."""

from __future__ import annotations

import numpy as np
import pytest

from im2hands_model.data.realism import (
    PhotoBackgrounds,
    camera_effects,
    forearm_meshes,
    realism_rng,
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


def test_realism_keeps_the_scene_and_changes_only_its_looks(generators):
    old, new = generators
    a, b = old.generate(300, 3), new.generate(300, 3)
    for key in ("joints_3d", "vertices", "occ_points", "occ_labels", "K_full", "hand_present"):
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    assert np.abs(a.arrays["image_full"].astype(int) - b.arrays["image_full"]).mean() > 10
    record = b.info["realism"]
    assert "camera" in record and "camera_crop" in record
    assert {f"forearm_{h}" for h in np.flatnonzero(b.arrays["hand_present"])} <= set(record)
    again = new.generate(300, 3)  # deterministic from the seed
    np.testing.assert_array_equal(again.arrays["image_full"], b.arrays["image_full"])


def test_forearm_leaves_the_wrist_away_from_the_fingers(generators):
    _, new = generators
    scene = new.generate(300, 0)
    joints = scene.arrays["joints_3d"][int(np.flatnonzero(scene.arrays["hand_present"])[0])]
    meshes, record = forearm_meshes(joints, realism_rng(1, 2), np.array([0.8, 0.6, 0.5]))
    verts = np.concatenate([m[0] for m in meshes])
    along = (verts - joints[0]) @ ((joints[0] - joints[9]) / np.linalg.norm(joints[0] - joints[9]))
    assert along.min() > -0.02  # starts at the wrist (1-2 cm inside it)
    assert 0.15 < along.max() < 0.33 and 0.18 <= record["length_m"] <= 0.30
    width = np.linalg.norm(joints[5] - joints[17])
    near = verts[along < 0.01]
    radius = np.linalg.norm(near - near.mean(0), axis=1).max()
    assert 0.2 * width < radius < 0.6 * width  # about as wide as the palm
    for v, f, rgb, jitter in meshes:
        assert f.max() < len(v) and jitter.shape == v.shape and (0 <= rgb).all()


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
