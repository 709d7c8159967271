"""InterHand2.6M v1.0 (5 fps) reader and its converter to im2hands shards (SPEC §4.2).

The release as distributed (verified against public code; sources below)::

    ROOT/annotations/<split>/InterHand2.6M_<split>_data.json        COCO-style images, annotations
    ROOT/annotations/<split>/InterHand2.6M_<split>_camera.json      per capture, per camera
    ROOT/annotations/<split>/InterHand2.6M_<split>_joint_3d.json    per capture, per frame
    ROOT/annotations/<split>/InterHand2.6M_<split>_MANO_NeuralAnnot.json
    ROOT/images/<split>/<file_name>   e.g. Capture0/ROM03_.../cam400262/image2590.jpg

Facts this module relies on, and where they were checked:

* Layout ``annotations/<split>/InterHand2.6M_<split>_{data,camera,joint_3d,MANO_NeuralAnnot}.json``
  and ``images/<split>/<file_name>``: IntagHand ``dataset/interhand.py`` (``InterHandLoader``,
  github.com/Dw1010/IntagHand) and InterWild ``data/InterHand26M/InterHand26M.py``
  (github.com/facebookresearch/InterWild). The pre-v1.0 InterHand2.6M repository
  (github.com/facebookresearch/InterHand2.6M, ``data/InterHand2.6M/dataset.py``, README) keeps
  the same file names under ``annotations/{all,human_annot,machine_annot}/`` instead; mmpose's
  ``configs/_base_/datasets/interhand3d.py`` uses ``annotations/all/`` too. Those folders are
  searched as well (:func:`find_annotation_dir`).
* ``camera.json``: ``{capture: {"campos" | "camrot" | "focal" | "princpt": {camera: value}}}``
  with capture ids and camera names as strings; ``campos`` is the camera centre in world mm,
  ``camrot`` a 3x3 rotation, and camera coordinates are ``camrot @ (world - campos)``
  (``world2cam(world, R, T) = R @ (world - T)`` called with ``T = campos`` in InterHand2.6M
  ``common/utils/transforms.py`` / ``data/InterHand2.6M/dataset.py``; the same product in mmpose
  ``mmpose/datasets/datasets/hand3d/interhand_3d_dataset.py``). Pixels are
  ``focal * xy / z + princpt`` (``cam2pixel`` there).
* ``joint_3d.json``: ``{capture: {frame_idx: {"world_coord": [42][3] mm, "joint_valid": [42],
  "hand_type", "hand_type_valid"}}}`` (InterWild reads ``world_coord`` and ``joint_valid`` from
  it; mmpose reads ``world_coord``).
* The 42 joints: right hand 0-20, left hand 21-41; per hand thumb4 (tip), thumb3, thumb2,
  thumb1, then index, middle, ring, pinky the same way (4 = tip ... 1 = next to the wrist), and
  the wrist last (20 / 41). Skeleton links wrist->thumb1->...->thumb4 (mmpose
  ``configs/_base_/datasets/interhand3d.py`` keypoint_info and skeleton_info; the docstring of
  mmpose's ``InterHand3DDataset``; InterWild's ``joints_name``; ``root_joint_idx`` 20 / 41 in
  InterHand2.6M ``dataset.py``).
* ``data.json``: ``images`` entries carry ``id, file_name, width, height, capture, camera,
  frame_idx, seq_name``; ``annotations`` entries ``id, image_id, bbox, joint_valid, hand_type,
  hand_type_valid`` (InterHand2.6M ``dataset.py`` and InterWild read exactly these keys).
* ``MANO_NeuralAnnot.json``: ``{capture: {frame_idx: {"right" | "left": {"pose": [48],
  "shape": [10], "trans": [3]} | null}}}``; ``pose[:3]`` is the global orientation. MANO run
  with these parameters gives the mesh in the *world* frame in metres: InterHand2.6M
  ``tool/MANO_render/render.py`` multiplies the smplx output by 1000 ("meter to milimeter") and
  then applies ``R``, ``t = -R @ campos`` in mm; IntagHand applies ``R`` and
  ``-R @ campos / 1000`` to metre vertices. (Both also fix smplx's left-hand shapedirs bug;
  that is :mod:`im2hands_model.data.mano`'s business.)
* Frame selection (IntagHand ``cut_inter_img``, which Im2Hands' README names as its image
  pre-processing): ``hand_type == "interacting"`` and ``hand_type_valid``, MANO parameters for
  both hands, and images with a mean intensity of at least 10 (darker frames are dropped).
* Crop (IntagHand ``dataset/dataset_utils.py``: ``IMG_SIZE = 256``, ``HAND_BBOX_RATIO = 0.8``,
  ``cut_img``; as vendored in github.com/adwardlee/RenderIH): the square around the 2D
  projections of both hands' MANO vertices, centred on their bounding box, whose longer side
  fills 0.8 of it, resized to 256 px with the intrinsics adjusted; parts outside the image are
  black (``cv2.warpAffine``'s default border). The synthetic data uses the same rule
  (:func:`~im2hands_model.geometry.crop_square`, ``CROP_FILL = 0.8``).

Pixel convention: InterHand2.6M's intrinsics follow OpenCV (pixel centres at integer
coordinates); ours (:mod:`im2hands_model.data.shards`) has pixel ``(r, c)`` cover ``[c, c + 1)``,
so the principal point moves by +0.5 px (:meth:`IHCamera.K`).
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from im2hands_model.hands import HAND_NAMES, LEFT, NUM_JOINTS, RIGHT

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: Annotation files of a split: ``InterHand2.6M_<split>_<kind>.json``.
ANNOTATION_KINDS: tuple[str, ...] = ("data", "camera", "joint_3d", "MANO_NeuralAnnot")
#: IntagHand drops frames whose mean intensity is below this (black frames of the capture).
DARK_IMAGE_MEAN = 10.0
#: Vertices closer to the camera plane than this (metres) make a frame unusable.
MIN_DEPTH_M = 0.02
#: Layout of a converted frame from the gap between the two hand meshes (see :func:`frame_layout`).
TOUCHING_GAP_M = 0.005
CLOSE_GAP_M = 0.08

# -- joint order -------------------------------------------------------------------------------

#: For each of our 21 joints (``hands.JOINT_NAMES``), its index within one InterHand2.6M hand:
#: IH orders each finger tip first (thumb4, thumb3, thumb2, thumb1, index4, ...) and the wrist
#: last (20); we order wrist first, then each finger from its root to its tip.
IH_FROM_OURS: tuple[int, ...] = (20,) + tuple(4 * f + 3 - j for f in range(5) for j in range(4))
#: The inverse: for each IH joint of a hand, our index.
OURS_FROM_IH: tuple[int, ...] = tuple(int(i) for i in np.argsort(IH_FROM_OURS))
#: First IH index of each hand's block of 21 in the 42 joints (right first).
IH_HAND_OFFSET: dict[str, int] = {"right": 0, "left": NUM_JOINTS}


def ih_to_ours(values: np.ndarray) -> np.ndarray:
    """InterHand2.6M's 42 per-joint values ``[42, ...]`` to ours ``[2, 21, ...]`` (0 = left)."""
    values = np.asarray(values)
    if values.shape[0] != 2 * NUM_JOINTS:
        raise ValueError(f"expected 42 InterHand2.6M joints, got shape {values.shape}")
    index = np.array(IH_FROM_OURS)
    return np.stack([values[IH_HAND_OFFSET[side] + index] for side in HAND_NAMES])


