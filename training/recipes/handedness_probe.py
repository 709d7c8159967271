"""Can a small CNN tell a left hand from a right one in our renders? A probe, not a shipped stage.

    python training/recipes/handedness_probe.py [--train out/cues/train] [--val out/cues/val] \
        [--test out/default/test] [--minutes 15] [--out runs/default/handedness_probe.json]

The keypoint predictor's handedness calls stayed at chance (docs/results_notes.md). This probe
asks the easier question on its own: given one hand, cut out by the box of its ground-truth 2D
joints (64 x 64 px), is it the left or the right hand? Every batch holds each crop twice, as is
and mirrored with the opposite label (the mirror image of a left hand is a right hand), so the
only way to beat chance is to see chirality: which side the thumb is on, given whether the palm
or the back faces the camera. It prints and writes the accuracy on the validation hands (same
renderer options as training) and on the test hands (e.g. renders without ``--skin-cues``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from im2hands_model.data.shards import ShardDataset  # noqa: E402

CROP = 64
MARGIN = 1.3  # box side = MARGIN x the larger side of the joints' 2D box


def hand_crops(folder: str, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """``([N, 3, CROP, CROP] uint8, [N] labels 0 left / 1 right)`` of every present hand."""
    data = ShardDataset(folder, keys=["image", "joints_2d", "hand_present"])
    n = len(data) if limit is None else min(limit, len(data))
    crops, labels = [], []
    for i in tqdm(range(n), desc=f"crops {Path(folder).name}", leave=False):
        item = data[i]
        image = item["image"][None]
        h, w = image.shape[-2:]
        for hand in range(2):
            if not bool(item["hand_present"][hand]):
                continue
            uv = item["joints_2d"][hand]
            centre = (uv.min(0).values + uv.max(0).values) / 2
            half = MARGIN * float((uv.max(0).values - uv.min(0).values).max()) / 2 + 1.0
            lin = torch.linspace(-half, half, CROP)
            gx = (centre[0] + lin) / w * 2 - 1
            gy = (centre[1] + lin) / h * 2 - 1
            grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], -1)[None]
            crop = F.grid_sample(image, grid, align_corners=False, padding_mode="border")[0]
            crops.append((crop * 255).round().clamp(0, 255).to(torch.uint8))
            labels.append(hand)
    return torch.stack(crops), torch.tensor(labels)


def classifier() -> nn.Module:
    """Four stride-2 conv blocks, global pooling, one logit (> 0: right hand)."""
    layers: list[nn.Module] = []
    cin = 3
    for cout in (32, 64, 128, 128):
        layers += [nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                   nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]  # fmt: skip
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 1))


def _pairs(crops: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each crop as is and mirrored with the other label, as floats in [0, 1]."""
    x = crops.float() / 255.0
    y = labels.float()
    return torch.cat([x, x.flip(-1)]), torch.cat([y, 1 - y])


@torch.no_grad()
def accuracy(net: nn.Module, crops: Tensor, labels: Tensor) -> float:
    net.eval()
    x, y = _pairs(crops, labels)
    logits = torch.cat([net(x[i : i + 256])[:, 0] for i in range(0, len(x), 256)])
    net.train()
    return float(((logits > 0).float() == y).float().mean())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", default="out/cues/train")
    ap.add_argument("--val", default="out/cues/val")
    ap.add_argument("--test", default="out/default/test", help="a second held-out set")
    ap.add_argument("--test-scenes", type=int, default=250)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=64, help="crops per step (x2 with mirrors)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/default/handedness_probe.json")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    train_x, train_y = hand_crops(args.train)
    held = {"val": hand_crops(args.val), "test": hand_crops(args.test, args.test_scenes)}
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(args.seed)
    log, start, step = [], time.monotonic(), 0
    bar = tqdm(desc="handedness probe", unit="step")
    while time.monotonic() - start < 60 * args.minutes:
        idx = torch.randint(len(train_x), (args.batch,), generator=gen)
        x, y = _pairs(train_x[idx], train_y[idx])
        loss = F.binary_cross_entropy_with_logits(net(x)[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % 250 == 0:
            row = {"step": step, "minutes": (time.monotonic() - start) / 60, "loss": loss.item()}
            row.update({name: accuracy(net, *xy) for name, xy in held.items()})
            log.append(row)
            tqdm.write(json.dumps(row))
    bar.close()
    final = {name: accuracy(net, *xy) for name, xy in held.items()}
    final["train"] = accuracy(net, train_x[:2000], train_y[:2000])
    report = {"steps": step, "minutes": args.minutes, "hands": {"train": len(train_x),
              **{k: len(v[0]) for k, v in held.items()}}, "accuracy": final, "log": log,
              "args": vars(args)}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(
        f"{step} steps: handedness accuracy (crops and their mirrors) "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in final.items())
        + f"; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
