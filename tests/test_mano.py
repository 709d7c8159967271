"""MANO support: converting the official pickles without chumpy, and the sealed MANO hand.

The MANO files cannot ship, so these tests use fakes in exactly the official format
(:mod:`mano_fixture`).
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from mano_fixture import (
    JOINT_TARGETS,
    dump_official_pickle,
    fake_mano_models,
    mirror_model,
    write_fake_mano_pkls,
)

from im2hands_model.data import cli
from im2hands_model.data.mano import (
    TIP_VERTEX_IDS,
    ManoFileError,
    ManoModel,
    MissingSmplxError,
    convert_mano,
    load_mano_pkl,
)
from im2hands_model.hands import JOINT_NAMES, TIP_JOINTS

MIRROR = np.array([-1.0, 1.0, 1.0])
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def mano_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(folder with the fake official pickles, folder with their conversion)."""
    tmp = tmp_path_factory.mktemp("mano")
    pkl_dir = write_fake_mano_pkls(tmp / "pkl")
    convert_mano(pkl_dir, tmp / "npz")
    return pkl_dir, tmp / "npz"


@pytest.fixture(scope="module")
def hands(mano_dirs) -> dict[str, ManoModel]:
    return {side: ManoModel.from_npz_dir(mano_dirs[1], side) for side in ("right", "left")}


def _volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight
    assert mesh.is_winding_consistent
    return float(mesh.volume)


def _mirror_pose(pose: np.ndarray) -> np.ndarray:
    """Axis-angle of the mirrored rotations M R M, M = diag(-1, 1, 1): (x, -y, -z)."""
    return pose * np.tile([1.0, -1.0, -1.0], 16)


def _run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "im2hands_model.data.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)


# -- conversion ----------------------------------------------------------------------------------


