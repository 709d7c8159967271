"""The training engine (im2hands_model.training) with a small real stage defined here.

``ToyStage`` regresses the 3D keypoints of the tiny synthetic dataset from the image with a tiny
CNN (with dropout, so the global RNG matters, and image noise drawn from the engine's generator,
so the per-step generator matters). It is registered with ``register_stage`` in-process and named
as ``<this file>:ToyStage`` in the configs of the subprocess runs (train.py, torchrun).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from im2hands_model.training import ConfigError, load_config, load_stage, register_stage
from im2hands_model.training.checkpoint import (
    load_checkpoint,
    load_model_state,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from im2hands_model.training.data import (
    ResumableDistributedBatchSampler,
    build_dataset,
    validation_batches,
)
from im2hands_model.training.engine import lr_factor, train
from im2hands_model.training.stages import STAGE_NAMES, unregister_stage

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "training" / "train.py"
THIS_FILE = Path(__file__).resolve()
STAGE_PATH = f"{THIS_FILE}:ToyStage"


class ToyNet(nn.Module):
    """image [B, 3, S, S] -> keypoints [B, 2, 21, 3] in decimetres (camera frame)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=8, stride=8)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 2 * 21 * 3)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return self.head(self.drop(f)).view(-1, 2, 21, 3)


