"""The paper-style accuracy table of trained checkpoints (``python training/evaluate.py``).

For each held-out scene and each variant, both hands are meshed with the reference mesher (MISE +
marching cubes, :mod:`im2hands_model.meshing`) and scored by the paper protocol
(:mod:`im2hands_model.evaluation`): IoU on uniform points of each hand's box, Chamfer-L1 and MPJPE
aligned at joint 9, and the penetration volume between the two hands. Variants:

``HALO``                    keypoint-only I (``init_occ`` with image_conditioning off), GT keypoints
``I``                       image-conditioned I, GT keypoints
``I+R``                     a ``ref_occ`` checkpoint: I, then R (anchors sampled on I's mesh)
``<occ> on noisy kpts``     I (else the first occupancy variant) given GT keypoints + noise
``<occ> on noisy kpts + K`` the same after K (a ``kpts_ref`` checkpoint) refined the noisy keypoints

Outputs in ``--out``: ``results.json`` (``{"variants": {name: {"iou", "chamfer_mm", "mpjpe_mm",
"penetration_cm3", ...}}, "settings": ...}``), ``results.md`` (the table) and
``comparison.png`` (input, GT and every variant for a few scenes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
    scene_penetration_cm3,
)
from im2hands_model.meshing import Mesh
from im2hands_model.metrics import sample_surface_points
from im2hands_model.networks.init_occ import EMPTY_LOGIT
from im2hands_model.training.stages.occupancy_common import mesh_scene
from im2hands_model.training.stages.ref_occ import own_points

#: Points farther than this from every bone of a hand are empty for it (not run through I):
#: hand surfaces lie within ~3 cm of their bones; most of a meshing grid is far from the hand.
SKIP_DISTANCE_M = 0.045

#: Thresholds of the paper protocol: 0.5 for I (and HALO), 0.45 for R.
THRESHOLD_I = 0.5
THRESHOLD_R = 0.45


@dataclass
class Variant:
    """One row of the table: how to get both hands' keypoints and occupancy for a scene."""

    name: str
    threshold: float
    # (scene batch, input joints [1, 2, 21, 3]) -> occ_fn(points [2, P, 3]) -> probs [2, P]
    occupancy: Callable[[dict[str, Tensor], Tensor], Callable[[Tensor], Tensor]]
    # scene batch -> joints [1, 2, 21, 3] the occupancy is conditioned on
    keypoints: Callable[[dict[str, Tensor]], Tensor]


def load_run(path: str | Path, device: torch.device) -> tuple[str, dict, nn.Module]:
    """``(stage, config, model in eval mode)`` from a training checkpoint (``weights_only``)."""
    from im2hands_model.training.stages import load_stage

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    cfg = ckpt.get("config") or {}
    stage = cfg.get("stage") or ckpt.get("stage")
    if stage == "ref_occ":
        from im2hands_model.training.stages.ref_occ import build_refined

        model = build_refined(cfg)
    elif stage in ("init_occ", "kpts_ref", "kpts_pred"):
        model = load_stage(stage)(cfg).build_model(torch.device("cpu"))
    else:
        raise ValueError(f"{path}: unsupported stage {stage!r}")
    model.load_state_dict(ckpt["model"])
    inner = model.init if stage == "ref_occ" else model
    if stage in ("init_occ", "ref_occ"):
        inner.skip_distance = SKIP_DISTANCE_M
    return stage, cfg, model.to(device).eval()


def _init_occupancy(net: nn.Module) -> Callable:
    def make(batch: dict[str, Tensor], joints: Tensor) -> Callable[[Tensor], Tensor]:
        ctx = net.encode(batch["image"]) if net.image_conditioning else None

        def occ(points: Tensor) -> Tensor:
            logits = net(points[None], joints, K=batch["K"], ctx=ctx,
                         present=batch["hand_present"], normalized=True)  # fmt: skip
            return torch.sigmoid(logits[0])

        return occ

    return make


