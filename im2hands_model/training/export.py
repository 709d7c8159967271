"""Package trained runs as the shipped weights (``python training/export_weights.py``).

Each run's checkpoint (usually ``best.pt``) becomes ``<name>.safetensors`` in the weights folder,
and ``manifest.json`` records for every network: the stage, the run config (architecture and the
data it saw), the training data seeds and scene counts (read from the datasets' reports), the
steps of every round (a run warm-started from another lists both), which checkpoint of each round
it came from with that checkpoint's validation value and the round's best,
the file's size and SHA-256, and the date. ``--results`` adds the held-out test table
(``training/evaluate.py``'s ``results.json``) to the manifest. ``--iso-level-r`` takes the
``results.json`` of ``evaluate.py --threshold-r`` runs on validation scenes, one per level, and
ships the level of the best I+R IoU (the lower penetration among levels within 0.05 points) with
R's entry; the pipeline meshes I+R at that level unless told otherwise. A newly exported R drops
the old level: it was chosen for other weights.

A network not given keeps the file and manifest entry it already has in the weights folder
(retrain one network, ship it, keep the others); a run warm-started from a shipped
``.safetensors`` lists that network's earlier rounds before its own.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from pathlib import Path
from typing import Any

import torch

from im2hands_model.pretrained import MANIFEST, MODELS, STAGES, WEIGHTS_DIR, sha256
from im2hands_model.training.checkpoint import (
    atomic_write,
    export_safetensors,
    load_checkpoint,
)


def _dataset_info(folder: str) -> dict[str, Any]:
    report = Path(folder) / "report.json"
    info: dict[str, Any] = {"folder": str(folder)}
    if report.is_file():
        rep = json.loads(report.read_text())
        info.update(seed=rep.get("seed"), scenes=rep.get("scenes"))
    return info


def _datasets(value: Any) -> list[dict[str, Any]]:
    if not value:
        return []
    return [_dataset_info(v) for v in (value if isinstance(value, list) else [value])]


def _val_at(run: Path, step: int, metric: str | None) -> float | None:
    """The run's validation ``metric`` at ``step`` (``val_log.jsonl``), if it validated there: a
    ``last.pt`` is not the best checkpoint, so ``best_val`` alone would misreport it."""
    log = run / "val_log.jsonl"
    if not metric or not log.is_file():
        return None
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash: the others still count
        if entry.get("step") == step:
            value = entry.get("metrics", {}).get(metric)
            return float(value) if value is not None else None
    return None


def _shipped_rounds(path: Path) -> list[dict[str, Any]]:
    """The rounds of the shipped network whose file ``path`` is (by checksum), else none."""
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return []
    digest = sha256(path)
    for entry in json.loads(manifest.read_text()).get("models", {}).values():
        if entry.get("sha256") == digest:
            return list(entry.get("training", {}).get("rounds", []))
    return []


def _rounds(ckpt_path: Path) -> list[dict[str, Any]]:
    """The training rounds behind a checkpoint: its own run, preceded by the run it was
    warm-started from (``train.init_weights``: a run, recursively, or a shipped network)."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.get("config") or {}
    best = ckpt.get("best") or {}
    tc = cfg.get("train", {})
    this = {
        "run": str(ckpt_path.parent),
        "steps": int(ckpt.get("step", 0)),
        "minutes": round(float(ckpt.get("elapsed_s", 0.0)) / 60.0, 1),
        "batch_size": tc.get("batch_size"),
        "lr": tc.get("lr"),
        "train_data": _datasets(cfg.get("data", {}).get("train")),
        "val_data": _datasets(cfg.get("data", {}).get("val")),
        "checkpoint": ckpt_path.name,
        "best_val": {best.get("metric", "metric"): best.get("value"), "step": best.get("step")},
        "val": _val_at(ckpt_path.parent, int(ckpt.get("step", 0)), best.get("metric")),
        "loss": dict(cfg.get("loss", {}) or {}),
    }
    parent = tc.get("init_weights")
    if parent and Path(parent).suffix == ".pt" and Path(parent).is_file():
        return [*_rounds(Path(parent)), this]
    if parent and Path(parent).suffix == ".safetensors" and Path(parent).is_file():
        return [*_shipped_rounds(Path(parent)), this]
    return [this]


