"""The per-user cache of exported graphs: one folder per weights fingerprint, exported on first
use and reused while its manifest matches (same weights, export format, opset and torch)."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from im2hands_model.io import weights_fingerprint
from im2hands_model.pipeline.onnx_backend.export import MANIFEST, export_graphs
from im2hands_model.pipeline.onnx_backend.graphs import EXPORT_FORMAT, GRAPHS


def default_cache_dir() -> Path:
    """``$IM2HANDS_CACHE/onnx`` or ``$XDG_CACHE_HOME/im2hands/onnx`` (``~/.cache/...``)."""
    if os.environ.get("IM2HANDS_CACHE"):
        return Path(os.environ["IM2HANDS_CACHE"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "im2hands" / "onnx"


def cache_valid(folder: Path, fingerprint: str, opset: int) -> bool:
    path = folder / MANIFEST
    if not path.is_file():
        return False
    try:
        man = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return (
        man.get("format") == EXPORT_FORMAT
        and man.get("opset") == opset
        and man.get("torch") == torch.__version__
        and man.get("fingerprint") == fingerprint
        and set(man.get("graphs", {})) == set(GRAPHS)
        and all((folder / g["file"]).is_file() for g in man["graphs"].values())
    )


def cached_export(nets: dict[str, nn.Module], cache_dir: Path | None, opset: int) -> Path:
    """The folder holding ``nets``' graphs, exported there unless already present."""
    fingerprint = weights_fingerprint(nets)
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / fingerprint[:16]
    if cache_valid(folder, fingerprint, opset):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # export beside the cache entry, then move it in whole (concurrent processes never see a
    # half-written folder; the first to finish wins)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        export_graphs(on_cpu(nets), tmp, opset, None, fingerprint)
        if cache_valid(folder, fingerprint, opset):  # another process was faster
            return folder
        if folder.exists():  # stale (other torch, opset or format)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not cache_valid(folder, fingerprint, opset):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def on_cpu(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The networks on the CPU, where the example inputs of the export live (copies of those on
    another device; the pipeline's own networks are left where they are)."""
    out = {}
    for name, net in nets.items():
        devices = {t.device.type for t in list(net.parameters()) + list(net.buffers())}
        out[name] = net if devices <= {"cpu"} else copy.deepcopy(net).cpu()
    return out
