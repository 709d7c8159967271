"""The Anny hand (PyPI ``anny``, Apache-2.0 code, CC0 MakeHuman assets) as a posable, sealed hand.

``AnnyHand`` wraps ``anny.Anny(rig='anny-hand.R', topology='hand.R')``. It poses the right hand
from per-bone angles in degrees (flexion, twist, abduction), seals the open wrist with a fan cap
so the mesh is watertight, and reads the 21 joints (bone heads plus fingertips; see
:mod:`im2hands_model.hands`). Left hands are made by mirroring the right hand
(:func:`im2hands_model.hands.mirror_points` and :func:`~im2hands_model.hands.flip_faces`); the
MakeHuman hand is left/right symmetric, so this is the same shape as Anny's ``hand.L`` with one
rig convention to pose.

Hand frame (what :meth:`AnnyHand.forward` returns): wrist at the origin, fingers along +y,
palm facing -x, metres.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from im2hands_model.hands import ANNY_TIP_BONES, anny_joints

#: Anny's phenotype parameters we sample (all in [0, 1]; age: 1/3 child, 2/3 young adult, 1 old).
PHENOTYPES: tuple[str, ...] = ("gender", "age", "muscle", "weight", "height", "proportions")

#: Bones we pose, by base name, in the order of the angle array.
POSED_BONES: tuple[str, ...] = (
    "finger1-1", "finger1-2", "finger1-3",
    "metacarpal1", "finger2-1", "finger2-2", "finger2-3",
    "metacarpal2", "finger3-1", "finger3-2", "finger3-3",
    "metacarpal3", "finger4-1", "finger4-2", "finger4-3",
    "metacarpal4", "finger5-1", "finger5-2", "finger5-3",
)  # fmt: skip

_TIP_CAP_MM = 3.0  # fingertip = centroid of the distal-bone vertices within this of the tip end


@dataclass
class PosedHands:
    """Output of :meth:`AnnyHand.forward` (numpy, float64, hand frame, metres)."""

    vertices: np.ndarray  # [B, V, 3] sealed mesh vertices (V = 1,609 + 1 cap centre)
    joints: np.ndarray  # [B, 21, 3]


def _quiet_import_anny():
    # Warp (Anny's skinning backend) prints a banner when Anny initialises it; silence it first.
    import warp

    warp.config.log_level = warp.LOG_ERROR
    import anny

    return anny


def _rotation_xyz(angles_deg: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``[..., 3, 3]`` for intrinsic x (flexion), y (twist), z (abduction)."""
    a = torch.deg2rad(angles_deg)
    cx, cy, cz = torch.cos(a).unbind(-1)
    sx, sy, sz = torch.sin(a).unbind(-1)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], -1)
    ry = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], -1)
    rz = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], -1)
    shape = angles_deg.shape[:-1] + (3, 3)
    return rz.reshape(shape) @ ry.reshape(shape) @ rx.reshape(shape)


