"""The paper-style accuracy table of trained networks (``python training/evaluate.py``).

For each held-out scene and each variant, both hands are meshed with the reference mesher (MISE +
marching cubes, :mod:`im2hands_model.meshing`) and scored by the paper protocol
(:mod:`im2hands_model.evaluation`): IoU on uniform points of each hand's box, Chamfer-L1 and MPJPE
aligned at joint 9, the penetration volume between the two hands and their contact area.

Networks come from training checkpoints (``--checkpoint``, repeatable) and/or the weights shipped
with the package (``--pretrained``). Rows: every occupancy network (``HALO`` = keypoint-only I,
``I``, ``I+R``) conditioned on every keypoint source:

``<occ>``                    ground-truth keypoints
``<occ> on pred. kpts``      the keypoint predictor's output (a ``kpts_pred`` network)
``<occ> on pred. kpts + K``  that output refined by K (a ``kpts_ref`` network)
``I on noisy kpts [+ K]``    without a predictor but with K: GT + K's validation noise, I only
``<occ> on source kpts + K`` the chain users run: the default keypoint source's output stored
                             with the dataset (``im2hands-data detect``) refined by K (without
                             K: ``on source kpts``)

plus ``GT meshes`` (the ground truth's own penetration and contact area, for reference). Hand
presence is the ground truth's in every row. I+R samples R's anchors on I's mesh of the same
keypoints (meshed once per scene and source).

Outputs in ``--out``: ``results.json`` (``{"variants": {name: {"iou", "chamfer_mm", "mpjpe_mm",
"penetration_cm3", "contact_cm2", ...}}, "settings": ...}``), ``results.md`` (settings, the
tables, the picture and ``--notes``) and ``comparison.png`` (input, GT and every variant for a
few scenes). ``--sources`` picks the keypoint sources meshed (e.g. ``src+K`` for the chain
alone). On the source's keypoints a hand is meshed only where the source found it; a missed hand
scores IoU 0 (Chamfer and MPJPE skip it), and ``hands_found_pct`` says how many were found.
``--jobs N`` shares the
scenes among N processes; every scene's random draws depend only on ``--seed`` and its index.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from im2hands_model.data.shards import ShardDataset
from im2hands_model.evaluation import (
    MetricTable,
    comparison_picture,
    hand_metrics,
    paper_table_markdown,
    scene_contact_cm2,
    scene_penetration_cm3,
    summary_markdown,
)
from im2hands_model.meshing import THRESHOLD_I, THRESHOLD_R, Mesh
from im2hands_model.metrics import joint_errors_mm
from im2hands_model.networks.init_occ import SKIP_DISTANCE_M, Shortcuts
from im2hands_model.pipeline.occupancy import InitialField, RefinedField
from im2hands_model.training.checkpoint import load_trained_network
from im2hands_model.training.stages.occupancy_common import mesh_scene

#: Layouts where the hands touch or interlock (the second table of results.md).
INTERACTING_LAYOUTS = ("clasped", "crossed", "touching")


@dataclass
class Variant:
    """One row of the table: an occupancy model meshed from one source of keypoints."""

    name: str
    model: str  # "HALO" | "I" | "I+R"
    threshold: float
    # (scene batch, input joints [1, 2, 21, 3], I's meshes for these joints or None)
    #   -> occ_fn(points [2, P, 3]) -> probs [2, P]
    occupancy: Callable[[dict[str, Tensor], Tensor, list | None], Callable[[Tensor], Tensor]]
    source: str  # key of the keypoint source in KeypointSources
    digest: str  # of the weights this row depends on (network_digest); see --cache


def load_run(path: str | Path, device: torch.device) -> tuple[str, dict, nn.Module]:
    """``(stage, config, model in eval mode)`` from a training checkpoint (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    stage, cfg, model = load_trained_network(path)
    return stage, cfg, model.to(device).eval()


def load_shipped(
    weights_dir: str | Path | None, device: torch.device, names: list[str] | None = None
) -> list:
    """The shipped networks (:mod:`im2hands_model.pretrained`; ``names``: only these) as
    ``(stage, config, model)``."""
    from im2hands_model.pretrained import MODELS, load_pretrained, manifest

    entries = manifest(weights_dir)["models"]
    unknown = sorted(set(names or []) - set(entries))
    if unknown:
        raise ValueError(f"--networks: no shipped network {unknown} (there are {list(entries)})")
    runs = []
    for name in MODELS:
        if name not in entries or (names and name not in names):
            continue
        model = load_pretrained(name, "cpu", weights_dir)
        runs.append((entries[name]["stage"], entries[name]["config"], model.to(device).eval()))
    return runs


def network_digest(*nets: nn.Module | None) -> str:
    """Short fingerprint of the weights of ``nets`` (``None`` entries are skipped): two rows with
    the same digest were computed by the same weights, wherever they were loaded from."""
    from im2hands_model.io import weights_fingerprint

    return weights_fingerprint({str(k): n for k, n in enumerate(nets) if n is not None})[:16]


#: I's shortcuts in every row: empty space skipped (exact there), all parts evaluated.
SHORTCUTS = Shortcuts(SKIP_DISTANCE_M)


def _init_field(net: nn.Module, batch: dict[str, Tensor], joints: Tensor) -> InitialField:
    return InitialField(net, batch["image"], batch["K"], joints, batch["hand_present"], SHORTCUTS)


def _init_occupancy(net: nn.Module) -> Callable:
    """I (or HALO) of a scene: the pipeline's :class:`InitialField`."""

    def make(
        batch: dict[str, Tensor], joints: Tensor, init_meshes: list | None = None
    ) -> Callable[[Tensor], Tensor]:
        return _init_field(net, batch, joints)

    return make


def _refined_occupancy(net: nn.Module, resolution: int, steps: int, seed: int) -> Callable:
    """I+R of a scene: I meshed first (unless an I row of the same keypoints did), then the
    pipeline's :class:`RefinedField` with anchors sampled evenly on I's meshes."""

    def make(
        batch: dict[str, Tensor], joints: Tensor, init_meshes: list | None = None
    ) -> Callable[[Tensor], Tensor]:
        init = _init_field(net.init, batch, joints)
        if init_meshes is None:  # not meshed by an I row of the same keypoints
            present = batch["hand_present"]
            init_meshes = mesh_scene(init, joints[0], present[0], resolution, steps, THRESHOLD_I)
        return RefinedField(net, init, batch["image"], init_meshes, seed)

    return make


#: Keypoint sources: key -> label in variant names ("" = ground truth).
SOURCE_LABELS = {
    "gt": "",
    "pred": "pred. kpts",
    "pred+K": "pred. kpts + K",
    "noisy": "noisy kpts",
    "noisy+K": "noisy kpts + K",
    "src": "source kpts",
    "src+K": "source kpts + K",
}


class KeypointSources:
    """The keypoints each variant is conditioned on, computed once per scene and source.

    ``gt``: the dataset's joints. ``pred``: the keypoint predictor (``kpts_pred``) on the image.
    ``noisy``: GT + the ``kpts_ref`` validation noise. ``src``: the default keypoint source's
    output stored with the dataset (``detections``: the digest of its settings; None when the
    dataset has none). ``…+K``: that input refined by K. Hand presence is the ground truth's,
    except for ``src`` sources: the hands the source found (:meth:`present`).
    """

    def __init__(self, predictor: nn.Module | None, refiner: nn.Module | None,
                 noise_stage: object | None, detections: str | None = None) -> None:  # fmt: skip
        self.predictor, self.refiner, self.noise_stage = predictor, refiner, noise_stage
        self.detections = detections
        self._cache: dict[str, Tensor] = {}
        self._digests: dict[str, str] = {}  # the networks are fixed: hash their weights once

    def available(self) -> list[str]:
        keys = ["gt"]
        if self.predictor is not None:
            keys += ["pred"] + (["pred+K"] if self.refiner is not None else [])
        elif self.refiner is not None and self.noise_stage is not None:
            keys += ["noisy", "noisy+K"]
        if self.detections is not None:
            keys += ["src"] + (["src+K"] if self.refiner is not None else [])
        return keys

    def scored(self) -> list[str]:
        """Sources in the keypoint table (no meshing, so also the noisy-GT ones when K is
        given: K's effect on keypoints with a known, realistic error)."""
        keys = [k for k in self.available() if k != "gt"]
        if self.refiner is not None and self.noise_stage is not None and "noisy" not in keys:
            keys += ["noisy", "noisy+K"]
        return keys

    @staticmethod
    def present(source: str, batch: dict[str, Tensor]) -> Tensor:
        """``[B, 2]`` the hands ``source`` gives keypoints of: the ground truth's, or for the
        stored source those it found among them."""
        gt = batch["hand_present"].bool()
        return gt & batch["src_present"].bool() if source.startswith("src") else gt

    def reset(self) -> None:
        self._cache.clear()

    def digest(self, source: str) -> str:
        """Digest of the networks behind ``source`` (the noise settings are in the cache's)."""
        if source == "gt":
            return "gt"
        if source not in self._digests:
            nets = {"pred": [self.predictor], "noisy": [], "src": []}[source.removesuffix("+K")]
            if source.endswith("+K"):
                nets.append(self.refiner)
            digest = f"{source}:{network_digest(*nets)}"
            if source.startswith("src"):
                digest += f":{self.detections}"
            # the slot order is a setting, not a weight: two predictors with the same weights
            # but different orders predict different hands (the default keeps older caches valid)
            order = getattr(self.predictor, "slot_order", "head")
            if source.startswith("pred") and order != "head":
                digest += f":{order}"
            self._digests[source] = digest
        return self._digests[source]

    @torch.no_grad()
    def __call__(self, source: str, batch: dict[str, Tensor]) -> Tensor:
        if source not in self._cache:
            self._cache[source] = self._compute(source, batch)
        return self._cache[source]

    def _compute(self, source: str, batch: dict[str, Tensor]) -> Tensor:
        if source == "gt":
            return batch["joints_3d"]
        if source == "pred":
            return self.predictor(batch["image"], batch["K"]).joints
        if source == "noisy":
            return self.noise_stage.validation_noise(batch)
        if source == "src":
            return batch["src_joints_3d"] * self.present(source, batch)[..., None, None]
        if source.endswith("+K"):
            start = self(source[:-2], batch)
            return self.refiner(start, self.present(source, batch), image=batch["image"],
                                K=batch["K"])  # fmt: skip
        raise KeyError(source)


def build_variants(
    runs: list[tuple[str, dict, nn.Module]],
    sources: list[str],
    resolution: int,
    steps: int,
    seed: int,
    source_digest: Callable[[str], str],
    threshold_r: float = THRESHOLD_R,
) -> list[Variant]:
    """The table's rows: each occupancy checkpoint with each keypoint source (module docstring).

    Noisy-keypoint sources (no predictor given) use only I (else the first occupancy model),
    the cheapest informative choice; predicted keypoints go through every occupancy model.
    ``source_digest`` (:meth:`KeypointSources.digest`) completes each row's digest;
    ``threshold_r`` is the iso-level of the I+R rows.
    """
    models: list[tuple[str, float, Callable, str]] = []
    for stage, _cfg, model in runs:
        if stage == "init_occ":
            name = "I" if model.image_conditioning else "HALO"
            models.append((name, THRESHOLD_I, _init_occupancy(model), network_digest(model)))
        elif stage == "ref_occ":
            occ = _refined_occupancy(model, resolution, steps, seed)
            models.append(("I+R", threshold_r, occ, network_digest(model)))
    if not models:
        return []
    variants: list[Variant] = []
    for source in sources:
        label = SOURCE_LABELS[source]
        chosen = models
        if source.startswith("noisy"):
            chosen = [next((m for m in models if m[0] == "I"), models[0])]
        src = source_digest(source)
        for name, threshold, occ, digest in chosen:
            full = f"{name} on {label}" if label else name
            variants.append(Variant(full, name, threshold, occ, source, f"{digest}/{src}"))
    return variants


def _load_models(args: argparse.Namespace, device: torch.device):
    """(variants, keypoint sources) from the checkpoints in ``args``."""
    runs = [load_run(p, device) for p in args.checkpoint]
    if args.pretrained is not None:
        runs = load_shipped(args.pretrained or None, device, args.networks) + runs
    noise_stage = predictor = refiner = None
    for stage, _cfg, model in runs:
        if stage == "kpts_ref":
            from im2hands_model.training.stages.kpts_ref import KptsRefStage

            # the evaluation noise is fixed (stage defaults: 8 mm per joint, 10 mm per hand),
            # whatever noise this K was trained with, so tables of different runs compare
            loss_cfg = {} if args.noise_mm is None else {"sigma_mm": args.noise_mm}
            noise_stage = KptsRefStage({"loss": loss_cfg})
            refiner = model
        elif stage == "kpts_pred":
            predictor = model
    kpts = KeypointSources(predictor, refiner, noise_stage, detections_digest(args.data))
    sources = kpts.available()
    if args.sources:
        unknown = sorted(set(args.sources) - set(sources))
        if unknown:
            hint = ("; the source's keypoints need `im2hands-data detect` on the dataset"
                    if any(u.startswith("src") for u in unknown) else "")  # fmt: skip
            raise ValueError(f"--sources: {unknown} not available here (there are {sources})"
                             f"{hint}")  # fmt: skip
        sources = [x for x in sources if x in args.sources]
    variants = build_variants(runs, sources, args.resolution, args.upsampling_steps,
                              args.seed, kpts.digest, args.threshold_r)  # fmt: skip
    if not variants:
        raise ValueError("no occupancy checkpoint given (init_occ / ref_occ)")
    return variants, kpts, noise_stage


def detections_digest(data: str | Path) -> str | None:
    """A digest of the stored keypoint source's settings on ``data`` (None: not detected)."""
    index = ShardDataset(data, keys=["hand_present"]).index
    record = index.get("detections")
    if not record or "src_joints_3d" not in index["keys"]:
        return None
    settings = {k: record.get(k) for k in ("source", "models", "image", "config")}
    return f"{zlib.crc32(json.dumps(settings, sort_keys=True).encode()):08x}"


_LOADED: dict = {}  # the networks of this process (see _scene_records)


def _scene_records(
    args: argparse.Namespace, indices: list[int], partial: dict[int, dict] | None = None
) -> list[dict]:
    """Evaluate the scenes ``indices``: per scene, every variant's hand and scene metrics (and
    the meshes of the first ``args.pictures`` scenes). Runs in the main process or a worker.

    ``partial`` maps a scene to its cached record made partly with other weights: the variants
    whose digests still match are copied from it, the others are meshed again (keypoint errors
    are always recomputed: no meshing, they are cheap)."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    key = (tuple(args.checkpoint), args.pretrained, tuple(args.networks or ()),
           tuple(args.sources or ()), args.device,
           args.resolution, args.upsampling_steps, args.seed, args.noise_mm,
           args.threshold_r)  # fmt: skip
    if _LOADED.get("key") != key:  # once per process, not per chunk of scenes
        _LOADED.update(key=key, models=_load_models(args, device))
    variants, kpts, _ = _LOADED["models"]
    data = ShardDataset(args.data)
    faces = data.faces.numpy()
    records = []
    for i in indices:
        item = data[i]
        batch = {k: v[None].to(device) for k, v in item.items()}
        present = item["hand_present"]
        both = bool(present.all())
        gt_meshes = [
            Mesh(item["vertices"][h].numpy(), faces[h]) if present[h] else None for h in range(2)
        ]
        rec: dict = {"index": i, "layout": int(item["layout"]), "hands": [], "scenes": [],
                     "n_hands": int(present.sum())}  # fmt: skip
        if both:
            rec["scenes"].append(("GT meshes", scene_penetration_cm3(gt_meshes),
                                  scene_contact_cm2(gt_meshes)))  # fmt: skip
        kpts.reset()
        rec["keypoints"] = _keypoint_errors(kpts, batch, present)
        rec["found"] = {}
        rec["digests"] = _record_digests(variants, kpts, i < args.mesh_scenes)
        if i >= args.mesh_scenes:  # keypoint-only scene (see --keypoint-scenes)
            rec["hands"], rec["scenes"] = [], []
            records.append(rec)
            continue
        kept = _reusable(partial.get(i) if partial else None, rec["digests"])
        if kept:
            old = partial[i]
            rec["hands"] += [row for row in old["hands"] if row[0] in kept]
            rec["scenes"] += [row for row in old["scenes"] if row[0] in kept]
        meshed: dict[tuple[str, str], list] = {}
        for v in variants:
            if v.name in kept:
                continue
            # per scene and row: the sample points of a row do not depend on the other rows
            rng = np.random.default_rng([args.seed, i, zlib.crc32(v.name.encode())])
            found = kpts.present(v.source, batch)
            with torch.no_grad():
                joints = kpts(v.source, batch)
                init_meshes = meshed.get(("I", v.source)) if v.model == "I+R" else None
                occ = v.occupancy(batch, joints, init_meshes)
                meshes = mesh_scene(occ, joints[0], found[0], args.resolution,
                                    args.upsampling_steps, v.threshold)  # fmt: skip
            meshed[(v.model, v.source)] = meshes
            rec["found"][v.name] = (int(found[0].sum()), int(present.sum()))
            for h in range(2):
                if not present[h]:
                    continue
                m = hand_metrics(  # a hand the source missed: no mesh, no joints
                    meshes[h] if found[0, h] else None, item["vertices"][h].numpy(), faces[h],
                    joints[0, h].cpu().numpy() if found[0, h] else None,
                    item["joints_3d"][h].numpy(), rng, n_iou=args.n_iou,
                    n_chamfer=args.n_chamfer,
                )  # fmt: skip
                rec["hands"].append((v.name, m))
            if both and bool(found[0].all()):
                rec["scenes"].append((v.name, scene_penetration_cm3(meshes),
                                      scene_contact_cm2(meshes)))  # fmt: skip
        if i in args.picture_scenes:
            image = (item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            shown = [
                v for v in variants if not args.picture_variants or v.name in args.picture_variants
            ]
            rows = {v.name: meshed[(v.model, v.source)] for v in shown}
            rec["picture"] = (image, gt_meshes, rows, item["K"].numpy())
        records.append(rec)
    return records


def _record_digests(variants: list[Variant], kpts: KeypointSources, meshed: bool) -> dict:
    """What a scene's record was computed with: the digest of every row (none for keypoint-only
    scenes) and of every scored keypoint source."""
    return {
        "variants": {v.name: v.digest for v in variants} if meshed else {},
        "keypoints": {s: kpts.digest(s) for s in kpts.scored()},
    }


def _reusable(cached: dict | None, digests: dict) -> set[str]:
    """Rows of a cached record computed with the same weights as this run's (by name)."""
    if not cached or not isinstance(cached.get("digests"), dict):
        return set()
    old = cached["digests"].get("variants", {})
    return {name for name, d in digests["variants"].items() if old.get(name) == d}


