"""Datasets, a deterministic resumable distributed batch sampler, DataLoaders and device transfer.

The training order is a pure function of ``(seed, epoch)``: each epoch draws one permutation of the
dataset from a generator seeded with both, pads it to a multiple of the world size, gives rank
``r`` every ``world_size``-th index starting at ``r`` and cuts that share into full batches. The
sampler can start at any batch inside an epoch, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from im2hands_model.training.config import INTERHAND_HINT, ConfigError, is_interhand_dataset


def build_dataset(cfg: dict, split: str, keys: Sequence[str] | None = None,
                  optional: Sequence[str] = ()) -> Dataset:  # fmt: skip
    """The dataset of ``split`` (``"train"`` or ``"val"``) that ``cfg['data']`` describes.

    ``data.train`` / ``data.val`` is one dataset folder or a list of folders (read as one).

    ``keys`` limits the arrays loaded per item (default: all), e.g. a stage's ``data_keys``;
    ``optional`` keys are loaded too when every folder of the split has them (e.g. stored
    detections).

    Raises:
        ConfigError: an unknown dataset kind, or ``data.dataset=interhand`` with a folder that
            ``im2hands-data interhand`` did not write.
        FileNotFoundError: the folder is not a dataset.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")
    data = cfg["data"]
    kind = data.get("dataset")
    if kind not in ("synthetic", "interhand"):
        raise ConfigError(f"data.dataset must be 'synthetic' or 'interhand', not {kind!r}")
    roots = data.get(split)
    if not roots:
        raise ConfigError(f"data.{split} is missing: set it to a dataset folder")
    folders = [roots] if isinstance(roots, str | PathLike) else list(roots)
    if kind == "interhand":  # the same shard format; only the folder's origin is checked
        for folder in folders:
            if not is_interhand_dataset(folder):
                raise ConfigError(
                    f"data.{split}: {folder} is not an InterHand2.6M conversion; {INTERHAND_HINT}"
                )
    from im2hands_model.data.shards import ShardDataset

    if keys:
        have = [set(ShardDataset(r).index["keys"]) for r in folders]
        keys = list(keys) + [k for k in optional if all(k in h for h in have)]
    if isinstance(roots, str | PathLike):
        return ShardDataset(roots, keys=list(keys) if keys else None)
    # several folders (e.g. datasets made with different seeds) are read as one, in order
    parts = [ShardDataset(r, keys=list(keys) if keys else None) for r in roots]
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def epoch_seed(seed: int, epoch: int) -> int:
    """The generator seed of an epoch's permutation (a fixed mix of the two integers)."""
    return (int(seed) * 0x9E3779B97F4A7C15 + int(epoch) * 0xBF58476D1CE4E5B9 + 0x2545F491) % (
        2**63 - 1
    )


class ResumableDistributedBatchSampler(Sampler[list[int]]):
    """Yields this rank's batches (lists of dataset indices) of one epoch, from a start position.

    Args:
        num_items: dataset length.
        batch_size: items per batch (per rank).
        rank, world_size: this process's share.
        seed: base seed; epoch ``e``'s order is ``randperm(num_items)`` from
            :func:`epoch_seed` ``(seed, e)`` (or ``0..n-1`` when ``shuffle`` is False).
        shuffle: permute each epoch.
        drop_last: keep only full batches (training); otherwise the last batch may be short.

    The share of a rank is ``ceil(num_items / world_size)`` items (the permutation is padded by
    repeating its start), so every rank has the same number of batches per epoch.
    """

    def __init__(
        self,
        num_items: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if num_items <= 0:
            raise ValueError("the dataset is empty")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        self.num_items = int(num_items)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.per_rank = math.ceil(self.num_items / self.world_size)
        if drop_last:
            self.batches_per_epoch = self.per_rank // self.batch_size
            if self.batches_per_epoch == 0:
                raise ConfigError(
                    f"train.batch_size={self.batch_size} is larger than this process's share of "
                    f"the dataset ({self.per_rank} of {self.num_items} scenes over "
                    f"{self.world_size} processes); lower the batch size or use more data"
                )
        else:
            self.batches_per_epoch = math.ceil(self.per_rank / self.batch_size)
        self.epoch = 0
        self.start = 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        """The next ``iter()`` starts at batch ``batch`` of epoch ``epoch``."""
        if epoch < 0 or not 0 <= batch <= self.batches_per_epoch:
            raise ValueError(
                f"position (epoch {epoch}, batch {batch}) outside 0..{self.batches_per_epoch}"
            )
        self.epoch = int(epoch)
        self.start = int(batch)

    def set_epoch(self, epoch: int) -> None:
        """Start of epoch ``epoch`` (``DistributedSampler`` compatible)."""
        self.set_position(epoch, 0)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All of this rank's batches of ``epoch``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            order = torch.randperm(self.num_items, generator=g)
        else:
            order = torch.arange(self.num_items)
        total = self.per_rank * self.world_size
        if total > self.num_items:
            reps = math.ceil(total / self.num_items)
            order = order.repeat(reps)[:total]
        share = order[self.rank :: self.world_size].tolist()
        return [
            share[i * self.batch_size : (i + 1) * self.batch_size]
            for i in range(self.batches_per_epoch)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.epoch_batches(self.epoch)[self.start :]

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start


class FixedBatchSampler(Sampler[list[int]]):
    """The same list of batches on every ``iter()`` (validation subsets)."""

    def __init__(self, batches: Sequence[Sequence[int]]) -> None:
        self.batches = [list(b) for b in batches]

    def __iter__(self) -> Iterator[list[int]]:
        yield from (list(b) for b in self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def validation_batches(
    num_items: int, batch_size: int, max_batches: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's first ``max_batches`` validation batches: items ``rank, rank + W, ...`` in order.

    Ranks never share an item; a rank may get fewer (or no) batches on a small set.
    """
    share = list(range(rank, num_items, world_size))
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    return batches[:max_batches]


def make_loader(
    dataset: Dataset,
    batch_sampler: Sampler[list[int]],
    num_workers: int,
    device: torch.device,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader over ``batch_sampler`` (persistent workers, pinned memory on CUDA).

    The loader gets its own generator (seeded with ``seed``) for its worker seeds, so creating an
    iterator never draws from the global torch RNG.
    """
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True
        kwargs["prefetch_factor"] = 2
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(int(seed)),
        **kwargs,
    )


def move_to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` (tensors in nested dicts/lists/tuples) on ``device``; other values unchanged."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor found in ``batch`` (0 if none)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.dim() else 1
    if isinstance(batch, Mapping):
        for v in batch.values():
            n = batch_size_of(v)
            if n:
                return n
    if isinstance(batch, list | tuple):
        for v in batch:
            n = batch_size_of(v)
            if n:
                return n
    return 0