def seal_with_fan_cap(
    faces: np.ndarray, vertices: np.ndarray, flip_if_inward: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Close a mesh's one boundary loop (a hand's wrist opening) with a fan cap.

    The cap joins each boundary edge to a new centre vertex with index ``len(vertices)`` (the
    caller appends it, e.g. the mean of the loop or the wrist joint) and winds like the faces
    around it, so the sealed mesh is watertight and consistently oriented.

    Args:
        faces: ``[F, 3]`` triangles of a disk-topology mesh.
        vertices: ``[V, 3]`` rest vertices, used only to check the orientation.
        flip_if_inward: if the sealed mesh encloses a negative volume (faces wound inward),
            reverse every face instead of raising.

    Returns:
        ``(sealed_faces [F + L, 3] int64, loop [L] int64)``: the faces with the cap appended and
        the boundary loop's vertex indices in order.

    Raises:
        ValueError: no opening, more than one opening, or inward faces (without
            ``flip_if_inward``).
    """
    import igl

    faces = np.asarray(faces, dtype=np.int64)
    loop = np.asarray(igl.boundary_loop(faces), dtype=np.int64)
    if loop.size < 3:
        raise ValueError("no wrist opening to seal")
    edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    directed = set(map(tuple, edges.tolist()))
    boundary = [e for e in directed if (e[1], e[0]) not in directed]
    if len(boundary) != loop.size:
        raise ValueError(f"{len(boundary)} boundary edges but the wrist loop has {loop.size}")
    if (int(loop[0]), int(loop[1])) not in directed:  # make the loop run along the faces
        loop = loop[::-1].copy()
    centre = np.full(loop.size, len(vertices), dtype=np.int64)
    cap = np.stack([np.roll(loop, -1), loop, centre], axis=1)
    sealed = np.concatenate([faces, cap])
    # Orientation: outward faces enclose a positive volume.
    v = np.concatenate([vertices, vertices[loop].mean(0, keepdims=True)])
    tri = v[sealed]
    volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    if volume < 0:
        if not flip_if_inward:
            raise ValueError("unexpected face orientation (negative volume)")
        sealed = sealed[:, ::-1].copy()
    return sealed, loop


class AnnyHand:
    """A posable, watertight right hand built on Anny.

    Pose angles are ``[B, len(POSED_BONES), 3]`` degrees about each bone's local axes:
    x = flexion (positive curls toward the palm), y = twist along the bone, z = abduction with
    positive toward the thumb side (radial); the sign of z is measured from the rig at start-up so
    the convention does not depend on Anny's bone axes.
    """

    def __init__(self, device: str = "cpu") -> None:
        anny = _quiet_import_anny()
        # The first construction on a machine builds Anny's model cache (~1 min) and writes it
        # non-atomically; serialise construction across our processes (e.g. dataset workers) so
        # one builds it and the others then load it.
        lock_dir = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "im2hands"
        lock_dir.mkdir(parents=True, exist_ok=True)
        with open(lock_dir / "anny-model.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.model = anny.Anny(rig="anny-hand.R", topology="hand.R").to(device)
        self.device = device
        labels = [label.rsplit(".", 1)[0] for label in self.model.bone_labels]
        self.bone_labels = list(self.model.bone_labels)
        self._wrist_bone = labels.index("wrist")
        self._pose_index = torch.tensor([labels.index(b) for b in POSED_BONES], device=device)
        faces = self.model.faces.cpu().numpy().astype(np.int64)
        self.num_template_vertices = int(self.model.template_vertices.shape[0])
        rest_vertices, rest_heads = self._run(
            torch.zeros(1, len(POSED_BONES), 3), np.full((1, 6), 0.5)
        )
        self.faces = self._seal(faces, rest_vertices[0])
        self._vertex_bone = self._main_bone()  # the bone that moves each vertex most
        self._tip_sets = self._find_tip_vertices(rest_vertices[0], rest_heads[0], labels)
        self.probe_vertices = self._find_probe_vertices(rest_vertices[0], rest_heads[0], labels)
        #: Finger (0 thumb ... 4 pinky) each probe vertex belongs to (Anny's ``fingerN`` bones).
        main = self._vertex_bone[self.probe_vertices]
        self.probe_finger = np.array([int(labels[b][len("finger")]) - 1 for b in main])
        self._abduction_sign = self._measure_abduction_sign(labels)
        self.palm_weight, self.nail_weight = self._skin_regions(
            rest_vertices[0], rest_heads[0], labels
        )

    # -- set-up -------------------------------------------------------------------------------
    def _seal(self, faces: np.ndarray, vertices: np.ndarray) -> np.ndarray:
        """Close the wrist opening with a fan around an added centre vertex (index V)."""
        try:
            sealed, _ = seal_with_fan_cap(faces, vertices[: self.num_template_vertices])
        except ValueError as exc:
            raise RuntimeError(f"the Anny hand mesh: {exc}") from None
        return sealed

    def _find_tip_vertices(
        self, verts: np.ndarray, heads: np.ndarray, labels: list[str]
    ) -> list[np.ndarray]:
        main_bone = self._vertex_bone
        sets = []
        for bone in ANNY_TIP_BONES:
            b = labels.index(bone)
            parent = int(self.model.bone_parents[b])
            axis = heads[b] - heads[parent]
            axis /= np.linalg.norm(axis)
            ids = np.flatnonzero(main_bone == b)
            along = (verts[ids] - heads[b]) @ axis
            sets.append(ids[along >= along.max() - _TIP_CAP_MM / 1000.0])
        return sets

    def _main_bone(self) -> np.ndarray:
        weights = self.model.vertex_bone_weights
        return (
            self.model.vertex_bone_indices[
                torch.arange(self.num_template_vertices), weights.argmax(1)
            ]
            .cpu()
            .numpy()
        )

    def _find_probe_vertices(
        self, verts: np.ndarray, heads: np.ndarray, labels: list[str]
    ) -> np.ndarray:
        """Vertices away from every joint crease, on the phalanges: the ones to test for fingers
        passing through each other or through the palm (skinning folds the skin at a flexed
        joint, so vertices near joints would report false self-intersections)."""
        main_bone = self._vertex_bone
        tips = {
            b: verts[ids].mean(0) for b, ids in zip(ANNY_TIP_BONES, self._tip_sets, strict=True)
        }
        probes = []
        for b, label in enumerate(labels):
            if not label.startswith("finger"):
                continue
            children = [c for c in range(len(labels)) if int(self.model.bone_parents[c]) == b]
            end = heads[children[0]] if children else tips[label]
            axis = end - heads[b]
            ids = np.flatnonzero(main_bone == b)
            t = (verts[ids] - heads[b]) @ axis / (axis @ axis)
            upper = 0.7 if children else 2.0
            probes.append(ids[(t > 0.3) & (t < upper)])
        return np.concatenate(probes)

    def _measure_abduction_sign(self, labels: list[str]) -> np.ndarray:
        """+1 where a positive z rotation moves the bone's child toward the thumb side."""
        n = len(POSED_BONES)
        angles = torch.zeros(n + 1, n, 3)
        for i in range(n):
            angles[i + 1, i, 2] = 10.0
        verts, heads = self._run(angles, np.full((n + 1, 6), 0.5))
        radial = heads[0, labels.index("finger2-1")] - heads[0, labels.index("finger5-1")]
        radial /= np.linalg.norm(radial)  # pinky MCP -> index MCP: toward the thumb
        moved = (verts[1:] - verts[:1]) @ radial  # [n, V]
        # Mean radial motion of the vertices that moved: sign of the abduction direction.
        sign = np.array(
            [
                np.sign(m[np.abs(m) > 1e-6].mean()) if (np.abs(m) > 1e-6).any() else 1.0
                for m in moved
            ]
        )
        return sign

    def _skin_regions(
        self, verts: np.ndarray, heads: np.ndarray, labels: list[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per sealed-mesh vertex in [0, 1]: how much it is palm-side skin, and nail.

        The palm side is the way the fingers curl: the mean motion of the fingertips under a
        flexion of every bone. Palm weight rises with the rest-pose normal's alignment with it;
        nails are the back-side vertices of each fingertip's last 10 mm. Vertex indices are the
        same in every pose and for the mirrored left hand, so these weights hold for all.
        """
        from im2hands_model.data.render import vertex_normals

        angles = torch.zeros(1, len(POSED_BONES), 3)
        angles[..., 0] = 20.0  # flex every bone
        flexed, _ = self._run(angles, np.full((1, 6), 0.5))
        tips = np.concatenate(self._tip_sets)
        palm_dir = (flexed[0, tips] - verts[tips]).mean(0)
        palm_dir /= np.linalg.norm(palm_dir)
        sealed = np.concatenate([verts, heads[self._wrist_bone][None]])  # + the cap centre
        normals = vertex_normals(sealed, self.faces)
        facing = normals @ palm_dir
        palm = np.clip((facing - 0.05) / 0.45, 0.0, 1.0)
        palm = palm * palm * (3 - 2 * palm)  # smoothstep: a soft border along the sides
        nail = np.zeros(len(sealed))
        for bone in ANNY_TIP_BONES:
            b = labels.index(bone)
            axis = heads[b] - heads[int(self.model.bone_parents[b])]
            ids = np.flatnonzero(self._vertex_bone == b)
            along = verts[ids] @ (axis / np.linalg.norm(axis))
            near_tip = along >= along.max() - 0.010
            back = facing[ids] < -0.35
            nail[ids[near_tip & back]] = 1.0
        return palm.astype(np.float32), nail.astype(np.float32)

    # -- evaluation -----------------------------------------------------------------------------
    def _run(self, angles: torch.Tensor, phenotypes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Anny's skinned (unsealed) vertices ``[B, 1609, 3]`` and bone heads ``[B, 21, 3]``."""
        batch = angles.shape[0]
        dtype = self.model.template_vertices.dtype
        deltas = torch.eye(4, dtype=dtype, device=self.device)
        deltas = deltas.repeat(batch, len(self.bone_labels), 1, 1)
        rot = _rotation_xyz(angles.to(dtype=dtype, device=self.device))
        deltas[:, self._pose_index, :3, :3] = rot
        pheno = torch.as_tensor(phenotypes, dtype=dtype, device=self.device)
        with torch.no_grad():
            out = self.model(
                pose_parameters=deltas,
                phenotype_kwargs=pheno,
                pose_parameterization="local-bone",
            )
        return out["vertices"].cpu().numpy(), out["bone_poses"][:, :, :3, 3].cpu().numpy()

    def forward(self, phenotypes: np.ndarray, angles: np.ndarray) -> PosedHands:
        """Pose a batch of right hands.

        Args:
            phenotypes: ``[B, 6]`` values in [0, 1] in :data:`PHENOTYPES` order.
            angles: ``[B, len(POSED_BONES), 3]`` degrees (flexion, twist, abduction toward thumb).

        Returns:
            Sealed vertices and the 21 joints, in the hand frame.
        """
        angles = np.asarray(angles, dtype=np.float64).copy()
        angles[..., 2] *= self._abduction_sign
        raw, heads = self._run(torch.from_numpy(angles), np.asarray(phenotypes, dtype=np.float64))
        # The cap's centre is the wrist joint itself, so the wrist keypoint lies on the mesh.
        wrist = heads[:, self._wrist_bone, None]
        vertices = np.concatenate([raw, wrist], axis=1)
        tips = np.stack([raw[:, ids].mean(1) for ids in self._tip_sets], axis=1)
        return PosedHands(vertices=vertices, joints=anny_joints(self.bone_labels, heads, tips))

    __call__ = forward
