"""The trained weights that ship inside the package (``im2hands_model/weights/``).

Five networks, one ``safetensors`` file each, described by ``manifest.json`` (architecture,
training data seeds, steps, validation and test metrics, date, SHA-256 of each file):

================  ==================================================================
``kpts_pred``     keypoint predictor: image crop -> two-hand 3D keypoints
``kpts_ref``      K: keypoint refinement
``halo``          keypoint-only I (the HALO baseline of the paper's ablation)
``init_occ``      I: image-conditioned initial occupancy
``ref_occ``       R: occupancy refinement (its file holds R only; I comes from ``init_occ``)
================  ==================================================================

``load_pretrained(name)`` builds a network from the manifest and loads its weights (safetensors:
no code is executed). ``training/recipes/default_weights.sh`` is how the files were made, and
``training/export_weights.py`` writes them from training runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from im2hands_model.io import sha256, weights_fingerprint  # noqa: F401 (re-exported)
from im2hands_model.networks import build_network

#: Folder of the shipped weights.
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
#: The shipped networks, in pipeline order.
MODELS: tuple[str, ...] = ("kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ")
#: Training stage of each shipped network.
STAGES: dict[str, str] = {
    "kpts_pred": "kpts_pred",
    "kpts_ref": "kpts_ref",
    "halo": "init_occ",
    "init_occ": "init_occ",
    "ref_occ": "ref_occ",
}


class WeightsError(RuntimeError):
    """Shipped (or user-given) weights are missing, corrupt or do not fit their network."""


def manifest(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The manifest (``{"models": {name: entry}, ...}``) of ``weights_dir`` (default: shipped)."""
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    path = folder / MANIFEST
    if not path.is_file():
        raise WeightsError(
            f"no {MANIFEST} in {folder}: the package was installed without its weights; "
            "reinstall it, or train your own (training/README.md)"
        )
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise WeightsError(f"{path} is not a weights manifest (no 'models' object)")
    return data


def iso_level(name: str, weights_dir: str | os.PathLike | None = None) -> float | None:
    """The iso-level the manifest ships with network ``name`` (chosen on validation scenes by
    ``training/export_weights.py --iso-level-r``), or ``None`` where it records none."""
    entry = manifest(weights_dir)["models"].get(name) or {}
    level = (entry.get("iso_level") or {}).get("value")
    if level is None:
        return None
    if not isinstance(level, int | float) or not 0.0 < float(level) < 1.0:
        raise WeightsError(f"the manifest's iso-level of {name} must be in (0, 1), got {level!r}")
    return float(level)


def _entry(name: str, weights_dir: str | os.PathLike | None) -> tuple[dict, Path]:
    if name not in MODELS:
        raise ValueError(f"unknown network {name!r}; shipped: {', '.join(MODELS)}")
    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    models = manifest(folder)["models"]
    if name not in models:
        raise WeightsError(f"{folder / MANIFEST} has no entry for {name!r}")
    entry = models[name]
    path = folder / entry["file"]
    if not path.is_file():
        raise WeightsError(f"weights file {path} is missing")
    return entry, path


def load_state(
    name: str, weights_dir: str | os.PathLike | None = None, verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict]:
    """``(state_dict, manifest entry)`` of a shipped network; ``verify`` checks the SHA-256."""
    from safetensors.torch import load_file

    entry, path = _entry(name, weights_dir)
    if verify and entry.get("sha256") and sha256(path) != entry["sha256"]:
        raise WeightsError(
            f"{path} does not match its manifest checksum (corrupt or replaced file); "
            "reinstall the package"
        )
    try:
        state = load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for broken files
        raise WeightsError(f"{path} is not a readable safetensors file: {exc}") from exc
    return state, entry


def load_pretrained(
    name: str,
    device: str | torch.device = "cpu",
    weights_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """A shipped network in eval mode (see the module docstring for ``name``).

    ``ref_occ`` returns I+R (:class:`~im2hands_model.networks.ref_occ.RefinedOccupancy`)
    with I loaded from the ``init_occ`` weights.

    Raises:
        ValueError: unknown ``name``.
        WeightsError: missing, corrupt or mismatching weights (the message says which file).
    """
    state, entry = load_state(name, weights_dir)
    init = load_pretrained("init_occ", "cpu", weights_dir) if name == "ref_occ" else None
    net = build_network(entry["stage"], entry["config"], init=init)
    if name == "ref_occ":
        # the file holds R only: I's keys come from init_occ (loaded above)
        missing, unexpected = net.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("init.")]
    else:
        missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"{entry['file']} does not fit the {name} network of its manifest: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return net.to(device).eval()