def ours_to_ih(values: np.ndarray) -> np.ndarray:
    """Our ``[2, 21, ...]`` per-joint values (0 = left) to InterHand2.6M's ``[42, ...]``."""
    values = np.asarray(values)
    if values.shape[:2] != (2, NUM_JOINTS):
        raise ValueError(f"expected [2, 21, ...] joints, got shape {values.shape}")
    index = np.array(OURS_FROM_IH)
    return np.concatenate([values[RIGHT][index], values[LEFT][index]])


# -- errors and the skip summary -----------------------------------------------------------------


class InterHandFormatError(ValueError):
    """A required InterHand2.6M file is missing, unreadable or not in the published format."""


#: Skip reasons that are the selection rule, not bad data (logged at debug level only).
SELECTION_REASONS = ("not_interacting", "hand_type_invalid", "beyond_max_frames")
#: At most this many warnings per skip reason; the rest are only counted.
WARNINGS_PER_REASON = 10


@dataclass
class ConversionSummary:
    """What happened to every image of ``data.json``: converted, or skipped for one reason."""

    root: str
    split: str
    annotation_dir: str
    images: int = 0  # images listed in data.json
    selected: int = 0  # passed the annotation checks and went to conversion
    written: int = 0  # frames in the shards
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)  # first few per reason

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        """Count one skipped image; bad data is logged (the first few of each reason)."""
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        message = f"{where}: {detail}" if detail else where
        if len(shown) < 5:
            shown.append(message)
        if reason in SELECTION_REASONS:
            log.debug("skipped (%s) %s", reason, message)
        elif self.skipped[reason] <= WARNINGS_PER_REASON:
            log.warning("InterHand2.6M %s: skipped (%s) %s", self.split, reason, message)
            if self.skipped[reason] == WARNINGS_PER_REASON:
                log.warning("further '%s' skips are only counted (see the summary)", reason)

    def as_dict(self) -> dict:
        return {
            "root": self.root,
            "split": self.split,
            "annotation_dir": self.annotation_dir,
            "images": self.images,
            "selected": self.selected,
            "written": self.written,
            "skipped": dict(sorted(self.skipped.items())),
            "examples": self.examples,
        }

    def format(self) -> str:
        """A human-readable summary (printed by ``im2hands-data interhand``)."""
        lines = [
            f"InterHand2.6M {self.split} ({self.annotation_dir}): {self.images} images, "
            f"{self.selected} selected, {self.written} written"
        ]
        for reason, count in sorted(self.skipped.items()):
            kind = "selection" if reason in SELECTION_REASONS else "bad data"
            example = self.examples.get(reason, [""])[0]
            lines.append(f"  skipped {count:>8d}  {reason:<20s} ({kind}) e.g. {example}")
        return "\n".join(lines)


