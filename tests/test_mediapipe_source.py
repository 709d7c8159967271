"""MediaPipe Hands as a keypoint source (``im2hands_model.pipeline.mediapipe_source``).

The lift, the handedness rules and the whole ``__call__`` path (through a stand-in ``mediapipe``
module) run without MediaPipe. The tests that run the real MediaPipe (``mediapipe==0.10.14``, the
``mediapipe`` extra) skip when it is not installed; they use a rendered synthetic two-hand frame
and two real photos of a hand from the OpenCV documentation (``tests/data/handSrc.jpg`` and
``tests/data/Back_Projection_Theory0.jpg``, from Debian's ``opencv-doc`` 4.6.0, Apache-2.0 /
BSD-3-Clause): one left hand each, palm toward the camera.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from im2hands_model.pipeline.mediapipe_source import (
    CHIRALITY_MARGIN,
    INSTALL_HINT,
    HandDetection,
    MediaPipeKeypoints,
    assign_sides,
    chirality,
    lift_hand,
    side_from_label,
    solve_translation,
)

# MediaPipe 0.10.14 with protobuf 4.25 warns about its own use of a deprecated protobuf call
pytestmark = pytest.mark.filterwarnings("ignore:SymbolDatabase.GetPrototype:UserWarning")

DATA = Path(__file__).parent / "data"
PHOTOS = ("handSrc.jpg", "Back_Projection_Theory0.jpg")


# ------------------------------------------------------------------------ made-up hands
def made_up_right_hand(curl_deg: float = 25.0) -> np.ndarray:
    """``[21, 3]`` right hand (metres), palm toward -z, fingers up (-y), thumb toward +x.

    Seen by a camera looking along +z this is a right hand showing its palm; fingers and thumb
    bend toward the palm (-z) by ``curl_deg`` per joint.
    """
    joints = np.zeros((21, 3))
    bases = {5: (0.025, -0.085), 9: (0.003, -0.090), 13: (-0.017, -0.085), 17: (-0.035, -0.075)}
    lengths = (0.040, 0.025, 0.020)
    curl = np.radians(curl_deg)
    for base, (x, y) in bases.items():
        joints[base] = (x, y, 0.0)
        angle = 0.0
        for k, length in enumerate(lengths):
            angle += curl
            step = length * np.array([0.0, -np.cos(angle), -np.sin(angle)])
            joints[base + k + 1] = joints[base + k] + step
    joints[1] = (0.020, -0.020, -0.008)
    direction = np.array([0.6, -0.6, -0.3 - 0.5 * np.sin(curl)])
    for k, length in enumerate((0.035, 0.030, 0.025)):
        joints[2 + k] = joints[1 + k] + length * direction / np.linalg.norm(direction)
    return joints


def mirrored(joints: np.ndarray) -> np.ndarray:
    return joints * np.array([-1.0, 1.0, 1.0])


def project(points: np.ndarray, K: np.ndarray) -> np.ndarray:
    q = points @ K.T
    return q[:, :2] / q[:, 2:3]


def camera_hand(rng: np.random.Generator, left: bool, centre: np.ndarray) -> np.ndarray:
    """A made-up hand, randomly turned (palm roughly toward the camera), centred at ``centre``."""
    hand = made_up_right_hand(rng.uniform(5, 40))
    if left:
        hand = mirrored(hand)
    turn = Rotation.from_rotvec(rng.normal(0, 0.5, 3)).as_matrix()
    hand = (hand - hand.mean(0)) @ turn.T
    return hand + centre


K_TEST = np.array([[612.0, 0.0, 331.0], [0.0, 598.0, 236.0], [0.0, 0.0, 1.0]])
SIZE = (640, 480)


# ------------------------------------------------------------------------ the lift
@pytest.mark.parametrize("seed", range(6))
def test_translation_is_recovered_from_exact_projections(seed):
    rng = np.random.default_rng(seed)
    centre = np.array([rng.uniform(-0.25, 0.25), rng.uniform(-0.2, 0.2), rng.uniform(0.25, 1.5)])
    hand = camera_hand(rng, bool(seed % 2), centre)
    world = hand - hand.mean(0)  # like MediaPipe: hand-centred, camera axes
    uv = project(hand, K_TEST)
    for iterations in (0, 5):
        t, rms = solve_translation(world, uv, K_TEST, iterations)
        assert np.linalg.norm(t - hand.mean(0)) < 1e-3  # < 1 mm
        assert rms < 1e-6


def test_translation_with_noisy_landmarks_and_refinement():
    rng = np.random.default_rng(3)
    errors, linear, refined = [], [], []
    for _ in range(20):
        centre = np.array([rng.uniform(-0.2, 0.2), rng.uniform(-0.15, 0.15), rng.uniform(0.3, 0.8)])
        hand = camera_hand(rng, False, centre)
        world = hand - hand.mean(0)
        uv = project(hand, K_TEST) + rng.normal(0, 1.0, (21, 2))
        linear.append(solve_translation(world, uv, K_TEST, 0)[1])
        t, rms = solve_translation(world, uv, K_TEST, 5)
        refined.append(rms)
        errors.append(np.linalg.norm(t - centre))
    assert np.all(np.array(refined) <= np.array(linear) + 1e-9)  # Gauss-Newton never worsens
    assert 0.8 < np.median(refined) < 1.5  # about the noise (1 px per axis)
    assert np.median(errors) < 0.01  # 1 px noise: a few mm, mostly along z


def test_translation_handles_a_general_K():
    rng = np.random.default_rng(11)
    K = np.array([[800.0, 3.0, 250.0], [0.0, 780.0, 300.0], [0.0, 0.0, 1.0]])  # with skew
    hand = camera_hand(rng, True, np.array([0.1, -0.05, 0.6]))
    t, rms = solve_translation(hand - hand.mean(0), project(hand, K), K)
    assert np.linalg.norm(t - hand.mean(0)) < 1e-3 and rms < 1e-6


def test_lift_rejects_hands_behind_the_camera_and_bad_fits():
    rng = np.random.default_rng(5)
    hand = camera_hand(rng, False, np.array([0.05, 0.0, 0.5]))
    world = hand - hand.mean(0)
    good = HandDetection("Left", 0.9, project(hand, K_TEST), world)
    assert lift_hand(good, K_TEST) and good.status == "ok"
    assert np.abs(good.joints - hand).max() < 1e-3

    behind = world + np.array([0.05, 0.0, -0.5])  # the same image, seen through the back
    det = HandDetection("Left", 0.9, project(behind, K_TEST), world)
    assert not lift_hand(det, K_TEST) and det.status.startswith("behind the camera")

    uv = project(hand, K_TEST)
    stretched = uv.mean(0) + (uv - uv.mean(0)) * np.array([1.8, 0.6])  # no translation fits
    det = HandDetection("Left", 0.9, stretched, world)
    assert not lift_hand(det, K_TEST) and det.status.startswith("reprojection error")
    assert lift_hand(det, K_TEST, max_reprojection_error=10.0)  # the limit is what rejects it


def test_solve_translation_checks_shapes():
    with pytest.raises(ValueError):
        solve_translation(np.zeros((21, 3)), np.zeros((20, 2)), K_TEST)


# ------------------------------------------------------------------------ handedness
def test_mirrored_labels_map_to_the_other_side():
    # MediaPipe assumes a selfie (mirrored) image: its "Left" is the right hand of a camera image
    assert side_from_label("Left") == 1
    assert side_from_label("Right") == 0
    with pytest.raises(ValueError):
        side_from_label("left")


def test_chirality_tells_right_from_left_on_made_up_hands():
    rng = np.random.default_rng(0)
    for curl in (5.0, 20.0, 45.0, 80.0):
        right = made_up_right_hand(curl)
        turn = Rotation.random(random_state=rng).as_matrix()
        assert chirality(right @ turn.T + 1.0) > CHIRALITY_MARGIN
        assert chirality(mirrored(right) @ turn.T) < -CHIRALITY_MARGIN
        assert chirality(right * 3.0) == pytest.approx(chirality(right))  # scale free
    flat = made_up_right_hand(0.0)
    flat[1:5, 2] = 0.0
    assert abs(chirality(flat)) < 1e-9
    assert chirality(np.zeros((21, 3))) == 0.0


@pytest.mark.slow
def test_chirality_sign_matches_the_project_right_hand():
    """On the Anny right hand of the synthetic data (and its mirror, the left hand)."""
    from im2hands_model.data.anny_hand import AnnyHand
    from im2hands_model.data.poses import POSE_STYLES, sample_pose
    from im2hands_model.hands import mirror_points

    hand = AnnyHand()
    rng = np.random.default_rng(0)
    poses = np.stack([sample_pose(rng, style) for style in POSE_STYLES for _ in range(3)])
    joints = hand(np.full((len(poses), 6), 0.5), poses).joints
    for j in joints:
        assert chirality(j) > CHIRALITY_MARGIN
        assert chirality(mirror_points(j)) < -CHIRALITY_MARGIN


def _uv(rng: np.random.Generator, left: bool, x: float) -> tuple[np.ndarray, np.ndarray]:
    hand = camera_hand(rng, left, np.array([x, 0.0, 0.5]))
    return project(hand, K_TEST), hand - hand.mean(0)


def test_assign_sides_rules():
    rng = np.random.default_rng(1)
    uv_l, w_l = _uv(rng, True, -0.12)
    uv_r, w_r = _uv(rng, False, 0.12)
    # distinct labels: mirrored mapping
    assert assign_sides(["Right", "Left"], [0.9, 0.8], [uv_l, uv_r], [w_l, w_r]) == [0, 1]
    # same label: the higher score keeps it; the other moves when its shape agrees ...
    assert assign_sides(["Left", "Left"], [0.7, 0.95], [uv_l, uv_r], [w_l, w_r]) == [0, 1]
    # ... is dropped when its 3D shape is clearly the wrong hand for the other side ...
    assert assign_sides(["Left", "Left"], [0.7, 0.95], [uv_l, uv_r], [w_r, w_r]) == [None, 1]
    # ... moves when no 3D shape is given, or when it is ambiguous (flat hand)
    assert assign_sides(["Left", "Left"], [0.7, 0.95], [uv_l, uv_r]) == [0, 1]
    flat = made_up_right_hand(0.0)
    flat[1:5, 2] = 0.0
    assert assign_sides(["Left", "Left"], [0.7, 0.95], [uv_l, uv_r], [flat, w_r]) == [0, 1]
    # ... and is dropped when it is the same hand found twice
    again = uv_r + rng.normal(0, 2.0, uv_r.shape)
    assert assign_sides(["Left", "Left"], [0.95, 0.7], [uv_r, again]) == [1, None]
    # more detections than sides: the lowest score is left out
    uv_3, w_3 = _uv(rng, True, 0.0)
    sides = assign_sides(["Right", "Left", "Right"], [0.9, 0.8, 0.6], [uv_l, uv_r, uv_3])
    assert sides == [0, 1, None]
    assert assign_sides([], [], []) == []
    with pytest.raises(ValueError):
        assign_sides(["Left"], [0.9, 0.8], [uv_l])


# ------------------------------------------------------------------------ without mediapipe
def test_missing_mediapipe_raises_an_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    with pytest.raises(ImportError, match=r"pip install 'im2hands_ros\[mediapipe\]'"):
        MediaPipeKeypoints()
    assert INSTALL_HINT == "pip install 'im2hands_ros[mediapipe]'"


def test_mediapipe_without_the_legacy_api_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", types.ModuleType("mediapipe"))
    with pytest.raises(ImportError, match="0.10.14"):
        MediaPipeKeypoints()


def test_mediapipe_that_cannot_start_names_protobuf(monkeypatch):
    def broken(**options):
        raise AttributeError("'FieldDescriptor' object has no attribute 'label'")

    fake = types.ModuleType("mediapipe")
    fake.solutions = SimpleNamespace(hands=SimpleNamespace(Hands=broken))
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    with pytest.raises(ImportError, match="protobuf>=4.25.3,<5"):
        MediaPipeKeypoints()


def test_pipeline_keypoint_source_reports_the_missing_extra(monkeypatch):
    from im2hands_model.pipeline.frame import Frame
    from im2hands_model.pipeline.model import Im2Hands, PipelineConfig

    monkeypatch.setitem(sys.modules, "mediapipe", None)
    model = Im2Hands({}, PipelineConfig(keypoint_source="mediapipe"))
    frame = Frame.from_input(np.zeros((48, 64, 3), np.uint8), K_TEST)
    with pytest.raises(ImportError, match="im2hands_ros"):
        model._keypoints(frame, None)


class _FakeHands:
    """Stands in for ``mediapipe.solutions.hands.Hands``: returns prepared results."""

    instances: list[_FakeHands] = []
    result: SimpleNamespace

    def __init__(self, **options):
        self.options, self.closed, self.seen = options, False, []
        _FakeHands.instances.append(self)

    def process(self, rgb):
        self.seen.append(rgb)
        return _FakeHands.result

    def close(self):
        self.closed = True


def _landmarks(points: np.ndarray) -> SimpleNamespace:
    return SimpleNamespace(landmark=[SimpleNamespace(x=p[0], y=p[1], z=p[2]) for p in points])


def _mediapipe_result(hands: list[tuple[np.ndarray, str, float]], size=SIZE) -> SimpleNamespace:
    """A MediaPipe-like result of camera-frame hands with (mirrored-convention) labels."""
    if not hands:
        return SimpleNamespace(
            multi_hand_landmarks=None, multi_hand_world_landmarks=None, multi_handedness=None
        )
    image, world, labels = [], [], []
    for joints, label, score in hands:
        uv = project(joints, K_TEST) / np.array(size)
        image.append(_landmarks(np.c_[uv, joints[:, 2] - joints[0, 2]]))
        world.append(_landmarks(joints - joints.mean(0)))
        labels.append(
            SimpleNamespace(classification=[SimpleNamespace(label=label, score=score, index=0)])
        )
    return SimpleNamespace(
        multi_hand_landmarks=image, multi_hand_world_landmarks=world, multi_handedness=labels
    )


@pytest.fixture
def fake_mediapipe(monkeypatch):
    fake = types.ModuleType("mediapipe")
    fake.solutions = SimpleNamespace(hands=SimpleNamespace(Hands=_FakeHands))
    monkeypatch.setitem(sys.modules, "mediapipe", fake)
    _FakeHands.instances.clear()
    return _FakeHands


def test_call_lifts_both_hands_into_the_camera_frame(fake_mediapipe):
    rng = np.random.default_rng(2)
    left = camera_hand(rng, True, np.array([-0.08, 0.02, 0.55]))
    right = camera_hand(rng, False, np.array([0.09, -0.01, 0.6]))
    # MediaPipe's labels are mirrored: the left hand is "Right"
    fake_mediapipe.result = _mediapipe_result([(right, "Left", 0.97), (left, "Right", 0.88)])
    rgb = np.zeros((SIZE[1], SIZE[0], 3), np.uint8)
    with MediaPipeKeypoints(model_complexity=0, min_detection_confidence=0.6) as source:
        kp = source(rgb, K_TEST)
        fake = fake_mediapipe.instances[-1]
        assert fake.options == {
            "static_image_mode": True,
            "max_num_hands": 2,
            "model_complexity": 0,
            "min_detection_confidence": 0.6,
            "min_tracking_confidence": 0.5,
        }
        assert fake.seen[0].flags["C_CONTIGUOUS"]
        assert kp.present.tolist() == [True, True]
        assert np.abs(kp.joints[0] - left).max() < 1e-3  # < 1 mm
        assert np.abs(kp.joints[1] - right).max() < 1e-3
        np.testing.assert_allclose(kp.confidence, [0.88, 0.97], rtol=1e-6)
        np.testing.assert_allclose(kp.joints_2d[0], project(left, K_TEST), atol=1e-3)
        assert kp.joints.dtype == np.float32 and kp.joints_2d.shape == (2, 21, 2)
        assert [d.status for d in source.detections] == ["ok", "ok"]
        assert [d.side for d in source.detections] == [1, 0]

        fake_mediapipe.result = _mediapipe_result([])
        empty = source(rgb, K_TEST)
        assert not empty.any and source.detections == []
    assert fake.closed
    source.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        source(rgb, K_TEST)


def test_call_drops_what_does_not_fit(fake_mediapipe):
    rng = np.random.default_rng(4)
    left = camera_hand(rng, True, np.array([-0.08, 0.02, 0.55]))
    right = camera_hand(rng, False, np.array([0.09, -0.01, 0.6]))
    result = _mediapipe_result([(right, "Left", 0.97), (left, "Left", 0.6)])
    # the second "Left" (really a left hand) fits the image but its label is taken: it moves
    with MediaPipeKeypoints() as source:
        fake_mediapipe.result = result
        kp = source(np.zeros((480, 640, 3), np.uint8), K_TEST)
        assert kp.present.tolist() == [True, True]
        assert np.abs(kp.joints[0] - left).max() < 1e-3
        # a hand whose world landmarks do not fit its 2D landmarks is rejected, not assigned
        shuffled = result.multi_hand_landmarks[0].landmark[::-1]
        result.multi_hand_landmarks[0] = SimpleNamespace(landmark=shuffled)
        kp = source(np.zeros((480, 640, 3), np.uint8), K_TEST)
        assert source.detections[0].status != "ok" and source.detections[0].side is None
        # alone, the left hand goes where its label says (labels come first)
        assert kp.present.tolist() == [False, True]
        assert source.detections[1].side == 1
        with pytest.raises(ValueError, match="uint8"):
            source(np.zeros((480, 640, 3), np.float32), K_TEST)
    for bad in ({"max_num_hands": 0}, {"model_complexity": 2}, {"min_detection_confidence": 2}):
        with pytest.raises(ValueError):
            MediaPipeKeypoints(**bad)


def test_pipeline_uses_the_source(fake_mediapipe):
    from im2hands_model.pipeline.frame import Frame
    from im2hands_model.pipeline.model import Im2Hands, PipelineConfig

    rng = np.random.default_rng(6)
    right = camera_hand(rng, False, np.array([0.0, 0.0, 0.5]))
    fake_mediapipe.result = _mediapipe_result([(right, "Left", 0.9)])
    model = Im2Hands({}, PipelineConfig(keypoint_source="mediapipe"))
    kp = model._keypoints(Frame.from_input(np.zeros((480, 640, 3), np.uint8), K_TEST), None)
    assert kp.present.tolist() == [False, True]
    assert np.abs(kp.joints[1] - right).max() < 1e-3


# ------------------------------------------------------------------------ real MediaPipe
@pytest.fixture(scope="module")
def mediapipe_source():
    pytest.importorskip("mediapipe")
    with MediaPipeKeypoints() as source:
        yield source


def _photo(name: str) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    rgb = np.asarray(Image.open(DATA / name).convert("RGB"))
    h, w = rgb.shape[:2]
    K = np.array([[w, 0.0, w / 2], [0.0, w, h / 2], [0.0, 0.0, 1.0]])  # ~53 degrees across
    return rgb, K


@pytest.mark.parametrize("name", PHOTOS)
def test_mediapipe_finds_the_left_hand_of_a_photo(mediapipe_source, name):
    rgb, K = _photo(name)
    kp = mediapipe_source(rgb, K)
    assert kp.present.tolist() == [True, False]  # MediaPipe says "Right": a left hand here
    (det,) = mediapipe_source.detections
    assert det.label == "Right" and det.side == 0 and det.status == "ok"
    diagonal = np.linalg.norm(det.joints_2d.max(0) - det.joints_2d.min(0))
    assert det.reprojection_error < 0.05 * diagonal
    assert 0.1 < kp.joints[0, :, 2].mean() < 0.4  # a hand filling the picture, fx = width
    assert chirality(kp.joints[0]) < 0  # its 3D shape is a left hand too
    np.testing.assert_allclose(kp.joints_2d[0], det.joints_2d, atol=1e-3)
    # the mirror image (a selfie view) shows a right hand
    flipped = mediapipe_source(np.ascontiguousarray(rgb[:, ::-1]), K)
    assert flipped.present.tolist() == [False, True]


@pytest.mark.slow
def test_mediapipe_on_a_rendered_two_hand_frame(mediapipe_source):
    """Scene 33 of seed 7 (full 640x480 frame): both hands are found on their own sides."""
    from im2hands_model.data.synthetic import SceneGenerator

    scene = SceneGenerator(points_per_hand=64, full_frame=True).generate(7, 33).arrays
    K = scene["K_full"].astype(np.float64)
    kp = mediapipe_source(scene["image_full"], K)
    assert kp.present.tolist() == [True, True]
    for side in range(2):
        gt = scene["joints_3d"][side]
        # the measured 2D landmarks lie on the rendered hand of that side
        offsets = np.linalg.norm(kp.joints_2d[side] - scene["joints_2d_full"][side], axis=1)
        assert offsets.mean() < 15
        # depth from MediaPipe's hand size: within 15 % here
        assert abs(kp.joints[side, :, 2].mean() / gt[:, 2].mean() - 1) < 0.15
        centred = (kp.joints[side] - kp.joints[side].mean(0)) - (gt - gt.mean(0))
        assert np.linalg.norm(centred, axis=1).mean() < 0.03  # hand shape within 3 cm per joint
    for det in mediapipe_source.detections:
        assert det.reprojection_error < 15
