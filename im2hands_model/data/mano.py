"""MANO, the hand model of InterHand2.6M's annotations, as a posable, sealed hand.

MANO (Romero, Tzionas, Black: *Embodied Hands*, SIGGRAPH Asia 2017) is a linear-blend-skinned hand
mesh of 778 vertices and 1,538 faces with 16 joints, 10 shape coefficients (``betas``) and 45 pose
parameters (axis-angle per finger joint) plus a global rotation. InterHand2.6M's NeuralAnnot fits
are MANO parameters.

Licence: MANO's model files are non-commercial and gated; they cannot ship with im2hands. Users
register at https://mano.is.tue.mpg.de/, download ``mano_v1_2.zip`` and supply
``MANO_RIGHT.pkl`` / ``MANO_LEFT.pkl`` themselves. The MANO layer comes from ``smplx`` (an optional
dependency, ``pip install 'im2hands_ros[mano]'``), whose code licence is non-commercial too.

Why the converter: the official ``.pkl`` files are Python 2 pickles holding ``chumpy`` objects,
and chumpy does not work on Python 3.11. :func:`load_mano_pkl` unpickles them with chumpy replaced
by stubs that keep only the arrays (chumpy is never imported), behind an allow-list of the classes
such a file may name, so a pickle cannot run code. :func:`convert_mano` writes plain
``MANO_RIGHT.npz`` / ``MANO_LEFT.npz`` once::

    im2hands-data convert-mano path/to/mano_v1_2 path/to/mano_npz

and :class:`ManoModel` loads those (with ``allow_pickle=False``, not through smplx's own loader,
which would allow pickles) and poses them with smplx's MANO layer.

Conventions (:class:`ManoModel`): metres, in MANO's own frame plus ``trans``; full axis-angle pose
(no PCA) relative to MANO's mean hand pose (``flat_hand_mean=False``, as InterHand2.6M's fits
assume); the wrist opening sealed with a fan cap to an added centre vertex (index 778) so that
inside tests work; 21 joints in :data:`im2hands_model.hands.JOINT_NAMES` order.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from im2hands_model.data.anny_hand import seal_with_fan_cap

NUM_VERTICES = 778
NUM_FACES = 1538
NUM_MANO_JOINTS = 16

#: Shapes every MANO model file must have.
REQUIRED_SHAPES: dict[str, tuple[int, ...]] = {
    "v_template": (NUM_VERTICES, 3),
    "f": (NUM_FACES, 3),
    "shapedirs": (NUM_VERTICES, 3, 10),
    "posedirs": (NUM_VERTICES, 3, 135),
    "J_regressor": (NUM_MANO_JOINTS, NUM_VERTICES),
    "weights": (NUM_VERTICES, NUM_MANO_JOINTS),
    "kintree_table": (2, NUM_MANO_JOINTS),
}
#: Shapes of the optional pose-space arrays (kept when present; ``hands_mean`` is needed to pose).
OPTIONAL_SHAPES: dict[str, tuple[int | None, ...]] = {
    "hands_mean": (45,),
    "hands_components": (45, 45),
    "hands_coeffs": (None, 45),  # one row per training scan
    "J": (NUM_MANO_JOINTS, 3),
}

#: MANO's fingertip vertices (thumb, index, middle, ring, pinky): smplx 0.1.28
#: ``vertex_ids.py``, ``vertex_ids['mano']``.
TIP_VERTEX_IDS: tuple[int, ...] = (744, 320, 443, 554, 671)

#: Our 21 joints (:data:`im2hands_model.hands.JOINT_NAMES`) as indices into MANO's 16 joints
#: followed by the 5 fingertips (16 + finger). MANO's joint order (smplx ``joint_names.py``,
#: the ``right_index1`` ... ``right_thumb3`` block): 0 wrist, 1-3 index, 4-6 middle,
#: 7-9 pinky, 10-12 ring, 13-15 thumb (13 = CMC, 14 = MCP, 15 = IP).
MANO_TO_JOINTS: tuple[int, ...] = (
    0,
    13, 14, 15, 16,
    1, 2, 3, 17,
    4, 5, 6, 18,
    10, 11, 12, 19,
    7, 8, 9, 20,
)  # fmt: skip

FILE_NAMES: dict[str, str] = {"right": "MANO_RIGHT", "left": "MANO_LEFT"}

_INSTALL_HINT = "MANO support needs smplx: pip install 'im2hands_ros[mano]'"


class ManoFileError(ValueError):
    """A MANO model file is missing, unreadable or not a MANO model."""


class MissingSmplxError(ImportError):
    """smplx (the optional ``mano`` extra) is not installed."""


def _import_smplx() -> Any:
    try:
        import smplx
    except ImportError as exc:
        raise MissingSmplxError(f"{_INSTALL_HINT} ({exc})") from None
    return smplx


# -- unpickling the official files without chumpy ------------------------------------------------


class _ChumpyStub:
    """Stands in for a chumpy class while unpickling; keeps the object's pickled state.

    chumpy's ``Ch`` has no ``__reduce__`` of its own: protocol 2 stores ``cls.__new__(cls)`` plus
    its ``__dict__`` (``Ch.__getstate__`` drops only the weak-reference caches), and a plain
    ``Ch`` holds its value as the array under ``'x'``.
    """

    chumpy_class = "chumpy"

    def __new__(cls, *args: Any, **kwargs: Any) -> _ChumpyStub:
        return super().__new__(cls)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state


@functools.cache
def _numpy_globals() -> dict[str, Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core to numpy._core
    return {
        "_reconstruct": core.multiarray._reconstruct,
        "scalar": core.multiarray.scalar,
        "ndarray": np.ndarray,
        "dtype": np.dtype,
    }


_NUMPY_MODULES = frozenset(
    {"numpy", "numpy.core.multiarray", "numpy._core.multiarray", "numpy.core", "numpy._core"}
)
_SPARSE_CLASSES = frozenset({"csc_matrix", "csr_matrix", "coo_matrix"})
_BUILTINS = frozenset({"set", "frozenset", "object", "complex", "slice", "bytearray"})


class _ManoUnpickler(pickle.Unpickler):
    """Resolves only the globals an official MANO pickle names; chumpy classes become stubs."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path
        self._stubs: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "chumpy" or module.startswith("chumpy."):
            qualified = f"{module}.{name}"
            if qualified not in self._stubs:
                self._stubs[qualified] = type(name, (_ChumpyStub,), {"chumpy_class": qualified})
            return self._stubs[qualified]
        if module in _NUMPY_MODULES and name in _numpy_globals():
            return _numpy_globals()[name]
        if module.startswith("scipy.sparse") and name in _SPARSE_CLASSES:
            import scipy.sparse

            return getattr(scipy.sparse, name)
        if module in ("__builtin__", "builtins") and name in _BUILTINS:
            return super().find_class(module, name)
        if (module, name) in (("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")):
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):  # bytes in protocol-2 pickles from Python 3
            return super().find_class(module, name)
        raise ManoFileError(
            f"{self._path}: not a MANO model file: it refers to {module}.{name}, which a MANO "
            "pickle does not contain (refused for safety)"
        )


