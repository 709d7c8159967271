"""Fake MANO model files in exactly the official format, for tests (MANO itself cannot ship).

``write_fake_mano_pkls(dir)`` writes ``MANO_RIGHT.pkl`` and ``MANO_LEFT.pkl`` as the official
``mano_v1_2`` files are laid out: a protocol-2 pickle of a dict whose ``v_template``,
``shapedirs``, ``J`` and ``weights`` are ``chumpy.ch.Ch`` objects, ``J_regressor`` a
``scipy.sparse`` CSC matrix (pickled under the old ``scipy.sparse.csc`` path), numpy arrays
elsewhere (named through ``numpy.core.multiarray`` as in pickles from numpy 1) and the strings
``bs_style`` / ``bs_type``. The numbers are made up: a hand-sized flattened tube (about 0.11 m
long, open at the wrist) with MANO's topology counts (778 vertices, 1,538 faces, one 16-vertex
boundary loop), laid out like the official right hand (wrist at +x, fingers toward -x, thumb
toward +z on the palm side, -y). The left file mirrors the right in x, with the official left
file's known bug: its shapedirs are the right hand's, unmirrored.

``fake_mano_npz_dir(tmp)`` writes the pickles and converts them with
:func:`im2hands_model.data.mano.convert_mano`; it returns the npz folder.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import scipy.sparse
from scipy.optimize import nnls

NUM_VERTICES = 778
RING = 16  # vertices per ring (the wrist loop)
RINGS = 48  # 48 rings of 16 + 10 dome vertices = 778
DOME = NUM_VERTICES - RING * RINGS
X_OPEN, X_END, DOME_DEPTH = 0.10, 0.0, 0.01  # metres: wrist opening, last ring, dome depth
HALF_THICKNESS, HALF_WIDTH = 0.015, 0.05  # ellipse semi-axes along y (palm normal) and z

#: MANO's kinematic tree (parents), joint order wrist, index, middle, pinky, ring, thumb.
PARENTS = (-1, 0, 1, 2, 0, 4, 5, 0, 7, 8, 0, 10, 11, 0, 13, 14)

#: Rest joint targets of the fake right hand (inside the tube), MANO joint order.
JOINT_TARGETS = np.array(
    [
        [0.090, 0.000, 0.000],  # wrist
        [0.050, 0.000, 0.025], [0.030, 0.000, 0.025], [0.015, 0.000, 0.025],  # index
        [0.050, 0.000, 0.000], [0.030, 0.000, 0.000], [0.015, 0.000, 0.000],  # middle
        [0.055, 0.000, -0.035], [0.040, 0.000, -0.035], [0.025, 0.000, -0.035],  # pinky
        [0.050, 0.000, -0.018], [0.030, 0.000, -0.018], [0.015, 0.000, -0.018],  # ring
        [0.075, -0.006, 0.030], [0.060, -0.007, 0.035], [0.045, -0.008, 0.038],  # thumb
    ]
)  # fmt: skip

#: Where each MANO fingertip vertex (744, 320, 443, 554, 671) is placed on the fake surface.
TIP_IDS = (744, 320, 443, 554, 671)
TIP_TARGETS = np.array(
    [[0.02, -0.01, 0.05], [0.0, 0.0, 0.025], [-0.01, 0.0, 0.0], [0.0, 0.0, -0.02], [0.01, 0, -0.04]]
)

_MIRROR = np.array([-1.0, 1.0, 1.0])


def _tube() -> tuple[np.ndarray, np.ndarray]:
    """Vertices and outward faces of the open tube with a dome end (disk topology)."""
    from scipy.spatial import Delaunay

    theta = 2 * np.pi * np.arange(RING) / RING
    xs = np.linspace(X_OPEN, X_END, RINGS)
    ring_y, ring_z = HALF_THICKNESS * np.sin(theta), HALF_WIDTH * np.cos(theta)
    tube = np.stack([np.repeat(xs, RING), np.tile(ring_y, RINGS), np.tile(ring_z, RINGS)], axis=1)
    # Dome: 9 vertices on an inner circle and 1 at the centre, triangulated with the last ring.
    inner = 2 * np.pi * (np.arange(DOME - 1) + 0.5) / (DOME - 1)
    uv = np.concatenate(
        [
            np.stack([np.cos(theta), np.sin(theta)], 1),
            0.55 * np.stack([np.cos(inner), np.sin(inner)], 1),
            np.zeros((1, 2)),
        ]
    )
    rho = np.linalg.norm(uv, axis=1)
    dome_pts = np.stack(
        [
            X_END - DOME_DEPTH * np.sqrt(np.clip(1 - rho**2, 0, 1)),
            HALF_THICKNESS * uv[:, 1],
            HALF_WIDTH * uv[:, 0],
        ],
        axis=1,
    )[RING:]
    vertices = np.concatenate([tube, dome_pts])
    faces = []
    for i in range(RINGS - 1):
        for j in range(RING):
            a, b = i * RING + j, i * RING + (j + 1) % RING
            c, d = a + RING, b + RING
            faces += [[a, b, d], [a, d, c]]
    last = (RINGS - 1) * RING
    local = np.concatenate([last + np.arange(RING), RING * RINGS + np.arange(DOME)])
    faces += local[Delaunay(uv).simplices].tolist()
    faces = np.array(faces, dtype=np.int64)
    # Wind every face outward: away from the axis point level with it (the shape is convex).
    tri = vertices[faces]
    centroid = tri.mean(1)
    axis_point = np.stack([np.maximum(centroid[:, 0], X_END + 0.005), 0 * centroid[:, 0]], 1)
    axis_point = np.concatenate([axis_point, np.zeros((len(faces), 1))], 1)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inward = np.einsum("ij,ij->i", normal, centroid - axis_point) < 0
    faces[inward] = faces[inward][:, ::-1]
    return vertices, faces


def _place_tips(vertices: np.ndarray, faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber vertices so that MANO's fingertip ids sit at the fake fingertip positions."""
    new_to_old = np.arange(len(vertices))
    taken: set[int] = set()
    for tip_id, target in zip(TIP_IDS, TIP_TARGETS, strict=True):
        order = np.argsort(np.linalg.norm(vertices - target, axis=1))
        phys = int(next(v for v in order if int(v) not in taken))
        taken.add(phys)
        where = int(np.flatnonzero(new_to_old == phys)[0])
        new_to_old[[tip_id, where]] = new_to_old[[where, tip_id]]
    old_to_new = np.argsort(new_to_old)
    return vertices[new_to_old], old_to_new[faces]


