"""Where a keypoint predictor's heatmaps put their mass: a picture and two numbers.

    python training/recipes/predictor_heatmaps.py [--checkpoint RUN/best.pt] \
        [--data out/default/test] [--scenes 100] [--out out/predictor_heatmaps.jpg]

For every joint of every present hand in the first ``--scenes`` two-hand scenes it measures the
heatmap probability within 16 crop pixels of the joint, and within 16 pixels of the same joint
of the *other* hand. A predictor that knows which hand is which puts far more on the first; the
first CPU-trained one (``runs/default/kpts_pred/best.pt``) split its mass between the two, which
is why its soft-argmax joints sat between the hands. The same numbers with the two hands matched in
the better order per scene tell localisation apart from handedness (``model.free_slots`` networks
localise first and learn handedness separately). The picture shows, for three interacting
scenes, the wrist and index-tip heatmaps of each hand over the crop (green: that joint's ground
truth; magenta: the same joint of the other hand).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from im2hands_model.data.layouts import LAYOUTS  # noqa: E402
from im2hands_model.data.shards import ShardDataset  # noqa: E402
from im2hands_model.hands import JOINT_NAMES  # noqa: E402

RADIUS_PX = 16.0
SHOWN_JOINTS = (0, 8)  # wrist, index tip
INTERACTING = ("clasped", "crossed", "touching")


def _mass_near(prob: torch.Tensor, centre: torch.Tensor, stride: float) -> torch.Tensor:
    """Probability of ``prob`` ``[..., h, w]`` within RADIUS_PX of ``centre`` ``[..., 2]``."""
    h, w = prob.shape[-2:]
    v = (torch.arange(h, dtype=prob.dtype) + 0.5) * stride
    u = (torch.arange(w, dtype=prob.dtype) + 0.5) * stride
    d2 = (u - centre[..., 0:1])[..., None, :] ** 2 + (v - centre[..., 1:2])[..., :, None] ** 2
    return (prob * (d2 <= RADIUS_PX**2)).sum((-1, -2))


def _tile(image: np.ndarray, prob: np.ndarray, own: np.ndarray, other: np.ndarray) -> Image.Image:
    size = image.shape[0]
    heat = np.asarray(Image.fromarray(prob / max(prob.max(), 1e-12) * 255).convert("L")
                      .resize((size, size), Image.BILINEAR), np.float32) / 255.0  # fmt: skip
    glow = np.array([255.0, 230.0, 60.0])
    mixed = image * (1 - 0.75 * heat[..., None]) + glow * 0.75 * heat[..., None]
    pic = Image.fromarray(mixed.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    for (x, y), colour in ((own, (40, 220, 60)), (other, (230, 40, 230))):
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], outline=colour, width=2)
    return pic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="kpts_pred training checkpoint (default: shipped)")
    ap.add_argument("--data", default="out/default/test", help="dataset folder")
    ap.add_argument("--scenes", type=int, default=100, help="scenes to measure")
    ap.add_argument("--out", default="out/predictor_heatmaps.jpg", help="picture to write")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.checkpoint:
        from im2hands_model.training.stages.kpts_pred import load_keypoint_predictor

        net = load_keypoint_predictor(args.checkpoint)
    else:
        from im2hands_model.pretrained import load_pretrained

        net = load_pretrained("kpts_pred").eval()
    data = ShardDataset(args.data, keys=["image", "K", "joints_2d", "hand_present", "layout"])
    interacting = {LAYOUTS.index(n) for n in INTERACTING}
    own_mass, other_mass, rows = [], [], []
    for i in range(min(args.scenes, len(data))):
        item = data[i]
        if not bool(item["hand_present"].all()):
            continue
        with torch.no_grad():
            pred = net(item["image"][None], item["K"][None])
        prob = pred.heatmaps[0]  # [2, 21, h, w]
        gt = item["joints_2d"]  # [2, 21, 2]
        stride = float(pred.features.stride)
        own_mass.append(_mass_near(prob, gt, stride).mean())
        other_mass.append(_mass_near(prob, gt[[1, 0]], stride).mean())
        if len(rows) < 3 and int(item["layout"]) in interacting:
            image = item["image"].permute(1, 2, 0).numpy() * 255.0
            tiles = [
                _tile(image, prob[h, j].numpy(), gt[h, j].numpy(), gt[1 - h, j].numpy())
                for j in SHOWN_JOINTS
                for h in range(2)
            ]
            rows.append([Image.fromarray(image.astype(np.uint8)), *tiles])
    if not own_mass:
        print(f"no two-hand scenes among the first {args.scenes} of {args.data}", file=sys.stderr)
        return 1
    own_t, other_t = torch.stack(own_mass), torch.stack(other_mass)
    own, other = own_t.mean().item(), other_t.mean().item()
    print(
        f"{len(own_mass)} two-hand scenes: heatmap mass within {RADIUS_PX:.0f} px of the joint "
        f"{100 * own:.1f} %, of the same joint of the other hand {100 * other:.1f} %"
    )
    # per scene in the better hand order: localisation whatever the handedness calls
    best, worst = torch.maximum(own_t, other_t).mean(), torch.minimum(own_t, other_t).mean()
    print(f"  with the hands matched in the better order per scene: {100 * best:.1f} % vs "
          f"{100 * worst:.1f} %")  # fmt: skip
    if rows:
        size, gap = rows[0][0].width, 4
        sheet = Image.new("RGB", (5 * size + 4 * gap, len(rows) * size + (len(rows) - 1) * gap),
                          "white")  # fmt: skip
        for r, row in enumerate(rows):
            for c, tile in enumerate(row):
                sheet.paste(tile, (c * (size + gap), r * (size + gap)))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        sheet.save(args.out, quality=85)
        names = ", ".join(f"{hand} {JOINT_NAMES[j]}" for j in SHOWN_JOINTS
                          for hand in ("left", "right"))  # fmt: skip
        print(f"wrote {args.out}: crop, then the heatmaps of {names}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
