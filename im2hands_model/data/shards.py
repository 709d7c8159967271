"""On-disk shard format of im2hands datasets and the torch ``Dataset`` that reads it.

A dataset is a folder::

    DIR/index.json            format version, scene count, shard list, keys, generator settings
    DIR/faces.npy             int32 [2, F, 3] triangles of the left and right hand meshes
    DIR/shard_00000/KEY.npy   one array per key, scenes stacked on the first axis
    DIR/shard_00001/...

Each shard holds consecutive scenes. Arrays are plain ``.npy`` so they are memory-mapped for
random access. Shards are written to a temporary folder and renamed into place, so an
interrupted run never leaves a half-written shard behind.

Keys of an item of :class:`ShardDataset` (hands are indexed 0 = left, 1 = right; N points per
hand; V = 1,610 mesh vertices):

=================  ===================  =========================================================
key                shape, dtype         meaning
=================  ===================  =========================================================
image              [3, S, S] float32    RGB crop in [0, 1]
K                  [3, 3] float32       intrinsics of the crop (pixel (r, c) covers [c, c+1))
joints_3d          [2, 21, 3] float32   keypoints in the camera frame, metres (0 if absent)
joints_2d          [2, 21, 2] float32   keypoints projected into the crop, pixels
hand_present       [2] bool             whether each hand is in the scene
occ_points         [2, N, 3] float32    query points in each hand's normalised space
occ_labels         [2, N] float32       1 inside that hand, 0 outside (never 1 for both)
norm_rot           [2, 3, 3] float32    root frame rows; p_norm = R (x - origin) / 0.4
norm_origin        [2, 3] float32       wrist position, camera frame, metres
vertices           [2, V, 3] float32    GT mesh vertices in the camera frame (faces: ``faces``)
phenotype          [2, 6] float32       Anny phenotype of each hand (``PHENOTYPES`` order)
pose               [2, 19, 3] float32   joint angles in degrees (``POSED_BONES`` order)
layout             [] int64             index into ``LAYOUTS``
scene_index        [] int64             scene number in the dataset (its random stream)
image_full         [3, 480, 640]        the full camera frame (only if generated with it)
K_full             [3, 3]               its intrinsics (only with the full frame)
joints_2d_full     [2, 21, 2]           keypoints in the full frame (only with it)
depth_full         [480, 640] float32   its metric depth (camera z, metres; 0 = background)
=================  ===================  =========================================================

Datasets converted from InterHand2.6M (``im2hands-data interhand``, :mod:`.interhand`) have the
same keys with V = 779 (the sealed MANO mesh); ``phenotype`` and ``pose`` hold neutral
placeholders and ``layout`` comes from the gap between the two hands. They add MANO and
InterHand2.6M keys (``mano_pose``, ``cam_R``, ``ih_joints_3d``, ...); their ``index.json``
describes each (``interhand.placeholders`` and ``interhand.extra_keys``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
FACES_FILE = "faces.npy"


def shard_name(i: int) -> str:
    return f"shard_{i:05d}"


def write_shard(out_dir: Path, shard: int, scenes: list[dict[str, np.ndarray]]) -> int:
    """Stack the scenes' arrays and write them as shard ``shard`` atomically. Returns the count."""
    final = out_dir / shard_name(shard)
    tmp = out_dir / f".{shard_name(shard)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for key in scenes[0]:
        np.save(tmp / f"{key}.npy", np.stack([s[key] for s in scenes]))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return len(scenes)


def write_index(
    out_dir: Path, counts: list[int], example: dict[str, np.ndarray], meta: dict
) -> None:
    """Write ``index.json`` (last, atomically: a dataset without it is incomplete)."""
    index = {
        "format_version": FORMAT_VERSION,
        "num_scenes": int(sum(counts)),
        "shards": [{"name": shard_name(i), "count": int(c)} for i, c in enumerate(counts)],
        "keys": {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in example.items()},
        **meta,
    }
    tmp = out_dir / f".{INDEX_FILE}.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out_dir / INDEX_FILE)


class ShardDataset(Dataset):
    """A torch ``Dataset`` over a folder of shards; items are dicts of tensors (module docstring).

    Args:
        root: the dataset folder (with ``index.json``).
        keys: only load these keys (default: all).
    """

    def __init__(self, root: str | os.PathLike, keys: list[str] | None = None) -> None:
        self.root = Path(root)
        index_path = self.root / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"{self.root} is not an im2hands dataset (no {INDEX_FILE}); make one with "
                "`im2hands-data synth --n N --seed S --out DIR`"
            )
        self.index = json.loads(index_path.read_text())
        if self.index.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{index_path}: format version {self.index.get('format_version')} is not "
                f"supported (expected {FORMAT_VERSION}); regenerate the dataset"
            )
        available = list(self.index["keys"])
        unknown = sorted(set(keys or []) - set(available))
        if unknown:
            raise KeyError(f"unknown keys {unknown}; the dataset has {available}")
        self.keys = list(keys) if keys else available
        self.faces = torch.from_numpy(np.load(self.root / FACES_FILE).astype(np.int64))
        counts = [s["count"] for s in self.index["shards"]]
        self._starts = np.cumsum([0] + counts)
        self._shards = [s["name"] for s in self.index["shards"]]
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i not in self._cache:  # memory maps: cheap to keep open, opened lazily per worker
            folder = self.root / self._shards[i]
            self._cache[i] = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in self.keys}
        return self._cache[i]

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if idx < 0:
            idx += len(self)
        if not 0 <= idx < len(self):
            raise IndexError(f"index {idx} out of range for {len(self)} scenes")
        shard = int(np.searchsorted(self._starts, idx, side="right") - 1)
        arrays = self._shard(shard)
        j = idx - self._starts[shard]
        item = {}
        for k in self.keys:
            a = np.array(arrays[k][j])
            if k in ("image", "image_full"):
                item[k] = torch.from_numpy(a).permute(2, 0, 1).float().div_(255.0)
            elif k == "occ_labels":
                item[k] = torch.from_numpy(a.astype(np.float32))
            elif a.dtype in (np.float16, np.float64):
                item[k] = torch.from_numpy(a.astype(np.float32))
            else:
                item[k] = torch.from_numpy(a)
        return item
