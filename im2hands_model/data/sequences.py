"""Moving two-hand sequences with ground truth per frame, for measuring video reconstruction.

A sequence passes through key scenes of :class:`~im2hands_model.data.synthetic.SceneGenerator`
(both hands present, layouts varied: apart, touching, clasped ...). Between two keys, every
camera frame interpolates each hand's finger pose (Anny's per-bone rotations, linearly) and its
placement (rotation by spherical interpolation, position linearly), eased in and out, so the
hands move, turn, close, touch and separate smoothly at the camera rate. The person (the first
key's identity, skin, light and background) and the camera (the first key's intrinsics) stay.

Each frame is rendered at the full camera size with its metric depth, and carries the posed
meshes and keypoints as ground truth. The in-between frames are not de-penetrated: where the
interpolation lets the hands overlap slightly, the ground truth overlaps too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from im2hands_model.data.layouts import LAYOUTS
from im2hands_model.data.render import random_background, vertex_color_jitter
from im2hands_model.data.synthetic import FULL_FRAME, SKIN_TONES, SceneGenerator
from im2hands_model.hands import LEFT, mirror_points

__all__ = ["SequenceFrame", "SequenceRenderer", "key_scenes"]


@dataclass
class SequenceFrame:
    """One camera frame of a sequence (hands 0 = left, 1 = right)."""

    index: int
    stamp: float  # seconds from the first frame
    image: np.ndarray  # uint8 [H, W, 3]
    depth: np.ndarray  # float32 [H, W], camera z in metres, 0 = background
    K: np.ndarray  # [3, 3]
    joints: np.ndarray  # [2, 21, 3] camera frame, metres
    vertices: np.ndarray  # [2, V, 3]
    faces: np.ndarray  # [2, F, 3]
    layout: str  # the layout of the key scene the frame is nearest to


def key_scenes(gen: SceneGenerator, seed: int, count: int,
               layouts: tuple[str, ...] | None = None) -> list[dict]:  # fmt: skip
    """The first ``count`` two-hand scenes of ``seed`` (in ``layouts`` when given), as arrays."""
    keys, index = [], 0
    while len(keys) < count:
        if index > 1000 * count:
            raise ValueError(f"no {count} two-hand scenes of layouts {layouts} in seed {seed}")
        arrays = gen.generate(seed, index).arrays
        index += 1
        layout = LAYOUTS[int(arrays["layout"])]
        if bool(np.all(arrays["hand_present"])) and (layouts is None or layout in layouts):
            keys.append(arrays)
    return keys


def _kabsch(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rotation ``R`` and translation ``t`` with ``dst ~ src @ R.T + t`` (least squares)."""
    cs, cd = src.mean(0), dst.mean(0)
    u, _, vt = np.linalg.svd((src - cs).T @ (dst - cd))
    d = np.sign(np.linalg.det(vt.T @ u.T))
    rot = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return rot, cd - cs @ rot.T


def _ease(s: float) -> float:
    return s * s * (3.0 - 2.0 * s)


class SequenceRenderer:
    """Renders sequences through key scenes (module docstring); holds a scene generator.

    Args:
        fps: camera rate (frames per second).
        seconds_per_key: time from one key scene to the next.
    """

    def __init__(self, fps: float = 30.0, seconds_per_key: float = 1.0) -> None:
        if fps <= 0 or seconds_per_key <= 0:
            raise ValueError("fps and seconds_per_key must be positive")
        self.fps, self.seconds_per_key = float(fps), float(seconds_per_key)
        self.gen = SceneGenerator(points_per_hand=64, full_frame=True)

    def _local(self, pheno: np.ndarray, pose: np.ndarray, hand: int) -> tuple:
        out = self.gen.hand(pheno[None], pose[None])
        verts, joints = out.vertices[0], out.joints[0]
        if hand == LEFT:
            verts, joints = mirror_points(verts), mirror_points(joints)
        return verts, joints

    def frames(self, seed: int, keys: int = 4, layouts: tuple[str, ...] | None = None,
               ) -> Iterator[SequenceFrame]:  # fmt: skip
        """The frames from the first of ``keys`` key scenes of ``seed`` to the last."""
        if keys < 2:
            raise ValueError("a sequence needs at least two key scenes")
        key = key_scenes(self.gen, seed, keys, layouts)
        pheno = key[0]["phenotype"].astype(np.float64)
        # each key's placement of each hand, fitted on that key's own skinned hand
        placements = []
        for arrays in key:
            per_hand = []
            for h in range(2):
                local, _ = self._local(arrays["phenotype"][h].astype(np.float64),
                                       arrays["pose"][h].astype(np.float64), h)  # fmt: skip
                per_hand.append(_kabsch(local, arrays["vertices"][h].astype(np.float64)))
            placements.append(per_hand)
        rng = np.random.default_rng([seed, 7])
        tone = SKIN_TONES[rng.integers(len(SKIN_TONES))]
        width, height = FULL_FRAME
        background = random_background(rng, width, height)
        lights = self.gen._lights(rng)
        ambient = float(rng.uniform(0.2, 0.35))
        K = key[0]["K_full"].astype(np.float64)
        jitter: list[np.ndarray] = []
        steps = int(round(self.fps * self.seconds_per_key))
        index = 0
        for k in range(keys - 1):
            slerps = [Slerp([0.0, 1.0], Rotation.from_matrix(
                [placements[k][h][0], placements[k + 1][h][0]])) for h in range(2)]  # fmt: skip
            last = k == keys - 2
            for step in range(steps + (1 if last else 0)):
                s = step / steps
                e = _ease(s)
                verts, joints = [], []
                for h in range(2):
                    pose = (1 - e) * key[k]["pose"][h] + e * key[k + 1]["pose"][h]
                    local_v, local_j = self._local(pheno[h], pose.astype(np.float64), h)
                    rot = slerps[h]([e]).as_matrix()[0]
                    t = (1 - e) * placements[k][h][1] + e * placements[k + 1][h][1]
                    verts.append(local_v @ rot.T + t)
                    joints.append(local_j @ rot.T + t)
                if not jitter:
                    jitter = [vertex_color_jitter(rng, v) for v in verts]
                meshes = [(verts[h], self.gen.faces[h], tone, jitter[h]) for h in range(2)]
                rendered = self.gen.renderer.render(meshes, K, width, height,
                                                    background=background, lights=lights,
                                                    ambient=ambient)  # fmt: skip
                nearest = key[k] if s < 0.5 else key[k + 1]
                yield SequenceFrame(
                    index=index,
                    stamp=index / self.fps,
                    image=rendered.rgb,
                    depth=np.ascontiguousarray(rendered.depth, dtype=np.float32),
                    K=K.copy(),
                    joints=np.stack(joints),
                    vertices=np.stack(verts),
                    faces=self.gen.faces,
                    layout=LAYOUTS[int(nearest["layout"])],
                )
                index += 1

    def release(self) -> None:
        """Free the renderer's GL context."""
        self.gen.renderer.release()