class ToyStage:
    """A real (small) stage: keypoint regression, MSE in decimetres; metric err_mm (min)."""

    name = "toy"
    best_metric = "err_mm"
    best_mode = "min"
    data_keys = ("image", "K", "joints_3d", "hand_present")

    def __init__(self, cfg: dict) -> None:
        toy = cfg.get("toy") or {}
        self.sleep_s = float(toy.get("sleep_s", 0.0))
        self.nan_calls = {int(c) for c in toy.get("nan_calls", [])}
        nan_rank = toy.get("nan_rank")  # only this rank's loss turns NaN (None: every rank)
        if nan_rank is not None and int(os.environ.get("RANK", "0")) != int(nan_rank):
            self.nan_calls = set()
        self.noise = float(toy.get("noise", 0.02))
        self.calls = 0

    def build_model(self, device: torch.device) -> nn.Module:
        return ToyNet().to(device)

    @staticmethod
    def _error(pred: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch["joints_3d"] * 10.0
        mask = batch["hand_present"].float()[:, :, None, None]
        return (pred - target) * mask, mask

    def loss(self, model, batch, gen):
        self.calls += 1
        if self.sleep_s:
            time.sleep(self.sleep_s)
        image = batch["image"]
        noise = torch.randn(image.shape, generator=gen, device=gen.device).to(image.device)
        diff, mask = self._error(model(image + self.noise * noise), batch)
        mse = diff.pow(2).sum() / (mask.sum() * 63).clamp(min=1)
        if self.calls in self.nan_calls:
            mse = mse * float("nan")
        return mse, {"mse": float(mse.detach())}

    @torch.no_grad()
    def validate(self, model, batch):
        diff, mask = self._error(model(batch["image"]), batch)
        err = diff.norm(dim=-1) * 100.0  # dm -> mm
        n = (mask[..., 0].sum() * 21).clamp(min=1)
        return {"err_mm": float(err.sum() / n), "mse": float(diff.pow(2).sum() / (n * 3))}

    @torch.no_grad()
    def visualize(self, model, batch):
        img = (batch["image"][0].permute(1, 2, 0).cpu().numpy() * 255).astype(np.uint8).copy()
        pred = model(batch["image"][:1])[0] / 10.0  # metres
        uvw = torch.einsum("ij,hkj->hki", batch["K"][0], pred)
        uv = (uvw[..., :2] / uvw[..., 2:].clamp(min=1e-3)).long().cpu().numpy()
        s = img.shape[0]
        for u, v in uv.reshape(-1, 2):
            if 0 <= u < s and 0 <= v < s:
                img[v, u] = (255, 0, 0)
        return img


def toy_config(data: Path, out: Path, **train_overrides) -> dict:
    """A resolved config for the toy stage on the tiny dataset (CPU, quiet)."""
    train_cfg = {
        "device": "cpu", "batch_size": 4, "lr": 3e-2, "max_steps": 40,
        "scheduler": {"type": "cosine", "warmup_steps": 5},
        "log_every": 1, "val_every": 20, "val_batches": 2, "ckpt_every": 10,
        "progress": False, **train_overrides,
    }  # fmt: skip
    base = {
        "stage": "toy",
        "seed": 3,
        "out": str(out),
        "data": {"train": str(data), "val": str(data), "num_workers": 0},
        "train": train_cfg,
    }
    return load_config(base=base)


@pytest.fixture
def toy_registered():
    register_stage(ToyStage)
    yield
    unregister_stage("toy")


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# --- config -----------------------------------------------------------------------------------


def test_config_overrides_types_and_errors(tiny_dataset_dir, tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({
        "stage": "init_occ",
        "data": {"train": str(tiny_dataset_dir), "val": str(tiny_dataset_dir)},
        "model": {"encoder": {"depth": "resnet18", "base_width": 16}},
    }))  # fmt: skip
    cfg = load_config(cfg_file, [
        "train.lr=3e-4", "train.batch_size=2", "train.amp=false", "train.time_limit_min=null",
        "model.encoder.depth=resnet50", "model.new.key=[1, 2]", "train.scheduler.type=step",
    ], out=tmp_path / "run")  # fmt: skip
    assert cfg["train"]["lr"] == pytest.approx(3e-4) and isinstance(cfg["train"]["lr"], float)
    assert cfg["train"]["batch_size"] == 2 and cfg["train"]["amp"] is False
    assert cfg["train"]["time_limit_min"] is None
    assert cfg["model"]["encoder"] == {"depth": "resnet50", "base_width": 16}  # merged
    assert cfg["model"]["new"]["key"] == [1, 2]
    assert cfg["train"]["scheduler"]["type"] == "step"
    assert cfg["train"]["scheduler"]["warmup_steps"] == 0  # default kept
    assert cfg["out"] == str(tmp_path / "run")
    # the default run folder follows the stage
    assert load_config(cfg_file)["out"] == str(Path("runs") / "init_occ")

    def err(overrides, path=cfg_file):
        with pytest.raises(ConfigError) as info:
            load_config(path, overrides)
        return str(info.value)

    msg = err(["data.dataset=interhand"])  # the synthetic folders are not InterHand conversions
    assert "is not an InterHand2.6M conversion" in msg and "im2hands-data interhand" in msg
    msg = err(["stage=nonsense"])
    assert "unknown stage 'nonsense'" in msg and all(s in msg for s in STAGE_NAMES)
    assert "expected key.sub=value" in err(["train.lr"])
    assert "dotted names" in err(["=3"])
    assert "dotted names" in err(["train..lr=3"])
    assert "train.batch_size must be a positive integer, not 0" in err(["train.batch_size=0"])
    assert "train.batch_size must be a positive integer" in err(["train.batch_size=-2"])
    assert "train.lr must be a positive number" in err(["train.lr=fast"])
    assert "did you mean 'batch_size'" in err(["train.batchsize=4"])
    assert "train.scheduler.type must be one of cosine, step, constant" in err(
        ["train.scheduler.type=linear"])  # fmt: skip
    msg = err(["data.train=" + str(tmp_path / "nowhere")])
    assert "data.train" in msg and "does not exist" in msg and "im2hands-data synth" in msg
    assert "data.val is missing" in err(["data.val=null"])
    # several problems are reported together
    msg = err(["train.batch_size=0", "train.max_steps=-1"])
    assert "batch_size" in msg and "max_steps" in msg
    assert "is 'init_occ', not a section" in err(["stage.sub=1"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("- a\n- b\n")
    assert "top level must be a mapping" in err([], bad_yaml)
    assert "does not exist" in err([], tmp_path / "missing.yaml")


def test_dataset_factory_and_shipped_configs(tiny_dataset_dir):
    cfg = {"data": {"dataset": "interhand", "train": str(tiny_dataset_dir)}}
    with pytest.raises(ConfigError, match="is not an InterHand2.6M conversion"):
        build_dataset(cfg, "train")
    cfg["data"]["dataset"] = "synthetic"
    assert len(build_dataset(cfg, "train")) == 16
    for stage in STAGE_NAMES:
        c = load_config(REPO / "training" / "configs" / f"{stage}.yaml", check_paths=False)
        assert c["stage"] == stage and c["out"] == f"runs/{stage}"
        assert c["data"]["train"] == "out/bench/train" and c["data"]["val"] == "out/bench/val"
        assert c["model"]["encoder"]["depth"] == "resnet18"
    ref = load_config(REPO / "training" / "configs" / "ref_occ.yaml", check_paths=False)
    assert ref["init"]["init_occ_checkpoint"] == "runs/init_occ/best.pt"


def test_stage_registry():
    with pytest.raises(ConfigError) as info:
        load_stage("nope")
    assert all(s in str(info.value) for s in STAGE_NAMES)
    cls = load_stage(STAGE_PATH)  # file path form (used across processes)
    assert cls.name == "toy" and cls.best_mode == "min"
    with pytest.raises(ConfigError, match="no attribute 'Missing'"):
        load_stage(f"{THIS_FILE}:Missing")
    with pytest.raises(TypeError, match="Stage protocol"):
        register_stage(type("Bad", (), {"name": "bad"}))
    register_stage(ToyStage, name="toy2")
    try:
        assert load_stage("toy2") is ToyStage
    finally:
        unregister_stage("toy2")


def test_lr_schedule():
    cos = {"type": "cosine", "warmup_steps": 10, "min_lr_ratio": 0.1}
    assert lr_factor(0, cos, 110) == pytest.approx(0.1)
    assert lr_factor(9, cos, 110) == pytest.approx(1.0)
    assert lr_factor(10, cos, 110) == pytest.approx(1.0)
    assert lr_factor(60, cos, 110) == pytest.approx(0.55)
    assert lr_factor(110, cos, 110) == pytest.approx(0.1)
    step = {"type": "step", "warmup_steps": 0, "step_size": 5, "gamma": 0.5}
    assert [lr_factor(s, step, 100) for s in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(50, {"type": "constant", "warmup_steps": 0}, 100) == 1.0


# --- sampler ----------------------------------------------------------------------------------


def test_sampler_deterministic_sharded_resumable():
    s0 = ResumableDistributedBatchSampler(10, 2, rank=0, world_size=2, seed=5)
    s1 = ResumableDistributedBatchSampler(10, 2, rank=1, world_size=2, seed=5)
    assert len(s0) == 2  # 5 items per rank -> 2 full batches
    b0, b1 = s0.epoch_batches(0), s1.epoch_batches(0)
    flat0, flat1 = sum(b0, []), sum(b1, [])
    assert not set(flat0) & set(flat1)  # ranks never share an item within an epoch
    assert s0.epoch_batches(0) == b0  # a pure function of (seed, epoch)
    assert s0.epoch_batches(1) != b0
    other_seed = ResumableDistributedBatchSampler(10, 2, rank=0, world_size=2, seed=6)
    assert other_seed.epoch_batches(0) != b0
    s0.set_position(0, 1)
    assert list(s0) == b0[1:] and len(s0) == 1
    s0.set_position(3, 2)
    assert list(s0) == []
    one = ResumableDistributedBatchSampler(7, 3, seed=1)
    assert len(set(sum(one.epoch_batches(0), []))) == 6  # 2 full batches of distinct items
    with pytest.raises(ConfigError, match="larger than this process's share"):
        ResumableDistributedBatchSampler(4, 3, rank=0, world_size=2)
    assert validation_batches(5, 2, 10, rank=1, world_size=2) == [[1, 3]]
    assert validation_batches(9, 2, 1, rank=0, world_size=1) == [[0, 1]]


# --- checkpoints ------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = ToyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for _ in range(3):
        model(torch.rand(2, 3, 32, 32)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    np.random.seed(11)
    path = save_checkpoint(tmp_path / "ck" / "last.pt", model=model, optimizer=opt,
                           scheduler=sched, step=3, epoch=1, batch_in_epoch=2,
                           best={"metric": "err_mm", "mode": "min", "value": 1.5, "step": 3},
                           config={"stage": "toy", "train": {"lr": 1e-2, "x": None}},
                           stage="toy")  # fmt: skip
    expected = (torch.rand(3), np.random.rand(2), __import__("random").random())
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.pt"]  # no temporary left

    ck = load_checkpoint(path)  # weights_only=True inside
    torch.load(path, weights_only=True)  # readable without unpickling code
    assert ck["step"] == 3 and ck["epoch"] == 1 and ck["batch_in_epoch"] == 2
    assert ck["best"]["value"] == 1.5 and ck["config"]["train"]["x"] is None

    torch.manual_seed(99)
    fresh = ToyNet()
    opt2 = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 0.5**s)
    assert state_digest(fresh) != state_digest(model)
    restore_training_state(ck, fresh, opt2, sched2)
    assert state_digest(fresh) == state_digest(model)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        sa, sb = opt.state[p], opt2.state[q]
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"]) == 3
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 8)
    assert sched2.last_epoch == 3
    # one more identical step gives identical weights
    x = torch.rand(2, 3, 32, 32)
    for m, o in ((model, opt), (fresh, opt2)):
        m.eval()
        m(x).pow(2).mean().backward()
        o.step()
    assert state_digest(fresh) == state_digest(model)
    # RNG states come back
    set_rng_state(ck["rng"][0])
    got = (torch.rand(3), np.random.rand(2), __import__("random").random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    st = rng_state()
    assert isinstance(st["python"]["state"], torch.Tensor)
    # weights-only loading refuses arbitrary objects
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "format_version": 1, "obj": ToyStage}, evil)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        load_checkpoint(evil)
    assert set(load_model_state(path)) == set(model.state_dict())


# --- in-process training ----------------------------------------------------------------------


def test_loss_falls_and_run_folder(tiny_dataset_dir, tmp_path, toy_registered):
    out = tmp_path / "run"
    result = train(toy_config(tiny_dataset_dir, out), resume=False)
    assert result["step"] == 40 and result["stopped"] == "max_steps"
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 41))
    losses = [r["loss"] for r in log]
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.35 * first, (first, last)
    # warm-up then cosine decay of the learning rate
    assert log[0]["lr"] == pytest.approx(3e-2 / 5) and log[4]["lr"] == pytest.approx(3e-2)
    assert log[-1]["lr"] < 0.01 * 3e-2
    assert log[-1]["samples_per_s"] > 0 and "mse" in log[-1]["terms"]

    names = {p.name for p in out.iterdir()}
    assert {"last.pt", "best.pt", "model.safetensors", "config.yaml", "train_log.jsonl",
            "val_log.jsonl", "tb", "vis"} <= names  # fmt: skip
    assert not [n for n in names if n.startswith(".")]  # no temporaries left
    val = read_log(out / "val_log.jsonl")
    assert [r["step"] for r in val] == [20, 40]
    assert val[1]["metrics"]["err_mm"] < val[0]["metrics"]["err_mm"]
    assert sorted(p.name for p in (out / "vis").iterdir()) == ["step_0000020.png",
                                                               "step_0000040.png"]  # fmt: skip
    assert list((out / "tb").glob("events.out.tfevents.*"))
    saved_cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert saved_cfg["train"]["max_steps"] == 40 and saved_cfg["stage"] == "toy"

    last = load_checkpoint(out / "last.pt")
    best = load_checkpoint(out / "best.pt")
    assert last["step"] == 40 and last["best"]["metric"] == "err_mm"
    assert best["step"] == result["best"]["step"] == 40
    assert result["best"]["value"] == pytest.approx(val[1]["metrics"]["err_mm"])
    st = load_model_state(out / "model.safetensors")
    assert state_digest(st) == state_digest(best["model"])
    # the run refuses to overwrite itself without --resume
    with pytest.raises(ConfigError, match="--resume"):
        train(toy_config(tiny_dataset_dir, out), resume=False)
    # resuming a finished run changes nothing
    again = train(toy_config(tiny_dataset_dir, out), resume=True)
    assert again["step"] == 40 and again["resumed_from"] == 40
    assert state_digest(load_checkpoint(out / "last.pt")["model"]) == state_digest(last["model"])


