"""A contact sheet of a dataset: each scene's crop with its keypoints drawn, beside its GT meshes
seen from a second viewpoint (a quarter turn around the hands), left hand blue, right orange."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy.spatial.transform import Rotation

from im2hands_model.data.render import Renderer
from im2hands_model.data.shards import ShardDataset
from im2hands_model.hands import HAND_COLOURS, SKELETON_EDGES


def draw_keypoints(image: np.ndarray, joints_2d: np.ndarray, present: np.ndarray) -> Image.Image:
    """The image with each present hand's skeleton drawn on it."""
    img = Image.fromarray(image)
    draw = ImageDraw.Draw(img)
    for h in range(2):
        if not present[h]:
            continue
        colour = HAND_COLOURS[h]
        pts = joints_2d[h]
        for a, b in SKELETON_EDGES:
            draw.line([tuple(pts[a]), tuple(pts[b])], fill=colour, width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(255, 255, 255), outline=colour)
    return img


def side_view(
    renderer: Renderer, vertices: np.ndarray, faces: np.ndarray, present: np.ndarray, size: int
) -> np.ndarray:
    """Render the present hands turned 90 degrees about the vertical axis through their centre."""
    visible = np.concatenate([vertices[h] for h in range(2) if present[h]])
    centre = visible.mean(0)
    turn = Rotation.from_euler("y", 90, degrees=True).as_matrix()
    radius = np.linalg.norm(visible - centre, axis=1).max()
    f = 1.2 * size
    dist = radius * f / (0.45 * size)
    K = np.array([[f, 0, size / 2], [0, f, size / 2], [0, 0, 1]])
    meshes = [
        ((vertices[h] - centre) @ turn.T + [0, 0, dist], faces[h], np.array(HAND_COLOURS[h]) / 255)
        for h in range(2)
        if present[h]
    ]
    return renderer.render(meshes, K, size, size, background=(235, 235, 235)).rgb


def make_contact_sheet(
    dataset_dir: str | Path, out_path: str | Path, max_scenes: int = 16, columns: int = 4
) -> Path:
    """Write a PNG contact sheet of the first ``max_scenes`` scenes; returns its path."""
    ds = ShardDataset(dataset_dir, keys=["image", "joints_2d", "hand_present", "vertices"])
    n = min(max_scenes, len(ds))
    faces = ds.faces.numpy()
    tiles = []
    with Renderer() as renderer:
        for i in range(n):
            item = ds[i]
            image = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            present = item["hand_present"].numpy()
            left = draw_keypoints(image, item["joints_2d"].numpy(), present)
            right = side_view(
                renderer,
                item["vertices"].numpy().astype(np.float64),
                faces,
                present,
                image.shape[0],
            )
            tiles.append(np.concatenate([np.asarray(left), right], axis=1))
    rows = [tiles[i : i + columns] for i in range(0, n, columns)]
    blank = np.zeros_like(tiles[0])
    sheet = np.concatenate(
        [np.concatenate(r + [blank] * (columns - len(r)), axis=1) for r in rows], axis=0
    )
    out_path = Path(out_path)
    Image.fromarray(sheet).save(out_path)
    return out_path