def _plain_value(value: Any, key: str, path: Path) -> Any:
    """A chumpy stub replaced by its array (recursively); other values unchanged."""
    if isinstance(value, _ChumpyStub):
        state = value.__dict__.get("state")
        if not isinstance(state, dict) or "x" not in state:
            raise ManoFileError(
                f"{path}: entry {key!r} is a {value.chumpy_class} object without a stored value "
                "(only plain chumpy Ch arrays are supported)"
            )
        return _plain_value(state["x"], key, path)
    return value


def _as_array(value: Any, key: str, path: Path) -> np.ndarray | None:
    """The numeric array an entry holds, or None for non-array entries (strings)."""
    value = _plain_value(value, key, path)
    if hasattr(value, "toarray") and hasattr(value, "tocsc"):  # scipy.sparse
        try:
            return np.asarray(value.toarray(), dtype=np.float32)
        except Exception as exc:
            raise ManoFileError(f"{path}: {key!r}: unreadable sparse matrix ({exc})") from None
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise ManoFileError(f"{path}: entry {key!r} is not numeric (dtype {value.dtype})")
        return value
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        array = np.asarray(value)
    except Exception:
        return None
    return array if array.dtype.kind in "biuf" else None


def _check_arrays(arrays: dict[str, np.ndarray], path: Path) -> None:
    missing = [k for k in REQUIRED_SHAPES if k not in arrays]
    if missing:
        raise ManoFileError(
            f"{path}: not a MANO model file: missing {', '.join(missing)} "
            f"(has: {', '.join(sorted(arrays)) or 'nothing'})"
        )
    shapes: dict[str, tuple[int | None, ...]] = {**REQUIRED_SHAPES, **OPTIONAL_SHAPES}
    for key, shape in shapes.items():
        if key not in arrays:
            continue
        got = arrays[key].shape
        fits = len(got) == len(shape) and all(
            s is None or g == s for g, s in zip(got, shape, strict=True)
        )
        if not fits:
            want = "[" + ", ".join("N" if s is None else str(s) for s in shape) + "]"
            raise ManoFileError(
                f"{path}: not a MANO model file: {key} has shape {list(got)}, expected {want}"
            )
        if arrays[key].dtype.kind == "f" and not np.isfinite(arrays[key]).all():
            raise ManoFileError(f"{path}: {key} holds NaN or infinite values")
    f = arrays["f"]
    if f.min() < 0 or f.max() >= NUM_VERTICES:
        raise ManoFileError(f"{path}: face indices outside 0..{NUM_VERTICES - 1}")