def test_conversion_needs_no_chumpy(mano_dirs):
    assert importlib.util.find_spec("chumpy") is None
    pkl_dir, npz_dir = mano_dirs
    raw = (pkl_dir / "MANO_RIGHT.pkl").read_bytes()
    assert b"cchumpy.ch\nCh\n" in raw and b"cscipy.sparse.csc\n" in raw  # the official layout
    arrays = load_mano_pkl(pkl_dir / "MANO_RIGHT.pkl")
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
    right, _ = fake_mano_models()
    np.testing.assert_array_equal(arrays["v_template"], right["v_template"])
    np.testing.assert_array_equal(arrays["shapedirs"], right["shapedirs"])
    assert arrays["J_regressor"].dtype == np.float32
    np.testing.assert_allclose(arrays["J_regressor"], right["J_regressor"], atol=1e-7)
    assert "bs_style" not in arrays and "hands_coeffs" in arrays

    for name in ("MANO_RIGHT.npz", "MANO_LEFT.npz"):
        with np.load(npz_dir / name, allow_pickle=False) as npz:
            loaded = {key: npz[key] for key in npz.files}
        assert all(a.dtype != object and a.dtype.kind in "biuf" for a in loaded.values())
        assert {"v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights"} <= set(loaded)
        assert {"hands_mean", "hands_components", "hands_coeffs", "J"} <= set(loaded)
    assert not [p for p in npz_dir.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_conversion_finds_the_official_zip_layout(tmp_path):
    write_fake_mano_pkls(tmp_path / "mano_v1_2" / "models")
    written = convert_mano(tmp_path / "mano_v1_2", tmp_path / "out")
    assert [p.name for p in written] == ["MANO_RIGHT.npz", "MANO_LEFT.npz"]


def test_swapped_files_are_refused(tmp_path):
    write_fake_mano_pkls(tmp_path / "src")
    (tmp_path / "swapped").mkdir()
    (tmp_path / "src" / "MANO_RIGHT.pkl").rename(tmp_path / "swapped" / "MANO_LEFT.pkl")
    (tmp_path / "src" / "MANO_LEFT.pkl").rename(tmp_path / "swapped" / "MANO_RIGHT.pkl")
    with pytest.raises(ManoFileError, match="swapped"):
        convert_mano(tmp_path / "swapped", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_converts(mano_dirs, tmp_path):
    proc = _run_cli("convert-mano", mano_dirs[0], tmp_path / "npz")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert lines == [
        str(tmp_path / "npz" / "MANO_RIGHT.npz"),
        str(tmp_path / "npz" / "MANO_LEFT.npz"),
    ]
    assert all(Path(p).is_file() for p in lines)


def _assert_clean_error(proc_or_code, stderr: str, *needles: str) -> None:
    assert proc_or_code == 2
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("im2hands-data: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_cli_missing_dir(tmp_path):
    proc = _run_cli("convert-mano", tmp_path / "nowhere", tmp_path / "out")
    _assert_clean_error(proc.returncode, proc.stderr, "nowhere", "no such folder")


@pytest.mark.parametrize("case", ["not_a_pickle", "wrong_thing", "truncated", "missing_left"])
def test_cli_bad_files(mano_dirs, tmp_path, capsys, case):
    src = tmp_path / "mano"
    write_fake_mano_pkls(src)
    right = src / "MANO_RIGHT.pkl"
    if case == "not_a_pickle":
        right.write_text("this is not a pickle\n")
        needles = ["MANO_RIGHT.pkl", "not a readable MANO pickle"]
    elif case == "wrong_thing":
        right.write_bytes(pickle.dumps({"weights": np.zeros((3, 3))}, protocol=2))
        needles = ["MANO_RIGHT.pkl", "missing v_template"]
    elif case == "truncated":
        data = right.read_bytes()
        right.write_bytes(data[: len(data) // 2])
        needles = ["MANO_RIGHT.pkl", "truncated"]
    else:
        (src / "MANO_LEFT.pkl").unlink()
        needles = ["no MANO_LEFT.pkl"]
    code = cli.main(["convert-mano", str(src), str(tmp_path / "out")])
    _assert_clean_error(code, capsys.readouterr().err, *needles)


def test_wrong_shapes_and_types(tmp_path):
    right, _ = fake_mano_models()
    bad = dict(right, v_template=right["v_template"][:700])
    dump_official_pickle(bad, tmp_path / "shape.pkl")
    with pytest.raises(
        ManoFileError, match=r"v_template has shape \[700, 3\], expected \[778, 3\]"
    ):
        load_mano_pkl(tmp_path / "shape.pkl")
    (tmp_path / "list.pkl").write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(ManoFileError, match="holds a list, not a dict"):
        load_mano_pkl(tmp_path / "list.pkl")
    with pytest.raises(ManoFileError, match="no such file"):
        load_mano_pkl(tmp_path / "absent.pkl")


class _Exploit:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_allow_list_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    payloads = {
        "reduce.pkl": pickle.dumps({"v_template": _Exploit(f"touch {marker}")}, protocol=2),
        "os.pkl": f"cos\nsystem\n(S'touch {marker}'\ntR.".encode(),
        "eval.pkl": b"c__builtin__\neval\n(S'1+1'\ntR.",
    }
    for name, data in payloads.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ManoFileError, match="refused for safety"):
            load_mano_pkl(tmp_path / name)
    assert not marker.exists()


# -- the model -----------------------------------------------------------------------------------


def test_sealed_and_outward(hands):
    rng = np.random.default_rng(3)
    for hand in hands.values():
        assert hand.faces.shape == (1538 + 16, 3) and hand.faces.dtype == np.int64
        assert hand.faces.max() == 778 and hand.wrist_loop.shape == (16,)
        verts, _ = hand.forward(np.zeros(48), np.zeros(10), np.zeros(3))
        assert verts.shape == (779, 3) and verts.dtype == np.float64
        np.testing.assert_allclose(verts[778], verts[hand.wrist_loop].mean(0))
        assert _volume(verts, hand.faces) > 1e-4  # about 2e-4 m^3 for the fake tube
        pose = np.concatenate([rng.normal(0, 0.5, 3), rng.normal(0, 0.3, 45)])
        verts, _ = hand.forward(pose, rng.normal(size=10), rng.normal(size=3))
        assert _volume(verts, hand.faces) > 1e-4


def test_joints_in_our_order(hands):
    right, _ = fake_mano_models()
    rest_joints = right["J_regressor"] @ right["v_template"]
    np.testing.assert_allclose(rest_joints, JOINT_TARGETS, atol=1e-9)
    hand = hands["right"]
    rng = np.random.default_rng(4)
    # Finger poses move neither the wrist nor the finger roots (their parent is the wrist).
    pose = np.concatenate([np.zeros(3), rng.normal(0, 0.3, 45)])
    verts, joints = hand.forward(pose, np.zeros(10), np.zeros(3))
    assert joints.shape == (len(JOINT_NAMES), 3) and joints.dtype == np.float64
    roots = {"wrist": 0, "thumb_cmc": 13, "index_mcp": 1, "middle_mcp": 4, "ring_mcp": 10}
    roots["pinky_mcp"] = 7
    for name, mano_joint in roots.items():
        np.testing.assert_allclose(
            joints[JOINT_NAMES.index(name)], rest_joints[mano_joint], atol=1e-6, err_msg=name
        )
    np.testing.assert_array_equal(joints[list(TIP_JOINTS)], verts[list(TIP_VERTEX_IDS)])
    # Joints move along their fingers: each finger's chain leaves its root joint.
    for finger in range(5):
        chain = joints[1 + 4 * finger : 5 + 4 * finger]
        assert (np.linalg.norm(np.diff(chain, axis=0), axis=1) > 1e-3).all()


def test_trans_translates_everything(hands):
    rng = np.random.default_rng(5)
    pose, betas, trans = rng.normal(0, 0.3, 48), rng.normal(size=10), np.array([0.1, -0.2, 0.5])
    for hand in hands.values():
        v0, j0 = hand.forward(pose, betas, np.zeros(3))
        v1, j1 = hand.forward(pose, betas, trans)
        np.testing.assert_allclose(v1 - v0, np.broadcast_to(trans, v0.shape), atol=1e-12)
        np.testing.assert_allclose(j1 - j0, np.broadcast_to(trans, j0.shape), atol=1e-12)


def test_left_mirrors_right(hands):
    """Also checks the left shapedirs fix: the fake left file has the official bug, and without
    the fix equal betas would give differently shaped hands."""
    right, left = hands["right"], hands["left"]
    rng = np.random.default_rng(6)
    betas = rng.normal(size=10)
    for pose in (np.zeros(48), rng.normal(0, 0.3, 48)):
        trans = rng.normal(0, 0.1, 3)
        vr, jr = right.forward(pose, betas, trans)
        vl, jl = left.forward(_mirror_pose(pose), betas, trans * MIRROR)
        np.testing.assert_allclose(vl, vr * MIRROR, atol=1e-6)
        np.testing.assert_allclose(jl, jr * MIRROR, atol=1e-6)


def test_left_shapedirs_fix_is_not_applied_twice(tmp_path, hands):
    right, _ = fake_mano_models()
    fixed_left = mirror_model(right, fix_left_shapedirs=True)
    src = tmp_path / "fixed"
    src.mkdir()
    dump_official_pickle(right, src / "MANO_RIGHT.pkl")
    dump_official_pickle(fixed_left, src / "MANO_LEFT.pkl")
    convert_mano(src, tmp_path / "npz")
    left = ManoModel.from_npz_dir(tmp_path / "npz", "left")
    betas = np.random.default_rng(7).normal(size=10)
    expected, _ = hands["left"].forward(np.zeros(48), betas, np.zeros(3))
    np.testing.assert_allclose(left.forward(np.zeros(48), betas, np.zeros(3))[0], expected)


def test_inward_faces_are_flipped(mano_dirs):
    from im2hands_model.data.mano import load_mano_npz

    arrays = load_mano_npz(mano_dirs[1] / "MANO_LEFT.npz")
    arrays["f"] = arrays["f"][:, ::-1].copy()  # a left file whose faces were not reversed
    hand = ManoModel(arrays, "left")
    verts, _ = hand.forward(np.zeros(48), np.zeros(10), np.zeros(3))
    assert _volume(verts, hand.faces) > 1e-4


def test_batch_matches_single(hands):
    rng = np.random.default_rng(8)
    pose, betas, trans = (
        rng.normal(0, 0.3, (3, 48)),
        rng.normal(size=(3, 10)),
        rng.normal(size=(3, 3)),
    )
    verts, joints = hands["right"].forward_batch(pose, betas, trans)
    assert verts.shape == (3, 779, 3) and joints.shape == (3, 21, 3)
    v1, j1 = hands["right"].forward(pose[1], betas[1], trans[1])
    np.testing.assert_allclose(verts[1], v1, atol=1e-12)
    np.testing.assert_allclose(joints[1], j1, atol=1e-12)
    with pytest.raises(ValueError, match="pose"):
        hands["right"].forward(np.zeros(45), np.zeros(10), np.zeros(3))


def test_npz_errors(tmp_path, mano_dirs):
    with pytest.raises(ManoFileError, match="convert-mano"):
        ManoModel.from_npz_dir(tmp_path, "right")
    with pytest.raises(ValueError, match="side"):
        ManoModel.from_npz_dir(mano_dirs[1], "middle")
    np.savez(tmp_path / "MANO_RIGHT.npz", v_template=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ManoFileError, match="MANO_RIGHT.npz"):
        ManoModel.from_npz_dir(tmp_path, "right")


def test_missing_smplx(mano_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "smplx", None)  # makes `import smplx` fail
    with pytest.raises(MissingSmplxError, match=r"pip install 'im2hands_ros\[mano\]'"):
        ManoModel.from_npz_dir(mano_dirs[1], "right")
    code = cli.main(["convert-mano", str(mano_dirs[0]), str(tmp_path / "out")])
    _assert_clean_error(code, capsys.readouterr().err, "pip install 'im2hands_ros[mano]'")