def _table(variants: list[Variant], records: list[dict]) -> MetricTable:
    table = MetricTable()
    for v in variants:  # rows in variant order, whatever order the scenes finished in
        table.add_variant(v.name)
    for rec in records:
        for name, m in rec["hands"]:
            table.add_hand(name, m)
        for name, pen, contact in rec["scenes"]:
            table.add_scene(name, pen, contact)
    return table


def picture_scenes(data: str | Path, n: int, count: int, layouts: list[str] | None) -> set[int]:
    """The first ``count`` scenes among the first ``n`` (of the given layouts, if any)."""
    if not layouts:
        return set(range(min(count, n)))
    from im2hands_model.data.layouts import LAYOUTS

    bad = set(layouts) - set(LAYOUTS)
    if bad:
        raise ValueError(f"--picture-layouts: unknown {sorted(bad)}; choose from {LAYOUTS}")
    wanted = {LAYOUTS.index(name) for name in layouts}
    ds = ShardDataset(data, keys=["layout"])
    chosen: list[int] = []
    for i in range(n):
        if len(chosen) == count:
            break
        if int(ds[i]["layout"]) in wanted:
            chosen.append(i)
    return set(chosen)


def _keypoint_errors(kpts: KeypointSources, batch: dict[str, Tensor], present: Tensor) -> list:
    """``(source, hand, MPJPE aligned at joint 9, camera-frame MPJPE)`` in mm for every
    scored keypoint source (:meth:`KeypointSources.scored`) and present hand."""
    out = []
    gt = batch["joints_3d"][0].double().cpu().numpy()
    for source in kpts.scored():
        joints = kpts(source, batch)[0].double().cpu().numpy()
        found = kpts.present(source, batch)[0]
        for h in range(2):
            if found[h]:
                aligned = float(joint_errors_mm(joints[h], gt[h]).mean())
                absolute = float(np.linalg.norm(joints[h] - gt[h], axis=-1).mean() * 1000.0)
                out.append((source, h, aligned, absolute))
    return out


