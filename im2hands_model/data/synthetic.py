"""Deterministic synthetic two-hand scenes on the Anny hand model (SPEC §4.1).

One scene (:func:`SceneGenerator.generate`) is fully determined by ``(seed, index)``:

1. identity: Anny phenotypes shared by the person's two hands with a small asymmetry; adults
   across the whole range, some children; hand sizes kept human (wrist to middle tip
   0.155-0.215 m for adults, 0.12-0.165 m for children);
2. finger poses within joint limits (:mod:`.poses`), relaxed until no finger passes through
   another part of the hand;
3. a two-hand layout (:mod:`.layouts`): clasped, crossed, touching, close, apart, or a single
   hand; touching hands are made penetration-free by splitting their overlap;
4. a random global rotation and a camera 0.3-0.9 m away with random intrinsics; a 256x256 crop
   around the hands (IntagHand-style, hands filling ~80 %) with its exact intrinsics, rendered
   at the resolution the camera would really see and resampled, with random skin tones, lights
   and background; optionally the full camera frame too;
5. occupancy labels per hand in its normalised box (uniform + near-surface points).

The generator holds the Anny model and one renderer; create one per process.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image
from scipy.spatial.transform import Rotation

from im2hands_model.data.anny_hand import POSED_BONES, AnnyHand
from im2hands_model.data.layouts import LAYOUT_POSE_STYLES, LAYOUTS, place_hands
from im2hands_model.data.occupancy import hand_occupancy, split_overlap
from im2hands_model.data.poses import (
    FINGER_POSE_ROWS,
    POSE_STYLES,
    probes_inside,
    sample_pose,
    self_intersection_count,
)
from im2hands_model.data.realism import CAMERA_DISTANCE_M as REALISM_DISTANCE_M
from im2hands_model.data.realism import (
    PHOTO_SHARE,
    PhotoBackgrounds,
    arm_meshes,
    body_view,
    camera_effects,
    depth_camera,
    depth_rng,
    realism_rng,
    scene_lights,
)
from im2hands_model.data.render import (
    Light,
    Renderer,
    project_points,
    random_background,
    vertex_color_jitter,
)
from im2hands_model.geometry import CROP_FILL, crop_intrinsics, crop_square  # noqa: F401
from im2hands_model.hands import LEFT, RIGHT, flip_faces, mirror_points, root_frame

#: Relative frequency of each layout (same order as ``LAYOUTS``).
LAYOUT_WEIGHTS = np.array([0.2, 0.15, 0.25, 0.15, 0.15, 0.1])
ADULT_SIZE_M = (0.155, 0.215)
CHILD_SIZE_M = (0.12, 0.165)
CHILD_FRACTION = 0.1
FULL_FRAME = (640, 480)
CAMERA_DISTANCE_M = (0.3, 0.9)
_RELAX_SCALES = np.array([1.0, 0.92, 0.85, 0.78, 0.7, 0.62, 0.55, 0.45, 0.35, 0.25, 0.0])
_MAX_PROBES_INSIDE = 3  # probe vertices allowed inside another part (skinning noise)

#: sRGB skin tones from very light to very dark (Fitzpatrick-like spread).
SKIN_TONES = np.array(
    [
        [0.96, 0.80, 0.69], [0.92, 0.74, 0.62], [0.87, 0.67, 0.54], [0.80, 0.60, 0.46],
        [0.72, 0.52, 0.38], [0.62, 0.43, 0.30], [0.50, 0.34, 0.24], [0.38, 0.26, 0.19],
    ]
)  # fmt: skip
#: ``skin_cues``: palms are lighter and pinker than the backs of hands (less melanin), most of all
#: for dark skin; nails are pale pink. Palm skin = tone blended this far toward PALM_TONE.
PALM_TONE = np.array([0.95, 0.76, 0.68])
PALM_BLEND = 0.45
NAIL_TONE = np.array([0.93, 0.80, 0.78])


@dataclass
class Scene:
    """One generated scene; arrays follow the dataset keys (see :mod:`.shards`)."""

    arrays: dict[str, np.ndarray]
    info: dict = field(default_factory=dict)  # statistics for the report (not stored per item)


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of a dataset made with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))


def scene_layout(rng: np.random.Generator) -> str:
    """The layout of a scene: the first draw of its random stream."""
    return LAYOUTS[rng.choice(len(LAYOUTS), p=LAYOUT_WEIGHTS / LAYOUT_WEIGHTS.sum())]


class SceneGenerator:
    """Generates scenes; holds an :class:`AnnyHand` and a :class:`Renderer` (one per process)."""

    def __init__(
        self,
        points_per_hand: int = 16384,
        image_size: int = 256,
        full_frame: bool = False,
        skin_cues: bool = False,
        realism: bool = False,
        depth_noise: bool = False,
    ) -> None:
        if points_per_hand <= 0 or image_size <= 0:
            raise ValueError("points_per_hand and image_size must be positive")
        self.points_per_hand = int(points_per_hand)
        self.image_size = int(image_size)
        self.full_frame = bool(full_frame)
        #: render lighter palms and nails, the cues that tell a palm from the back of a hand
        #: body-anchored views, arms, photo backgrounds, light with shadows and camera effects
        #: (:mod:`.realism`; implies skin cues)
        self.realism = bool(realism)
        self.skin_cues = bool(skin_cues) or self.realism
        #: the full frame's depth as a consumer depth camera measures it (:func:`depth_camera`)
        self.depth_noise = bool(depth_noise)
        self.backgrounds = PhotoBackgrounds() if self.realism else None
        self.renderer = Renderer(self.image_size, self.image_size)
        self.hand = AnnyHand()
        faces_right = self.hand.faces
        #: Faces per hand (left = mirrored right, so its winding is flipped).
        self.faces = np.stack([flip_faces(faces_right), faces_right])

    # -- identity and pose -------------------------------------------------------------------------
    def _identity(self, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
        child = bool(rng.random() < CHILD_FRACTION)
        pheno = np.array(
            [
                rng.uniform(0, 1),  # gender
                rng.uniform(0.3, 0.5) if child else rng.uniform(0.55, 1.0),  # age
                rng.uniform(0, 1),  # muscle
                rng.uniform(0, 1),  # weight
                np.clip(rng.normal(0.5, 0.18), 0.05, 0.95),  # height
                rng.uniform(0, 1),  # proportions
            ]
        )
        return pheno, child

    def _pose_hand(
        self, phenotype: np.ndarray, pose: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """Pose one right hand; fingers that pass through another part are relaxed toward rest.

        Relaxation levels are tried from the full pose down. Each finger keeps the strongest
        level at which it is clear of the rest of the hand; the composed pose is checked once
        more and, should the fingers now collide with each other, the whole hand is relaxed
        uniformly.

        Returns:
            Vertices, joints, the pose used and the smallest relaxation factor applied.
        """
        hand = self.hand
        poses = pose[None] * _RELAX_SCALES[:, None, None]
        out = hand(phenotype[None], poses)  # skinning all levels at once is cheap
        # The winding-number test is what costs: test levels in order, only until every finger
        # has found one where it is clear.
        level = np.full(5, len(_RELAX_SCALES) - 1)
        found = np.zeros(5, bool)
        clean_levels = []
        for k in range(len(_RELAX_SCALES)):
            hits = probes_inside(out.vertices[k], hand.faces, hand.probe_vertices)
            if k == 0 and hits.sum() <= _MAX_PROBES_INSIDE:
                return out.vertices[0], out.joints[0], poses[0], 1.0
            if hits.sum() <= _MAX_PROBES_INSIDE:
                clean_levels.append(k)
            per_finger = np.bincount(hand.probe_finger[hits], minlength=5)
            newly_clear = (per_finger <= 1) & ~found
            level[newly_clear] = k
            found |= newly_clear
            if clean_levels and found.all():
                break
        composed = pose.copy()
        for f, rows in enumerate(FINGER_POSE_ROWS):
            composed[rows] *= _RELAX_SCALES[level[f]]
        single = hand(phenotype[None], composed[None])
        if self_intersection_count(single.vertices[0], hand.faces, hand.probe_vertices) <= (
            _MAX_PROBES_INSIDE
        ):
            return single.vertices[0], single.joints[0], composed, float(_RELAX_SCALES[level].min())
        k = clean_levels[0] if clean_levels else len(_RELAX_SCALES) - 1
        return out.vertices[k], out.joints[k], poses[k], float(_RELAX_SCALES[k])

    # -- the scene ---------------------------------------------------------------------------------
    def generate(self, seed: int, index: int) -> Scene:
        rng = scene_rng(seed, index)
        layout = scene_layout(rng)
        info: dict = {"layout": layout}

        # 1. identity, shared by both hands with a small asymmetry; size kept human.
        for _ in range(20):
            pheno, child = self._identity(rng)
            size_range = CHILD_SIZE_M if child else ADULT_SIZE_M
            phenos = np.clip(pheno + rng.normal(0, 0.015, (2, 6)), 0, 1)
            sizes = self._sizes(phenos)
            if ((sizes >= size_range[0]) & (sizes <= size_range[1])).all():
                break
        info.update(child=child, hand_size_m=sizes.tolist())

        # 2. poses (right-hand frame; the left hand is the mirror image of a right hand).
        styles = LAYOUT_POSE_STYLES[layout] or POSE_STYLES
        verts, joints, poses, relax = [], [], [], []
        for h in (LEFT, RIGHT):
            style = styles[rng.integers(len(styles))]
            v, j, p, s = self._pose_hand(phenos[h], sample_pose(rng, style))
            if h == LEFT:
                v, j = mirror_points(v), mirror_points(j)
            verts.append(v)
            joints.append(j)
            poses.append(p)
            relax.append(s)
        info.update(pose_relax=relax)

        # 3. layout: A = the hand that stays, B = the one placed against it.
        a = int(rng.integers(2))
        b = 1 - a
        present = np.ones(2, bool)
        if layout == "single":
            present[b] = False
        order = (a, b)
        placement = place_hands(
            layout,
            (verts[a], verts[b]),
            (self.faces[a], self.faces[b]),
            (joints[a], joints[b]),
            (a == RIGHT, b == RIGHT),
            rng,
        )
        for slot, h in enumerate(order):
            verts[h] = verts[h] @ placement.rotation[slot].T + placement.translation[slot]
            joints[h] = joints[h] @ placement.rotation[slot].T + placement.translation[slot]
        info["press_mm"] = placement.press_m * 1000
        if present.all():
            split = split_overlap(verts[LEFT], self.faces[LEFT], verts[RIGHT], self.faces[RIGHT])
            verts[LEFT], verts[RIGHT] = split.vertices_a, split.vertices_b
            info.update(max_depth_mm=split.max_depth_m * 1000, moved_vertices=split.moved_vertices)

        # 4. global rotation and camera.
        glob = Rotation.random(random_state=rng).as_matrix()
        distance = CAMERA_DISTANCE_M
        rrng = realism_rng(seed, index) if self.realism else None
        if rrng is not None:  # a person's arms, at the distances of a real camera's hands
            glob, info["view"] = body_view(rrng, [joints[h] for h in range(2) if present[h]])
            distance = REALISM_DISTANCE_M
        visible = [verts[h] for h in range(2) if present[h]]
        centre = np.concatenate(visible).mean(0)
        K_full, t_cam = self._camera(rng, [(v - centre) @ glob.T for v in visible], distance)
        for h in range(2):
            verts[h] = (verts[h] - centre) @ glob.T + t_cam
            joints[h] = (joints[h] - centre) @ glob.T + t_cam
        arrays = self._images(rng, verts, present, K_full, joints, rrng, info)
        if self.depth_noise and "depth_full" in arrays:
            arrays["depth_full"], info["depth_camera"] = depth_camera(
                arrays["depth_full"], K_full, depth_rng(seed, index))

        # 5. occupancy in each hand's normalised box.
        n = self.points_per_hand
        occ_points = np.zeros((2, n, 3), np.float16)
        occ_labels = np.zeros((2, n), bool)
        norm_rot = np.tile(np.eye(3), (2, 1, 1))
        norm_origin = np.zeros((2, 3))
        reassigned = 0
        for h in range(2):
            if not present[h]:
                continue
            norm_rot[h], norm_origin[h] = root_frame(joints[h])
            other = (verts[1 - h], self.faces[1 - h]) if present[1 - h] else None
            occ_points[h], occ_labels[h], r = hand_occupancy(
                verts[h], self.faces[h], norm_rot[h], norm_origin[h], other, n, rng
            )
            reassigned += r
        info["reassigned_points"] = reassigned

        joints_arr = np.stack(joints) * present[:, None, None]
        verts_arr = np.stack(verts) * present[:, None, None]

        def project(K: np.ndarray) -> np.ndarray:  # absent hands stay all zero
            uv = np.zeros((2, 21, 2), np.float32)
            for h in np.flatnonzero(present):
                uv[h] = project_points(joints_arr[h], K)
            return uv

        arrays.update(
            joints_3d=joints_arr.astype(np.float32),
            joints_2d=project(arrays["K"]),
            hand_present=present,
            occ_points=occ_points,
            occ_labels=occ_labels,
            norm_rot=norm_rot.astype(np.float32),
            norm_origin=norm_origin.astype(np.float32),
            vertices=verts_arr.astype(np.float32),
            phenotype=phenos.astype(np.float32),
            pose=np.stack(poses).astype(np.float32),
            layout=np.int64(LAYOUTS.index(layout)),
            scene_index=np.int64(index),
        )
        if self.full_frame:
            arrays["joints_2d_full"] = project(K_full)
        return Scene(arrays, info)

    def _sizes(self, phenos: np.ndarray) -> np.ndarray:
        """Wrist to middle fingertip length (m) of each phenotype, straight hand."""
        out = self.hand(phenos, np.zeros((len(phenos), len(POSED_BONES), 3)))
        return np.linalg.norm(out.joints[:, 12] - out.joints[:, 0], axis=1)

    def _camera(
        self, rng: np.random.Generator, centred: list[np.ndarray],
        distance: tuple[float, float] = CAMERA_DISTANCE_M,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Full-frame intrinsics and the position of the hands' centre in the camera frame
        (``distance`` away, further when they do not fit), chosen so every vertex projects
        inside the full frame."""
        w, h = FULL_FRAME
        f = rng.uniform(480, 720)
        K = np.array(
            [[f, 0, w / 2 + rng.normal(0, 4)], [0, f, h / 2 + rng.normal(0, 4)], [0, 0, 1]]
        )
        pts = np.concatenate(centred)
        z = rng.uniform(*distance)
        for _ in range(50):
            # A random image position for the centre, shrunk toward the middle until it fits.
            target = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
            for shrink in np.linspace(1.0, 0.0, 6):
                uv = K[:2, 2] + shrink * (target - K[:2, 2])
                t = np.array([(uv[0] - K[0, 2]) * z / f, (uv[1] - K[1, 2]) * z / f, z])
                cam = pts + t
                if cam[:, 2].min() < 0.1:
                    continue
                proj = project_points(cam, K)
                if (
                    (proj >= 2).all()
                    and (proj[:, 0] <= w - 2).all()
                    and (proj[:, 1] <= h - 2).all()
                ):
                    return K, t
            z = min(z * 1.15, 2.0)  # too big for the frame at this distance: step back
        raise RuntimeError("could not fit the hands into the camera frame")

    def _skin_cue_factors(self, tone: np.ndarray) -> np.ndarray:
        """``[V, 3]`` colour factors on ``tone``: lighter palm skin and nails (``skin_cues``)."""
        palm = self.hand.palm_weight[:, None] * PALM_BLEND
        nail = self.hand.nail_weight[:, None]
        colour = tone * (1 - palm) + PALM_TONE * palm
        colour = colour * (1 - nail) + NAIL_TONE * nail
        return colour / np.maximum(tone, 1e-3)

    def _images(
        self,
        rng: np.random.Generator,
        verts: list[np.ndarray],
        present: np.ndarray,
        K_full: np.ndarray,
        joints: list[np.ndarray] | None = None,
        rrng: np.random.Generator | None = None,
        info: dict | None = None,
    ) -> dict[str, np.ndarray]:
        """Render the crop (and optionally the full frame) of the posed hands; with the realism
        stream ``rrng``, arms, fine skin detail, photo backgrounds, light with shadows and camera
        effects too (:mod:`.realism`)."""
        size = self.image_size
        visible = np.concatenate([verts[h] for h in range(2) if present[h]])
        centre, side = crop_square(project_points(visible, K_full))
        centre = centre + rng.normal(0, 0.03 * side, 2)
        K_crop = crop_intrinsics(K_full, centre - side / 2, side, size)
        person_tone = SKIN_TONES[rng.integers(len(SKIN_TONES))]
        meshes = []
        tones: dict[int, np.ndarray] = {}
        for h in range(2):
            if present[h]:
                tone = np.clip(person_tone * rng.uniform(0.93, 1.07, 3), 0, 1)
                jitter = vertex_color_jitter(rng, verts[h])
                if self.skin_cues:
                    jitter = jitter * self._skin_cue_factors(tone)
                if rrng is not None:  # fine albedo variation: pores, freckles, veins (~8 mm)
                    jitter = jitter * vertex_color_jitter(rrng, verts[h], 0.04, 0.008)
                meshes.append((verts[h], self.faces[h], tone, jitter))
                tones[h] = tone
        record: dict = {}
        if rrng is not None and joints is not None:
            for h in np.flatnonzero(present):
                arm, record[f"arm_{h}"] = arm_meshes(joints[h], rrng, tones[int(h)])
                meshes += arm
        lights = self._lights(rng)  # drawn with realism too: the stream stays the plain one's
        ambient = float(rng.uniform(0.15, 0.4))
        shading: dict = {}
        if rrng is not None:
            lights, ambient, shading, record["light"] = scene_lights(rrng)
        # Render at the resolution the camera really has over the crop, then resample to the
        # crop size: far hands look as soft as they would in a real frame.
        res = int(np.clip(np.ceil(side), 48, size))
        K_res = K_crop.copy()
        K_res[:2] *= res / size
        # the procedural backgrounds are drawn even when a photograph replaces them: skipping
        # the draw would shift the scene's random stream, and with it the occupancy samples
        bg = random_background(rng, res, res)
        photo = rrng is not None and self.backgrounds is not None and len(self.backgrounds) > 0
        if photo and rrng.random() < PHOTO_SHARE:
            bg, record["background_crop"] = self.backgrounds.sample(rrng, res, res)
        crop = self.renderer.render(
            meshes, K_res, res, res, background=bg, lights=lights, ambient=ambient, **shading
        )
        rgb = crop.rgb
        if res != size:
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
        if rrng is not None:
            rgb, record["camera_crop"] = camera_effects(rgb, rrng)
        out = {"image": rgb, "K": K_crop.astype(np.float32)}
        if self.full_frame:
            w, h = FULL_FRAME
            bg_full = random_background(rng, w, h)
            if photo and rrng.random() < PHOTO_SHARE:
                bg_full, record["background"] = self.backgrounds.sample(rrng, w, h)
            full = self.renderer.render(
                meshes, K_full, w, h, background=bg_full, lights=lights, ambient=ambient,
                **shading,
            )  # fmt: skip
            rgb_full = full.rgb
            if rrng is not None:
                rgb_full, record["camera"] = camera_effects(rgb_full, rrng)
            out.update(image_full=rgb_full, K_full=K_full.astype(np.float32),
                       depth_full=np.ascontiguousarray(full.depth, dtype=np.float32))  # fmt: skip
        if info is not None and record:
            info["realism"] = record
        return out

    @staticmethod
    def _lights(rng: np.random.Generator) -> list[Light]:
        lights = []
        for i in range(int(rng.integers(1, 4))):
            d = rng.normal(0, 1, 3)
            d[2] = abs(d[2]) + 0.5  # mostly from the camera side
            colour = np.clip(1 + rng.normal(0, 0.08, 3), 0.7, 1.0)
            strength = rng.uniform(0.5, 0.9) if i == 0 else rng.uniform(0.1, 0.4)
            lights.append(
                Light(
                    direction=tuple(d / np.linalg.norm(d)),
                    color=tuple(colour),
                    intensity=float(strength),
                )
            )
        return lights
