"""A picture of a reconstruction: the meshes drawn over the input image (``overlay.png``).

The meshes are rendered headlessly through the image's own intrinsics (moderngl/EGL, the
dataset's :class:`~im2hands_model.data.render.Renderer`) and blended over the photo, left hand
blue, right hand orange; keypoints and bones are drawn on top, and contact points (red: inside the
other hand, yellow: touching) on top of those.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from im2hands_model.hands import HAND_COLOURS, SKELETON_EDGES
from im2hands_model.pipeline.crop import project
from im2hands_model.pipeline.result import Reconstruction

__all__ = ["overlay"]

#: Longest side of the rendered overlay; larger images are drawn downscaled.
MAX_SIDE = 2048


def overlay(
    image: np.ndarray,
    K: np.ndarray,
    result: Reconstruction,
    alpha: float = 0.65,
    renderer: Any | None = None,
) -> np.ndarray:
    """``uint8 [H', W', 3]``: the reconstruction drawn over ``image`` (RGB uint8 ``[H, W, 3]``,
    intrinsics ``K``); images longer than :data:`MAX_SIDE` pixels are drawn downscaled."""
    img = np.asarray(image, dtype=np.uint8)
    K = np.asarray(K, dtype=np.float64).copy()
    scale = min(1.0, MAX_SIDE / max(img.shape[:2]))
    if scale < 1.0:
        size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
        img = np.asarray(Image.fromarray(img).resize(size, Image.Resampling.BILINEAR))
        K[:2] *= scale
    h, w = img.shape[:2]
    items = []
    for hand in result.hands:
        if hand is not None and hand.mesh is not None and len(hand.mesh.faces):
            colour = np.asarray(HAND_COLOURS[0 if hand.side == "left" else 1]) / 255.0
            items.append((np.asarray(hand.mesh.vertices), np.asarray(hand.mesh.faces), colour))
    out = img.copy()
    if items:
        own = renderer is None
        if own:
            from im2hands_model.data.render import Renderer

            renderer = Renderer(w, h)
        try:
            rendered = renderer.render(items, K, w, h, background=img)
        finally:
            if own:
                renderer.release()
        mask = rendered.mask >= 0
        blend = alpha * rendered.rgb.astype(np.float32) + (1 - alpha) * img.astype(np.float32)
        out[mask] = np.clip(blend[mask], 0, 255).astype(np.uint8)
    pic = Image.fromarray(out)
    draw = ImageDraw.Draw(pic)
    for hand in result.hands:
        if hand is None:
            continue
        colour = HAND_COLOURS[0 if hand.side == "left" else 1]
        uv = project(hand.keypoints, K)
        for a, b in SKELETON_EDGES:
            draw.line([tuple(uv[a]), tuple(uv[b])], fill=colour, width=2)
        for x, y in uv:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255), outline=colour)
    contacts = result.contacts
    for points, colour in (
        (contacts.touching_points, (255, 220, 0)),
        (contacts.penetrating_points, (230, 20, 20)),
    ):
        for pts in points:
            if len(pts):
                for x, y in project(np.asarray(pts), K):
                    draw.point((x, y), fill=colour)
    return np.asarray(pic)
