"""A miniature InterHand2.6M v1.0 (5 fps) release, written in exactly the published formats.

:func:`write_interhand_tree` makes ``ROOT/annotations/<split>/InterHand2.6M_<split>_*.json`` and
``ROOT/images/<split>/Capture0/<seq>/cam<cam>/image<frame>.jpg`` for one capture seen by two
cameras. The MANO parameters of each frame are run through the MANO model, so the 42 world
joints of ``joint_3d.json`` (mm) are the model's joints and the JPEGs show the model's vertices
(small skin-coloured dots) and joints (red blobs for the left hand, blue for the right) projected
with the published camera convention ``camrot @ (world - campos)``, ``focal * xy / z + princpt``.

Frames: ``n_frames`` interacting frames with MANO for both hands, one right-hand-only frame and
one interacting frame without left-hand MANO parameters (both must be skipped).

MANO: the project's ``im2hands_model.data.mano.ManoModel`` on the fake ``.npz`` files of
``tests/mano_fixture.py``. Each frame's global orientation and translation are solved from the
model's own rest joints, so the hands face the cameras (fingers up, thumbs outward, palms to the
camera) and touch at their little fingers whatever the (fake or real) model's rest layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.spatial.transform import Rotation

CAPTURE = 0
CAMERAS = ("400262", "400263")
IMAGE_W, IMAGE_H = 334, 512  # InterHand2.6M's portrait frames
SEQ = "0051_dinosaur"
LEFT_JOINT_RGB = (255, 0, 0)
RIGHT_JOINT_RGB = (0, 0, 255)

#: InterHand2.6M's joint names of one hand in file order (tip first, wrist last), written
#: independently of the converter's index table, with the name of the same joint in ours.
IH_HAND_JOINTS = [
    ("thumb4", "thumb_tip"), ("thumb3", "thumb_ip"), ("thumb2", "thumb_mcp"),
    ("thumb1", "thumb_cmc"),
    ("index4", "index_tip"), ("index3", "index_dip"), ("index2", "index_pip"),
    ("index1", "index_mcp"),
    ("middle4", "middle_tip"), ("middle3", "middle_dip"), ("middle2", "middle_pip"),
    ("middle1", "middle_mcp"),
    ("ring4", "ring_tip"), ("ring3", "ring_dip"), ("ring2", "ring_pip"), ("ring1", "ring_mcp"),
    ("pinky4", "pinky_tip"), ("pinky3", "pinky_dip"), ("pinky2", "pinky_pip"),
    ("pinky1", "pinky_mcp"),
    ("wrist", "wrist"),
]  # fmt: skip


# -- MANO --------------------------------------------------------------------------------------


def fake_mano_dir(tmp: Path) -> Path:
    """The project's fake MANO ``.npz`` files (``tests/mano_fixture.py``)."""
    from mano_fixture import fake_mano_npz_dir

    return fake_mano_npz_dir(Path(tmp))


def load_models(npz_dir: Path) -> dict:
    from im2hands_model.data.mano import ManoModel

    return {side: ManoModel.from_npz_dir(Path(npz_dir), side) for side in ("left", "right")}


# -- the release ------------------------------------------------------------------------------


def camera_params() -> dict[str, dict]:
    """Two cameras 1 m from the world origin, the second turned 20 degrees about y."""
    out = {}
    for i, cam in enumerate(CAMERAS):
        rot = Rotation.from_euler("y", 20 * i, degrees=True).as_matrix()
        campos = -rot.T @ np.array([0.0, 0.0, 1000.0])  # mm; origin at depth 1 m
        out[cam] = {
            "campos": campos.tolist(),
            "camrot": rot.tolist(),
            "focal": [1000.0 + 10 * i, 1002.0 + 10 * i],
            "princpt": [IMAGE_W / 2 + 1.5, IMAGE_H / 2 - 2.0],
        }
    return out


def project(world_mm: np.ndarray, cam: dict) -> np.ndarray:
    """The published projection: ``camrot @ (X - campos)``, then ``focal * xy / z + princpt``."""
    x = (np.asarray(world_mm) - np.array(cam["campos"])) @ np.array(cam["camrot"]).T
    return x[:, :2] / x[:, 2:3] * np.array(cam["focal"]) + np.array(cam["princpt"])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _frame_params(models: dict, rng: np.random.Generator) -> dict[str, dict]:
    """MANO parameters (world metres) of a two-hand frame: fingers up (world -y, the cameras'
    image up), thumbs outward, palms toward the cameras (world -z), the two little-finger edges
    overlapping by 6 mm at depths 20 mm apart (touching hands), a few degrees of jitter."""
    out = {}
    for side, outward in (("left", -1.0), ("right", 1.0)):
        shape = rng.normal(0, 0.5, 10)
        fingers = 0.1 * rng.normal(size=45)
        rest_v, rest_j = (np.asarray(a, float) for a in models[side].forward(
            np.concatenate([np.zeros(3), fingers]), shape, np.zeros(3)))  # fmt: skip
        up = _unit(rest_j[9] - rest_j[0])  # wrist -> middle MCP
        radial = rest_j[5] - rest_j[17]  # pinky MCP -> index MCP: toward the thumb
        radial = _unit(radial - (radial @ up) * up)
        rest = np.stack([up, radial, np.cross(up, radial)], 1)
        goal_up, goal_radial = np.array([0.0, -1.0, 0.0]), np.array([outward, 0.0, 0.0])
        goal = np.stack([goal_up, goal_radial, np.cross(goal_up, goal_radial)], 1)
        jitter = Rotation.from_rotvec(rng.normal(0, np.radians(4), 3)).as_matrix()
        rot = jitter @ goal @ rest.T
        posed = (rest_v - rest_j[0]) @ rot.T  # about the wrist (MANO's root joint)
        inner = posed[:, 0].min() if outward > 0 else posed[:, 0].max()
        wrist = np.array([-outward * 0.003 - inner, 0.07, -outward * 0.01])
        out[side] = {
            "pose": np.concatenate([Rotation.from_matrix(rot).as_rotvec(), fingers]).tolist(),
            "shape": shape.tolist(),
            "trans": (wrist - rest_j[0]).tolist(),  # MANO rotates about the root joint
        }
    return out


