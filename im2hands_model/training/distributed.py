"""Process-group set-up from ``torchrun``'s environment, with a plain single-process fallback.

``torchrun --nproc_per_node=N training/train.py ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them, picks the
backend (NCCL when training on CUDA, gloo on the CPU) and the device (``cuda:LOCAL_RANK`` or the
CPU). Without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and every helper
here degenerates to the single-process behaviour, so the same code runs both ways.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)
    owns_group: bool = False  # init_distributed created the process group (cleanup destroys it)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def select_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:<local_rank>`` when CUDA is available, else the CPU; ``cpu``; ``cuda``."""
    if preference == "cpu":
        return torch.device("cpu")
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but CUDA is not available; use train.device=auto")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but only {count} CUDA devices are visible; start at "
                f"most {count} processes per node"
            )
        return torch.device("cuda", local_rank)
    if preference not in ("auto", "cuda"):
        raise ValueError(f"unknown device preference {preference!r} (auto, cpu or cuda)")
    return torch.device("cpu")


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise the default process group from the torchrun environment (if ``WORLD_SIZE > 1``).

    Args:
        device: ``auto`` | ``cpu`` | ``cuda`` (``train.device``).
        timeout_s: collective timeout.
    Returns:
        :class:`DistInfo` for this process. Call :func:`cleanup` at the end.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    dev = select_device(device, local_rank if world_size > 1 else 0)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size == 1:
        return DistInfo(0, 1, 0, dev, None)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise RuntimeError(
                f"WORLD_SIZE={world_size} but {var} is not set; start multi-process training "
                "with `torchrun --nproc_per_node=N training/train.py ...`"
            )
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dist.is_initialized():
        return DistInfo(rank, world_size, local_rank, dev, dist.get_backend())
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
        **kwargs,
    )
    return DistInfo(rank, world_size, local_rank, dev, backend, owns_group=True)


def is_dist() -> bool:
    """Whether a default process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_dist():
        dist.barrier()


def all_reduce_max_flags(flags: list[bool], device: torch.device) -> list[bool]:
    """Logical OR of boolean flags over all ranks (one collective)."""
    if not is_dist():
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    """Mean over ranks of each value (identity in a single process)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32,
                     device=device)  # fmt: skip
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / dist.get_world_size()).tolist()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup(info: DistInfo | None = None) -> None:
    """Destroy the default process group (only the one ``info`` says it created, if given)."""
    if info is not None and not info.owns_group:
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
