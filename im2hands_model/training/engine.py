"""The training loop shared by every stage.

:func:`train` builds the stage selected by ``cfg['stage']``, its model, the optimiser (Adam/AdamW
over the parameters that require gradients), the learning-rate schedule (cosine/step/constant with
linear warm-up), mixed precision on CUDA, DistributedDataParallel under ``torchrun``, and then runs
``train.max_steps`` steps:

* each step draws the next batch of the resumable sampler, calls ``stage.loss(model, batch, gen)``
  with a generator seeded from ``(seed, step, rank)``, back-propagates, clips the gradient norm and
  steps the optimiser and the schedule;
* a non-finite loss (on any rank) skips the update (the step still counts), is logged and counted;
  ``train.max_consecutive_nonfinite`` of them in a row abort with ``FloatingPointError``;
* every ``log_every`` steps: a line in ``<out>/train_log.jsonl``, TensorBoard scalars, the tqdm
  bar's loss and samples/s (rank 0);
* every ``val_every`` steps: ``stage.validate`` on ``val_batches`` batches per rank (means reduced
  over the ranks), ``stage.visualize`` on rank 0's first batch (TensorBoard image and
  ``<out>/vis/step_NNNNNNN.png``), a line in ``<out>/val_log.jsonl``, and ``best.pt`` +
  ``model.safetensors`` when ``stage.best_metric`` improves;
* every ``ckpt_every`` steps and at the end: ``last.pt``.

The run ends at ``max_steps``, after ``time_limit_min`` (validation + checkpoint first), or on
SIGINT/SIGTERM (the current step is finished and checkpointed; a second SIGINT aborts at once).
``train(cfg, resume=True)`` continues from ``<out>/last.pt`` with the same weights, optimiser,
schedule, GradScaler, RNG states and sampler position, so its loss curve is the uninterrupted one.

Randomness: model construction sees the global RNGs seeded with ``seed`` (same on every rank); the
loss sees only ``gen``; data order comes from ``(seed, epoch)``; validation and visualisation run
with the global RNG states saved and restored, so they never change the training stream.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from im2hands_model.training import distributed as dist_utils
from im2hands_model.training.checkpoint import (
    BEST,
    LAST,
    SAFETENSORS,
    export_safetensors,
    load_checkpoint,
    load_model_state,
    restore_training_state,
    rng_state,
    save_checkpoint,
    set_rng_state,
    state_digest,
)
from im2hands_model.training.config import ConfigError, load_config, save_config
from im2hands_model.training.data import (
    FixedBatchSampler,
    ResumableDistributedBatchSampler,
    batch_size_of,
    build_dataset,
    make_loader,
    move_to_device,
    validation_batches,
)
from im2hands_model.training.stages import load_stage

log = logging.getLogger("im2hands.train")

TRAIN_LOG = "train_log.jsonl"
VAL_LOG = "val_log.jsonl"

_MASK64 = (1 << 63) - 1


def mix_seed(*values: int) -> int:
    """A 63-bit seed from integers (a fixed, platform-independent mix)."""
    h = 0x243F6A8885A308D3
    for v in values:
        h ^= int(v) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h & _MASK64


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The loss's CPU generator for (0-based) step ``step`` on ``rank``.

    On the CPU whatever the training device, so that the random draws (point subsampling, noise)
    are the same numbers on every device; stages move what they draw to the batch's device.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(mix_seed(seed, step, rank))
    return gen


#: A log window this much slower than the run's fastest one gets a warning.
SLOWDOWN_FACTOR = 4.0


def slowdown_warning(samples_per_s: float, fastest: float, device_type: str) -> str | None:
    """The warning for a training window ``fastest / samples_per_s`` times slower than the best.

    On a CPU the usual cause is another process on the same cores: PyTorch's OpenMP threads
    wait for each other by spinning, so two busy processes on two cores slow each other down far
    more than twofold (docs/measurements.md).
    """
    if not (samples_per_s > 0 and fastest > 0) or fastest < SLOWDOWN_FACTOR * samples_per_s:
        return None
    msg = (f"training throughput fell to {samples_per_s:.1f} samples/s from {fastest:.1f} "
           f"({fastest / samples_per_s:.0f}x slower)")  # fmt: skip
    if device_type == "cpu":
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        msg += (
            f"; load average {load:.1f} on {cores} cores with {torch.get_num_threads()} torch "
            "threads here: other processes on the same cores slow PyTorch's threads down many "
            "times over (stop them, or give each process its own cores with OMP_NUM_THREADS)"
        )
    return msg


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (CPU and CUDA) global RNGs."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def lr_factor(step: int, sched: dict[str, Any], max_steps: int) -> float:
    """Learning-rate multiplier for (0-based) step ``step``.

    Linear warm-up ``(step + 1) / warmup_steps`` over the first ``warmup_steps`` steps, then
    ``cosine``: half a cosine from 1 to ``min_lr_ratio`` at ``max_steps``; ``step``: ``gamma`` per
    ``step_size`` steps after warm-up; ``constant``: 1.
    """
    warmup = int(sched.get("warmup_steps", 0))
    if step < warmup:
        return (step + 1) / warmup
    kind = sched.get("type", "constant")
    after = step - warmup
    if kind == "cosine":
        span = max(1, max_steps - warmup)
        p = min(1.0, after / span)
        lo = float(sched.get("min_lr_ratio", 0.0))
        return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * p))
    if kind == "step":
        return float(sched.get("gamma", 0.5)) ** (after // int(sched.get("step_size", 1000)))
    if kind == "constant":
        return 1.0
    raise ConfigError(f"unknown scheduler type {kind!r}")


def build_optimizer(params: list[nn.Parameter], tc: dict[str, Any]) -> torch.optim.Optimizer:
    """Adam or AdamW over ``params`` with ``train.lr``, ``train.weight_decay``, ``train.betas``."""
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[tc["optimizer"]]
    return cls(params, lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]),
               betas=tuple(float(b) for b in tc["betas"]))  # fmt: skip


def build_scheduler(
    optimizer: torch.optim.Optimizer, tc: dict[str, Any]
) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR applying :func:`lr_factor` (state: the step count, so it resumes exactly)."""
    sched = dict(tc["scheduler"])
    max_steps = int(tc["max_steps"])

    def factor(step: int) -> float:
        return lr_factor(step, sched, max_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Run a block without changing the global RNG states (torch, CUDA, numpy, random)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def truncate_jsonl(path: Path, max_step: int) -> None:
    """Keep the lines of a JSON-lines log whose ``step`` is at most ``max_step`` (atomically).

    Unparsable lines (a write cut short by a crash) are dropped too.
    """
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and int(rec.get("step", 0)) <= max_step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def _finite_float(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _json_float(v: float) -> float | None:
    """NaN/inf are not JSON: write them as null."""
    return v if math.isfinite(v) else None


class _Trainer:
    def __init__(self, cfg: dict, info: dist_utils.DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self.tc = cfg["train"]
        self.out = Path(cfg["out"])
        self.device = info.device
        self.seed = int(cfg["seed"])
        self.stop_signal: int | None = None
        self._prev_handlers: dict[int, Any] = {}
        self.writer = None
        self.pbar = None
        self.warned: set[str] = set()

    # --- signals -------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.stop_signal = signum

    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._prev_handlers[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, handler in self._prev_handlers.items():
            signal.signal(sig, handler)
        self._prev_handlers.clear()

    # --- set-up --------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        cfg, tc, info = self.cfg, self.tc, self.info
        main = info.is_main
        last_path = self.out / LAST
        if not resume and last_path.exists():
            raise ConfigError(
                f"{self.out} already holds a run ({LAST}); pass --resume to continue it, or "
                "choose another --out"
            )
        if main:
            self.out.mkdir(parents=True, exist_ok=True)

        self.stage_cls = load_stage(cfg["stage"])
        seed_everything(self.seed)
        self.stage = self.stage_cls(cfg)
        model = self.stage.build_model(self.device)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.stage_cls.__name__}.build_model returned {type(model)}")
        self.model = model.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"stage {cfg['stage']!r}: the model has no trainable parameters")
        self.optimizer = build_optimizer(self.params, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)

        self.use_amp = bool(tc["amp"]) and self.device.type == "cuda"
        self.amp_dtype = torch.float32
        if self.use_amp:
            self.amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16
        )

        self.step = 0
        self.epoch = 0
        self.pos = 0
        self.elapsed_before = 0.0
        self.skipped = 0
        self.best: dict[str, Any] = {
            "metric": self.stage_cls.best_metric,
            "mode": self.stage_cls.best_mode,
            "value": None,
            "step": None,
        }
        self.resumed_from: int | None = None
        if resume and last_path.is_file():
            ckpt = load_checkpoint(last_path, map_location="cpu")
            self._restore(ckpt)
        else:
            if resume:
                log.info("--resume: no %s in %s yet, starting a new run", LAST, self.out)
            if tc.get("init_weights"):
                self._warm_start(Path(tc["init_weights"]))
            # per-rank global RNG streams (dropout etc.); the weights were built with `seed`
            seed_everything(mix_seed(self.seed, 1 + info.rank))
        if main:
            save_config(cfg, self.out)
            for stale in self.out.glob(".*.tmp*"):  # left by a run killed while saving
                stale.unlink(missing_ok=True)
            truncate_jsonl(self.out / TRAIN_LOG, self.step)
            truncate_jsonl(self.out / VAL_LOG, self.step)
        dist_utils.barrier()

        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.train_model: nn.Module = DDP(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=bool(tc["find_unused_parameters"]),
            )
        else:
            self.train_model = self.model

        # data
        nw = int(cfg["data"]["num_workers"])
        keys = getattr(self.stage, "data_keys", None)
        optional = getattr(self.stage, "optional_data_keys", ())
        self.train_set = build_dataset(cfg, "train", keys, optional)
        self.val_set = build_dataset(cfg, "val", keys, optional)
        self.sampler = ResumableDistributedBatchSampler(
            len(self.train_set), int(tc["batch_size"]), info.rank, info.world_size, self.seed,
            shuffle=True, drop_last=True,
        )  # fmt: skip
        if self.pos > self.sampler.batches_per_epoch:  # resumed with another world size
            self.pos = self.sampler.batches_per_epoch
        self.loader = make_loader(self.train_set, self.sampler, nw, self.device,
                                  seed=mix_seed(self.seed, 7, info.rank))  # fmt: skip
        vbs = int(tc["val_batch_size"] or tc["batch_size"])
        vb = validation_batches(len(self.val_set), vbs, int(tc["val_batches"]), info.rank,
                                info.world_size)  # fmt: skip
        self.val_loader = make_loader(self.val_set, FixedBatchSampler(vb), min(nw, len(vb)),
                                      self.device, seed=0)  # fmt: skip

        if main and tc["tensorboard"]:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError(
                    "TensorBoard logging needs the `tensorboard` package: pip install "
                    "tensorboard (or set train.tensorboard=false)"
                ) from exc
            self.writer = SummaryWriter(
                log_dir=str(self.out / "tb"), purge_step=self.step if self.step > 0 else None
            )
        if main and tc["progress"]:
            from tqdm.auto import tqdm

            desc = str(self.cfg["stage"]).rpartition(":")[2]
            self.pbar = tqdm(total=int(tc["max_steps"]), initial=self.step, unit="step",
                             dynamic_ncols=True, desc=desc)  # fmt: skip

    def _warm_start(self, path: Path) -> None:
        """Model weights from ``train.init_weights``; parameters the stage freezes (those under
        its ``frozen_prefixes``, e.g. R's copy of I) keep the values the stage gave them, and
        heads under its ``optional_prefixes`` (added by an option, e.g. the predictor's
        handedness head) may be missing from the file: they keep their initial values."""
        frozen = tuple(getattr(self.stage, "frozen_prefixes", ()))
        optional = tuple(getattr(self.stage, "optional_prefixes", ()))
        state = {k: v for k, v in load_model_state(path).items() if not k.startswith(frozen)}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith(frozen + optional)]
        if missing or unexpected:
            raise ConfigError(
                f"train.init_weights={path} does not fit stage {self.cfg['stage']!r}: "
                f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                f"(e.g. {unexpected[:3]}) weights"
            )
        self._info(f"warm start: {len(state)} weights from {path}")

    def _restore(self, ckpt: dict[str, Any]) -> None:
        info = self.info
        saved_stage = ckpt.get("stage")
        if saved_stage and saved_stage != self.cfg["stage"]:
            raise ConfigError(
                f"{self.out / LAST} belongs to stage {saved_stage!r}, not {self.cfg['stage']!r}; "
                "choose another --out"
            )
        restore_training_state(ckpt, self.model, self.optimizer, self.scheduler, self.scaler)
        self.step = int(ckpt["step"])
        self.epoch = int(ckpt["epoch"])
        self.pos = int(ckpt["batch_in_epoch"])
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        self.skipped = int(ckpt.get("skipped_nonfinite", 0))
        if ckpt.get("best"):
            self.best.update(ckpt["best"])
        self.resumed_from = self.step
        rngs = ckpt.get("rng") or []
        saved_world = int(ckpt.get("world_size", len(rngs) or 1))
        if saved_world == info.world_size and len(rngs) == info.world_size:
            set_rng_state(rngs[info.rank])
        else:
            log.warning(
                "resuming with %d processes from a checkpoint of %d: RNG streams are reseeded "
                "(the run continues, but will not repeat an uninterrupted one exactly)",
                info.world_size, saved_world,
            )  # fmt: skip
            seed_everything(mix_seed(self.seed, 1 + info.rank, self.step))
        if self.step > int(self.tc["max_steps"]):
            log.warning("checkpoint step %d is beyond train.max_steps=%d", self.step,
                        self.tc["max_steps"])  # fmt: skip
        if info.is_main:
            log.info("resumed %s at step %d (epoch %d, batch %d)", self.out / LAST, self.step,
                     self.epoch, self.pos)  # fmt: skip

    # --- checkpoints ---------------------------------------------------------------------
    def _save(self, name: str, session_start: float) -> None:
        """All ranks call this (RNG states are gathered); rank 0 writes ``<out>/<name>``."""
        rngs = dist_utils.all_gather_objects(rng_state())
        if not self.info.is_main:
            return
        save_checkpoint(
            self.out / name,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            step=self.step,
            epoch=self.epoch,
            batch_in_epoch=self.pos,
            best=self.best,
            rng=rngs,
            config=self.cfg,
            stage=str(self.cfg["stage"]),
            elapsed_s=self.elapsed_before + (time.monotonic() - session_start),
            skipped_nonfinite=self.skipped,
            world_size=self.info.world_size,
        )
        if name == BEST:
            export_safetensors(
                self.model,
                self.out / SAFETENSORS,
                metadata={
                    "stage": str(self.cfg["stage"]),
                    "step": self.step,
                    "best_metric": str(self.best.get("metric")),
                    "best_value": self.best.get("value"),
                    "config": self.cfg,
                },
            )

    # --- validation ----------------------------------------------------------------------
    def _validate(self) -> dict[str, float]:
        model = self.model
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        image = None
        try:
            with preserved_rng(self.device), torch.no_grad():
                for i, batch in enumerate(self.val_loader):
                    batch = move_to_device(batch, self.device)
                    n = max(1, batch_size_of(batch))
                    metrics = self.stage.validate(model, batch)
                    for key, value in metrics.items():
                        v = _finite_float(value)
                        if math.isfinite(v):
                            sums[key] = sums.get(key, 0.0) + v * n
                            counts[key] = counts.get(key, 0) + n
                        else:
                            sums.setdefault(key, 0.0)
                            counts.setdefault(key, 0)
                    if i == 0 and self.info.is_main:
                        image = self.stage.visualize(model, batch)
        finally:
            model.train(was_training)
        merged_s: dict[str, float] = {}
        merged_c: dict[str, int] = {}
        for s, c in dist_utils.all_gather_objects((sums, counts)):
            for key in s:
                merged_s[key] = merged_s.get(key, 0.0) + s[key]
                merged_c[key] = merged_c.get(key, 0) + c[key]
        means = {k: (merged_s[k] / merged_c[k] if merged_c[k] else float("nan"))
                 for k in sorted(merged_s)}  # fmt: skip
        if self.info.is_main:
            self._log_validation(means, image)
        return means

    def _log_validation(self, means: dict[str, float], image: Any) -> None:
        rec = {"step": self.step, "time": time.time(),
               "metrics": {k: _json_float(v) for k, v in means.items()}}  # fmt: skip
        with open(self.out / VAL_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        text = ", ".join(f"{k}={v:.4g}" for k, v in means.items())
        self._info(f"step {self.step}: validation {text or '(no metrics)'}")
        if self.writer is not None:
            for k, v in means.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"val/{k}", v, self.step)
        if image is not None:
            img = np.asarray(image)
            if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
                raise ValueError(
                    f"{self.stage_cls.__name__}.visualize must return [H, W, 3] uint8, got "
                    f"{img.dtype} {img.shape}"
                )
            if self.writer is not None:
                self.writer.add_image("val/visualize", img, self.step, dataformats="HWC")
            from PIL import Image

            vis = self.out / "vis"
            vis.mkdir(exist_ok=True)
            Image.fromarray(img).save(vis / f"step_{self.step:07d}.png")

    def _update_best(self, means: dict[str, float]) -> bool:
        metric, mode = self.best["metric"], self.best["mode"]
        value = means.get(metric)
        if value is None or not math.isfinite(value):
            if "best" not in self.warned:
                self.warned.add("best")
                self._warn(f"validation gave no finite {metric!r} (got {sorted(means)}); "
                           "best.pt is not updated")  # fmt: skip
            return False
        old = self.best.get("value")
        better = old is None or (value > old if mode == "max" else value < old)
        if better:
            self.best.update(value=float(value), step=self.step)
        return better

    # --- logging -------------------------------------------------------------------------
    def _info(self, msg: str) -> None:
        if not self.info.is_main:
            return
        if self.pbar is not None:
            self.pbar.write(msg)
        else:
            log.info(msg)

    def _warn(self, msg: str) -> None:
        if self.info.is_main:
            log.warning(msg)

    def _log_step(self, loss: float, terms: dict[str, float], lr: float, grad_norm: float,
                  samples_per_s: float, session_start: float) -> None:  # fmt: skip
        rec = {
            "step": self.step,
            "epoch": self.epoch,
            "loss": _json_float(loss),
            "terms": {k: _json_float(v) for k, v in terms.items()},
            "lr": lr,
            "grad_norm": _json_float(grad_norm),
            "samples_per_s": samples_per_s,
            "skipped_nonfinite": self.skipped,
            "elapsed_s": self.elapsed_before + (time.monotonic() - session_start),
            "time": time.time(),
        }
        with open(self.out / TRAIN_LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")
        if self.writer is not None:
            if math.isfinite(loss):
                self.writer.add_scalar("train/loss", loss, self.step)
            for k, v in terms.items():
                if math.isfinite(v):
                    self.writer.add_scalar(f"train/{k}", v, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            if math.isfinite(grad_norm):
                self.writer.add_scalar("train/grad_norm", grad_norm, self.step)
            self.writer.add_scalar("perf/samples_per_s", samples_per_s, self.step)
        if self.pbar is not None:
            self.pbar.set_postfix(loss=f"{loss:.4g}", lr=f"{lr:.2e}",
                                  samples_s=f"{samples_per_s:.1f}", refresh=False)  # fmt: skip

    # --- the loop ------------------------------------------------------------------------
    def _next_batch(self) -> Any:
        while True:
            if self._it is None:
                self.sampler.set_position(self.epoch, self.pos)
                self._it = iter(self.loader)
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1
                self.pos = 0
                continue
            self.pos += 1
            return batch

    def _train_step(self) -> tuple[float, dict[str, float], float, float, str | None, int]:
        """One step. Returns loss, terms, lr, grad norm, stop reason (any rank), batch size.

        The stop reason is ``"signal"`` (SIGINT/SIGTERM on some rank), ``"time_limit"`` or None.
        """
        tc = self.tc
        batch = move_to_device(self._next_batch(), self.device)
        n = batch_size_of(batch)
        gen = step_generator(self.seed, self.step, self.info.rank)
        autocast = (
            torch.autocast(device_type="cuda", dtype=self.amp_dtype)
            if self.use_amp
            else contextlib.nullcontext()
        )
        with autocast:
            out = self.stage.loss(self.train_model, batch, gen)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise TypeError(f"{self.stage_cls.__name__}.loss must return (loss, terms)")
        loss, terms = out
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(
                f"{self.stage_cls.__name__}.loss must return a scalar tensor, got "
                f"{type(loss).__name__}{'' if not isinstance(loss, torch.Tensor) else loss.shape}"
            )
        loss = loss.reshape(())
        loss_value = float(loss.detach().float().item())
        terms_f = {str(k): _finite_float(v) for k, v in (terms or {}).items()}
        time_up = tc["time_limit_min"] is not None and (
            time.monotonic() - self._session_start
        ) / 60.0 >= float(tc["time_limit_min"])
        # one collective: every rank takes the same decisions
        nonfinite, sig, time_up = dist_utils.all_reduce_max_flags(
            [not math.isfinite(loss_value), self.stop_signal is not None, time_up], self.device
        )
        stop = "signal" if sig else "time_limit" if time_up else None
        lr = float(self.optimizer.param_groups[0]["lr"])
        grad_norm = float("nan")
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            self._skip(f"non-finite loss {loss_value} (or on another rank)")
        else:
            self.scaler.scale(loss).backward()
            if self.scaler.is_enabled():
                self.scaler.unscale_(self.optimizer)
            clip = tc["grad_clip"]
            grad_norm = float(
                torch.nn.utils.clip_grad_norm_(
                    self.params, float(clip) if clip is not None else float("inf")
                )
            )
            if not self.scaler.is_enabled() and not math.isfinite(grad_norm):
                self.optimizer.zero_grad(set_to_none=True)
                self._skip(f"non-finite gradient norm {grad_norm}")
            else:
                self._consecutive = 0
                self.scaler.step(self.optimizer)  # skips by itself on fp16 overflow
                self.scaler.update()
                self.optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()"
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()
        self.step += 1
        return loss_value, terms_f, lr, grad_norm, stop, n

    def _skip(self, why: str) -> None:
        self.skipped += 1
        self._consecutive += 1
        self._warn(f"step {self.step + 1}: {why}; update skipped "
                   f"({self._consecutive} in a row, {self.skipped} in all)")  # fmt: skip
        limit = int(self.tc["max_consecutive_nonfinite"])
        if self._consecutive >= limit:
            raise FloatingPointError(
                f"{self._consecutive} consecutive steps with a non-finite loss/gradient (last at "
                f"step {self.step + 1}); aborting. Lower train.lr, check the data, or raise "
                "train.max_consecutive_nonfinite. The last good checkpoint is "
                f"{self.out / LAST}"
            )

    def run(self, resume: bool) -> dict[str, Any]:
        self._session_start = time.monotonic()
        self._consecutive = 0
        self._it = None
        self._install_signals()
        try:
            self._setup(resume)
            return self._loop()
        finally:
            self._restore_signals()
            if self.pbar is not None:
                self.pbar.close()
            if self.writer is not None:
                self.writer.close()
            self._it = None

    def _loop(self) -> dict[str, Any]:
        tc = self.tc
        max_steps = int(tc["max_steps"])
        log_every, val_every, ckpt_every = (int(tc["log_every"]), int(tc["val_every"]),
                                            int(tc["ckpt_every"]))  # fmt: skip
        session_start = self._session_start
        self.model.train()
        last_val: dict[str, float] = {}
        last_loss = float("nan")
        validated_at = checkpointed_at = -1
        window_t, window_n = time.monotonic(), 0
        fastest, slow = 0.0, False  # best window throughput; warned since the last recovery
        stopped = "max_steps"
        if self.info.is_main:
            self._info(
                f"training {self.cfg['stage']} on {self.device} x{self.info.world_size} "
                f"(AMP {self.amp_dtype if self.use_amp else 'off'}), {len(self.train_set)} train "
                f"scenes, {self.sampler.batches_per_epoch} batches/epoch/rank, from step "
                f"{self.step} to {max_steps}; run folder {self.out}"
            )
        while self.step < max_steps:
            loss, terms, lr, grad_norm, stop, n = self._train_step()
            last_loss = loss
            window_n += n * self.info.world_size
            if self.pbar is not None:
                self.pbar.update(1)
            final = self.step >= max_steps
            if self.step % log_every == 0 or final or stop:
                values = dist_utils.all_gather_objects((loss, terms))
                loss_mean = float(np.mean([v[0] for v in values]))
                keys = sorted({k for v in values for k in v[1]})
                terms_mean = {k: float(np.mean([v[1][k] for v in values if k in v[1]]))
                              for k in keys}  # fmt: skip
                now = time.monotonic()
                sps = window_n / max(now - window_t, 1e-9)
                window_t, window_n = now, 0
                if self.info.is_main:
                    self._log_step(loss_mean, terms_mean, lr, grad_norm, sps, session_start)
                    warning = slowdown_warning(sps, fastest, self.device.type)
                    if warning and not slow:
                        self._warn(warning)
                    slow = (slow or warning is not None) and sps < 0.5 * fastest
                    fastest = max(fastest, sps)
            if stop == "signal":
                stopped = stop
                name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal"
                self._info(f"{name} received: stopping after step {self.step}")
            elif stop == "time_limit":
                stopped = stop
                self._info(f"train.time_limit_min reached: stopping after step {self.step}")
            do_val = self.step % val_every == 0 or final or stop == "time_limit"
            if do_val:
                last_val = self._validate()
                validated_at = self.step
                if self._update_best(last_val):
                    self._save(BEST, session_start)
            if self.step % ckpt_every == 0 or final or stop:
                self._save(LAST, session_start)
                checkpointed_at = self.step
            if stop:
                break
            if do_val or checkpointed_at == self.step:  # throughput counts training steps only
                window_t, window_n = time.monotonic(), 0
        if checkpointed_at != self.step:  # e.g. resumed at or beyond max_steps
            if validated_at != self.step and stopped != "signal":
                last_val = self._validate()
                if self._update_best(last_val):
                    self._save(BEST, session_start)
            self._save(LAST, session_start)
        no_best = dist_utils.broadcast_object(
            self.best.get("value") is None and not (self.out / BEST).exists()
        )
        if no_best:
            self._warn(f"no finite validation {self.best['metric']!r} yet: {BEST} and "
                       f"{SAFETENSORS} hold the latest weights")  # fmt: skip
            self._save(BEST, session_start)
        if self.tc["debug_rank_state"]:
            debug = self.out / "debug"
            debug.mkdir(parents=True, exist_ok=True)
            (debug / f"rank{self.info.rank}.json").write_text(json.dumps(
                {"rank": self.info.rank, "step": self.step, "digest": state_digest(self.model)}
            ))  # fmt: skip
        dist_utils.barrier()
        if stopped == "signal":
            self._info(f"checkpoint at step {self.step} in {self.out / LAST}; continue with "
                       "--resume")  # fmt: skip
        return {
            "out": str(self.out),
            "step": self.step,
            "epoch": self.epoch,
            "stopped": stopped,
            "resumed_from": self.resumed_from,
            "last_loss": last_loss,
            "val": last_val,
            "best": dict(self.best),
            "skipped_nonfinite": self.skipped,
            "elapsed_s": self.elapsed_before + (time.monotonic() - session_start),
        }


def train(cfg: dict, resume: bool = False) -> dict[str, Any]:
    """Train the stage that ``cfg`` selects (see the module docstring). Works under torchrun.

    Args:
        cfg: a config (:func:`im2hands_model.training.config.load_config`; missing keys take
            their defaults).
        resume: continue from ``<out>/last.pt`` if it exists (else start a new run).

    Returns:
        ``{out, step, epoch, stopped ("max_steps" | "time_limit" | "signal"), resumed_from,
        last_loss, val (last validation means), best {metric, mode, value, step},
        skipped_nonfinite, elapsed_s}``.

    Raises:
        ConfigError: invalid config, or a run already in ``out`` without ``resume``.
        FloatingPointError: too many consecutive non-finite losses.
    """
    cfg = load_config(base=cfg)  # defaults for missing keys, validation
    info = dist_utils.init_distributed(cfg["train"]["device"])
    try:
        return _Trainer(cfg, info).run(resume)
    finally:
        dist_utils.cleanup(info)