def load_mano_pkl(path: str | Path) -> dict[str, np.ndarray]:
    """Read an official MANO model pickle (``MANO_RIGHT.pkl`` / ``MANO_LEFT.pkl``) without chumpy.

    Every numeric entry comes back as a plain array: chumpy objects become their values, the
    sparse ``J_regressor`` becomes a dense float32 array; strings (``bs_style``, ``bs_type``) are
    left out.

    Raises:
        ManoFileError: the file is missing, not a pickle, truncated, refers to anything outside
            the allow-list (numpy arrays, scipy.sparse matrices, chumpy objects, a few builtins),
            or is not a MANO model (missing keys, wrong shapes).
    """
    path = Path(path)
    if not path.is_file():
        raise ManoFileError(f"{path}: no such file")
    try:
        with open(path, "rb") as file:
            data = _ManoUnpickler(file, path).load()  # type: ignore[arg-type]
    except ManoFileError:
        raise
    except (EOFError, pickle.UnpicklingError) as exc:
        reason = "truncated" if isinstance(exc, EOFError) or "truncated" in str(exc) else "corrupt"
        raise ManoFileError(f"{path}: not a readable MANO pickle ({reason}: {exc})") from None
    except OSError as exc:
        raise ManoFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except Exception as exc:  # malformed opcodes raise anything from ValueError to TypeError
        raise ManoFileError(
            f"{path}: not a readable MANO pickle ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(data, dict):
        raise ManoFileError(
            f"{path}: not a MANO model file: holds a {type(data).__name__}, not a dict"
        )
    arrays: dict[str, np.ndarray] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            continue
        array = _as_array(value, key, path)
        if array is not None:
            arrays[key] = array
    _check_arrays(arrays, path)
    return arrays


# -- conversion ----------------------------------------------------------------------------------


def hand_chirality(arrays: dict[str, np.ndarray]) -> float:
    """Which hand a MANO model is, from its rest joints: < 0 right, > 0 left (about +-0.26 for
    the official files).

    Mirror-invariant geometry, not a frame convention: the cross product of the finger direction
    (wrist -> middle MCP) and the radial direction (pinky MCP -> index MCP) points to the back of
    a right hand and to the palm of a left one, and the thumb sits on the palm side.
    """
    joints = arrays["J_regressor"].astype(np.float64) @ arrays["v_template"].astype(np.float64)
    fingers = joints[4] - joints[0]
    radial = joints[1] - joints[7]
    thumb = joints[15] - joints[0]
    normal = np.cross(fingers, radial)
    scale = np.linalg.norm(normal) * np.linalg.norm(thumb)
    return float(normal @ thumb / scale) if scale > 0 else 0.0


def _find_pkl(mano_dir: Path, side: str) -> Path:
    name = FILE_NAMES[side] + ".pkl"
    candidates = [mano_dir / name, mano_dir / "models" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ManoFileError(
        f"{mano_dir}: no {name} (looked for {' and '.join(str(c) for c in candidates)}); "
        "download the MANO models from https://mano.is.tue.mpg.de/"
    )


def _write_npz_atomic(path: Path, arrays: dict[str, np.ndarray]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def convert_mano(mano_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Convert the official MANO pickles to ``out_dir/MANO_RIGHT.npz`` and ``MANO_LEFT.npz``.

    Looks for ``MANO_RIGHT.pkl`` and ``MANO_LEFT.pkl`` in ``mano_dir`` or ``mano_dir/models``
    (the layout of the official zip). The side comes from the file name and is checked against
    the hand's geometry (:func:`hand_chirality`), so swapped files are refused. The npz files hold
    only numeric arrays (no pickled objects) and are written atomically.

    Returns:
        The written paths, right first.

    Raises:
        ManoFileError: a missing folder or file, an unreadable or non-MANO file, or a file whose
            hand is the other side.
    """
    mano_dir, out_dir = Path(mano_dir), Path(out_dir)
    if not mano_dir.is_dir():
        raise ManoFileError(f"{mano_dir}: no such folder")
    models = {}
    for side in ("right", "left"):
        path = _find_pkl(mano_dir, side)
        arrays = load_mano_pkl(path)
        chirality = hand_chirality(arrays)
        other = "left" if side == "right" else "right"
        if (side == "right" and chirality > 0.05) or (side == "left" and chirality < -0.05):
            raise ManoFileError(
                f"{path}: holds a {other} hand, not a {side} one; are MANO_RIGHT.pkl and "
                "MANO_LEFT.pkl swapped or renamed?"
            )
        models[side] = arrays
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for side, arrays in models.items():
            target = out_dir / f"{FILE_NAMES[side]}.npz"
            _write_npz_atomic(target, arrays)
            written.append(target)
    except OSError as exc:
        raise ManoFileError(f"{out_dir}: cannot write: {exc.strerror or exc}") from None
    return written


def load_mano_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read a converted MANO model (``allow_pickle=False``) and check it."""
    path = Path(path)
    if not path.is_file():
        raise ManoFileError(
            f"{path}: no such file; convert the official MANO models first: "
            "im2hands-data convert-mano MANO_DIR OUT_DIR"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception as exc:
        raise ManoFileError(
            f"{path}: not a readable MANO npz ({type(exc).__name__}: {exc})"
        ) from None
    for key, array in arrays.items():
        if array.dtype.kind not in "biuf":
            raise ManoFileError(f"{path}: entry {key!r} is not numeric (dtype {array.dtype})")
    _check_arrays(arrays, path)
    return arrays


# -- the posable model ---------------------------------------------------------------------------


def _left_shapedirs_fixed(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """The left model's shapedirs with the x component negated where the file has the known bug.

    The official MANO_LEFT file carries the right hand's shapedirs unchanged, although its
    template is the right one mirrored in x, so equal betas give differently shaped hands
    (smplx issue #48, https://github.com/vchoutas/smplx/issues/48). InterHand2.6M negates
    ``shapedirs[:, 0, :]`` of the left layer when it nearly equals the right one
    (``tool/MANO_render/render.py``); its NeuralAnnot fits assume that fix. Files already fixed
    (x component equal to minus the right one) are left alone.
    """
    same = np.linalg.norm(left[:, 0] - right[:, 0])
    opposite = np.linalg.norm(left[:, 0] + right[:, 0])
    if same < 0.1 * opposite:
        left = left.copy()
        left[:, 0] *= -1
    return left


class ManoModel:
    """One MANO hand (left or right) posed by smplx's MANO layer, sealed and with our 21 joints.

    Poses are full axis-angle (``use_pca=False``): 3 global orientation + 45 finger values,
    relative to MANO's mean hand pose (``flat_hand_mean=False``, smplx's default, which
    InterHand2.6M's NeuralAnnot fits assume: its ``tool/MANO_render/render.py`` builds the layer
    with ``smplx.create(..., 'mano', use_pca=False, is_rhand=...)``). A zero pose is therefore
    the slightly curled mean hand, not a flat one. The global rotation turns about MANO's wrist
    joint (not the origin) and ``trans`` is added afterwards, as in smplx.

    Attributes:
        side: ``'left'`` or ``'right'``.
        faces: ``[1538 + 16, 3]`` int64: MANO's faces plus a fan cap over the 16-vertex wrist
            loop to vertex 778, wound outward (positive volume); watertight.
        wrist_loop: ``[16]`` the wrist opening's vertex indices.
    """

    def __init__(
        self, arrays: dict[str, np.ndarray], side: str, device: str = "cpu", name: str = "MANO"
    ) -> None:
        if side not in FILE_NAMES:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        if "hands_mean" not in arrays:
            raise ManoFileError(
                f"{name}: no hands_mean (MANO's mean hand pose, needed with flat_hand_mean=False)"
            )
        smplx = _import_smplx()
        import torch

        self.side = side
        self.device = torch.device(device)
        self._torch = torch
        components = arrays.get("hands_components", np.eye(45))
        struct = smplx.utils.Struct(**{k: arrays[k] for k in REQUIRED_SHAPES})
        struct.hands_mean = arrays["hands_mean"]
        struct.hands_components = components
        with contextlib.redirect_stdout(io.StringIO()):  # smplx prints a 10-betas warning
            layer = smplx.MANO(
                model_path=name,
                is_rhand=side == "right",
                data_struct=struct,
                use_pca=False,
                flat_hand_mean=False,
                create_global_orient=False,
                create_hand_pose=False,
                create_betas=False,
                create_transl=False,
                dtype=torch.float64,
            )
        self._layer = layer.to(self.device).eval()
        faces = np.asarray(arrays["f"], dtype=np.int64)
        rest = np.asarray(arrays["v_template"], dtype=np.float64)
        self.faces, self.wrist_loop = seal_with_fan_cap(faces, rest, flip_if_inward=True)
        self._tips = torch.as_tensor(TIP_VERTEX_IDS, device=self.device)
        self._order = torch.as_tensor(MANO_TO_JOINTS, device=self.device)
        self._loop = torch.as_tensor(self.wrist_loop, device=self.device)

    @classmethod
    def from_npz_dir(cls, npz_dir: str | Path, side: str, device: str = "cpu") -> ManoModel:
        """Load ``MANO_RIGHT.npz`` or ``MANO_LEFT.npz`` written by :func:`convert_mano`.

        The left model also reads the right one, to detect and fix the left shapedirs bug
        (:func:`_left_shapedirs_fixed`).
        """
        if side not in FILE_NAMES:
            raise ValueError(f"side must be 'left' or 'right', got {side!r}")
        npz_dir = Path(npz_dir)
        path = npz_dir / f"{FILE_NAMES[side]}.npz"
        arrays = load_mano_npz(path)
        if side == "left":
            right = load_mano_npz(npz_dir / f"{FILE_NAMES['right']}.npz")
            arrays["shapedirs"] = _left_shapedirs_fixed(arrays["shapedirs"], right["shapedirs"])
        return cls(arrays, side, device=device, name=str(path))

    @property
    def num_vertices(self) -> int:
        """Vertices of the sealed mesh (778 + the cap centre)."""
        return NUM_VERTICES + 1

    def forward_batch(
        self, pose: np.ndarray, betas: np.ndarray, trans: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pose a batch of hands.

        Args:
            pose: ``[B, 48]`` axis-angle: global orientation (3) then the 15 finger joints (45),
                in MANO's joint order, relative to the mean hand pose.
            betas: ``[B, 10]`` shape coefficients.
            trans: ``[B, 3]`` translation in metres.

        Returns:
            ``(vertices [B, 779, 3], joints [B, 21, 3])`` float64 in metres: the sealed mesh (the
            last vertex is the cap centre, the mean of the wrist loop) and the joints in
            :data:`im2hands_model.hands.JOINT_NAMES` order (MANO's 16 regressed joints plus the
            fingertip vertices :data:`TIP_VERTEX_IDS`).
        """
        torch = self._torch
        pose, betas, trans = (np.asarray(a, dtype=np.float64) for a in (pose, betas, trans))
        if pose.ndim != 2 or pose.shape[1] != 48:
            raise ValueError(f"pose must be [B, 48] axis-angle, got {list(pose.shape)}")
        batch = pose.shape[0]
        if betas.shape != (batch, 10):
            raise ValueError(f"betas must be [{batch}, 10], got {list(betas.shape)}")
        if trans.shape != (batch, 3):
            raise ValueError(f"trans must be [{batch}, 3], got {list(trans.shape)}")

        def tensor(a: np.ndarray) -> Any:
            return torch.as_tensor(a, dtype=torch.float64, device=self.device)

        with torch.no_grad():
            out = self._layer(
                betas=tensor(betas),
                global_orient=tensor(pose[:, :3]),
                hand_pose=tensor(pose[:, 3:]),
                transl=tensor(trans),
            )
            verts = out.vertices
            centre = verts[:, self._loop].mean(1, keepdim=True)
            joints = torch.cat([out.joints, verts[:, self._tips]], dim=1)[:, self._order]
            sealed = torch.cat([verts, centre], dim=1)
        return sealed.cpu().numpy(), joints.cpu().numpy()

    def forward(
        self, pose: np.ndarray, betas: np.ndarray, trans: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pose one hand: ``pose [48]``, ``betas [10]``, ``trans [3]`` -> ``(vertices [779, 3],
        joints [21, 3])``; see :meth:`forward_batch`."""
        pose, betas, trans = (np.asarray(a, dtype=np.float64) for a in (pose, betas, trans))
        if pose.shape != (48,) or betas.shape != (10,) or trans.shape != (3,):
            raise ValueError(
                "forward takes pose [48], betas [10], trans [3]; got "
                f"{list(pose.shape)}, {list(betas.shape)}, {list(trans.shape)}"
            )
        verts, joints = self.forward_batch(pose[None], betas[None], trans[None])
        return verts[0], joints[0]

    __call__ = forward
