#!/usr/bin/env python
"""Train one im2hands stage.

    python training/train.py --config training/configs/<stage>.yaml \\
        [--set key.sub=value ...] [--resume] [--out DIR]

    torchrun --nproc_per_node=2 training/train.py --config ...   # DDP (NCCL on GPUs, gloo on CPU)

Stages, in order: kpts_pred, kpts_ref, init_occ, ref_occ (ref_occ starts from init_occ's best.pt).
``--set`` values are YAML (``--set train.lr=3e-4 train.amp=false data.num_workers=0``).
``--resume`` continues ``<out>/last.pt`` exactly (weights, optimiser, schedule, RNG, data order).
SIGINT/SIGTERM finish the current step and write ``last.pt``; run again with ``--resume``.
See im2hands_model/training/config.py for every config key.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

try:
    import im2hands_model  # noqa: F401
except ImportError:  # not installed: run from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train an im2hands stage (kpts_pred, kpts_ref, init_occ, ref_occ).",
    )
    parser.add_argument("--config", required=True, help="YAML config (training/configs/*.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. --set train.batch_size=4 train.lr=3e-4",
    )
    parser.add_argument("--resume", action="store_true", help="continue from <out>/last.pt")
    parser.add_argument("--out", default=None, help="run folder (overrides the config's out)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0") or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s",
    )
    from im2hands_model.training.config import ConfigError, load_config
    from im2hands_model.training.engine import train

    try:
        cfg = load_config(args.config, args.overrides, out=args.out)
        result = train(cfg, resume=args.resume)
    except ConfigError as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        best = result["best"]
        value = best.get("value")
        shown = f"{value:.4g}" if isinstance(value, float) else "n/a"
        print(
            f"{result['stopped']}: step {result['step']}, last loss {result['last_loss']:.4g}, "
            f"best {best.get('metric')}={shown} (step {best.get('step')}), "
            f"{result['skipped_nonfinite']} skipped; run folder {result['out']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
