"""The headline figures of the chain from the image (``docs/chain.json``) from an evaluation.

    python training/recipes/chain_summary.py --results docs/chain/realistic/results.json \
        [--json docs/chain.json]

Reads a ``training/evaluate.py`` summary made with ``--sources src+K`` (and optionally ``gt``) on
held-out scenes that carry the default source's stored output (``im2hands-data detect``) and
writes what issue 22 asks for: the source's and source + K's joint-9-aligned MPJPE, the IoU of
HALO, I and I+R meshed on source + K (camera frame, the paper's protocol, and at joint 9),
I's and I+R's penetration volume, the share of hands the source found and the scene count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def chain_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The ``docs/chain.json`` figures of one evaluation summary (module docstring)."""
    kp = summary["keypoints"]["sources"]
    rows = summary["variants"]

    def row(name: str) -> dict[str, Any]:
        if name not in rows:
            raise KeyError(f"the evaluation has no row {name!r}: run it with --sources src+K")
        return rows[name]

    source, refined = kp["source kpts"], kp["source kpts + K"]
    halo, i, ir = (row(f"{m} on source kpts + K") for m in ("HALO", "I", "I+R"))
    out = {
        "source_mpjpe_mm": source["mpjpe_mm"],
        "source_k_mpjpe_mm": refined["mpjpe_mm"],
        "source_mpjpe_abs_mm": source["mpjpe_abs_mm"],
        "source_k_mpjpe_abs_mm": refined["mpjpe_abs_mm"],
        "k_reduction_pct": 100.0 * (1.0 - refined["mpjpe_mm"] / source["mpjpe_mm"]),
        "halo_iou": halo["iou"],
        "i_iou": i["iou"],
        "ir_iou": ir["iou"],
        "halo_iou_j9": halo.get("iou_j9"),
        "i_iou_j9": i.get("iou_j9"),
        "ir_iou_j9": ir.get("iou_j9"),
        "i_pen_cm3": i["penetration_cm3"],
        "ir_pen_cm3": ir["penetration_cm3"],
        "hands_found_pct": source["hands_found_pct"],
        "scenes": summary["settings"]["scenes"],
        "keypoint_scenes": summary["keypoints"]["scenes"],
        "data": summary["settings"]["data"],
    }
    if "I" in rows:  # the paper's protocol on the same scenes, for reference
        out["i_iou_gt_keypoints"] = rows["I"]["iou"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", required=True, type=Path, help="an evaluation's results.json")
    p.add_argument("--json", default="docs/chain.json", type=Path)
    args = p.parse_args(argv)
    figures = chain_figures(json.loads(args.results.read_text()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
