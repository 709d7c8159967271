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


def test_ref_occ_without_an_i_checkpoint_fails_clearly(tiny_dataset_dir, tmp_path):
    cfg = _cfg("ref_occ", tiny_dataset_dir, tmp_path, 2,
               [f"init.init_occ_checkpoint={tmp_path / 'missing.pt'}"])  # fmt: skip
    with pytest.raises(FileNotFoundError, match="train the init_occ stage first"):
        train(cfg)


@pytest.mark.parametrize("stage", ["kpts_pred", "kpts_ref"])
def test_keypoint_stages_train(stage, tiny_dataset_dir, tmp_path):
    cfg = _cfg(stage, tiny_dataset_dir, tmp_path, 40, [])
    train(cfg)
    _assert_falls(_losses(tmp_path))
