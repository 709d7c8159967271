"""InterHand2.6M v1.0 reader and converter, on a miniature release written in the published
formats (tests/interhand_fixture.py) with the project's MANO model on fake MANO files."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from interhand_fixture import (
    CAMERAS,
    IH_HAND_JOINTS,
    fake_mano_dir,
    project,
    write_interhand_tree,
)

from im2hands_model.data import ShardDataset
from im2hands_model.data.interhand import (
    ConvertSettings,
    InterHandFormatError,
    camera_of,
    convert_interhand,
    find_annotation_dir,
    ih_to_ours,
    ours_to_ih,
)
from im2hands_model.hands import JOINT_NAMES, from_normalized

REPO = Path(__file__).resolve().parents[1]
SPLIT = "test"
N_FRAMES = 4  # interacting frames with both hands' MANO, seen by 2 cameras -> 8 written
POINTS = 1024
ANN = f"annotations/{SPLIT}/InterHand2.6M_{SPLIT}_"
TINY_ENCODER = "{depth: resnet18, base_width: 8, feature_dim: 16, global_dim: 32}"
#: Keys (and on-disk dtypes) of the synthetic shards that the converted shards must share.
SYNTHETIC_KEYS = {
    "image": "uint8", "K": "float32", "joints_3d": "float32", "joints_2d": "float32",
    "hand_present": "bool", "occ_points": "float16", "occ_labels": "bool",
    "norm_rot": "float32", "norm_origin": "float32", "vertices": "float32",
    "phenotype": "float32", "pose": "float32", "layout": "int64", "scene_index": "int64",
}  # fmt: skip


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("interhand")
    mano = fake_mano_dir(tmp)
    return write_interhand_tree(tmp / "IH26M", mano, split=SPLIT, n_frames=N_FRAMES), mano


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory) -> Path:
    """The fixture release converted by the real command (shards of 4 frames)."""
    root, mano = release
    out = tmp_path_factory.mktemp("converted") / "ds"
    cmd = [sys.executable, "-m", "im2hands_model.data.cli", "interhand", "--root", str(root),
           "--mano", str(mano), "--split", SPLIT, "--out", str(out), "--points-per-hand",
           str(POINTS), "--shard-size", "4", "--workers", "1", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 written" in proc.stdout and "missing_mano" in proc.stdout, proc.stdout
    return out


def _json(root: Path, kind: str):
    return json.loads((root / f"{ANN}{kind}.json").read_text())


def test_joint_order_round_trips_and_matches_the_names():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(42, 3))
    np.testing.assert_array_equal(ours_to_ih(ih_to_ours(x)), x)
    y = rng.normal(size=(2, 21))
    np.testing.assert_array_equal(ih_to_ours(ours_to_ih(y)), y)
    # By name, against the fixture's table (InterHand2.6M's skeleton: tip first, wrist last).
    ih_names = [f"{side}_{ih}" for side in ("right", "left") for ih, _ in IH_HAND_JOINTS]
    ours = ih_to_ours(np.array(ih_names, dtype=object))
    to_ih = {our: ih for ih, our in IH_HAND_JOINTS}
    for h, side in enumerate(("left", "right")):
        assert [ours[h, k] for k in range(21)] == [f"{side}_{to_ih[n]}" for n in JOINT_NAMES]
    assert ours[1, 0] == "right_wrist" and ih_names[20] == "right_wrist"
    assert ours[0, 0] == "left_wrist" and ih_names[41] == "left_wrist"
    with pytest.raises(ValueError, match="42"):
        ih_to_ours(np.zeros((21, 3)))


def test_camera_transform_matches_the_published_projection(release, converted):
    root, _ = release
    cameras, joints = _json(root, "camera"), _json(root, "joint_3d")
    images = {img["id"]: img for img in _json(root, "data")["images"]}
    for frame in joints["0"].values():
        world = np.array(frame["world_coord"])
        for cam_name in CAMERAS:
            cam = camera_of(cameras, "0", cam_name)
            expected = project(world, {k: cameras["0"][k][cam_name] for k in cameras["0"]})
            got = cam.project_ih(cam.world_mm_to_camera_m(world))
            np.testing.assert_allclose(got, expected, atol=1e-6)
    ds = ShardDataset(converted)
    ours_index = {name: i for i, name in enumerate(JOINT_NAMES)}
    per_hand = [ours_index[our] for _, our in IH_HAND_JOINTS]  # IH order -> our index
    for i in range(len(ds)):
        item = ds[i]
        img = images[int(item["ih_image_id"])]
        params = {k: np.array(cameras["0"][k][img["camera"]]) for k in cameras["0"]}
        world = np.array(joints["0"][str(img["frame_idx"])]["world_coord"])
        # world -> camera (metres), by hand: R (X - campos)
        cam_m = (world - params["campos"]) @ params["camrot"].T / 1000
        uv_ih = project(world, {k: v.tolist() for k, v in params.items()})
        K = item["K"].numpy().astype(np.float64)
        scale = K[0, 0] / params["focal"][0]
        corner = params["princpt"] + 0.5 - K[:2, 2] / scale  # crop origin, our pixel convention
        for h, block in ((0, 21), (1, 0)):  # left = IH 21..41, right = IH 0..20
            expect_uv = (uv_ih[block : block + 21] + 0.5 - corner) * scale
            got_uv = item["joints_2d"][h].numpy()[per_hand]
            np.testing.assert_allclose(got_uv, expect_uv, atol=2e-3)
            got_3d = item["joints_3d"][h].numpy()[per_hand]
            np.testing.assert_allclose(got_3d, cam_m[block : block + 21], atol=2e-6)
        np.testing.assert_allclose(item["ih_joints_3d"], item["joints_3d"], atol=2e-6)


def test_crops_hold_both_hands_where_the_joints_project(converted):
    ds = ShardDataset(converted)
    for i in range(len(ds)):
        item = ds[i]
        uv = item["joints_2d"].numpy().reshape(-1, 2)
        assert (uv >= 0).all() and (uv < 256).all(), uv
        verts = item["vertices"].numpy().reshape(-1, 3).astype(np.float64)
        pix = verts @ item["K"].numpy().astype(np.float64).T
        pix = pix[:, :2] / pix[:, 2:]
        extent = (pix.max(0) - pix.min(0)).max()
        assert extent == pytest.approx(0.8 * 256, rel=1e-3)  # IntagHand's 0.8 fill
        np.testing.assert_allclose((pix.max(0) + pix.min(0)) / 2, 128, atol=1e-2)  # centred
        # The JPEG's joint blobs (red left, blue right) are where joints_2d says.
        rgb = (item["image"].permute(1, 2, 0).numpy() * 255).astype(int)
        for h, channel in ((0, 0), (1, 2)):
            cols, rows = item["joints_2d"][h].numpy().astype(int).T
            px = rgb[rows, cols]
            assert (px[:, [0, 2]].max(1) - px[:, 1] > 60).all(), px
            assert (px[:, channel] > 120).mean() > 0.7  # mostly its own colour (occlusion)


def test_crop_image_keeps_pixel_centres_and_pads_with_black():
    """The converter crops with the pipeline's resampler (pipeline/crop.py): pixel centres stay
    put, outside the image is black, shrinking averages."""
    from im2hands_model.pipeline.crop import CropWindow, crop_image

    rng = np.random.default_rng(1)
    img = rng.integers(1, 256, (40, 60, 3)).astype(np.uint8)
    np.testing.assert_array_equal(crop_image(img, CropWindow(10.0, 5.0, 20), 20), img[5:25, 10:30])
    out = crop_image(img, CropWindow(-20.0, -20.0, 40), 40)  # the top-left quarter is outside
    assert (out[:20] == 0).all() and (out[:, :20] == 0).all()
    np.testing.assert_array_equal(out[20:, 20:], img[:20, :20])
    half = crop_image(img, CropWindow(0.0, 0.0, 40), 20)  # 2:1, pixel centres at 1, 3, ...
    expected = img[:40, :40].astype(float).reshape(20, 2, 20, 2, 3).mean((1, 3))
    np.testing.assert_allclose(half, expected, atol=1.0)  # Pillow's 8-bit fixed-point bilinear


def test_occupancy_labels_agree_with_the_meshes(converted):
    import igl
    import trimesh

    ds = ShardDataset(converted)
    faces = ds.faces.numpy().astype(np.int64)
    fractions = []
    for i in range(len(ds)):
        item = ds[i]
        verts = item["vertices"].numpy().astype(np.float64)
        for h in range(2):
            assert trimesh.Trimesh(verts[h], faces[h], process=False).is_watertight
        for h in range(2):
            pts = from_normalized(item["occ_points"][h].numpy().astype(np.float64),
                                  item["norm_rot"][h].numpy().astype(np.float64),
                                  item["norm_origin"][h].numpy().astype(np.float64))  # fmt: skip
            own = np.abs(igl.winding_number(verts[h], faces[h], pts)) > 0.5
            other = np.abs(igl.winding_number(verts[1 - h], faces[1 - h], pts)) > 0.5
            label = item["occ_labels"][h].numpy() > 0.5
            assert (~label | own).mean() > 0.995  # labelled inside -> inside its mesh
            assert (label | ~own | other).mean() > 0.995  # inside only it -> labelled
            fractions.append(label.mean())
        np.testing.assert_allclose(item["norm_origin"], item["joints_3d"][:, 0], atol=1e-6)
    assert 0.1 < np.mean(fractions) < 0.45  # half the points lie near the surface


def test_skips_are_counted_with_reasons_and_warned(release, tmp_path, caplog):
    root, mano = release
    bad = shutil.copytree(root, tmp_path / "IH26M")
    data = _json(bad, "data")
    (bad / "images" / SPLIT / data["images"][0]["file_name"]).unlink()  # frame 2590, cam 1
    (bad / "images" / SPLIT / data["images"][1]["file_name"]).write_bytes(b"no jpeg")  # cam 2
    mano_json = _json(bad, "MANO_NeuralAnnot")
    mano_json["0"]["2595"]["right"]["trans"] = [float("nan")] * 3  # JSON NaN: bad_mano x2
    (bad / f"{ANN}MANO_NeuralAnnot.json").write_text(json.dumps(mano_json))
    joints = _json(bad, "joint_3d")
    joints["0"]["2600"]["world_coord"] = joints["0"]["2600"]["world_coord"][:41]  # bad_joints x2
    (bad / f"{ANN}joint_3d.json").write_text(json.dumps(joints))
    dark = bad / "images" / SPLIT / data["images"][7]["file_name"]  # frame 2605, cam 2
    from PIL import Image

    Image.new("RGB", (334, 512), (3, 3, 3)).save(dark)
    settings = ConvertSettings(points_per_hand=128, image_size=64)
    with caplog.at_level(logging.WARNING, logger="im2hands_model.data.interhand"):
        summary = convert_interhand(bad, SPLIT, mano, tmp_path / "out", settings, progress=False)
    assert summary.images == 12 and summary.written == 1
    assert dict(summary.skipped) == {
        "missing_image": 1, "unreadable_image": 1, "bad_mano": 2, "bad_joints": 2,
        "dark_image": 1, "missing_mano": 2, "not_interacting": 2,
    }  # fmt: skip
    assert summary.written + sum(summary.skipped.values()) == summary.images
    assert "MANO right trans has NaN" in summary.examples["bad_mano"][0]
    assert "InterHand2.6M_test_MANO_NeuralAnnot.json" in summary.examples["bad_mano"][0]
    text = caplog.text
    for reason in ("missing_image", "unreadable_image", "bad_mano", "bad_joints", "dark_image",
                   "missing_mano"):  # fmt: skip
        assert f"({reason})" in text, reason
    assert "not_interacting" not in text  # the selection rule is not bad data
    assert str(dark) in text and "image2590.jpg does not exist" in text
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["num_scenes"] == 1
    assert index["interhand"]["skipped"] == dict(sorted(summary.skipped.items()))
    assert index["interhand"]["root"] == str(bad) and index["interhand"]["split"] == SPLIT
    # --max-frames keeps the first selected frames and says so
    limited = convert_interhand(root, SPLIT, mano, tmp_path / "lim", ConvertSettings(
        points_per_hand=128, image_size=64, max_frames=3), progress=False)  # fmt: skip
    assert limited.written == 3 and limited.skipped["beyond_max_frames"] == 5
    assert limited.written + sum(limited.skipped.values()) == 12


def test_broken_or_missing_annotations_name_the_file(release, tmp_path, capsys):
    from im2hands_model.data.cli import main

    root, mano = release
    tree = shutil.copytree(root, tmp_path / "IH26M", ignore=shutil.ignore_patterns("*.jpg"))
    joints = tree / f"{ANN}joint_3d.json"
    joints.write_text(joints.read_text()[:-20])
    with pytest.raises(InterHandFormatError, match="broken JSON") as err:
        convert_interhand(tree, SPLIT, mano, tmp_path / "out", progress=False)
    assert str(joints) in str(err.value)
    argv = ["interhand", "--root", str(tree), "--mano", str(mano), "--split", SPLIT, "--out",
            str(tmp_path / "cli"), "--quiet"]  # fmt: skip
    assert main(argv) == 2
    assert str(joints) in capsys.readouterr().err
    (tree / f"{ANN}data.json").write_text("[]")
    with pytest.raises(InterHandFormatError, match="not in the InterHand2.6M v1.0 format"):
        convert_interhand(tree, SPLIT, mano, tmp_path / "out", progress=False)
    (tree / f"{ANN}camera.json").unlink()
    with pytest.raises(InterHandFormatError) as err:
        find_annotation_dir(tree, SPLIT)
    message = str(err.value)
    assert f"{tree / 'annotations' / SPLIT}: missing InterHand2.6M_test_camera.json" in message
    assert str(tree / "annotations" / "all") in message  # every place looked in is listed
    # a flattened annotations folder is found too
    flat = tmp_path / "flat"
    shutil.copytree(root / "annotations" / SPLIT, flat / "annotations")
    assert find_annotation_dir(flat, SPLIT) == flat / "annotations"


def test_command_writes_shards_in_the_synthetic_format(release, converted, tmp_path):
    ds = ShardDataset(converted)
    assert len(ds) == 2 * N_FRAMES
    index = ds.index
    assert [s["count"] for s in index["shards"]] == [4, 4]
    for key, dtype in SYNTHETIC_KEYS.items():
        assert index["keys"][key]["dtype"] == dtype, key
    assert index["keys"]["vertices"]["shape"] == [2, 779, 3]
    assert tuple(ds.faces.shape) == (2, 1554, 3)
    info = index["interhand"]
    assert info["split"] == SPLIT and info["root"] == str(release[0])
    assert (info["images"], info["selected"], info["written"]) == (12, 8, 8)
    assert info["skipped"] == {"missing_mano": 2, "not_interacting": 2}
    assert set(info["placeholders"]) == {"phenotype", "pose", "layout", "scene_index"}
    item = ds[0]
    assert item["hand_present"].all() and item["image"].shape == (3, 256, 256)
    assert (item["phenotype"] == 0.5).all() and (item["pose"] == 0).all()
    from im2hands_model.data.layouts import LAYOUTS

    layouts = {LAYOUTS[int(ds[i]["layout"])] for i in range(len(ds))}
    assert layouts <= {"touching", "close"}, layouts
    assert [int(ds[i]["scene_index"]) for i in range(len(ds))] == list(range(8))
    # Deterministic, and the same with worker processes.
    again = tmp_path / "workers"
    convert_interhand(*release[:1], SPLIT, release[1], again,
                      ConvertSettings(points_per_hand=POINTS, shard_size=4), workers=2,
                      progress=False)  # fmt: skip
    for shard in ("shard_00000", "shard_00001"):
        for key in index["keys"]:
            a = np.load(converted / shard / f"{key}.npy")
            b = np.load(again / shard / f"{key}.npy")
            np.testing.assert_array_equal(a, b, err_msg=key)


def test_training_and_evaluation_run_on_converted_shards(converted, tmp_path):
    run = tmp_path / "run"
    sets = ["data.dataset=interhand", f"data.train={converted}", f"data.val={converted}",
            "data.num_workers=0",
            "data.points_per_hand=256", "train.max_steps=4", "train.batch_size=4",
            "train.scheduler.type=constant", "train.scheduler.warmup_steps=0",
            "train.log_every=1", "train.val_every=4", "train.val_batches=1",
            "train.ckpt_every=4", "train.device=cpu", "train.progress=false",
            "train.tensorboard=false", "model.hidden=16",
            f"model.encoder={TINY_ENCODER}"]  # fmt: skip
    cmd = [sys.executable, str(REPO / "training" / "train.py"), "--config",
           str(REPO / "training" / "configs" / "init_occ.yaml"), "--out", str(run), "--set",
           *sets]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 4" in proc.stdout and (run / "best.pt").is_file(), proc.stdout
    out = tmp_path / "results"
    cmd = [sys.executable, str(REPO / "training" / "evaluate.py"), "--checkpoint",
           str(run / "best.pt"), "--data", str(converted), "--scenes", "2", "--resolution", "12",
           "--upsampling-steps", "1", "--n-iou", "2000", "--n-chamfer", "1000", "--pictures",
           "1", "--quiet", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    assert {"I", "GT meshes"} <= set(summary["variants"])
    assert 0.0 <= summary["variants"]["I"]["iou"] <= 100.0
    assert summary["variants"]["I"]["mpjpe_mm"] == 0.0  # ground-truth keypoints in
    assert "In the paper's layout" in (out / "results.md").read_text()  # published beside ours