def _refined_occupancy(net: nn.Module, resolution: int, steps: int, seed: int) -> Callable:
    """I+R: mesh I first, sample R's anchors evenly on I's mesh, then score with R."""
    init_make = _init_occupancy(net.init)

    def make(batch: dict[str, Tensor], joints: Tensor) -> Callable[[Tensor], Tensor]:
        present = batch["hand_present"]
        init_meshes = mesh_scene(
            init_make(batch, joints), joints[0], present[0], resolution, steps, THRESHOLD_I
        )
        rng = np.random.default_rng(seed)
        anchors = torch.zeros(1, 2, net.refine.num_anchors, 3)
        for h, mesh in enumerate(init_meshes):
            if mesh is not None:
                pts = sample_surface_points(mesh.vertices, mesh.faces, net.refine.num_anchors, rng)
                anchors[0, h] = torch.as_tensor(pts, dtype=torch.float32)
        has_mesh = torch.tensor([[m is not None for m in init_meshes]], device=joints.device)
        state = net.prepare(joints, batch["K"], batch["image"], present & has_mesh,
                            anchors=anchors.to(joints.device))  # fmt: skip

        def occ(points: Tensor) -> Tensor:
            # R only where I sees a hand nearby (I skips empty space, see SKIP_DISTANCE_M)
            queries, init_logits = net.init_logits(state, points[None])
            near = (init_logits[0] > EMPTY_LOGIT).any(0).nonzero()[:, 0]
            refined = init_logits.clone()
            if near.numel():
                ctx = state.ctx
                refined[:, :, near] = net.refine.decode(
                    queries[:, near], init_logits[:, :, near], ctx, state.K, state.feats,
                    state.center,
                )  # fmt: skip
            return torch.sigmoid(own_points(refined)[0])

        return occ

    return make


def build_variants(
    runs: list[tuple[str, dict, nn.Module]],
    noise_stage: object | None,
    resolution: int,
    steps: int,
    seed: int,
) -> list[Variant]:
    """The table's variants from the loaded checkpoints (see the module docstring)."""

    def gt(batch: dict[str, Tensor]) -> Tensor:
        return batch["joints_3d"]

    variants: list[Variant] = []
    refiner = None
    for stage, _cfg, model in runs:
        if stage == "init_occ":
            name = "I" if model.image_conditioning else "HALO"
            variants.append(Variant(name, THRESHOLD_I, _init_occupancy(model), gt))
        elif stage == "ref_occ":
            occ = _refined_occupancy(model, resolution, steps, seed)
            variants.append(Variant("I+R", THRESHOLD_R, occ, gt))
        elif stage == "kpts_ref":
            refiner = model
    if refiner is not None:
        occ_variants = [v for v in variants if v.keypoints is gt]
        if not occ_variants:
            raise ValueError("K needs an occupancy checkpoint (init_occ or ref_occ) to mesh with")
        # Mesh the noisy-keypoint variants with I if there is one (cheaper than I+R).
        base = next((v for v in occ_variants if v.name == "I"), occ_variants[0])

        def noisy(batch: dict[str, Tensor]) -> Tensor:
            return noise_stage.validation_noise(batch)

        def refined(batch: dict[str, Tensor]) -> Tensor:
            with torch.no_grad():
                return refiner(noisy(batch), batch["hand_present"], image=batch["image"],
                               K=batch["K"])  # fmt: skip

        for name, kpts in (("on noisy kpts", noisy), ("on noisy kpts + K", refined)):
            variants.append(Variant(f"{base.name} {name}", base.threshold, base.occupancy, kpts))
    return variants