def _joint_regressor(vertices: np.ndarray) -> np.ndarray:
    """[16, 778] convex weights of nearby vertices that reproduce each joint target."""
    regressor = np.zeros((len(JOINT_TARGETS), len(vertices)))
    for j, target in enumerate(JOINT_TARGETS):
        # The tube's cross-sections nearest the joint (about 3 rings): their hull holds it.
        near = np.flatnonzero(np.abs(vertices[:, 0] - target[0]) < 0.003)
        system = np.concatenate([vertices[near].T, 100.0 * np.ones((1, near.size))])
        weights, residual = nnls(system, np.concatenate([target, [100.0]]))
        assert residual < 1e-5, f"fake joint {j} is outside its vertices' hull"
        regressor[j, near] = weights / weights.sum()
    return regressor


class _Python2Pickler(pickle._Pickler):
    """Writes ``bytes`` and ``str`` as Python 2 ``str`` (BINSTRING opcodes), as the official files
    hold their keys, strings and numpy buffers; Python 3 would write protocol-2 bytes as calls
    to ``_codecs.encode``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str
    dispatch[str] = _save_py2_str


class _FakeCh:
    """Pickles like chumpy's ``Ch``: class ``chumpy.ch.Ch``, state = ``__dict__`` with ``x``."""

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self._dirty_vars: set = set()
        self._itr = None
        self._depends_on_deps: dict = {}
        self._make_dense = False
        self._make_sparse = False


