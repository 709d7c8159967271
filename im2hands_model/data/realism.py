"""What makes a render look like a camera image: forearms, photo backgrounds, camera effects.

Used by :class:`~im2hands_model.data.synthetic.SceneGenerator` with ``realism=True``. Every effect
draws its parameters from its own random stream (:func:`realism_rng`), so a scene's hands, poses
and camera are the same with and without realism -- the two renders of one scene can be compared
directly -- and each scene records what was drawn (``Scene.info["realism"]``).

* **Views** (:func:`body_view`): hands held by a person in front of the camera, arms entering
  the frame from below or a side, 0.25-0.9 m away; some scenes from any view.
* **Arms** (:func:`arm_meshes`): forearm, elbow and upper arm as tapered tubes, with sleeves of
  random colour and length. A stand-in for Anny's full body (its arm mesh is not separable from
  the hand rig in ``anny==0.6.2``'s hand topology); labels, keypoints and contacts stay the
  hands'.
* **Backgrounds** (:class:`PhotoBackgrounds`): real photographs from Debian packages installed by
  the set-up (``mate-backgrounds``: its ``nature`` photographs, GPL-2+, credited in
  ``docs/render_realism.md``), randomly cropped, scaled, flipped and toned; the procedural
  backgrounds remain as a fallback and for variety.
* **Camera** (:func:`camera_effects`): exposure, white balance, vignetting, defocus or motion
  blur, signal-dependent sensor noise, JPEG compression and occasional greyscale, in that order
  (the order of a camera's pipeline).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from im2hands_model.data.render import Light, vertex_color_jitter

__all__ = [
    "BACKGROUND_DIRS",
    "BODY_VIEW_SHARE",
    "CAMERA_DISTANCE_M",
    "PhotoBackgrounds",
    "body_view",
    "camera_effects",
    "depth_camera",
    "depth_rng",
    "light_colour",
    "arm_meshes",
    "realism_rng",
    "scene_lights",
]

#: Folders searched for background photographs (``IM2HANDS_BACKGROUNDS``: ``:``-separated list).
BACKGROUND_DIRS: tuple[str, ...] = ("/usr/share/backgrounds/mate/nature",)
#: Share of scenes seen from a body-anchored view (:func:`body_view`); the rest from any view.
BODY_VIEW_SHARE = 0.85
#: Camera to hands' centre, metres: arm's length down to a close-up (the plain renders: 0.3-0.9).
CAMERA_DISTANCE_M = (0.25, 0.9)
#: Share of backgrounds that are photographs (the rest procedural, for variety).
PHOTO_SHARE = 0.9
#: Longest side the photographs are kept at in memory, pixels.
_PHOTO_SIDE = 720


def realism_rng(seed: int, index: int) -> np.random.Generator:
    """The realism stream of scene ``index`` of a dataset made with ``seed`` (independent of the
    scene's geometry stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EA1]))


# ------------------------------------------------------------------------------------ views
def _forearm_direction(joints: np.ndarray) -> np.ndarray:
    """Unit direction from the wrist toward the elbow: away from the middle finger's base."""
    return _unit(np.asarray(joints[0], np.float64) - np.asarray(joints[9], np.float64))


def body_view(
    rng: np.random.Generator, joints: list[np.ndarray], tries: int = 64
) -> tuple[np.ndarray, dict[str, Any]]:
    """A global rotation for hands that belong to a person in front of the camera, and its record.

    In photographs the arms come from the body: into the frame from below or from a side, rarely
    from the top, and seldom straight along the optical axis. With probability
    :data:`BODY_VIEW_SHARE` the rotation is drawn until every hand's forearm (camera frame: x
    right, y down, z forward) points no higher than slightly up (``y > -0.1``) and at most ~53°
    from the image plane (``|z| < 0.8``); else (and for the few layouts with no such view in
    ``tries`` draws: the best one) any rotation.

    Args:
        rng: the realism stream.
        joints: ``[21, 3]`` joints of each visible hand in the layout's frame.
    """
    from scipy.spatial.transform import Rotation

    dirs = np.stack([_forearm_direction(j) for j in joints])
    if rng.random() >= BODY_VIEW_SHARE:
        return Rotation.random(random_state=rng).as_matrix(), {"view": "any"}
    best, best_margin, used = np.eye(3), -np.inf, 0
    while used < tries and best_margin <= 0:
        R = Rotation.random(random_state=rng).as_matrix()
        d = dirs @ R.T
        margin = float(min((d[:, 1] + 0.1).min(), (0.8 - np.abs(d[:, 2])).min()))
        used += 1
        if margin > best_margin:
            best, best_margin = R, margin
    return best, {"view": "body", "tries": used, "fits": best_margin > 0}


# ------------------------------------------------------------------------------------ forearms
def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _tube(centres: np.ndarray, axes_a: np.ndarray, axes_b: np.ndarray, radii: np.ndarray,
          sides: int, cap_end: bool) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Vertices and faces of a tube through ``centres`` with elliptic rings (radii ``[M, 2]``)."""
    angles = np.linspace(0.0, 2.0 * math.pi, sides, endpoint=False)
    ring = np.stack([np.cos(angles), np.sin(angles)], 1)  # [S, 2]
    verts = (centres[:, None, :]
             + ring[None, :, 0:1] * radii[:, None, 0:1] * axes_a[:, None, :]
             + ring[None, :, 1:2] * radii[:, None, 1:2] * axes_b[:, None, :])  # fmt: skip
    verts = verts.reshape(-1, 3)
    faces = []
    m = len(centres)
    for i in range(m - 1):
        for k in range(sides):
            a, b = i * sides + k, i * sides + (k + 1) % sides
            c, d = a + sides, b + sides
            faces += [(a, c, b), (b, c, d)]
    if cap_end:
        tip = len(verts)
        verts = np.vstack([verts, centres[-1]])
        base = (m - 1) * sides
        faces += [(base + k, tip, base + (k + 1) % sides) for k in range(sides)]
    return verts, np.asarray(faces, np.int64)


#: Colour variation of cloth (strength, wavelength in metres): folds and weave.
CLOTH = (0.08, 0.05)


def _bent_axis(start: np.ndarray, d0: np.ndarray, d1: np.ndarray, length: float, m: int
               ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``m`` ring centres from ``start`` along a direction bending smoothly from ``d0`` to ``d1``,
    and the direction at each."""
    s = np.linspace(0.0, 1.0, m)
    dirs = np.stack([_unit((1 - t) * d0 + t * d1) for t in s])
    steps = np.vstack([np.zeros(3), dirs[:-1]]) * (length / (m - 1))
    return start + np.cumsum(steps, 0), dirs


def _frames(dirs: np.ndarray, across: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-ring section axes: ``across`` made orthogonal to each direction, and their cross."""
    a = np.stack([_unit(across - d * float(across @ d)) for d in dirs])
    return a, np.cross(dirs, a)


def _part(centres: np.ndarray, dirs: np.ndarray, across: np.ndarray, radii: np.ndarray,
          rgb: np.ndarray, rng: np.random.Generator, cap_end: bool,
          jitter: tuple[float, float] = (0.05, 0.03)) -> tuple[Any, ...]:  # fmt: skip
    """One renderer mesh of an arm: a tube along ``centres`` with ``(strength, scale)`` colour
    variation (:func:`vertex_color_jitter`)."""
    a, b = _frames(dirs, across)
    verts, faces = _tube(centres, a, b, radii, 20, cap_end)
    return verts, faces, rgb, vertex_color_jitter(rng, verts, *jitter)


def arm_meshes(
    joints: np.ndarray, rng: np.random.Generator, skin: np.ndarray
) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """Renderer meshes of one hand's arm (forearm, sleeve, upper arm), and what was drawn.

    The forearm is a tapered tube of elliptic section from inside the wrist, away from the
    middle finger's base and bent by a few degrees, as wide as the palm at the wrist. At the
    elbow the upper arm (usually in a shirt's sleeve) turns by 20-100° toward a body below and
    behind the hands, long enough to leave the frame at most distances.

    Args:
        joints: ``[21, 3]`` the hand's joints, camera frame (metres; y down, z forward).
        rng: the realism stream.
        skin: RGB skin tone of the hand (display values in [0, 1]).
    """
    j = np.asarray(joints, np.float64)
    axis = _forearm_direction(j)
    width = float(np.linalg.norm(j[5] - j[17]))
    across = j[5] - j[17]
    across = _unit(across - axis * float(across @ axis))
    depth_dir = np.cross(axis, across)
    bend = math.radians(float(rng.uniform(-15, 15)))
    tilt = math.radians(float(rng.uniform(-10, 10)))
    end_dir = _unit(axis + math.tan(bend) * across + math.tan(tilt) * depth_dir)
    length = float(rng.uniform(0.18, 0.30))
    start = j[0] - 0.012 * axis  # begins inside the wrist: no gap
    m = 10
    centres, dirs = _bent_axis(start, axis, end_dir, length, m)
    s = np.linspace(0.0, 1.0, m)
    r_wrist = 0.5 * width * float(rng.uniform(0.72, 0.85))
    grow = float(rng.uniform(1.15, 1.45))
    radii = np.stack([r_wrist * (1 + (grow - 1) * s ** 1.5),
                      r_wrist * 0.68 * (1 + (grow - 1) * 1.1 * s ** 1.5)], 1)  # fmt: skip
    record: dict[str, Any] = {"length_m": length, "bend_deg": math.degrees(bend)}
    arm_skin = np.clip(skin * rng.uniform(0.95, 1.03, 3), 0, 1)
    sleeve = np.clip(rng.uniform(0.05, 0.95, 3) ** rng.uniform(0.6, 1.6), 0, 1)
    sleeve_at = float(rng.uniform(0.25, 0.85)) if rng.random() < 0.6 else 1.0
    cut = max(2, int(round(sleeve_at * (m - 1))) + 1)
    meshes = [_part(centres[:cut], dirs[:cut], across, radii[:cut], arm_skin, rng, cut == m)]
    if cut < m:
        sl = slice(cut - 1, m)
        meshes.append(_part(centres[sl], dirs[sl], across, radii[sl] * 1.12, sleeve, rng, True,
                            CLOTH))  # fmt: skip
        record["sleeve"] = {"from": sleeve_at, "rgb": sleeve.round(3).tolist()}
    # the upper arm, toward a shoulder below and behind the hands
    toward_body = np.array([rng.normal(0.0, 0.5), 1.0, 0.6])
    perp = toward_body - end_dir * float(toward_body @ end_dir)
    perp = _unit(perp) if np.linalg.norm(perp) > 1e-6 else across
    elbow = math.radians(float(rng.uniform(20, 100)))
    up_dir = _unit(math.cos(elbow) * end_dir + math.sin(elbow) * perp)
    up_len = float(rng.uniform(0.24, 0.32))
    up_centres, up_dirs = _bent_axis(centres[-1] - 0.02 * end_dir, end_dir, up_dir, up_len, 6)
    t = np.linspace(0.0, 1.0, 6)[:, None]
    up_radii = radii[-1] * (1 + float(rng.uniform(0.05, 0.3)) * t)
    sleeved = cut < m or rng.random() < 0.8  # a long sleeve, else a shirt's short sleeve
    if sleeved:
        up_radii = up_radii * 1.12
    meshes.append(_part(up_centres, up_dirs, across, up_radii, sleeve if sleeved else arm_skin,
                        rng, True, CLOTH if sleeved else (0.05, 0.03)))  # fmt: skip
    record["upper_arm"] = {"elbow_deg": math.degrees(elbow), "length_m": up_len,
                           "sleeve": bool(sleeved)}  # fmt: skip
    return meshes, record


# ------------------------------------------------------------------------------------ light
#: Light colour (linear RGB, green = 1) from warm tungsten (2700 K) to overcast daylight (6500 K).
_KELVIN = np.array([2700.0, 3500.0, 4500.0, 5500.0, 6500.0])
_KELVIN_RGB = np.array([[1.0, 0.71, 0.42], [1.0, 0.80, 0.60], [1.0, 0.89, 0.79],
                        [1.0, 0.96, 0.92], [0.95, 0.97, 1.0]])  # fmt: skip


def light_colour(kelvin: float) -> np.ndarray:
    """Approximate linear RGB of a light of colour temperature ``kelvin`` (2700-6500 K)."""
    return np.array([np.interp(kelvin, _KELVIN, _KELVIN_RGB[:, c]) for c in range(3)])


def _direction(rng: np.random.Generator, from_behind: bool) -> tuple[float, float, float]:
    """A travel direction: mostly from above and the camera side (``from_behind``: toward it)."""
    d = rng.normal(0.0, 1.0, 3)
    d[1] = abs(d[1]) * 0.8 + 0.2  # travels downward: light from above
    d[2] = -(abs(d[2]) + 0.8) if from_behind else abs(d[2]) + 0.3
    return tuple(float(x) for x in _unit(d))


def scene_lights(rng: np.random.Generator) -> tuple[list[Light], np.ndarray, dict[str, Any],
                                                     dict[str, Any]]:  # fmt: skip
    """Key, fill and ambient light of a room or of daylight, with skin's shading parameters.

    A key light of random direction (mostly from above and the camera side), colour temperature
    and strength, casting soft shadows (of one hand on the other, of fingers on the palm); a
    weaker fill of another temperature; a tinted ambient. 15 % of scenes have
    hard light (a strong key, little fill and ambient), 10 % a backlight (the key from behind the
    hands, a rim of light around them). Returns the lights, the ambient RGB, the renderer's
    ``specular`` / ``shininess`` / ``wrap`` / shadow settings and the record.
    """
    kind = rng.choice(["soft", "hard", "back"], p=[0.75, 0.15, 0.10])
    key_k, fill_k = float(rng.uniform(2700, 6500)), float(rng.uniform(2700, 6500))
    key_strength = {"soft": rng.uniform(0.55, 0.95), "hard": rng.uniform(1.0, 1.4),
                    "back": rng.uniform(0.9, 1.4)}[kind]  # fmt: skip
    fill_strength = rng.uniform(0.05, 0.15) if kind == "hard" else rng.uniform(0.15, 0.4)
    ambient_strength = rng.uniform(0.05, 0.15) if kind == "hard" else rng.uniform(0.15, 0.35)
    if kind == "back":
        ambient_strength += 0.1  # the camera still sees the hands: light bounced off the room
    lights = [Light(_direction(rng, kind == "back"), tuple(light_colour(key_k)),
                    float(key_strength)),
              Light(_direction(rng, False), tuple(light_colour(fill_k)), float(fill_strength))]
    ambient = light_colour(float(rng.uniform(3500, 6500))) * ambient_strength
    softness = rng.uniform(0.002, 0.005) if kind == "hard" else rng.uniform(0.005, 0.015)
    shading = {"specular": float(rng.uniform(0.05, 0.25)),
               "shininess": float(rng.uniform(10.0, 40.0)),
               "wrap": float(rng.uniform(0.1, 0.4)),
               "shadow_softness_m": float(softness)}  # fmt: skip
    record = {"kind": str(kind), "key_kelvin": round(key_k), "key": round(float(key_strength), 3),
              "fill": round(float(fill_strength), 3),
              **{k: round(v, 4) for k, v in shading.items()}}  # fmt: skip
    shading["shadows"] = True
    return lights, ambient, shading, record


# ------------------------------------------------------------------------------------ backgrounds
class PhotoBackgrounds:
    """Background photographs from the installed Debian packages (module docstring).

    Args:
        folders: where to look (default ``$IM2HANDS_BACKGROUNDS`` or :data:`BACKGROUND_DIRS`).
    """

    def __init__(self, folders: list[str] | None = None) -> None:
        if folders is None:
            env = os.environ.get("IM2HANDS_BACKGROUNDS")
            folders = env.split(":") if env else list(BACKGROUND_DIRS)
        self.paths = sorted(p for f in folders if Path(f).is_dir() for p in Path(f).iterdir()
                            if p.suffix.lower() in (".jpg", ".jpeg", ".png"))  # fmt: skip
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.paths)

    def _photo(self, i: int) -> np.ndarray:
        if i not in self._cache:
            from PIL import Image

            with Image.open(self.paths[i]) as im:
                im.draft("RGB", (_PHOTO_SIDE, _PHOTO_SIDE))  # JPEG: decode at reduced size
                im = im.convert("RGB")
                im.thumbnail((_PHOTO_SIDE, _PHOTO_SIDE))
                self._cache[i] = np.asarray(im)
        return self._cache[i]

    def sample(self, rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, dict]:
        """A random ``uint8 [height, width, 3]`` view of a random photograph, and its record."""
        i = int(rng.integers(len(self.paths)))
        photo = self._photo(i)
        ph, pw = photo.shape[:2]
        aspect = width / height
        scale = float(rng.uniform(0.5, 1.0))
        cw = min(pw, int(round(min(pw, ph * aspect) * scale)))
        ch = min(ph, max(1, int(round(cw / aspect))))
        x0 = int(rng.integers(0, pw - cw + 1))
        y0 = int(rng.integers(0, ph - ch + 1))
        view = photo[y0 : y0 + ch, x0 : x0 + cw]
        if rng.random() < 0.5:
            view = view[:, ::-1]
        if rng.random() < 0.25:
            view = view[::-1]
        out = cv2.resize(np.ascontiguousarray(view), (width, height), interpolation=cv2.INTER_AREA)
        gain = rng.uniform(0.55, 1.15) * rng.uniform(0.9, 1.1, 3)
        out = np.clip(out.astype(np.float32) * gain, 0, 255).astype(np.uint8)
        return out, {"photo": self.paths[i].name, "crop": [x0, y0, cw, ch]}


# ------------------------------------------------------------------------------------ camera
def camera_effects(rgb: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A rendered ``uint8 [H, W, 3]`` image through a random consumer camera, and its record."""
    img = rgb.astype(np.float32) / 255.0
    h, w = img.shape[:2]
    rec: dict[str, Any] = {}
    exposure = float(2.0 ** rng.normal(0.0, 0.35))
    kelvin_shift = rng.normal(0.0, 0.06)
    balance = np.array([1 + kelvin_shift, 1.0, 1 - kelvin_shift], np.float32)
    img = img * exposure * balance
    rec.update(exposure=exposure, white_balance=balance.round(3).tolist())
    if rng.random() < 0.6:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r2 = ((xx - w / 2) ** 2 + (yy - h / 2) ** 2) / (0.25 * (w * w + h * h))
        strength = float(rng.uniform(0.1, 0.45))
        img = img * (1 - strength * r2)[..., None]
        rec["vignetting"] = strength
    img = np.clip(img, 0.0, 1.0)
    blur = rng.random()
    if blur < 0.3:
        sigma = float(rng.uniform(0.4, 1.6)) * max(h, w) / 640
        img = cv2.GaussianBlur(img, (0, 0), sigma)
        rec["defocus_sigma_px"] = sigma
    elif blur < 0.45:
        length = int(rng.integers(3, 10))
        angle = float(rng.uniform(0, 180))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2] = 1.0 / length
        M = cv2.getRotationMatrix2D((length / 2 - 0.5, length / 2 - 0.5), angle, 1.0)
        kernel = cv2.warpAffine(kernel, M, (length, length))
        img = cv2.filter2D(img, -1, kernel / max(float(kernel.sum()), 1e-6))
        rec["motion_blur"] = {"px": length, "deg": angle}
    read, shot = float(rng.uniform(0.002, 0.02)), float(rng.uniform(0.0, 0.03))
    noise = rng.standard_normal(img.shape).astype(np.float32)
    img = img + noise * np.sqrt(read ** 2 + shot ** 2 * img)
    rec["noise"] = {"read": read, "shot": shot}
    out = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    if rng.random() < 0.05:
        grey = cv2.cvtColor(out, cv2.COLOR_RGB2GRAY)
        out = np.repeat(grey[..., None], 3, axis=2)
        rec["greyscale"] = True
    if rng.random() < 0.7:
        quality = int(rng.integers(35, 95))
        ok, buf = cv2.imencode(".jpg", cv2.cvtColor(out, cv2.COLOR_RGB2BGR),
                               [cv2.IMWRITE_JPEG_QUALITY, quality])  # fmt: skip
        if ok:
            out = cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
            rec["jpeg_quality"] = quality
    return out, rec


# ------------------------------------------------------------------------------------ depth
def depth_rng(seed: int, index: int) -> np.random.Generator:
    """The depth camera's stream of scene ``index`` of a dataset made with ``seed``."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0xDE97]))


def depth_camera(depth: np.ndarray, K: np.ndarray, rng: np.random.Generator
                 ) -> tuple[np.ndarray, dict[str, Any]]:  # fmt: skip
    """A rendered metric depth image (``float32 [H, W]`` metres, 0 = nothing) as a consumer
    active-stereo camera would measure it, and what was drawn.

    In that order: no measurement nearer than the camera's minimum range; disparity quantised to
    a sub-pixel step (depth steps growing with z²) with Gaussian disparity noise; holes along
    depth edges (the projector's shadow and mixed pixels), a few small dropout blobs. The
    baseline, sub-pixel step and noise are drawn per frame from the range of RealSense-like
    cameras.
    """
    z = np.asarray(depth, np.float32)
    h, w = z.shape
    f = float(np.asarray(K)[0, 0])
    baseline = float(rng.uniform(0.04, 0.06))
    step = float(rng.choice([1 / 8, 1 / 16, 1 / 32]))  # disparity sub-pixel resolution
    sigma = float(rng.uniform(0.04, 0.12))  # disparity noise, pixels
    min_z = float(rng.uniform(0.15, 0.28))
    valid = z > min_z
    disparity = np.where(valid, f * baseline / np.maximum(z, 1e-6), 0.0).astype(np.float32)
    disparity += rng.standard_normal(z.shape).astype(np.float32) * sigma
    disparity = np.round(disparity / step) * step
    out = np.where(valid & (disparity > 0), f * baseline / np.maximum(disparity, 1e-6), 0.0)
    # edges: where the depth jumps by more than a few cm, some pixels around the jump are lost
    jump = float(rng.uniform(0.02, 0.05))
    gx = np.abs(np.diff(z, axis=1, prepend=z[:, :1]))
    gy = np.abs(np.diff(z, axis=0, prepend=z[:1]))
    edges = ((gx > jump) | (gy > jump)).astype(np.uint8)
    radius = int(rng.integers(1, 4))
    edges = cv2.dilate(edges, np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)) > 0
    lost = edges & (rng.random(z.shape) < float(rng.uniform(0.5, 0.9)))
    blobs = int(rng.integers(0, 6))
    holes = np.zeros((h, w), np.uint8)
    for _ in range(blobs):
        c = (int(rng.integers(w)), int(rng.integers(h)))
        axes = (int(rng.integers(2, 12)), int(rng.integers(2, 12)))
        cv2.ellipse(holes, c, axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
    out[lost | (holes > 0)] = 0.0
    record = {"baseline_m": round(baseline, 4), "subpixel": step, "sigma_px": round(sigma, 3),
              "min_z_m": round(min_z, 3), "edge_radius_px": radius, "blobs": blobs}  # fmt: skip
    return out.astype(np.float32), record
