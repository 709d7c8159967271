"""Every stage trains through the real engine on the tiny generated dataset and its loss falls."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from im2hands_model.training.config import load_config
from im2hands_model.training.engine import train

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
TINY_ENCODER = "{depth: resnet18, base_width: 8, feature_dim: 16, global_dim: 32}"


def _cfg(stage: str, data: Path, out: Path, steps: int, extra: list[str]) -> dict:
    overrides = [
        f"data.train={data}", f"data.val={data}", "data.num_workers=0",
        f"train.max_steps={steps}", "train.batch_size=4", "train.lr=1.0e-3",
        "train.scheduler.type=constant", "train.scheduler.warmup_steps=0",
        "train.log_every=1", f"train.val_every={steps}", "train.val_batches=1",
        f"train.ckpt_every={steps}", "train.device=cpu", f"model.encoder={TINY_ENCODER}",
        *extra,
    ]  # fmt: skip
    return load_config(CONFIGS / f"{stage}.yaml", overrides, out=out)


def _losses(out: Path) -> np.ndarray:
    lines = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    return np.array([x["loss"] for x in lines if "loss" in x and x["loss"] is not None])


def _assert_falls(losses: np.ndarray) -> None:
    assert np.isfinite(losses).all()
    first, last = losses[:5].mean(), losses[-5:].mean()
    assert last < 0.9 * first, f"loss did not fall: first {first:.4f}, last {last:.4f}"


@pytest.fixture(scope="module")
def init_run(tiny_dataset_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init_occ")
    cfg = _cfg("init_occ", tiny_dataset_dir, out, 40,
               ["data.points_per_hand=256", "model.hidden=32",
                "model.capsule_prior=false"])  # fmt: skip
    result = train(cfg)
    assert result["step"] == 40
    return out


def test_init_occ_trains_validates_and_checkpoints(init_run):
    _assert_falls(_losses(init_run))
    ckpt = torch.load(init_run / "best.pt", weights_only=True)
    assert ckpt["stage"] == "init_occ" and ckpt["step"] == 40
    assert (init_run / "model.safetensors").is_file()
    val = [json.loads(x) for x in (init_run / "val_log.jsonl").read_text().splitlines()]
    assert val and 0.0 <= val[-1]["metrics"]["iou"] <= 1.0, val
    assert list((init_run / "vis").glob("*.png")), "no validation picture"


def test_halo_mode_trains_without_an_image_encoder(tiny_dataset_dir, tmp_path):
    cfg = _cfg("init_occ", tiny_dataset_dir, tmp_path, 30,
               ["data.points_per_hand=256", "model.hidden=32", "model.capsule_prior=false",
                "model.image_conditioning=false"])  # fmt: skip
    train(cfg)
    _assert_falls(_losses(tmp_path))
    state = torch.load(tmp_path / "last.pt", weights_only=True)["model"]
    assert not any(k.startswith("encoder.") for k in state)


def test_ref_occ_trains_with_i_frozen(init_run, tiny_dataset_dir, tmp_path):
    cfg = _cfg("ref_occ", tiny_dataset_dir, tmp_path, 30,
               ["data.points_per_hand=256", f"init.init_occ_checkpoint={init_run / 'best.pt'}",
                "model.refine={dim: 32, num_anchors: 64, latent_dim: 32, hidden: 32}",
                "model.anchor_candidates=256"])  # fmt: skip
    train(cfg)
    _assert_falls(_losses(tmp_path))
    i_before = torch.load(init_run / "best.pt", weights_only=True)["model"]
    after = torch.load(tmp_path / "last.pt", weights_only=True)
    for k, v in i_before.items():  # I is frozen: its weights inside I+R are unchanged
        assert torch.equal(after["model"][f"init.{k}"], v), k
    # the run records I's architecture, so evaluation can rebuild I+R from this file alone
    assert after["config"]["init"]["init_occ_model"]["hidden"] == 32


def test_ref_occ_goes_on_from_the_shipped_i_with_overlap_points(tiny_dataset_dir, tmp_path):
    """R trained on the shipped I (frozen) with extra points where I's two hands overlap: those
    points carry far more two-hand overlap than the stored ones, so the new loss term is real."""
    from im2hands_model.pretrained import load_state

    steps = 6
    cfg = _cfg("ref_occ", tiny_dataset_dir, tmp_path, steps,
               ["data.points_per_hand=256", "init.init_occ_checkpoint=pretrained",
                "model.refine={dim: 16, num_anchors: 32, latent_dim: 16, hidden: 16}",
                "model.anchor_candidates=256", "train.batch_size=2", "loss.overlap_weight=1.0",
                "loss.overlap_points=32", "loss.overlap_pool=256"])  # fmt: skip
    assert train(cfg)["step"] == steps
    after = torch.load(tmp_path / "last.pt", weights_only=True)
    shipped, entry = load_state("init_occ")
    for k, v in shipped.items():  # the shipped I, frozen
        assert torch.equal(after["model"][f"init.{k}"], v), k
    assert after["config"]["init"]["init_occ_model"] == entry["config"]["model"]
    lines = [json.loads(x) for x in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    overlap = np.array([x["terms"]["overlap_penetration"] for x in lines if "terms" in x])
    regular = np.array([x["terms"]["penetration"] for x in lines if "terms" in x])
    assert len(overlap) == steps and np.isfinite(overlap).all()
    assert overlap.mean() > 3 * regular.mean() > 0, (overlap, regular)


def test_ref_occ_without_an_i_checkpoint_fails_clearly(tiny_dataset_dir, tmp_path):
    cfg = _cfg("ref_occ", tiny_dataset_dir, tmp_path, 2,
               [f"init.init_occ_checkpoint={tmp_path / 'missing.pt'}"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="train the init_occ stage first"):
        train(cfg)


def test_keypoint_predictor_stage_trains(tiny_dataset_dir, tmp_path):
    train(_cfg("kpts_pred", tiny_dataset_dir, tmp_path, 40, []))
    _assert_falls(_losses(tmp_path))


def test_keypoint_refinement_stage_trains_and_beats_its_noisy_input(tiny_dataset_dir, tmp_path):
    # The training loss is dominated by fresh per-step noise (incl. a global offset per hand that
    # the image barely constrains); validation uses fixed noise per scene: K must beat its input.
    # Judged on all 16 scenes (one batch of 4 left it 1 % from the bar, on which side depending
    # on the thread count): 7-9 % better after 160 steps with 1 and 2 threads.
    train(_cfg("kpts_ref", tiny_dataset_dir, tmp_path, 160, ["train.val_batches=4"]))
    assert np.isfinite(_losses(tmp_path)).all()
    val = json.loads((tmp_path / "val_log.jsonl").read_text().splitlines()[-1])["metrics"]
    assert val["mpjpe_mm"] < 0.95 * val["mpjpe_in_mm"], val


def test_evaluate_writes_the_table_for_every_variant(init_run, tiny_dataset_dir, tmp_path):
    """HALO, I, I+R and K variants end to end through training/evaluate.py (tiny sizes)."""
    import subprocess
    import sys

    halo = tmp_path / "halo"
    train(_cfg("init_occ", tiny_dataset_dir, halo, 4,
               ["data.points_per_hand=128", "model.hidden=16",
                "model.image_conditioning=false"]))  # fmt: skip
    ref = tmp_path / "ref"
    train(_cfg("ref_occ", tiny_dataset_dir, ref, 4,
               ["data.points_per_hand=128", f"init.init_occ_checkpoint={init_run / 'best.pt'}",
                "model.refine={dim: 16, num_anchors: 32, latent_dim: 16, hidden: 16}",
                "model.anchor_candidates=128"]))  # fmt: skip
    kref = tmp_path / "kref"
    train(_cfg("kpts_ref", tiny_dataset_dir, kref, 4, []))
    out = tmp_path / "results"
    script = Path(__file__).resolve().parents[1] / "training" / "evaluate.py"
    cmd = [
        sys.executable,
        str(script),
        "--data",
        str(tiny_dataset_dir),
        "--scenes",
        "2",
        "--resolution",
        "12",
        "--upsampling-steps",
        "1",
        "--n-iou",
        "3000",
        "--n-chamfer",
        "2000",
        "--pictures",
        "2",
        "--quiet",
        "--out",
        str(out),
    ]
    for run in (halo, init_run, ref, kref):
        cmd += ["--checkpoint", str(run / "best.pt")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "results.json").read_text())
    names = list(summary["variants"])
    assert names == ["HALO", "I", "I+R", "I on noisy kpts", "I on noisy kpts + K", "GT meshes"]
    for name, row in summary["variants"].items():
        assert set(row) >= {"iou", "chamfer_mm", "mpjpe_mm", "penetration_cm3", "contact_cm2"}
        assert name == "GT meshes" or 0.0 <= row["iou"] <= 100.0, name
    assert summary["variants"]["HALO"]["mpjpe_mm"] == 0.0  # GT keypoints in
    assert summary["variants"]["I on noisy kpts"]["mpjpe_mm"] > 1.0
    assert "| I+R |" in (out / "results.md").read_text()
    from PIL import Image

    assert Image.open(out / "comparison.png").size[0] == 128 * 7  # input, GT, 5 variants


def test_evaluate_rejects_missing_checkpoints(tiny_dataset_dir, tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "training" / "evaluate.py"
    proc = subprocess.run([sys.executable, str(script), "--data", str(tiny_dataset_dir),
                           "--checkpoint", str(tmp_path / "nope.pt")],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_resumed_init_occ_run_reproduces_the_uninterrupted_loss_curve(tiny_dataset_dir, tmp_path):
    """The real I stage (image branch, capsule prior, part loss): 12 steps in one go equal
    6 steps + resume to 12, loss by loss and weight by weight."""
    extra = ["data.points_per_hand=128", "model.hidden=16", "train.val_every=100",
             "train.ckpt_every=3"]  # fmt: skip
    full = tmp_path / "full"
    train(_cfg("init_occ", tiny_dataset_dir, full, 12, extra))
    split = tmp_path / "split"
    train(_cfg("init_occ", tiny_dataset_dir, split, 6, extra))
    result = train(_cfg("init_occ", tiny_dataset_dir, split, 12, extra), resume=True)
    assert result["resumed_from"] == 6 and result["step"] == 12
    np.testing.assert_array_equal(_losses(full), _losses(split))
    a = torch.load(full / "last.pt", weights_only=True)["model"]
    b = torch.load(split / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
