"""How photo-like are the renders? A detector trained on real photos (MediaPipe) is the yardstick.

    python training/recipes/render_realism.py [--frames 200] [--seed 300] \
        [--json docs/render_realism.json] [--picture docs/render_realism.jpg]

The same held-out scenes (seed 300: the same hands, poses and layouts) rendered the old way and
with ``realism`` (body-anchored views, arms, photo backgrounds, light with shadows, camera
effects: ``im2hands_model/data/realism.py``) go through the default keypoint source (MediaPipe's
models with the two-hand search) and one plain MediaPipe pass; the share of hands they find, by
layout, and their keypoint errors are written to ``--json`` with the generator's speed (16
scenes, ``im2hands-data synth``'s default workers) for both renders. ``--picture``: a sheet of
real photos (``tests/data``), old renders and new renders of the same scenes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from im2hands_model.hand_tracking.bench import (  # noqa: E402
    fit_tile,
    load_frames,
    run_keypoint_bench,
)

PHOTOS = ("handSrc.jpg", "Back_Projection_Theory0.jpg", "Histogram_Comparison_Source_1.jpg",
          "Histogram_Comparison_Source_2.jpg")  # fmt: skip


def generator_speed(realism: bool, scenes: int = 16) -> dict[str, float]:
    """Scenes per second of ``im2hands-data synth`` (default workers) for ``scenes`` scenes:
    overall (the target's figure) and once the workers are up, with their start-up time."""
    import os

    from im2hands_model.data.build import SynthSettings, build_dataset

    with tempfile.TemporaryDirectory() as tmp:  # the CLI's default: one worker per core
        settings = SynthSettings(n=scenes, seed=900, realism=realism)
        report = build_dataset(settings, Path(tmp), workers=os.cpu_count() or 1, progress=False)
    return {k: float(report[k]) for k in ("scenes_per_s", "scenes_per_s_after_startup",
                                          "startup_s")}  # fmt: skip


def found_by_layout(report: dict, frames: list) -> dict:
    """Found share by layout, over all hands, and pooled over the single and apart layouts."""
    out = {**report["found_pct_by_layout"], "all": report["hands_found_pct"]}
    hands = {lay: sum(int(f.present.sum()) for f in frames if f.layout == lay)
             for lay in ("single", "apart")}  # fmt: skip
    total = sum(hands.values())
    if total:
        found = sum(out.get(lay, 0.0) * n for lay, n in hands.items()) / total
        out["single_apart"] = round(found, 1)
    return out


def sheet(old: list, new: list, path: Path, columns: int = 4) -> None:
    from PIL import Image

    fit = fit_tile
    photos = [np.asarray(Image.open(ROOT / "tests" / "data" / p).convert("RGB")) for p in PHOTOS]
    rows = [[fit(p) for p in photos[:columns]],
            [fit(f.image) for f in old[:columns]],
            [fit(f.image) for f in new[:columns]]]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate([np.concatenate(r, 1) for r in rows], 0)).save(path, quality=88)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--seed", type=int, default=300)
    p.add_argument("--cache", default="out/render_realism", help="rendered frames kept here")
    p.add_argument("--json", default="docs/render_realism.json")
    p.add_argument("--picture", default="docs/render_realism.jpg")
    args = p.parse_args(argv)
    cache = Path(args.cache)
    frames = {name: load_frames(args.frames, args.seed, cache / f"{name}_{args.seed}.npz",
                                realism=name == "new")
              for name in ("old", "new")}  # fmt: skip
    reports = {name: run_keypoint_bench(f, learned=False) for name, f in frames.items()}
    out = {name: found_by_layout(r, frames[name]) for name, r in reports.items()}
    out["plain"] = {name: found_by_layout(r["baselines"]["plain"], frames[name])
                    for name, r in reports.items()}  # fmt: skip
    out["keypoints"] = {name: {k: r[k] for k in ("both_found_pct", "handedness_pct",
                                                  "mpjpe_aligned_mm", "root_error_depth_mm")}
                        for name, r in reports.items()}  # fmt: skip
    new_speed, old_speed = generator_speed(True), generator_speed(False)
    out["scenes_per_s"] = new_speed["scenes_per_s"]
    out["scenes_per_s_old"] = old_speed["scenes_per_s"]
    out["speed"] = {"new": new_speed, "old": old_speed}
    out["frames"], out["seed"] = args.frames, args.seed
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    if args.picture:
        sheet(frames["old"], frames["new"], Path(args.picture))
    return 0


if __name__ == "__main__":
    sys.exit(main())