def keypoint_summary(records: list[dict]) -> dict[str, dict[str, float | int]]:
    """Per keypoint source: mean MPJPE (aligned at joint 9 and camera frame) over the hands it
    gives (all present hands; the stored source's: those it found, ``hands_found_pct``)."""
    acc: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        for source, _, aligned, absolute in rec.get("keypoints", []):
            acc.setdefault(source, []).append((aligned, absolute))
    hands = sum(int(rec.get("n_hands", 0)) for rec in records)
    out: dict[str, dict[str, float | int]] = {}
    for src, vals in acc.items():
        out[SOURCE_LABELS[src]] = {
            "source": src,
            "mpjpe_mm": float(np.mean([a for a, _ in vals])),
            "mpjpe_abs_mm": float(np.mean([b for _, b in vals])),
            "n_hands": len(vals),
        }
        if src.startswith("src") and hands:
            out[SOURCE_LABELS[src]]["hands_found_pct"] = 100.0 * len(vals) / hands
    return out


def _cache_settings(args: argparse.Namespace) -> dict:
    """What a scene's record depends on: a cache made with other settings must not be mixed in."""
    return {
        "data": str(Path(args.data).resolve()),
        "checkpoints": [str(Path(c).resolve()) for c in args.checkpoint],
        "pretrained": args.pretrained,
        "resolution": args.resolution,
        "upsampling_steps": args.upsampling_steps,
        "n_iou": args.n_iou,
        "n_chamfer": args.n_chamfer,
        "noise_mm": args.noise_mm,
        "seed": args.seed,
        "mesh_scenes": args.mesh_scenes,
        "threshold_r": args.threshold_r,
    }