# -- reading the release -------------------------------------------------------------------------


def annotation_file_name(split: str, kind: str) -> str:
    return f"InterHand2.6M_{split}_{kind}.json"


def find_annotation_dir(root: Path, split: str) -> Path:
    """The folder that holds the four annotation files of ``split``.

    Looked for, in order: ``ROOT/annotations/<split>`` (v1.0 as distributed),
    ``ROOT/annotations`` (flattened), ``ROOT/annotations/all`` (the pre-v1.0 subset folder) and
    ``ROOT`` itself (ROOT is the annotation folder).

    Raises:
        InterHandFormatError: no candidate holds all four files (lists what was looked for).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    root = Path(root)
    names = [annotation_file_name(split, kind) for kind in ANNOTATION_KINDS]
    candidates = [root / "annotations" / split, root / "annotations", root / "annotations" / "all"]
    candidates.append(root)
    report = []
    for folder in candidates:
        missing = [n for n in names if not (folder / n).is_file()]
        if not missing:
            return folder
        if not folder.is_dir():
            report.append(f"  {folder}: no such folder")
        elif len(missing) == len(names):
            report.append(f"  {folder}: none of the files")
        else:
            report.append(f"  {folder}: missing {', '.join(missing)}")
    raise InterHandFormatError(
        f"no InterHand2.6M v1.0 annotations for split '{split}' under {root}; looked for "
        f"{', '.join(names)} in:\n" + "\n".join(report) + "\nExpected layout: "
        f"ROOT/annotations/{split}/{names[0]} (and the other three), "
        f"images in ROOT/images/{split}/"
    )


def load_json(path: Path) -> Any:
    """Parse one annotation file; a missing, unreadable or broken file names itself."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise InterHandFormatError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InterHandFormatError(f"{path}: broken JSON ({exc})") from None
    except OSError as exc:
        raise InterHandFormatError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _require(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise InterHandFormatError(f"{path}: not in the InterHand2.6M v1.0 format ({what})")


@dataclass
class Annotations:
    """The four annotation files of one split, parsed (plain JSON structures)."""

    split: str
    annotation_dir: Path
    images: list[dict]
    annotations: list[dict]
    cameras: dict
    joints: dict
    mano: dict


def load_annotations(root: Path, split: str) -> Annotations:
    """Find and parse the annotation files of ``split``; checks their top-level structure.

    Raises:
        InterHandFormatError: a file is missing, broken or has the wrong top-level structure.
    """
    folder = find_annotation_dir(root, split)
    paths = {kind: folder / annotation_file_name(split, kind) for kind in ANNOTATION_KINDS}
    data = load_json(paths["data"])
    _require(isinstance(data, dict), paths["data"], "top level is not an object")
    _require(isinstance(data.get("images"), list), paths["data"], "no 'images' list")
    _require(isinstance(data.get("annotations"), list), paths["data"], "no 'annotations' list")
    loaded = {}
    for kind in ("camera", "joint_3d", "MANO_NeuralAnnot"):
        value = load_json(paths[kind])
        _require(isinstance(value, dict), paths[kind], "top level is not an object of captures")
        loaded[kind] = value
    for capture, cams in loaded["camera"].items():
        ok = isinstance(cams, dict) and all(
            isinstance(cams.get(k), dict) for k in ("campos", "camrot", "focal", "princpt")
        )
        _require(ok, paths["camera"], f"capture {capture} lacks campos/camrot/focal/princpt")
    return Annotations(
        split=split,
        annotation_dir=folder,
        images=data["images"],
        annotations=data["annotations"],
        cameras=loaded["camera"],
        joints=loaded["joint_3d"],
        mano=loaded["MANO_NeuralAnnot"],
    )


# -- cameras -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IHCamera:
    """One InterHand2.6M camera: ``campos`` [3] world mm, ``camrot`` [3, 3], ``focal`` [2],
    ``princpt`` [2] (OpenCV pixel convention)."""

    campos: np.ndarray
    camrot: np.ndarray
    focal: np.ndarray
    princpt: np.ndarray

    def world_mm_to_camera_m(self, points_mm: np.ndarray) -> np.ndarray:
        """World points in mm ``[N, 3]`` to the camera frame in metres: ``R (X - campos)``."""
        return (np.asarray(points_mm, np.float64) - self.campos) @ self.camrot.T / 1000.0

    def world_m_to_camera_m(self, points_m: np.ndarray) -> np.ndarray:
        """World points in metres (MANO output) to the camera frame in metres."""
        return self.world_mm_to_camera_m(np.asarray(points_m, np.float64) * 1000.0)

    @property
    def rotation(self) -> np.ndarray:
        """``R`` of ``x_cam = R x_world + t`` (metres)."""
        return self.camrot

    @property
    def translation_m(self) -> np.ndarray:
        """``t`` of ``x_cam = R x_world + t`` in metres: ``-R campos / 1000``."""
        return -self.camrot @ self.campos / 1000.0

    def project_ih(self, points_cam: np.ndarray) -> np.ndarray:
        """Camera-frame points ``[N, 3]`` to InterHand2.6M pixel coordinates ``[N, 2]``."""
        p = np.asarray(points_cam, np.float64)
        return p[:, :2] / p[:, 2:3] * self.focal + self.princpt

    @property
    def K(self) -> np.ndarray:
        """Intrinsics in our pixel convention (pixel (r, c) covers [c, c + 1)): +0.5 px."""
        return np.array(
            [
                [self.focal[0], 0.0, self.princpt[0] + 0.5],
                [0.0, self.focal[1], self.princpt[1] + 0.5],
                [0.0, 0.0, 1.0],
            ]
        )


def _array(value: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """``value`` as a finite float64 array of ``shape`` (ValueError naming ``what`` if not)."""
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{what} is not numeric") from None
    if a.size != math.prod(shape):
        raise ValueError(f"{what} has shape {list(a.shape)}, expected {list(shape)}")
    a = a.reshape(shape)
    if not np.isfinite(a).all():
        raise ValueError(f"{what} has NaN or infinite values")
    return a


def camera_of(cameras: dict, capture: str, camera: str) -> IHCamera:
    """The camera ``camera`` of ``capture`` from ``camera.json`` (KeyError / ValueError)."""
    cams = cameras[capture]
    return IHCamera(
        campos=_array(cams["campos"][camera], (3,), "campos"),
        camrot=_array(cams["camrot"][camera], (3, 3), "camrot"),
        focal=_array(cams["focal"][camera], (2,), "focal"),
        princpt=_array(cams["princpt"][camera], (2,), "princpt"),
    )


# -- frames --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ManoParams:
    pose: np.ndarray  # [48] axis-angle, global orientation first
    shape: np.ndarray  # [10]
    trans: np.ndarray  # [3] metres, world frame


@dataclass(frozen=True)
class InterHandFrame:
    """One selected image with everything its conversion needs (picklable for workers)."""

    image_id: int
    file_name: str
    image_path: Path
    capture: str
    camera_name: str
    frame_idx: str
    camera: IHCamera
    mano: dict[str, ManoParams]  # "left", "right"
    world_joints_mm: np.ndarray  # [42, 3] InterHand2.6M order
    joint_valid: np.ndarray  # [42] bool


def _mano_params(entry: Any, side: str) -> ManoParams:
    if not isinstance(entry, dict):
        raise ValueError(f"MANO {side} is not an object")
    return ManoParams(
        pose=_array(entry.get("pose"), (48,), f"MANO {side} pose"),
        shape=_array(entry.get("shape"), (10,), f"MANO {side} shape"),
        trans=_array(entry.get("trans"), (3,), f"MANO {side} trans"),
    )


def _entry(table: dict, capture: str, frame_idx: str) -> Any:
    """``table[capture][frame_idx]`` of a per-capture, per-frame annotation file, or None."""
    per_capture = table.get(capture)
    return per_capture.get(frame_idx) if isinstance(per_capture, dict) else None


def _int_or_minus_one(text: str) -> np.int64:
    return np.int64(int(text)) if text.isdigit() else np.int64(-1)


def _is_true(value: Any) -> bool:
    if isinstance(value, list | tuple):  # tolerate [1] / [[1]]
        return bool(value) and all(_is_true(v) for v in value)
    try:
        return bool(float(value))
    except (TypeError, ValueError):
        return False


def select_frames(
    ann: Annotations, images_dir: Path, summary: ConversionSummary, max_frames: int | None = None
) -> list[InterHandFrame]:
    """The interacting frames of ``ann`` that can be converted, in ``data.json`` order.

    Every image of ``data.json`` is either returned or counted in ``summary`` under one reason:
    ``not_interacting``, ``hand_type_invalid`` and ``beyond_max_frames`` (the selection rule);
    ``bad_record``, ``no_annotation``, ``missing_camera``, ``bad_camera``, ``missing_joints``,
    ``bad_joints``, ``missing_mano`` (a hand without NeuralAnnot parameters), ``bad_mano``
    (wrong shape, NaN) and ``missing_image`` (bad data, logged as warnings).
    """
    data_path = ann.annotation_dir / annotation_file_name(ann.split, "data")
    joints_path = ann.annotation_dir / annotation_file_name(ann.split, "joint_3d")
    mano_path = ann.annotation_dir / annotation_file_name(ann.split, "MANO_NeuralAnnot")
    cam_path = ann.annotation_dir / annotation_file_name(ann.split, "camera")
    by_image: dict[Any, dict] = {}
    for a in ann.annotations:
        if isinstance(a, dict) and "image_id" in a:
            by_image.setdefault(a["image_id"], a)
    frames: list[InterHandFrame] = []
    summary.images += len(ann.images)
    for n, img in enumerate(ann.images):
        try:
            image_id = int(img["id"])
            file_name = str(img["file_name"])
            capture, camera_name = str(img["capture"]), str(img["camera"])
            frame_idx = str(img["frame_idx"])
        except (KeyError, TypeError, ValueError):
            what = "lacks id/file_name/capture/camera/frame_idx"
            summary.skip("bad_record", f"{data_path} images[{n}]", what)
            continue
        where = f"image {image_id} ({file_name})"
        a = by_image.get(img["id"])
        if a is None:
            summary.skip("no_annotation", where, f"no annotation in {data_path}")
            continue
        if a.get("hand_type") != "interacting":
            summary.skip("not_interacting", where, f"hand_type {a.get('hand_type')!r}")
            continue
        if not _is_true(a.get("hand_type_valid")):
            summary.skip("hand_type_invalid", where)
            continue
        key = f"capture {capture} frame {frame_idx}"
        try:
            camera = camera_of(ann.cameras, capture, camera_name)
        except KeyError:
            summary.skip("missing_camera", where, f"{key} camera {camera_name}: not in {cam_path}")
            continue
        except (ValueError, TypeError) as exc:
            summary.skip("bad_camera", where, f"{cam_path}: {exc}")
            continue
        entry = _entry(ann.joints, capture, frame_idx)
        if not isinstance(entry, dict) or "world_coord" not in entry:
            summary.skip("missing_joints", where, f"{key} not in {joints_path}")
            continue
        try:
            valid = np.asarray(entry.get("joint_valid", np.ones(42)), np.float64).reshape(-1)
            if valid.size != 42:
                raise ValueError(f"joint_valid has {valid.size} entries, expected 42")
            valid = valid > 0
            world = np.asarray(entry["world_coord"], np.float64)
            if world.shape != (42, 3):
                raise ValueError(f"world_coord has shape {list(world.shape)}, expected [42, 3]")
            if not np.isfinite(world[valid]).all():
                raise ValueError("world_coord has NaN or infinite values for valid joints")
            world = np.where(np.isfinite(world), world, 0.0)
        except (TypeError, ValueError) as exc:
            summary.skip("bad_joints", where, f"{joints_path}: {exc}")
            continue
        mano_entry = _entry(ann.mano, capture, frame_idx)
        if not isinstance(mano_entry, dict):
            summary.skip("missing_mano", where, f"{key} not in {mano_path}")
            continue
        absent = " and ".join(s for s in ("right", "left") if mano_entry.get(s) is None)
        if absent:
            summary.skip("missing_mano", where, f"{key}: no {absent} hand in {mano_path}")
            continue
        try:
            mano = {side: _mano_params(mano_entry[side], side) for side in HAND_NAMES}
        except ValueError as exc:
            summary.skip("bad_mano", where, f"{mano_path}: {exc}")
            continue
        image_path = images_dir / file_name
        if not image_path.is_file():
            summary.skip("missing_image", where, f"{image_path} does not exist")
            continue
        if max_frames is not None and len(frames) >= max_frames:
            summary.skip("beyond_max_frames", where, f"--max-frames {max_frames}")
            continue
        frames.append(
            InterHandFrame(
                image_id=image_id,
                file_name=file_name,
                image_path=image_path,
                capture=capture,
                camera_name=camera_name,
                frame_idx=frame_idx,
                camera=camera,
                mano=mano,
                world_joints_mm=world,
                joint_valid=valid,
            )
        )
    summary.selected += len(frames)
    return frames


# -- MANO ----------------------------------------------------------------------------------------


class HandModel(Protocol):
    """What the converter needs of one MANO side (:class:`im2hands_model.data.mano.ManoModel`)."""

    faces: Any

    def forward(self, pose: np.ndarray, betas: np.ndarray, trans: np.ndarray) -> tuple[Any, Any]:
        """``(verts [V, 3], joints [21, 3] in our order)``, metres, world frame of the fit."""


def load_mano(npz_dir: Path, side: str) -> HandModel:
    """MANO of one side from the project's converted ``.npz`` files (lazy import)."""
    try:
        from im2hands_model.data.mano import ManoModel
    except ImportError as exc:  # pragma: no cover - the module ships with the package
        raise RuntimeError(f"MANO support is not available: {exc}") from exc
    return ManoModel.from_npz_dir(npz_dir, side)


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


# -- one frame -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvertSettings:
    points_per_hand: int = 16384
    image_size: int = 256
    shard_size: int = 64
    seed: int = 0
    max_frames: int | None = None


class FrameSkipped(Exception):  # noqa: N818 - a control-flow signal, not an error
    """A frame that cannot be converted (``reason``, ``detail``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def frame_layout(verts: list[np.ndarray], faces: list[np.ndarray]) -> tuple[str, float]:
    """The synthetic layout name that describes two GT hands, and their gap in metres.

    ``touching`` when the meshes overlap or come within :data:`TOUCHING_GAP_M`, ``close`` within
    :data:`CLOSE_GAP_M` and ``apart`` otherwise (the synthetic ranges are 5-40 mm for close and
    120-300 mm for apart). The gap is the smallest distance of a vertex of one hand to the other
    hand's surface (0 when they overlap).
    """
    from im2hands_model.data.occupancy import hands_overlap, surface_distance

    if hands_overlap(verts[0], faces[0], verts[1], faces[1]):
        return "touching", 0.0
    d01, _ = surface_distance(verts[1], faces[1], verts[0])
    d10, _ = surface_distance(verts[0], faces[0], verts[1])
    gap = float(min(d01.min(), d10.min()))
    if gap <= TOUCHING_GAP_M:
        return "touching", gap
    return ("close" if gap <= CLOSE_GAP_M else "apart"), gap


def load_image(path: Path) -> np.ndarray:
    """An image file as ``[H, W, 3]`` uint8 RGB (FrameSkipped if unreadable)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError) as exc:
        raise FrameSkipped("unreadable_image", f"{path}: {exc}") from None


def convert_frame(
    frame: InterHandFrame,
    manos: dict[str, HandModel],
    faces: np.ndarray,
    settings: ConvertSettings,
) -> dict[str, np.ndarray]:
    """The shard arrays of one frame (keys of :mod:`.shards` plus the InterHand2.6M extras).

    Raises:
        FrameSkipped: unreadable or dark image, non-finite or behind-camera meshes.
    """
    from im2hands_model.data.anny_hand import POSED_BONES
    from im2hands_model.data.layouts import LAYOUTS
    from im2hands_model.data.occupancy import hand_occupancy
    from im2hands_model.data.render import project_points
    from im2hands_model.geometry import CROP_FILL, crop_intrinsics, crop_square
    from im2hands_model.hands import root_frame
    from im2hands_model.pipeline.crop import CropWindow, crop_image

    cam = frame.camera
    verts, joints = [], []
    for side in HAND_NAMES:
        p = frame.mano[side]
        v, j = manos[side].forward(p.pose, p.shape, p.trans)
        v, j = _numpy(v), _numpy(j)
        if v.ndim != 2 or v.shape[1] != 3 or j.shape != (NUM_JOINTS, 3):
            raise ValueError(f"MANO {side} returned shapes {v.shape} and {j.shape}")
        if not (np.isfinite(v).all() and np.isfinite(j).all()):
            raise FrameSkipped("non_finite_mesh", f"MANO {side} mesh has NaN or infinite values")
        verts.append(cam.world_m_to_camera_m(v))
        joints.append(cam.world_m_to_camera_m(j))
    depth = min(v[:, 2].min() for v in verts)
    if depth < MIN_DEPTH_M:
        detail = f"a hand reaches {depth * 1000:.0f} mm from the camera plane"
        raise FrameSkipped("behind_camera", detail)

    image = load_image(frame.image_path)
    if image.mean() < DARK_IMAGE_MEAN:
        detail = f"{frame.image_path}: mean intensity {image.mean():.1f} < {DARK_IMAGE_MEAN:g}"
        raise FrameSkipped("dark_image", detail)

    # IntagHand-style crop around the projected vertices of both hands.
    K_full = cam.K
    size = settings.image_size
    centre, side = crop_square(project_points(np.concatenate(verts), K_full), CROP_FILL)
    corner = centre - side / 2
    K_crop = crop_intrinsics(K_full, corner, side, size)
    # the same resampler as the pipeline's crops at run time (pixel centres kept, shrinking
    # area-averaged), so networks trained on these crops see what they will be given
    crop = crop_image(image, CropWindow(float(corner[0]), float(corner[1]), float(side)), size)

    # Occupancy of each hand in its normalised box, from its own random stream.
    rng = np.random.default_rng(np.random.SeedSequence([int(settings.seed), frame.image_id]))
    n = settings.points_per_hand
    occ_points = np.zeros((2, n, 3), np.float16)
    occ_labels = np.zeros((2, n), bool)
    norm_rot = np.zeros((2, 3, 3))
    norm_origin = np.zeros((2, 3))
    for h in range(2):
        norm_rot[h], norm_origin[h] = root_frame(joints[h])
        other = (verts[1 - h], faces[1 - h])
        occ_points[h], occ_labels[h], _ = hand_occupancy(
            verts[h], faces[h], norm_rot[h], norm_origin[h], other, n, rng
        )
    layout, gap = frame_layout(verts, [faces[0], faces[1]])

    ih_valid = ih_to_ours(frame.joint_valid)
    ih_joints = ih_to_ours(cam.world_mm_to_camera_m(frame.world_joints_mm)) * ih_valid[..., None]
    joints_arr = np.stack(joints)
    mano = [frame.mano[s] for s in HAND_NAMES]
    return {
        "image": crop,
        "K": K_crop.astype(np.float32),
        "joints_3d": joints_arr.astype(np.float32),
        "joints_2d": np.stack([project_points(j, K_crop) for j in joints]).astype(np.float32),
        "hand_present": np.ones(2, bool),
        "occ_points": occ_points,
        "occ_labels": occ_labels,
        "norm_rot": norm_rot.astype(np.float32),
        "norm_origin": norm_origin.astype(np.float32),
        "vertices": np.stack(verts).astype(np.float32),
        # Anny-only keys, neutral placeholders (index.json "placeholders")
        "phenotype": np.full((2, 6), 0.5, np.float32),
        "pose": np.zeros((2, len(POSED_BONES), 3), np.float32),
        "layout": np.int64(LAYOUTS.index(layout)),
        "scene_index": np.int64(-1),  # the frame's number in the dataset, set when written
        # InterHand2.6M extras
        "hands_gap_m": np.float32(gap),
        "mano_pose": np.stack([m.pose for m in mano]).astype(np.float32),
        "mano_shape": np.stack([m.shape for m in mano]).astype(np.float32),
        "mano_trans": np.stack([m.trans for m in mano]).astype(np.float32),
        "cam_R": cam.rotation.astype(np.float32),
        "cam_t": cam.translation_m.astype(np.float32),
        "ih_joints_3d": ih_joints.astype(np.float32),
        "ih_joint_valid": ih_valid.astype(bool),
        "ih_image_id": np.int64(frame.image_id),
        "ih_capture": _int_or_minus_one(frame.capture),
        "ih_frame_idx": _int_or_minus_one(frame.frame_idx),
        "ih_camera": _int_or_minus_one(frame.camera_name),
    }


#: What index.json says about the keys that only mean something for synthetic Anny scenes.
PLACEHOLDERS = {
    "phenotype": "0.5 for every entry (Anny's neutral phenotype); MANO hands have no Anny "
    "phenotype: see mano_shape",
    "pose": "zeros (Anny's rest pose); the hand pose is in mano_pose",
    "layout": f"from the gap between the GT meshes: touching (overlap or <= "
    f"{TOUCHING_GAP_M * 1000:g} mm), close (<= {CLOSE_GAP_M * 1000:g} mm), apart; gap in "
    "hands_gap_m",
    "scene_index": "frame number in this converted dataset (ih_image_id is InterHand's image id)",
}
EXTRA_KEYS = {
    "mano_pose": "[2, 48] NeuralAnnot MANO pose (axis-angle, global orientation first), "
    "left/right, world frame",
    "mano_shape": "[2, 10] MANO shape",
    "mano_trans": "[2, 3] MANO translation (metres, world frame)",
    "cam_R": "[3, 3] world -> camera rotation (camrot)",
    "cam_t": "[3] world -> camera translation in metres (-camrot campos / 1000)",
    "ih_joints_3d": "[2, 21, 3] InterHand2.6M's annotated joints in the camera frame (metres; "
    "0 where invalid), our order; joints_3d are the MANO joints",
    "ih_joint_valid": "[2, 21] joint_valid of joint_3d.json, our order",
    "ih_image_id": "image id in data.json",
    "ih_capture": "capture id",
    "ih_frame_idx": "frame index",
    "ih_camera": "camera name as a number",
    "hands_gap_m": "smallest vertex-to-surface distance between the hands (0 if they overlap)",
}

# -- workers -------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(mano_dir: Path, settings: ConvertSettings) -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    manos = {side: load_mano(Path(mano_dir), side) for side in HAND_NAMES}
    faces = np.stack([outward_faces(manos[side]) for side in HAND_NAMES])
    _WORKER.update(manos=manos, faces=faces, settings=settings)


def outward_faces(model: HandModel) -> np.ndarray:
    """The model's triangles ``[F, 3]`` int64, wound outward (checked on the mean-pose mesh by
    its signed volume; a mirrored left model keeps the right's winding in some MANO files)."""
    faces = np.asarray(_numpy(model.faces), np.int64)
    verts, _ = model.forward(np.zeros(48), np.zeros(10), np.zeros(3))
    tri = _numpy(verts)[faces]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6.0
    return faces if volume >= 0 else faces[:, [0, 2, 1]]


def _convert_chunk(
    chunk: list[InterHandFrame],
) -> list[tuple[int, dict | None, tuple[str, str] | None]]:
    out = []
    for frame in chunk:
        try:
            arrays = convert_frame(frame, _WORKER["manos"], _WORKER["faces"], _WORKER["settings"])
            out.append((frame.image_id, arrays, None))
        except FrameSkipped as exc:
            out.append((frame.image_id, None, (exc.reason, exc.detail)))
    return out


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class InterHandConversionError(RuntimeError):
    """Nothing could be converted (the summary says why)."""

    def __init__(self, message: str, summary: ConversionSummary) -> None:
        super().__init__(message)
        self.summary = summary


def convert_interhand(
    root: str | os.PathLike,
    split: str,
    mano_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: ConvertSettings | None = None,
    workers: int = 1,
    progress: bool = True,
) -> ConversionSummary:
    """Convert the interacting frames of one InterHand2.6M split into a shard dataset.

    Writes ``out_dir/shard_*``, ``faces.npy``, ``index.json`` (with the root, split, settings and
    the skip counts) and ``report.json`` (the summary and timing). The result does not depend on
    ``workers``: frames keep ``data.json`` order and each frame's occupancy points come from its
    own random stream ``(seed, image id)``.

    Every image of ``data.json`` is written or counted under one skip reason: the selection rule
    (``not_interacting``, ``hand_type_invalid``, ``beyond_max_frames``), bad annotations (see
    :func:`select_frames`) or a frame that fails to convert (``unreadable_image``,
    ``dark_image``, ``non_finite_mesh``, ``behind_camera``). Bad data is logged as warnings
    (the first :data:`WARNINGS_PER_REASON` of each reason) with the file and the reason.

    Raises:
        InterHandFormatError: a required annotation file or the image folder is missing or broken.
        InterHandConversionError: no frame could be converted.
    """
    from tqdm import tqdm

    from im2hands_model.data.shards import FACES_FILE, write_index, write_shard
    from im2hands_model.geometry import CROP_FILL

    settings = settings or ConvertSettings()
    root, mano_dir, out_dir = Path(root), Path(mano_dir), Path(out_dir)
    start = time.perf_counter()
    ann = load_annotations(root, split)
    images_dir = root / "images" / split
    if not images_dir.is_dir():
        raise InterHandFormatError(
            f"no image folder for split '{split}': looked for {images_dir} (expected "
            f"ROOT/images/{split}/<file_name> as in data.json)"
        )
    summary = ConversionSummary(str(root), split, str(ann.annotation_dir))
    frames = select_frames(ann, images_dir, summary, settings.max_frames)
    del ann  # the big JSON structures are not needed any more
    out_dir.mkdir(parents=True, exist_ok=True)

    tasks = list(_chunks(frames, 2 if workers > 1 else 1))
    counts: list[int] = []
    pending: list[dict] = []
    example: dict | None = None
    frame_by_id = {f.image_id: f for f in frames}
    bar = tqdm(total=len(frames), desc=f"interhand {split}", unit="frame", disable=not progress)

    def consume(results: list) -> None:
        nonlocal example
        for image_id, arrays, skipped in results:
            bar.update(1)
            if arrays is None:
                f = frame_by_id[image_id]
                summary.skip(skipped[0], f"image {image_id} ({f.file_name})", skipped[1])
                continue
            arrays["scene_index"] = np.int64(summary.written)  # numbered after the skips
            summary.written += 1
            pending.append(arrays)
            example = example or arrays
            if len(pending) == settings.shard_size:
                counts.append(write_shard(out_dir, len(counts), pending))
                pending.clear()

    # MANO in this process first: its errors surface here, not in (respawning) pool workers.
    _init_worker(mano_dir, settings)
    faces = _WORKER["faces"]
    if workers <= 1 or len(tasks) <= 1:
        for task in tasks:
            consume(_convert_chunk(task))
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, _init_worker, (mano_dir, settings)) as pool:
            for results in pool.imap(_convert_chunk, tasks):
                consume(results)
    if pending:
        counts.append(write_shard(out_dir, len(counts), pending))
    bar.close()
    _WORKER.clear()
    elapsed = time.perf_counter() - start
    if example is None:
        raise InterHandConversionError(
            f"no frame of InterHand2.6M {split} could be converted\n{summary.format()}", summary
        )
    np.save(out_dir / FACES_FILE, faces.astype(np.int32))
    meta = {
        "source": "InterHand2.6M v1.0",
        "interhand": {
            **summary.as_dict(),
            "images_dir": str(images_dir),
            "mano_dir": str(mano_dir),
            "selection": "hand_type == 'interacting' and hand_type_valid, MANO for both hands, "
            f"image mean >= {DARK_IMAGE_MEAN:g} (IntagHand's rule)",
            "crop": f"square around both hands' projected MANO vertices, filling "
            f"{CROP_FILL:g} of it, {settings.image_size} px (IntagHand)",
            "placeholders": PLACEHOLDERS,
            "extra_keys": EXTRA_KEYS,
        },
        "generator": {**asdict(settings), "kind": "interhand"},
        "workers": workers,
    }
    write_index(out_dir, counts, example, meta)
    report = {
        **summary.as_dict(),
        "shards": len(counts),
        "seconds": round(elapsed, 2),
        "frames_per_s": round(summary.written / elapsed, 3) if elapsed > 0 else None,
        "workers": workers,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    return summary