def write_interhand_tree(
    root: Path, mano_npz_dir: Path, split: str = "test", n_frames: int = 4
) -> Path:
    """Write the miniature release under ``root`` (returned): ``(n_frames + 2) x 2`` images.

    Frames ``0..n_frames-1`` are interacting with both hands' MANO; then one ``right``-only frame
    and one interacting frame whose left hand has no MANO parameters.
    """
    from im2hands_model.hands import JOINT_NAMES

    root = Path(root)
    rng = np.random.default_rng(1234)
    models = load_models(Path(mano_npz_dir))
    ours = {name: i for i, name in enumerate(JOINT_NAMES)}
    hand_index = [ours[name] for _, name in IH_HAND_JOINTS]
    cams = camera_params()
    frame_ids = [str(2590 + 5 * k) for k in range(n_frames + 2)]
    kinds = ["interacting"] * n_frames + ["right", "no_left_mano"]
    images, annotations, joints_json, mano_json = [], [], {}, {}
    for frame_idx, kind in zip(frame_ids, kinds, strict=True):
        params = _frame_params(models, rng)
        world_m, verts_m = {}, {}
        for side in ("left", "right"):
            p = params[side]
            v, j = models[side].forward(np.array(p["pose"]), np.array(p["shape"]),
                                        np.array(p["trans"]))  # fmt: skip
            v, j = (np.asarray(a.detach() if hasattr(a, "detach") else a) for a in (v, j))
            world_m[side], verts_m[side] = np.asarray(j, float), np.asarray(v, float)
        shown = ("right",) if kind == "right" else ("left", "right")
        world = np.zeros((42, 3))
        valid = np.zeros(42, int)
        for block, side in ((0, "right"), (21, "left")):
            if side in shown:
                world[block : block + 21] = world_m[side][hand_index] * 1000.0
                valid[block : block + 21] = 1
        hand_type = "right" if kind == "right" else "interacting"
        joints_json[frame_idx] = {"world_coord": world.round(4).tolist(),
                                  "joint_valid": valid.tolist(), "hand_type": hand_type,
                                  "hand_type_valid": True}  # fmt: skip
        mano_json[frame_idx] = {
            "right": params["right"],
            "left": params["left"] if kind == "interacting" else None,
        }
        for cam in CAMERAS:
            image_id = len(images)
            file_name = f"Capture{CAPTURE}/{SEQ}/cam{cam}/image{frame_idx}.jpg"
            path = root / "images" / split / file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            uv_joints = {s: project(world_m[s] * 1000.0, cams[cam]) for s in shown}
            uv_verts = {s: project(verts_m[s] * 1000.0, cams[cam]) for s in shown}
            _draw(path, rng, uv_verts, uv_joints)
            uv = np.concatenate(list(uv_joints.values()))
            lo, hi = uv.min(0), uv.max(0)
            images.append({"id": image_id, "file_name": file_name, "width": IMAGE_W,
                           "height": IMAGE_H, "capture": CAPTURE, "camera": cam,
                           "frame_idx": int(frame_idx), "seq_name": SEQ})  # fmt: skip
            annotations.append({"id": image_id, "image_id": image_id,
                                "bbox": [*lo.tolist(), *(hi - lo).tolist()],
                                "joint_valid": [[int(v)] for v in valid],
                                "hand_type": hand_type, "hand_type_valid": 1})  # fmt: skip
    folder = root / "annotations" / split
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "data": {"images": images, "annotations": annotations},
        "camera": {str(CAPTURE): {k: {c: cams[c][k] for c in CAMERAS}
                                  for k in ("campos", "camrot", "focal", "princpt")}},
        "joint_3d": {str(CAPTURE): joints_json},
        "MANO_NeuralAnnot": {str(CAPTURE): mano_json},
    }  # fmt: skip
    for kind, content in files.items():
        (folder / f"InterHand2.6M_{split}_{kind}.json").write_text(json.dumps(content))
    return root


def _draw(
    path: Path,
    rng: np.random.Generator,
    uv_verts: dict[str, np.ndarray],
    uv_joints: dict[str, np.ndarray],
) -> None:
    """A grey noisy background, the hands' vertices as skin dots, joints as coloured blobs.

    Pixel coordinates are InterHand2.6M's (pixel centres at integers), so a point ``(u, v)``
    lies in array pixel ``(round(v), round(u))``.
    """
    bg = rng.normal(110, 12, (IMAGE_H, IMAGE_W, 1)) + np.array([0.0, 4.0, -4.0])
    im = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for uv in uv_verts.values():
        for u, v in uv:
            draw.ellipse([u - 1.5, v - 1.5, u + 1.5, v + 1.5], fill=(225, 180, 150))
    for side, uv in uv_joints.items():
        colour = LEFT_JOINT_RGB if side == "left" else RIGHT_JOINT_RGB
        for u, v in uv:
            draw.ellipse([u - 3.5, v - 3.5, u + 3.5, v + 3.5], fill=colour)
    im.save(path, quality=95)