def _open_cache(args: argparse.Namespace) -> dict[int, dict]:
    """The scene records already in ``--cache`` (checked against this run's settings)."""
    folder = Path(args.cache)
    folder.mkdir(parents=True, exist_ok=True)
    settings_path = folder / "settings.json"
    settings = _cache_settings(args)
    if settings_path.is_file():
        old = json.loads(settings_path.read_text())
        old.setdefault("threshold_r", THRESHOLD_R)  # caches written before --threshold-r
        if old != settings:
            changed = sorted(k for k in settings if old.get(k) != settings[k])
            raise ValueError(
                f"--cache {folder} holds scenes evaluated with other settings "
                f"({', '.join(changed)}); use another folder"
            )
    else:
        settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    cached = {}
    for path in sorted(folder.glob("scene_*.json")):
        try:
            rec = json.loads(path.read_text())
        except json.JSONDecodeError:  # a scene cut off mid-write: evaluate it again
            continue
        cached[int(rec["index"])] = rec
    return cached


def _save_record(folder: str, rec: dict) -> None:
    """One scene's record (without picture arrays) as JSON, written atomically."""
    from im2hands_model.io import atomic_write

    plain = {k: v for k, v in rec.items() if k != "picture"}
    path = Path(folder) / f"scene_{rec['index']:06d}.json"
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(plain)))


