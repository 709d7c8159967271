"""Checkpoints: atomic save, ``weights_only`` load, RNG capture and ``safetensors`` export.

A run folder holds::

    last.pt              full training state, every ``train.ckpt_every`` steps and at the end
    best.pt              the same at the best validation value of ``stage.best_metric``
    model.safetensors    the weights of best.pt alone (metadata: stage, step, config JSON)
    config.yaml          the resolved config

A checkpoint (``.pt``) is a dict of tensors, numbers, strings, lists and dicts only, so that
``torch.load(path, weights_only=True)`` reads it (nothing is unpickled as code)::

    format_version  int
    stage           str
    step            int       completed optimiser steps
    epoch           int       sampler epoch of the next batch
    batch_in_epoch  int       position of the next batch in that epoch
    model           dict      state_dict of the unwrapped model (no ``module.`` prefix)
    optimizer       dict      optimizer.state_dict()
    scheduler       dict      lr scheduler state_dict()
    scaler          dict      GradScaler state_dict() ({} when AMP is off)
    best            dict      {metric, mode, value (float | None), step}
    rng             list      one RNG state per rank (see :func:`rng_state`)
    elapsed_s       float     training time so far (all sessions)
    skipped_nonfinite int     steps skipped for a non-finite loss
    world_size      int
    config          dict      the resolved config

Every file is written to a temporary file in the same folder, flushed, fsync'ed and renamed over
the target (``os.replace``), so a crash never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from im2hands_model.io import atomic_write  # noqa: F401 (re-exported: training's writers use it)
from im2hands_model.networks import build_network

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
SAFETENSORS = "model.safetensors"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (or itself)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, CUDA if available, numpy, Python) as tensors/lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "kind": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": int(py_state[0]),
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([s.cpu().to(torch.uint8) for s in cuda])
        else:  # another GPU count: at least restore the current device
            torch.cuda.set_rng_state(cuda[0].cpu().to(torch.uint8))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()),
                     py["gauss_next"]))  # fmt: skip


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict of the unwrapped model, detached, on the CPU."""
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()
            if isinstance(v, torch.Tensor)}  # fmt: skip


def state_digest(state: dict[str, torch.Tensor] | nn.Module) -> str:
    """SHA-256 over the sorted names, dtypes, shapes and bytes of a state dict (or a model's)."""
    if isinstance(state, nn.Module):
        state = model_state(state)
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(
    path: str | os.PathLike,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int = 0,
    epoch: int = 0,
    batch_in_epoch: int = 0,
    best: dict[str, Any] | None = None,
    rng: list[dict[str, Any]] | None = None,
    config: dict | None = None,
    stage: str = "",
    **extra: Any,
) -> Path:
    """Write a checkpoint (module docstring) atomically. ``rng`` defaults to this process's state.

    Extra keyword arguments (numbers, strings, tensors, lists, dicts) are stored as they are.
    """
    ckpt: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "step": int(step),
        "epoch": int(epoch),
        "batch_in_epoch": int(batch_in_epoch),
        "model": model_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else {},
        "scheduler": scheduler.state_dict() if scheduler is not None else {},
        "scaler": scaler.state_dict() if scaler is not None else {},
        "best": dict(best) if best else {},
        "rng": rng if rng is not None else [rng_state()],
        "config": config or {},
        **extra,
    }
    return atomic_torch_save(ckpt, path)


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(..., weights_only=True)``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an im2hands checkpoint or an unsupported format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"{path} is not an im2hands training checkpoint (no 'model' entry)")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: checkpoint format {version} is not supported (expected {FORMAT_VERSION})"
        )
    return ckpt


def restore_training_state(
    ckpt: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> None:
    """Load model / optimizer / scheduler / scaler states from a loaded checkpoint (strict)."""
    unwrap(model).load_state_dict(ckpt["model"], strict=True)
    if optimizer is not None and ckpt.get("optimizer"):
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler"):
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def export_safetensors(
    model: nn.Module | dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write the weights as a ``safetensors`` file (atomically); metadata values become strings.

    Dict/list metadata values are stored as JSON.
    """
    from safetensors.torch import save_file

    state = model_state(model) if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    meta = {
        str(k): (json.dumps(v) if isinstance(v, dict | list) else str(v))
        for k, v in (metadata or {}).items()
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_trained_network(
    path: str | os.PathLike, expected_stage: str | None = None
) -> tuple[str, dict, nn.Module]:
    """``(stage, run config, network with the run's weights)`` from a training checkpoint.

    The network is built from the run's own config
    (:func:`im2hands_model.networks.build_network`), so no other checkpoint the run started
    from is read; the weights are loaded strictly, with ``weights_only=True``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a checkpoint, an unknown stage, or not ``expected_stage``.
    """
    ckpt = load_checkpoint(path)
    cfg = ckpt.get("config") or {}
    stage = cfg.get("stage") or ckpt.get("stage")
    if expected_stage is not None and stage != expected_stage:
        raise ValueError(f"{path} is a {stage!r} checkpoint, not {expected_stage}")
    net = build_network(stage, cfg)
    net.load_state_dict(ckpt["model"])
    return stage, cfg, net


def load_model_state(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """Model weights from a training checkpoint (``.pt``) or a ``.safetensors`` export.

    Stages that start from another stage's result (e.g. ``ref_occ`` from
    ``init.init_occ_checkpoint``) use this.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    return load_checkpoint(path, map_location=map_location)["model"]