def evaluate(args: argparse.Namespace) -> dict:
    """Run the evaluation; returns the summary written to ``results.json``."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    runs = [load_run(p, device) for p in args.checkpoint]
    noise_stage = None
    for stage, cfg, _ in runs:
        if stage == "kpts_ref":
            from im2hands_model.training.stages.kpts_ref import KptsRefStage

            loss_cfg = dict(cfg.get("loss", {}))
            if args.noise_mm is not None:
                loss_cfg["sigma_mm"] = args.noise_mm
            noise_stage = KptsRefStage({**cfg, "loss": loss_cfg})
    variants = build_variants(runs, noise_stage, args.resolution, args.upsampling_steps, args.seed)
    if not variants:
        raise ValueError("no occupancy checkpoint given (init_occ / ref_occ)")

    data = ShardDataset(args.data)
    faces = data.faces.numpy()
    n = len(data) if args.scenes is None else min(args.scenes, len(data))
    table = MetricTable()
    picture_rows, picture_K = [], []
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    from tqdm import tqdm

    for i in tqdm(range(n), desc="evaluate", unit="scene", disable=args.quiet):
        item = data[i]
        batch = {k: v[None].to(device) for k, v in item.items()}
        present = item["hand_present"]
        gt_meshes = [
            Mesh(item["vertices"][h].numpy(), faces[h]) if present[h] else None for h in range(2)
        ]
        row = {}
        for v in variants:
            with torch.no_grad():
                joints = v.keypoints(batch)
                occ = v.occupancy(batch, joints)
                meshes = mesh_scene(occ, joints[0], batch["hand_present"][0], args.resolution,
                                    args.upsampling_steps, v.threshold)  # fmt: skip
            for h in range(2):
                if not present[h]:
                    table.add_hand(v.name, None)
                    continue
                m = hand_metrics(
                    meshes[h], item["vertices"][h].numpy(), faces[h],
                    joints[0, h].cpu().numpy(), item["joints_3d"][h].numpy(), rng,
                    n_iou=args.n_iou, n_chamfer=args.n_chamfer,
                )  # fmt: skip
                table.add_hand(v.name, m)
            if bool(present.all()):
                table.add_scene(v.name, scene_penetration_cm3(meshes))
            row[v.name] = meshes
        if i < args.pictures:
            image = (item["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            picture_rows.append((image, gt_meshes, row))
            picture_K.append(item["K"].numpy())
    seconds = time.perf_counter() - t0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = table.summary()
    summary["settings"] = {
        "data": str(args.data),
        "scenes": n,
        "checkpoints": [str(p) for p in args.checkpoint],
        "resolution": args.resolution,
        "upsampling_steps": args.upsampling_steps,
        "effective_resolution": args.resolution * 2**args.upsampling_steps,
        "n_iou": args.n_iou,
        "n_chamfer": args.n_chamfer,
        "noise_mm": None if noise_stage is None else noise_stage.sigma_mm,
        "seconds": round(seconds, 1),
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "results.md").write_text(table.to_markdown() + "\n")
    if picture_rows:
        Image.fromarray(comparison_picture(picture_rows, picture_K)).save(out / "comparison.png")
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="training/evaluate.py",
        description="Paper-style table (IoU %, Chamfer-L1 mm, MPJPE mm, penetration cm^3) of "
        "trained checkpoints on a held-out dataset.",
    )
    p.add_argument("--checkpoint", action="append", required=True,
                   help="a training checkpoint (init_occ / ref_occ / kpts_ref); repeat for more")
    p.add_argument("--data", required=True, help="held-out dataset folder (im2hands-data synth)")
    p.add_argument("--out", default="results", help="output folder (default: results)")
    p.add_argument("--scenes", type=int, default=None, help="first N scenes (default: all)")
    p.add_argument("--resolution", type=int, default=32, help="MISE coarse grid (default 32)")
    p.add_argument("--upsampling-steps", type=int, default=3,
                   help="MISE subdivisions (default 3: 256^3 effective, the paper protocol)")
    p.add_argument("--n-iou", type=int, default=100_000, help="uniform IoU points per hand")
    p.add_argument("--n-chamfer", type=int, default=100_000, help="surface samples per direction")
    p.add_argument("--noise-mm", type=float, default=None,
                   help="per-joint noise for the K variants (default: the kpts_ref config's)")
    p.add_argument("--pictures", type=int, default=4, help="scenes in comparison.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.scenes is not None and args.scenes <= 0:
        p.error("--scenes must be positive")
    if args.resolution < 2 or args.upsampling_steps < 0:
        p.error("--resolution must be >= 2 and --upsampling-steps >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
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
