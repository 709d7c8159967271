"""The synthetic two-hand generator, its command and the shard Dataset, on real Anny meshes,
real EGL renders and a small dataset made by the real command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from im2hands_model import hands
from im2hands_model.data import ShardDataset
from im2hands_model.data.anny_hand import POSED_BONES
from im2hands_model.data.occupancy import label_points, split_overlap
from im2hands_model.data.poses import JOINT_LIMITS, POSE_STYLES, sample_pose
from im2hands_model.metrics import inside_mesh, penetration_volume, winding_numbers

N_SCENES = 10
SEED = 7
POINTS = 4096
CLI = [sys.executable, "-m", "im2hands_model.data.cli"]


@pytest.fixture(scope="module")
def generator():
    from im2hands_model.data.synthetic import SceneGenerator

    return SceneGenerator(points_per_hand=POINTS, full_frame=True)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    cmd = CLI + ["synth", "--n", str(N_SCENES), "--seed", str(SEED), "--out", str(out),
                 "--workers", "2", "--points-per-hand", str(POINTS), "--full-frame",
                 "--shard-size", "4", "--quiet"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def dataset(dataset_dir) -> ShardDataset:
    return ShardDataset(dataset_dir)


def test_command_writes_shards_report_and_contact_sheet(dataset_dir):
    index = json.loads((dataset_dir / "index.json").read_text())
    assert index["num_scenes"] == N_SCENES
    assert [s["count"] for s in index["shards"]] == [4, 4, 2]
    report = json.loads((dataset_dir / "report.json").read_text())
    assert report["scenes"] == N_SCENES and report["scenes_per_s"] > 0
    assert sum(report["layouts"].values()) == N_SCENES
    from PIL import Image

    sheet = Image.open(dataset_dir / "contact_sheet.png")
    assert sheet.size == (4 * 2 * 256, 3 * 256)  # 10 scenes in rows of 4 (crop + side view)
    assert np.asarray(sheet).std() > 10  # not a blank picture
    assert not list(dataset_dir.glob(".*tmp"))  # no half-written shard left behind


def test_dataset_items_have_documented_keys_shapes_and_dtypes(dataset):
    assert len(dataset) == N_SCENES
    v = dataset.faces.max().item() + 1
    expected = {
        "image": ((3, 256, 256), torch.float32),
        "K": ((3, 3), torch.float32),
        "joints_3d": ((2, 21, 3), torch.float32),
        "joints_2d": ((2, 21, 2), torch.float32),
        "hand_present": ((2,), torch.bool),
        "occ_points": ((2, POINTS, 3), torch.float32),
        "occ_labels": ((2, POINTS), torch.float32),
        "norm_rot": ((2, 3, 3), torch.float32),
        "norm_origin": ((2, 3), torch.float32),
        "vertices": ((2, v, 3), torch.float32),
        "phenotype": ((2, 6), torch.float32),
        "pose": ((2, len(POSED_BONES), 3), torch.float32),
        "layout": ((), torch.int64),
        "scene_index": ((), torch.int64),
        "image_full": ((3, 480, 640), torch.float32),
        "K_full": ((3, 3), torch.float32),
        "joints_2d_full": ((2, 21, 2), torch.float32),
        "depth_full": ((480, 640), torch.float32),
    }
    assert set(dataset.keys) == set(expected)
    assert dataset.faces.shape == (2, 3216, 3)
    for i in (0, len(dataset) - 1, -1):
        item = dataset[i]
        for key in item:
            assert torch.isfinite(item[key].float()).all(), key
        for key, (shape, dtype) in expected.items():
            assert tuple(item[key].shape) == shape, key
            assert item[key].dtype == dtype, key
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert set(item["occ_labels"].unique().tolist()) <= {0.0, 1.0}
        assert item["occ_points"].abs().max() <= hands.BOX_HALF + 1e-3
    assert [dataset[i]["scene_index"].item() for i in range(N_SCENES)] == list(range(N_SCENES))
    with pytest.raises(IndexError):
        dataset[N_SCENES]
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    batch = next(iter(loader))
    assert batch["occ_points"].shape == (4, 2, POINTS, 3)
    sub = ShardDataset(dataset.root, keys=["image", "K"])
    assert set(sub[0]) == {"image", "K"}
    with pytest.raises(KeyError):
        ShardDataset(dataset.root, keys=["nope"])


def test_generation_is_deterministic_per_seed(generator, dataset):
    a = generator.generate(SEED, 3).arrays
    b = generator.generate(SEED, 3).arrays
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    other = generator.generate(SEED + 1, 3).arrays
    assert not np.array_equal(a["occ_points"], other["occ_points"])
    # The 2-worker command made the same scene: the dataset does not depend on the workers.
    # (Worker processes run torch single-threaded, so allow float round-off.)
    item = dataset[3]
    np.testing.assert_allclose(item["vertices"].numpy(), a["vertices"], atol=1e-6)
    np.testing.assert_allclose(item["joints_3d"].numpy(), a["joints_3d"], atol=1e-6)
    np.testing.assert_array_equal(item["occ_points"].numpy(), a["occ_points"].astype(np.float32))
    assert (item["occ_labels"].numpy() == a["occ_labels"]).mean() > 0.999
    diff = np.abs(item["image"].permute(1, 2, 0).numpy() * 255 - a["image"].astype(float))
    assert diff.mean() < 0.5


def _meshes(item, faces):
    return [(item["vertices"][h].numpy().astype(np.float64), faces[h]) for h in range(2)]


def test_ground_truth_is_valid(dataset):
    faces = dataset.faces.numpy()
    layouts_seen = set()
    for i in range(len(dataset)):
        item = dataset[i]
        present = item["hand_present"].numpy()
        layouts_seen.add(int(item["layout"]))
        meshes = _meshes(item, faces)
        for h in np.flatnonzero(present):
            v, f = meshes[h]
            mesh = trimesh.Trimesh(v, f, process=False)
            # the wrist is sealed: closed, consistently wound, outward (positive volume)
            assert mesh.is_watertight and mesh.is_winding_consistent, (i, h)
            assert mesh.volume > 1e-4, (i, h)  # > 100 cm^3
            # keypoints lie inside or on their hand's mesh
            joints = item["joints_3d"][h].numpy().astype(np.float64)
            w = winding_numbers(v, f, joints)
            d = np.linalg.norm(v[None] - joints[:, None], axis=2).min(1)
            assert ((w > 0.5) | (d < 2e-3)).all(), (i, h, w.round(2))
            # occupancy labels agree with the mesh (camera frame inside test of stored points)
            pts = hands.from_normalized(
                item["occ_points"][h].numpy().astype(np.float64),
                item["norm_rot"][h].numpy().astype(np.float64),
                item["norm_origin"][h].numpy().astype(np.float64),
            )
            labels = item["occ_labels"][h].numpy() > 0.5
            ins = inside_mesh(v, f, pts)
            assert 0.05 < labels.mean() < 0.6
            # labels differ from the own-mesh test only where a point is also inside the other
            # hand and was given to it by the split
            differ = labels != ins
            if differ.any():
                assert present.all()
                assert not labels[differ].any()
                assert inside_mesh(*meshes[1 - h], pts[differ]).all()
            assert differ.mean() < 1e-3
            # no point is labelled inside both hands
            if present.all() and labels.any():
                other, _ = label_points(pts[labels], meshes[1 - h], meshes[h])
                assert not other.any(), i
        if not present.all():
            absent = int(np.flatnonzero(~present)[0])
            assert item["joints_3d"][absent].abs().max() == 0
            assert item["joints_2d"][absent].abs().max() == 0
            assert item["vertices"][absent].abs().max() == 0
            assert item["occ_labels"][absent].max() == 0
        # 2D keypoints are the projection of the 3D ones through K
        K = item["K"].numpy().astype(np.float64)
        for h in np.flatnonzero(present):
            j = item["joints_3d"][h].numpy().astype(np.float64)
            uv = (j @ K.T)[:, :2] / j[:, 2:]
            np.testing.assert_allclose(item["joints_2d"][h].numpy(), uv, atol=1e-2)
            assert (j[:, 2] > 0.25).all() and (j[:, 2] < 2.1).all()
    assert len(layouts_seen) >= 3


def test_single_hand_scene_masks_the_absent_hand(generator):
    from im2hands_model.data.synthetic import scene_layout, scene_rng

    index = next(i for i in range(200) if scene_layout(scene_rng(SEED, i)) == "single")
    a = generator.generate(SEED, index).arrays
    present = a["hand_present"]
    assert present.sum() == 1
    absent = int(np.flatnonzero(~present)[0])
    for key in ("joints_3d", "joints_2d", "joints_2d_full", "vertices", "occ_labels"):
        assert not a[key][absent].any(), key
    assert a["occ_labels"][1 - absent].mean() > 0.05
    assert np.isfinite(a["joints_2d"]).all()


def test_hand_sizes_are_human(generator, dataset):
    pheno = torch.cat([dataset[i]["phenotype"] for i in range(len(dataset))]).numpy()
    sizes = generator._sizes(pheno.astype(np.float64))
    adult = pheno[:, 1] >= 0.5
    assert adult.any()
    assert ((sizes[adult] >= 0.12) & (sizes[adult] <= 0.22)).all(), sizes
    assert ((sizes >= 0.10) & (sizes <= 0.22)).all(), sizes


def test_children_sizes_and_phenotype_range(generator):
    rng = np.random.default_rng(0)
    ids = [generator._identity(rng) for _ in range(400)]
    ages = np.array([p[1] for p, _ in ids])
    child = np.array([c for _, c in ids])
    assert 0.03 < child.mean() < 0.2
    assert ages[child].max() < 0.5 <= ages[~child].min()
    phenos = np.stack([p for p, _ in ids])
    assert phenos.min() >= 0 and phenos.max() <= 1
    assert phenos[:, 0].min() < 0.1 and phenos[:, 0].max() > 0.9  # both genders


def test_poses_stay_within_joint_limits():
    rng = np.random.default_rng(0)
    for style in POSE_STYLES:
        poses = np.stack([sample_pose(rng, style) for _ in range(50)])
        assert (poses >= JOINT_LIMITS[..., 0] - 1e-9).all(), style
        assert (poses <= JOINT_LIMITS[..., 1] + 1e-9).all(), style
    with pytest.raises(ValueError, match="unknown pose style"):
        sample_pose(rng, "jazz")
    fist = np.stack([sample_pose(rng, "fist") for _ in range(20)])
    open_ = np.stack([sample_pose(rng, "open") for _ in range(20)])
    assert fist[:, :, 0].mean() > open_[:, :, 0].mean() + 30


def test_posed_hands_have_no_fingers_through_each_other(generator):
    from im2hands_model.data.poses import self_intersection_count

    rng = np.random.default_rng(5)
    hand = generator.hand
    for style in ("fist", "grasp", "random"):
        v, _, _, _ = generator._pose_hand(np.full(6, 0.5), sample_pose(rng, style))
        assert self_intersection_count(v, hand.faces, hand.probe_vertices) <= 3
    # the check itself detects a finger driven through the palm
    bad = np.zeros((len(POSED_BONES), 3))
    bad[POSED_BONES.index("finger3-1"), 0] = 170
    bad[POSED_BONES.index("finger3-2"), 0] = 170
    out = hand(np.full((1, 6), 0.5), bad[None])
    assert self_intersection_count(out.vertices[0], hand.faces, hand.probe_vertices) > 3


@pytest.mark.parametrize("layout", ["clasped", "crossed", "touching", "close", "apart"])
def test_layouts_place_hands_as_named(generator, layout):
    from im2hands_model.data.layouts import place_hands
    from im2hands_model.data.occupancy import surface_distance

    rng = np.random.default_rng(11)
    hand = generator.hand
    out = hand(np.full((2, 6), 0.5), np.stack([sample_pose(rng, "relaxed") for _ in range(2)]))
    verts = [hands.mirror_points(out.vertices[0]), out.vertices[1]]
    joints = [hands.mirror_points(out.joints[0]), out.joints[1]]
    faces = generator.faces
    p = place_hands(layout, tuple(verts), tuple(faces), tuple(joints), (False, True), rng)
    va = verts[0] @ p.rotation[0].T + p.translation[0]
    vb = verts[1] @ p.rotation[1].T + p.translation[1]
    gap = surface_distance(va, faces[0], vb)[0].min()
    if layout in ("clasped", "crossed", "touching"):
        split = split_overlap(va, faces[0], vb, faces[1])
        assert split.max_depth_m <= 0.006
        pen = penetration_volume(
            (split.vertices_a, faces[0]), (split.vertices_b, faces[1]), voxel_size=0.0005
        )
        before = penetration_volume((va, faces[0]), (vb, faces[1]), voxel_size=0.0005)
        assert pen <= before
        assert pen < 0.05e-6  # < 0.05 cm^3 left after the split
        assert surface_distance(split.vertices_a, faces[0], split.vertices_b)[0].min() < 1e-3
    elif layout == "close":
        assert 0.004 < gap < 0.045
    else:
        assert gap > 0.1


def test_command_rejects_bad_arguments(tmp_path):
    def run(*args):
        return subprocess.run(CLI + ["synth", *args], capture_output=True, text=True, timeout=120)

    r = run("--n", "-3", "--seed", "0", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--n must be a positive integer" in r.stderr
    r = run("--n", "2", "--seed", "x", "--out", str(tmp_path / "a"))
    assert r.returncode == 2 and "--seed must be an integer" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run("--n", "2", "--seed", "0", "--out", str(blocker))
    assert r.returncode == 2 and "not a folder" in r.stderr
    r = run("--n", "2", "--seed", "0", "--out", str(blocker / "sub"))
    assert r.returncode == 2 and "cannot write" in r.stderr
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    r = run("--n", "2", "--seed", "0", "--out", str(full))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        r = run("--n", "2", "--seed", "0", "--out", str(locked / "ds"))
        assert r.returncode == 2 and "cannot write" in r.stderr


def test_dataset_reports_a_missing_or_wrong_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="im2hands-data synth"):
        ShardDataset(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format version"):
        ShardDataset(tmp_path)


def test_command_explains_how_to_install_missing_egl(tmp_path):
    # No EGL vendor library found: what a machine without Mesa's EGL looks like to libglvnd.
    env = dict(os.environ, __EGL_VENDOR_LIBRARY_DIRS=str(tmp_path / "none"))
    cmd = CLI + ["synth", "--n", "2", "--seed", "0", "--out", str(tmp_path / "ds")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 3
    assert "apt-get install" in r.stderr and "libegl1" in r.stderr
    assert not (tmp_path / "ds" / "index.json").exists()


def test_skin_cues_colour_palms_and_nails_only(generator):
    """--skin-cues: palm-side skin and nails are lighter; geometry, labels and the background
    are those of the same scene without them."""
    from im2hands_model.data.synthetic import SceneGenerator

    hand = generator.hand
    palm, nail = hand.palm_weight, hand.nail_weight
    assert palm.shape == nail.shape == (hand.faces.max() + 1,)
    assert 0.2 < float((palm > 0.5).mean()) < 0.6  # about half the skin faces the palm side
    assert 5 * 3 <= int((nail > 0).sum()) <= 5 * 80  # a patch on each of five fingertips
    assert (palm[nail > 0] == 0).all()  # nails are on the back of the fingers
    # the palm side is where fingertips curl to: flexing every bone moves palm skin inward
    rest = hand.forward(np.full((1, 6), 0.5), np.zeros((1, len(POSED_BONES), 3)))
    flexed = np.zeros((1, len(POSED_BONES), 3))
    flexed[..., 0] = 30.0
    curled = hand.forward(np.full((1, 6), 0.5), flexed)
    tips = [hands.JOINT_NAMES.index(f"{f}_tip") for f in ("index", "middle", "ring", "pinky")]
    motion = (curled.joints[0, tips] - rest.joints[0, tips]).mean(0)
    v = rest.vertices[0]
    palm_side = (v[palm > 0.5].mean(0) - v[palm == 0].mean(0)) @ motion
    assert palm_side > 0

    cued = SceneGenerator(points_per_hand=POINTS, full_frame=True, skin_cues=True)
    a, b = generator.generate(SEED, 2).arrays, cued.generate(SEED, 2).arrays
    for key in ("joints_3d", "joints_2d", "vertices", "occ_points", "occ_labels", "K"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    changed = np.abs(a["image"].astype(int) - b["image"].astype(int)).max(-1) > 2  # [H, W, 3]
    assert 0.005 < changed.mean() < 0.5, changed.mean()  # hand pixels only
    lighter = b["image"].astype(float).sum() - a["image"].astype(float).sum()
    assert lighter > 0
