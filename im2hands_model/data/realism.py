"""What makes a render look like a camera image: forearms, photo backgrounds, camera effects.

Used by :class:`~im2hands_model.data.synthetic.SceneGenerator` with ``realism=True``. Every effect
draws its parameters from its own random stream (:func:`realism_rng`), so a scene's hands, poses
and camera are the same with and without realism -- the two renders of one scene can be compared
directly -- and each scene records what was drawn (``Scene.info["realism"]``).

* **Forearms** (:func:`forearm_meshes`): a tapered tube of elliptic section from inside the
  wrist along the forearm's direction (wrist away from the middle-finger base, turned by a few
  degrees), capped at the elbow end, as wide as the palm at the wrist; part of it may be a sleeve
  of a random colour. A stand-in for Anny's full body (its arm mesh is not separable from the
  hand rig in ``anny==0.6.2``'s hand topology); labels, keypoints and contacts stay the hands'.
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

from im2hands_model.data.render import vertex_color_jitter

__all__ = [
    "BACKGROUND_DIRS",
    "PhotoBackgrounds",
    "camera_effects",
    "forearm_meshes",
    "realism_rng",
]

#: Folders searched for background photographs (``IM2HANDS_BACKGROUNDS``: ``:``-separated list).
BACKGROUND_DIRS: tuple[str, ...] = ("/usr/share/backgrounds/mate/nature",)
#: Longest side the photographs are kept at in memory, pixels.
_PHOTO_SIDE = 720


def realism_rng(seed: int, index: int) -> np.random.Generator:
    """The realism stream of scene ``index`` of a dataset made with ``seed`` (independent of the
    scene's geometry stream)."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(index), 0x5EA1]))


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


def forearm_meshes(
    joints: np.ndarray, rng: np.random.Generator, skin: np.ndarray
) -> tuple[list[tuple[Any, ...]], dict[str, Any]]:
    """Renderer meshes of one hand's forearm (skin, and a sleeve part), and what was drawn.

    Args:
        joints: ``[21, 3]`` the hand's joints, camera frame (metres).
        rng: the realism stream.
        skin: RGB skin tone of the hand (display values in [0, 1]).
    """
    j = np.asarray(joints, np.float64)
    axis = _unit(j[0] - j[9])  # from the hand toward the elbow
    width = float(np.linalg.norm(j[5] - j[17]))
    across = j[5] - j[17]
    across = _unit(across - axis * float(across @ axis))
    depth_dir = np.cross(axis, across)
    bend = math.radians(float(rng.uniform(-15, 15)))
    tilt = math.radians(float(rng.uniform(-10, 10)))
    end_dir = _unit(axis + math.tan(bend) * across + math.tan(tilt) * depth_dir)
    length = float(rng.uniform(0.18, 0.30))
    start = j[0] + 0.012 * _unit(j[9] - j[0])  # begins inside the wrist: no gap
    m = 10
    s = np.linspace(0.0, 1.0, m)
    # the axis bends smoothly from the wrist's direction to the elbow's
    dirs = np.stack([_unit((1 - t) * axis + t * end_dir) for t in s])
    centres = start + np.cumsum(np.vstack([np.zeros(3), dirs[:-1]]) * (length / (m - 1)), 0)
    a_axes = np.stack([_unit(across - d * float(across @ d)) for d in dirs])
    b_axes = np.cross(dirs, a_axes)
    r_wrist = 0.5 * width * float(rng.uniform(0.72, 0.85))
    grow = float(rng.uniform(1.15, 1.45))
    radii = np.stack([r_wrist * (1 + (grow - 1) * s ** 1.5),
                      r_wrist * 0.68 * (1 + (grow - 1) * 1.1 * s ** 1.5)], 1)  # fmt: skip
    record: dict[str, Any] = {"length_m": length, "bend_deg": math.degrees(bend)}
    sleeve_at = float(rng.uniform(0.25, 0.85)) if rng.random() < 0.6 else 1.0
    cut = max(2, int(round(sleeve_at * (m - 1))) + 1)
    meshes = []
    verts, faces = _tube(centres[:cut], a_axes[:cut], b_axes[:cut], radii[:cut], 20,
                         cap_end=cut == m)  # fmt: skip
    meshes.append((verts, faces, np.clip(skin * rng.uniform(0.95, 1.03, 3), 0, 1),
                   vertex_color_jitter(rng, verts, 0.05)))  # fmt: skip
    if cut < m:
        sleeve = np.clip(rng.uniform(0.05, 0.95, 3) ** rng.uniform(0.6, 1.6), 0, 1)
        sl = slice(cut - 1, m)
        verts, faces = _tube(centres[sl], a_axes[sl], b_axes[sl], radii[sl] * 1.12, 20, True)
        meshes.append((verts, faces, sleeve, vertex_color_jitter(rng, verts, 0.08, 0.05)))
        record["sleeve"] = {"from": sleeve_at, "rgb": sleeve.round(3).tolist()}
    return meshes, record


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