def export_run(name: str, ckpt_path: Path, out_dir: Path) -> dict[str, Any]:
    """Write ``<name>.safetensors`` from a run checkpoint; returns its manifest entry."""
    ckpt = load_checkpoint(ckpt_path)
    cfg = ckpt.get("config") or {}
    stage = cfg.get("stage")
    if stage != STAGES[name]:
        raise ValueError(f"{ckpt_path} is a {stage!r} run; {name} needs a {STAGES[name]!r} run")
    if name in ("halo", "init_occ"):
        image = bool(cfg.get("model", {}).get("image_conditioning", True))
        if image != (name == "init_occ"):
            raise ValueError(f"{ckpt_path}: image_conditioning={image} does not fit {name}")
    state = ckpt["model"]
    if name == "ref_occ":  # I ships once, as init_occ
        state = {k: v for k, v in state.items() if not k.startswith("init.")}
    config = {"stage": stage, "model": cfg.get("model", {})}
    if stage == "ref_occ":
        config["init"] = {"init_occ_model": cfg.get("init", {}).get("init_occ_model")}
    rounds = _rounds(ckpt_path)  # before the file is written: it may be the warm start's
    path = out_dir / f"{name}.safetensors"
    # one metadata key: safetensors writes metadata keys in an unspecified order, and the file's
    # checksum (manifest) must not change when the same weights are exported again
    export_safetensors(state, path, metadata={"im2hands": {"name": name, "stage": stage}})
    path.chmod(0o644)  # package data: readable by everyone who installs it
    return {
        "file": path.name,
        "stage": stage,
        "config": config,
        "parameters": int(sum(v.numel() for v in state.values() if v.is_floating_point())),
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "training": {
            "rounds": rounds,
            "total_steps": sum(r["steps"] for r in rounds),
            "total_minutes": round(sum(r["minutes"] for r in rounds), 1),
        },
    }


def export(runs: dict[str, Path], out_dir: Path, results: Path | None, notes: str) -> dict:
    """Export every run of ``runs`` (name -> best.pt) and write the manifest; returns it.
    Networks not in ``runs`` keep their shipped file and entry (module docstring)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = json.loads((out_dir / MANIFEST).read_text()) if (out_dir / MANIFEST).is_file() else {}
    kept = {}
    for name in MODELS:
        if name in runs:
            continue
        entry = old.get("models", {}).get(name)
        if entry is None or not (out_dir / entry["file"]).is_file():
            raise ValueError(f"no run given for {name} and {out_dir} ships none to keep")
        if sha256(out_dir / entry["file"]) != entry["sha256"]:
            raise ValueError(f"{out_dir / entry['file']} does not match its manifest entry")
        kept[name] = entry
    exported = {name: export_run(name, Path(p), out_dir) for name, p in runs.items()}
    models = {name: exported.get(name) or kept[name] for name in MODELS}
    data: dict[str, Any] = {
        "format": 1,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "notes": notes or old.get("notes", ""),
        "models": models,
    }
    if results is not None:
        data["test_results"] = json.loads(Path(results).read_text())
    elif "test_results" in old:
        data["test_results"] = old["test_results"]
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(out_dir / MANIFEST, lambda tmp: tmp.write_text(text))
    return data


#: IoU differences below this (points) count as ties, decided by the lower penetration.
ISO_LEVEL_TIE_IOU = 0.05


def choose_iso_level(sweep: list[Path], variant: str = "I+R") -> dict[str, Any]:
    """The manifest's ``iso_level`` record from ``evaluate.py`` runs at several levels: each
    level's IoU, penetration and contact, and the chosen one (module docstring)."""
    rows, data = [], set()
    for folder in sweep:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        summary = json.loads(path.read_text())
        settings = summary.get("settings", {})
        entry = summary.get("variants", {}).get(variant)
        if entry is None or "threshold_r" not in settings:
            raise ValueError(f"{path} has no {variant} row or no threshold_r: not an "
                             "evaluate.py --threshold-r result")  # fmt: skip
        data.add((settings.get("data"), settings.get("scenes")))
        rows.append({"level": float(settings["threshold_r"]), "iou": float(entry["iou"]),
                     "penetration_cm3": entry.get("penetration_cm3"),
                     "contact_cm2": entry.get("contact_cm2")})  # fmt: skip
    if len({r["level"] for r in rows}) < 2:
        raise ValueError("give evaluate.py results of at least two different levels")
    if len(data) != 1:
        raise ValueError(f"the results come from different scenes: {sorted(map(str, data))}")
    best_iou = max(r["iou"] for r in rows)
    tied = [r for r in rows if r["iou"] >= best_iou - ISO_LEVEL_TIE_IOU]
    chosen = min(tied, key=lambda r: (r["penetration_cm3"] or 0.0, -r["iou"]))
    (folder_name, scenes), = data
    return {"value": chosen["level"], "variant": variant, "chosen_on": folder_name,
            "scenes": scenes, "rule": f"best IoU; within {ISO_LEVEL_TIE_IOU} points the lower "
            "penetration", "candidates": sorted(rows, key=lambda r: r["level"]),
            "date": _dt.date.today().isoformat()}  # fmt: skip