def test_nonfinite_loss_is_skipped(tiny_dataset_dir, tmp_path, toy_registered):
    cfg = toy_config(tiny_dataset_dir, tmp_path / "nan", max_steps=8, val_every=8,
                     ckpt_every=8)  # fmt: skip
    cfg["toy"] = {"nan_calls": [3, 4]}
    result = train(cfg, resume=False)
    assert result["step"] == 8 and result["skipped_nonfinite"] == 2
    log = read_log(tmp_path / "nan" / "train_log.jsonl")
    assert [r["loss"] is None for r in log] == [i in (3, 4) for i in range(1, 9)]
    assert log[-1]["skipped_nonfinite"] == 2
    state = load_checkpoint(tmp_path / "nan" / "last.pt")["model"]
    assert all(torch.isfinite(v).all() for v in state.values())
    assert math.isfinite(result["val"]["err_mm"])

    cfg = toy_config(tiny_dataset_dir, tmp_path / "nan2", max_steps=8,
                     max_consecutive_nonfinite=3)  # fmt: skip
    cfg["toy"] = {"nan_calls": [2, 3, 4, 5]}
    with pytest.raises(FloatingPointError, match="3 consecutive steps"):
        train(cfg, resume=False)


def test_time_limit_stops_with_validation_and_checkpoint(tiny_dataset_dir, tmp_path,
                                                         toy_registered):  # fmt: skip
    out = tmp_path / "timed"
    cfg = toy_config(tiny_dataset_dir, out, time_limit_min=0.003)  # 0.18 s
    cfg["toy"] = {"sleep_s": 0.05}
    result = train(cfg, resume=False)
    assert result["stopped"] == "time_limit" and 1 <= result["step"] < 40
    assert load_checkpoint(out / "last.pt")["step"] == result["step"]
    assert read_log(out / "val_log.jsonl")[-1]["step"] == result["step"]
    assert load_checkpoint(out / "best.pt")["step"] == result["step"]