def _worker(payload: tuple[argparse.Namespace, list[int], int, dict[int, dict]]) -> list[dict]:
    args, indices, threads, partial = payload
    torch.set_num_threads(threads)
    records = _scene_records(args, indices, partial)
    if args.cache:
        for rec in records:
            _save_record(args.cache, rec)
    return records


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns the summary written to ``results.json``."""
    device = torch.device(args.device)
    variants, kpts, noise_stage = _load_models(args, device)  # fails early on bad checkpoints
    n_data = len(ShardDataset(args.data))
    n_mesh = n_data if args.scenes is None else min(args.scenes, n_data)
    n = n_mesh if args.keypoint_scenes is None else max(n_mesh, min(args.keypoint_scenes, n_data))
    args.mesh_scenes = n_mesh
    from tqdm import tqdm

    args.picture_scenes = picture_scenes(args.data, n_mesh, args.pictures, args.picture_layouts)
    unknown = set(args.picture_variants or []) - {v.name for v in variants}
    if unknown:
        raise ValueError(f"--picture-variants: no variant {sorted(unknown)}")
    cached = _open_cache(args) if args.cache else {}
    # Cached scenes are used as they are when every digest matches this run's weights, and
    # completed (the rows of changed networks meshed again) when some do not. Pictures hold
    # arrays that are not cached: their scenes are evaluated again.
    records: list[dict] = []
    partial: dict[int, dict] = {}
    for i, rec in cached.items():
        if i >= n or i in args.picture_scenes:
            continue
        if rec.get("digests") == _record_digests(variants, kpts, i < n_mesh):
            records.append(rec)
        else:
            partial[i] = rec
    done = {rec["index"] for rec in records}
    todo = [i for i in range(n) if i not in done]
    if cached:
        print(f"--cache {args.cache}: {len(records)} of {n} scenes already evaluated, "
              f"{len(partial)} to complete for changed weights")  # fmt: skip
    t0 = time.perf_counter()
    bar = tqdm(total=len(todo), desc="evaluate", unit="scene", disable=args.quiet)
    if args.jobs <= 1 or len(todo) < 2:
        for i in todo:
            records += _worker((args, [i], torch.get_num_threads(), partial))
            bar.update(1)
    else:
        # Scenes in small chunks over worker processes (spawned: no forked OpenMP state);
        # each worker uses its share of the CPU threads.
        import multiprocessing as mp

        threads = max(1, torch.get_num_threads() // args.jobs)
        chunks = [todo[a : a + 4] for a in range(0, len(todo), 4)]
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            jobs = [(args, c, threads, {i: partial[i] for i in c if i in partial}) for c in chunks]
            for recs in pool.imap_unordered(_worker, jobs):
                records += recs
                bar.update(len(recs))
    bar.close()
    seconds = time.perf_counter() - t0

    from im2hands_model.data.layouts import LAYOUTS

    records.sort(key=lambda r: r["index"])
    interacting = {LAYOUTS.index(name) for name in INTERACTING_LAYOUTS}
    table = _table(variants, records)
    close = _table(variants, [r for r in records if r["layout"] in interacting])
    keypoints = keypoint_summary(records)
    picture_rows, picture_K = [], []
    for rec in records:
        if "picture" in rec:
            image, gt_meshes, rows, K = rec["picture"]
            picture_rows.append((image, gt_meshes, rows))
            picture_K.append(K)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = table.summary()
    for v in variants:  # the rows' keypoint source and how many of the hands it found
        entry = summary["variants"].get(v.name)
        if entry is None:
            continue
        entry["keypoint_source"] = v.source
        counts = [r["found"][v.name] for r in records if v.name in r.get("found", {})]
        if counts and v.source.startswith("src"):
            total = sum(t for _, t in counts)
            entry["hands_found_pct"] = 100.0 * sum(f for f, _ in counts) / max(total, 1)
    summary["interacting"] = {
        "layouts": list(INTERACTING_LAYOUTS),
        **close.summary(),
    }
    summary["keypoints"] = {"scenes": n, "sources": keypoints}
    summary["settings"] = {
        "data": str(args.data),
        "scenes": n_mesh,
        "keypoint_scenes": n,
        "checkpoints": [str(p) for p in args.checkpoint],
        "pretrained": None if args.pretrained is None else (args.pretrained or "shipped"),
        "networks": args.networks,
        "sources": args.sources,
        "resolution": args.resolution,
        "upsampling_steps": args.upsampling_steps,
        "effective_resolution": args.resolution * 2**args.upsampling_steps,
        "n_iou": args.n_iou,
        "n_chamfer": args.n_chamfer,
        "noise_mm": None if noise_stage is None else noise_stage.sigma_mm,
        "seed": args.seed,
        "threshold_i": THRESHOLD_I,
        "threshold_r": args.threshold_r,
        "jobs": args.jobs,
        "date": time.strftime("%Y-%m-%d"),
        "seconds": round(seconds, 1),
        "cached_scenes": len(records) - len(todo) if args.cache else 0,
    }
    picture = None
    if picture_rows:
        picture = f"comparison.{args.picture_format}"
        img = Image.fromarray(comparison_picture(picture_rows, picture_K))
        img.save(out / picture, **({"quality": 88} if args.picture_format == "jpg" else {}))
    notes = Path(args.notes).read_text() if args.notes else ""
    summary["settings"]["picture"] = picture
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "results.md").write_text(results_markdown(summary, notes))
    return summary


def _cached_note(settings: dict) -> str:
    n = settings.get("cached_scenes", 0)
    return f"; {n} scenes read from the --cache of earlier runs" if n else ""


def results_markdown(summary: dict, notes: str = "") -> str:
    """``results.md`` from a ``results.json`` summary: what was evaluated and how, both tables,
    the keypoint table, the picture and ``notes``."""
    st = summary["settings"]
    picture = st.get("picture")
    nets = []
    if st["pretrained"]:
        nets.append(f"the weights shipped with the package ({st['pretrained']})")
    nets += [f"`{c}`" for c in st["checkpoints"]]
    lines = [
        "# Accuracy on held-out synthetic scenes",
        "",
        f"Generated by `training/evaluate.py` on {st.get('date') or time.strftime('%Y-%m-%d')} "
        f"({st['seconds'] / 60:.0f} min, {st['jobs']} process(es){_cached_note(st)}): "
        f"{st['scenes']} scenes of "
        f"`{st['data']}`; networks: {', '.join(nets)}.",
        "",
        f"Protocol: meshes by MISE from {st['resolution']}³ with {st['upsampling_steps']} "
        f"subdivisions ({st['effective_resolution']}³ effective) and marching cubes, thresholds "
        f"{st.get('threshold_i', THRESHOLD_I)} (HALO, I) and "
        f"{st.get('threshold_r', THRESHOLD_R)} (I+R). IoU on {st['n_iou']:,} uniform points "
        f"of each hand's box; Chamfer-L1 with {st['n_chamfer']:,} surface samples each way and "
        "MPJPE, both after aligning each hand at joint 9; penetration volume between the two "
        "hands (1 mm voxels); contact area = surface within 3 mm of, or inside, the other hand "
        "(mean of the two hands). Hand presence is the ground truth's in every row; `GT meshes` "
        "is the ground truth's own penetration and contact.",
        "",
        f"## All {st['scenes']} scenes",
        "",
        summary_markdown(summary),
        "",
        f"## Interacting scenes ({', '.join(INTERACTING_LAYOUTS)})",
        "",
        summary_markdown(summary["interacting"]),
        "",
    ]
    kp = summary.get("keypoints", {})
    if kp.get("sources"):
        lines += [
            f"## Keypoints ({kp['scenes']} scenes, no meshing)",
            "",
            "| Keypoints | MPJPE (mm, joint 9 aligned) | MPJPE (mm, camera frame) | Hands |",
            "|---|---:|---:|---:|",
        ]
        for label, row in kp["sources"].items():
            found = row.get("hands_found_pct")
            hands = f"{row['n_hands']}" + (f" ({found:.1f} % found)" if found is not None else "")
            lines.append(f"| {label} | {row['mpjpe_mm']:.2f} | {row['mpjpe_abs_mm']:.2f} | "
                         f"{hands} |")  # fmt: skip
        if kp.get("note"):
            lines += ["", f"({kp['note']})"]
        lines.append("")
    lines += [
        "## In the paper's layout",
        "",
        "Published numbers: InterHand2.6M test set (interacting hands). Ours compare with them "
        "only when the data above is InterHand2.6M (`im2hands-data interhand`).",
        "",
        paper_table_markdown(summary),
    ]
    if picture:
        lines += [f"![input, ground truth and predictions]({picture})", ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="training/evaluate.py",
        description="Paper-style table (IoU %, Chamfer-L1 mm, MPJPE mm, penetration cm^3, "
        "contact cm^2) of trained networks on a held-out dataset.",
    )
    p.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        help="a training checkpoint (kpts_pred / kpts_ref / init_occ / ref_occ); repeat for more",
    )
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="evaluate the weights shipped with the package (or those in DIR, written by "
        "training/export_weights.py)",
    )
    p.add_argument(
        "--networks",
        type=lambda t: t.split(","),
        default=None,
        metavar="N1,N2",
        help="with --pretrained: only these shipped networks, e.g. init_occ,ref_occ for the I "
        "and I+R rows alone (default: all)",
    )
    p.add_argument(
        "--sources",
        type=lambda t: t.split(","),
        default=None,
        metavar="S1,S2",
        help="only mesh on these keypoint sources: gt, pred, pred+K, noisy, noisy+K, src, src+K "
        "(src: the default source's output stored by `im2hands-data detect`; default: all)",
    )
    p.add_argument("--data", required=True, help="held-out dataset folder (im2hands-data synth)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--scenes", type=int, default=None, help="first N scenes (default: all)")
    p.add_argument(
        "--keypoint-scenes",
        type=int,
        default=None,
        metavar="N",
        help="also score the keypoint sources (no meshing: fast) on the first N "
        "scenes (default: the --scenes ones)",
    )
    p.add_argument("--resolution", type=int, default=32, help="MISE coarse grid (default 32)")
    p.add_argument(
        "--upsampling-steps",
        type=int,
        default=3,
        help="MISE subdivisions (default 3: 256^3 effective, the paper protocol)",
    )
    p.add_argument("--n-iou", type=int, default=100_000, help="uniform IoU points per hand")
    p.add_argument("--n-chamfer", type=int, default=100_000, help="surface samples per direction")
    p.add_argument(
        "--noise-mm",
        type=float,
        default=None,
        help="per-joint noise of the noisy-keypoint rows (default 8 mm; 10 mm per hand)",
    )
    p.add_argument("--pictures", type=int, default=4, help="scenes in comparison.png")
    p.add_argument("--picture-format", choices=("png", "jpg"), default="png")
    p.add_argument(
        "--notes",
        default=None,
        metavar="FILE",
        help="Markdown appended to results.md (e.g. docs/results_notes.md)",
    )
    p.add_argument(
        "--picture-layouts",
        type=lambda t: t.split(","),
        default=None,
        metavar="L1,L2",
        help="only scenes of these layouts in the picture "
        "(e.g. clasped,crossed,touching: the interacting ones)",
    )
    p.add_argument(
        "--picture-variants",
        type=lambda t: t.split(","),
        default=None,
        metavar="V1,V2",
        help="only these rows in the picture (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threshold-r",
        type=float,
        default=None,
        metavar="T",
        help="iso-level of the I+R meshes (default: the one --pretrained weights ship with R, "
        f"else {THRESHOLD_R}, the paper's; I and HALO use {THRESHOLD_I}): a lower level grows "
        "R's hands, a higher one shrinks them",
    )
    p.add_argument(
        "--cache",
        default=None,
        metavar="DIR",
        help="keep each scene's scores here and skip scenes already scored with the same "
        "settings: a long evaluation can be stopped and resumed",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes sharing the scenes (default 1; results do not depend on it)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if not args.checkpoint and args.pretrained is None:
        p.error("give --pretrained or at least one --checkpoint")
    if args.networks and args.pretrained is None:
        p.error("--networks selects among the --pretrained networks: give --pretrained")
    if args.jobs < 1:
        p.error("--jobs must be >= 1")
    if args.scenes is not None and args.scenes <= 0:
        p.error("--scenes must be positive")
    if args.threshold_r is None:
        from im2hands_model.pretrained import iso_level

        shipped = iso_level("ref_occ", args.pretrained or None) if args.pretrained is not None \
            else None
        args.threshold_r = THRESHOLD_R if shipped is None else shipped
    if not 0.0 < args.threshold_r < 1.0:
        p.error("--threshold-r must lie strictly between 0 and 1")
    if args.resolution < 2 or args.upsampling_steps < 0:
        p.error("--resolution must be >= 2 and --upsampling-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"]:  # results.md again from results.json (e.g. after editing notes)
        p = argparse.ArgumentParser(prog="training/evaluate.py --render")
        p.add_argument("--render", required=True, metavar="RESULTS_JSON")
        p.add_argument("--notes", default=None, metavar="FILE")
        a = p.parse_args(argv)
        summary = json.loads(Path(a.render).read_text())
        notes = Path(a.notes).read_text() if a.notes else ""
        md = Path(a.render).with_name("results.md")
        md.write_text(results_markdown(summary, notes))
        print(f"wrote {md}")
        return 0
    args = parse_args(argv)
    try:
        summary = evaluate(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    md = Path(args.out) / "results.md"
    print(md.read_text())
    print(json.dumps(summary["settings"]))
    return 0