def _right_model(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    vertices, faces = _place_tips(*_tube())
    regressor = _joint_regressor(vertices)
    joints = regressor @ vertices
    dist2 = ((vertices[:, None] - joints[None]) ** 2).sum(-1)
    weights = np.exp(-dist2 / (2 * 0.012**2))
    weights /= weights.sum(1, keepdims=True)
    kintree = np.array([[2**32 - 1, *PARENTS[1:]], list(range(16))], dtype=np.int64)
    components = np.linalg.qr(rng.normal(size=(45, 45)))[0]
    return {
        "v_template": vertices,
        "f": faces.astype(np.uint32),
        "shapedirs": 0.002 * rng.normal(size=(NUM_VERTICES, 3, 10)),
        "posedirs": 0.001 * rng.normal(size=(NUM_VERTICES, 3, 135)),
        "J_regressor": regressor,
        "J": joints,
        "weights": weights,
        "kintree_table": kintree,
        "hands_mean": 0.1 * rng.normal(size=45),
        "hands_components": components,
        "hands_coeffs": rng.normal(size=(64, 45)),
        "bs_style": "lbs",
        "bs_type": "lrotmin",
    }


def mirror_model(right: dict, fix_left_shapedirs: bool = False) -> dict:
    """The left model: the right one mirrored in x (``x -> -x``).

    Joint rotations mirror as ``M R M`` with ``M = diag(-1, 1, 1)``: axis-angle ``(x, -y, -z)``,
    rotation-matrix entry ``(i, j)`` times ``m_i m_j``. The faces are reversed so they stay
    outward. Like the official MANO_LEFT file, shapedirs are copied unmirrored unless
    ``fix_left_shapedirs``.
    """
    left = dict(right)
    left["v_template"] = right["v_template"] * _MIRROR
    left["J"] = right["J"] * _MIRROR
    left["f"] = right["f"][:, ::-1].copy()
    axis_sign = np.tile([1.0, -1.0, -1.0], 15)
    left["hands_mean"] = right["hands_mean"] * axis_sign
    left["hands_components"] = right["hands_components"] * axis_sign
    entry_sign = np.tile(np.outer(_MIRROR, _MIRROR).ravel(), 15)  # the 135 pose features
    left["posedirs"] = right["posedirs"] * _MIRROR[None, :, None] * entry_sign
    if fix_left_shapedirs:
        left["shapedirs"] = right["shapedirs"] * _MIRROR[None, :, None]
    return left


def _official_layout(model: dict) -> dict:
    """Wrap the arrays as the official files hold them."""
    out = dict(model)
    for key in ("v_template", "shapedirs", "J", "weights"):
        out[key] = _FakeCh(model[key])
    out["J_regressor"] = scipy.sparse.csc_matrix(model["J_regressor"])
    return out


def dump_official_pickle(model: dict, path: Path) -> None:
    """Pickle ``model`` (arrays) like an official MANO file, through a temporary fake chumpy."""
    chumpy, chumpy_ch = types.ModuleType("chumpy"), types.ModuleType("chumpy.ch")
    ch_class = type("Ch", (_FakeCh,), {"__module__": "chumpy.ch"})
    chumpy_ch.Ch = ch_class
    chumpy.ch = chumpy_ch
    saved = {name: sys.modules.get(name) for name in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = chumpy, chumpy_ch
    try:
        layout = _official_layout(model)
        for key, value in layout.items():
            if isinstance(value, _FakeCh):
                obj = ch_class.__new__(ch_class)
                obj.__dict__.update(value.__dict__)
                layout[key] = obj
        buffer = io.BytesIO()
        _Python2Pickler(buffer, protocol=2).dump(layout)
        data = buffer.getvalue()
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
    # Old module paths, as in the official files (numpy 1, scipy < 1.8).
    data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    data = data.replace(b"cscipy.sparse._csc\n", b"cscipy.sparse.csc\n")
    path.write_bytes(data)


def fake_mano_models(seed: int = 0) -> tuple[dict, dict]:
    """The fake right and left models as plain arrays (the left with the shapedirs bug)."""
    right = _right_model(seed)
    return right, mirror_model(right)


def write_fake_mano_pkls(directory: Path, seed: int = 0) -> Path:
    """Write fake ``MANO_RIGHT.pkl`` and ``MANO_LEFT.pkl`` into ``directory``; return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    right, left = fake_mano_models(seed)
    dump_official_pickle(right, directory / "MANO_RIGHT.pkl")
    dump_official_pickle(left, directory / "MANO_LEFT.pkl")
    return directory


def fake_mano_npz_dir(tmp: Path) -> Path:
    """Fake pickles under ``tmp/mano_pkl`` converted to ``tmp/mano_npz``; returns the latter."""
    from im2hands_model.data.mano import convert_mano

    tmp = Path(tmp)
    write_fake_mano_pkls(tmp / "mano_pkl")
    convert_mano(tmp / "mano_pkl", tmp / "mano_npz")
    return tmp / "mano_npz"