# --- subprocesses: kill / resume, torchrun ---------------------------------------------------


def _sub_env() -> dict[str, str]:
    env = dict(os.environ)  # keeps ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST from conftest
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _write_cfg(path: Path, data: Path, **train_overrides) -> Path:
    cfg = {
        "stage": STAGE_PATH,
        "seed": 3,
        "data": {"train": str(data), "val": str(data), "num_workers": 1},
        "train": {"device": "cpu", "batch_size": 4, "lr": 3e-2, "max_steps": 40,
                  "scheduler": {"type": "cosine", "warmup_steps": 5}, "log_every": 1,
                  "val_every": 15, "val_batches": 2, "ckpt_every": 10, **train_overrides},
        "toy": {"sleep_s": 0.1},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cmd(cfg: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(TRAIN_PY), "--config", str(cfg), "--out", str(out), *extra]


def _ckpt_step(path: Path) -> int:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except (FileNotFoundError, RuntimeError, EOFError):
        return -1


def _log_step(path: Path) -> int:
    try:
        lines = path.read_text().splitlines()
        return int(json.loads(lines[-1])["step"]) if lines else -1
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def _run_until(cmd: list[str], cond, sig: int, timeout: float = 120.0):
    proc = subprocess.Popen(cmd, env=_sub_env(), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    deadline = time.monotonic() + timeout
    try:
        while not cond():
            if proc.poll() is not None:
                raise AssertionError(f"run ended before the signal:\n{proc.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the run")
            time.sleep(0.03)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, output


def test_kill_and_resume_repeat_the_uninterrupted_run(tiny_dataset_dir, tmp_path):
    cfg = _write_cfg(tmp_path / "toy.yaml", tiny_dataset_dir)
    env = _sub_env()
    ref = tmp_path / "ref"
    proc = subprocess.run(_cmd(cfg, ref), env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "max_steps: step 40" in proc.stdout
    ref_log = read_log(ref / "train_log.jsonl")
    assert [r["step"] for r in ref_log] == list(range(1, 41))
    ref_digest = state_digest(load_checkpoint(ref / "last.pt")["model"])

    # 1. SIGKILL once last.pt holds step >= 20; resume from it
    killed = tmp_path / "killed"
    rc, output = _run_until(_cmd(cfg, killed), lambda: _ckpt_step(killed / "last.pt") >= 20,
                            signal.SIGKILL)  # fmt: skip
    assert rc == -signal.SIGKILL, output[-2000:]
    at_kill = _ckpt_step(killed / "last.pt")
    assert at_kill in (20, 30), at_kill

    # 2. SIGTERM after step 15 was logged: the step is finished, checkpointed, exit 0
    termed = tmp_path / "termed"
    rc, output = _run_until(_cmd(cfg, termed), lambda: _log_step(termed / "train_log.jsonl") >= 15,
                            signal.SIGTERM)  # fmt: skip
    assert rc == 0, output[-3000:]
    assert "SIGTERM received" in output and "signal: step" in output
    at_term = _ckpt_step(termed / "last.pt")
    assert 15 <= at_term < 40
    assert _log_step(termed / "train_log.jsonl") == at_term

    for run, stopped_at in ((killed, at_kill), (termed, at_term)):
        proc = subprocess.run(_cmd(cfg, run, "--resume"), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"resumed {run / 'last.pt'} at step {stopped_at}" in proc.stderr
        log = read_log(run / "train_log.jsonl")
        assert [r["step"] for r in log] == list(range(1, 41))
        # the whole loss curve and the final weights are those of the uninterrupted run
        assert [r["loss"] for r in log] == [r["loss"] for r in ref_log]
        assert [r["lr"] for r in log] == [r["lr"] for r in ref_log]
        assert state_digest(load_checkpoint(run / "last.pt")["model"]) == ref_digest
        val = read_log(run / "val_log.jsonl")
        assert [r["step"] for r in val] == [15, 30, 40]
        assert val == [v | {"time": val[i]["time"]} for i, v in
                       enumerate(read_log(ref / "val_log.jsonl"))]  # fmt: skip


def test_torchrun_two_processes_gloo(tiny_dataset_dir, tmp_path):
    cfg = _write_cfg(tmp_path / "toy.yaml", tiny_dataset_dir, max_steps=6, val_every=3,
                     ckpt_every=3, debug_rank_state=True)  # fmt: skip
    out = tmp_path / "ddp"
    # rank 1 alone gets a NaN loss at step 2: both ranks must skip that update together
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *_cmd(cfg, out, "--set", "data.num_workers=0", "toy.sleep_s=0", "toy.nan_calls=[2]",
                 "toy.nan_rank=1")[1:]]  # fmt: skip
    proc = subprocess.run(cmd, env=_sub_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    ranks = [json.loads((out / "debug" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["step"] == ranks[1]["step"] == 6
    saved = state_digest(load_checkpoint(out / "last.pt")["model"])
    assert ranks[0]["digest"] == ranks[1]["digest"] == saved
    ck = load_checkpoint(out / "last.pt")
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2
    assert ck["skipped_nonfinite"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())
    # the ranks drew different data and noise: their RNG streams differ
    assert not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
    log = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7))
    assert [r["loss"] is None for r in log] == [s == 2 for s in range(1, 7)]  # mean over ranks
    # 2 ranks x 4 scenes per step: 16 scenes are one epoch of 2 steps
    assert ck["epoch"] == 2 and ck["batch_in_epoch"] == 2


def test_a_collapse_in_throughput_is_explained():
    from im2hands_model.training.engine import SLOWDOWN_FACTOR, slowdown_warning

    assert slowdown_warning(70.0, 0.0, "cpu") is None  # the first window sets the pace
    assert slowdown_warning(70.0 / (SLOWDOWN_FACTOR - 0.5), 70.0, "cpu") is None  # ordinary noise
    cpu = slowdown_warning(3.0, 70.0, "cpu")
    assert cpu is not None and "3.0 samples/s from 70.0 (23x slower)" in cpu
    assert f"on {os.cpu_count()} cores" in cpu and "OMP_NUM_THREADS" in cpu
    gpu = slowdown_warning(3.0, 70.0, "cuda")
    assert gpu is not None and "load average" not in gpu