def set_iso_level(out_dir: Path, choice: dict[str, Any], name: str = "ref_occ") -> None:
    """Record ``choice`` (:func:`choose_iso_level`) with ``name``'s manifest entry."""
    path = out_dir / MANIFEST
    data = json.loads(path.read_text())
    if name not in data.get("models", {}):
        raise ValueError(f"{path} has no {name} entry to give an iso-level")
    data["models"][name]["iso_level"] = choice
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="training/export_weights.py", description=__doc__.split("\n")[0]
    )
    for name in MODELS:
        flag = f"--{name.replace('_', '-')}"
        example = f"runs/default/{name}/best.pt"
        p.add_argument(flag, type=Path, default=None,
                       help=f"the {name} run (e.g. {example}; default: keep the shipped one)")
    p.add_argument("--out", type=Path, default=WEIGHTS_DIR, help=f"default: {WEIGHTS_DIR}")
    p.add_argument("--results", type=Path, default=None,
                   help="evaluate.py results.json to record in the manifest")  # fmt: skip
    p.add_argument("--notes", default="", help="free text stored in the manifest")
    p.add_argument("--iso-level-r", nargs="+", type=Path, default=None, metavar="RESULTS",
                   help="evaluate.py --threshold-r outputs on validation scenes, one per level: "
                        "ship the best level with R (alone, or after exporting runs)")  # fmt: skip
    args = p.parse_args(argv)
    runs = {name: getattr(args, name) for name in MODELS if getattr(args, name) is not None}
    if not runs and not args.iso_level_r:
        p.error("give at least one run, or --iso-level-r")
    try:
        if runs:
            data = export(runs, args.out, args.results, args.notes)
        if args.iso_level_r:
            choice = choose_iso_level(args.iso_level_r)
            set_iso_level(args.out, choice)
            levels = ", ".join(f"{r['level']:g}" for r in choice["candidates"])
            print(f"R's iso-level {choice['value']:g} (of {levels}; {choice['rule']}) -> "
                  f"{args.out / MANIFEST}")  # fmt: skip
            if not runs:
                return 0
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    total = sum(m["bytes"] for m in data["models"].values())
    for name, m in data["models"].items():
        print(f"{name:10s} {m['bytes'] / 1e6:6.2f} MB  {m['training']['total_steps']:6d} steps")
    print(f"total {total / 1e6:.1f} MB in {args.out}")
    return 0
