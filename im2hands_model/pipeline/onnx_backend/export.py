"""ONNX export of the pipeline's networks (:func:`export_onnx`), with the TorchScript-based
exporter (``dynamo=False``): it exports all eleven graphs in seconds, takes ``dynamic_axes``
without specialising example sizes of 0 or 1, and needs ``onnx`` but not ``onnxscript``. It is
deprecated since torch 2.9 but present in 2.13; its warnings are silenced. Two operators it lacks
get symbolics here: the predictor's antialiased resize (ONNX ``Resize`` with ``antialias``) and
its ``K^-1`` (ONNX Runtime's ``com.microsoft.Inverse``, so ``kpts_pred`` needs ONNX Runtime).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from im2hands_model.io import sha256, weights_fingerprint
from im2hands_model.pipeline.crop import CROP_SIZE
from im2hands_model.pipeline.onnx_backend.graphs import (
    EXPORT_FORMAT,
    NETWORKS,
    GraphSpec,
    graph_specs,
)

#: ONNX opset of the exported graphs (18: Resize with antialiasing, LayerNormalization).
DEFAULT_OPSET = 18
#: Name of the manifest written next to the graphs.
MANIFEST = "onnx_manifest.json"


def _resize_antialiased(g: Any, image: Any, output_size: Any, align_corners: Any, *_: Any) -> Any:
    """ONNX symbolic of ``aten::_upsample_bilinear2d_aa`` (``F.interpolate(..., antialias=True)``,
    which the TorchScript exporter lacks): Resize (opset 18) with ``antialias`` and
    ``exclude_outside``, which is torch's filter (same values to ~2e-7)."""
    try:
        from torch.onnx._internal.torchscript_exporter import symbolic_helper
    except ImportError:  # older torch
        from torch.onnx import symbolic_helper

    size = [int(v) for v in symbolic_helper._maybe_get_const(output_size, "is")]
    corners = bool(symbolic_helper._maybe_get_const(align_corners, "b"))

    def const(values: list, dtype: torch.dtype) -> Any:
        return g.op("Constant", value_t=torch.tensor(values, dtype=dtype))

    batch_channels = g.op("Slice", g.op("Shape", image), const([0], torch.int64),
                          const([2], torch.int64))  # fmt: skip
    sizes = g.op("Concat", batch_channels, const(size, torch.int64), axis_i=0)
    empty = const([], torch.float32)
    mode = "align_corners" if corners else "half_pixel"
    return g.op("Resize", image, empty, empty, sizes, mode_s="linear", antialias_i=1,
                exclude_outside_i=1, coordinate_transformation_mode_s=mode)  # fmt: skip


def _inverse(g: Any, matrix: Any) -> Any:
    """ONNX symbolic of ``torch.linalg.inv`` (the predictor's ``K^-1``): ONNX Runtime's
    ``com.microsoft.Inverse`` (standard ONNX has no inverse)."""
    return g.op("com.microsoft::Inverse", matrix).setType(matrix.type())


def _io_entry(names: Sequence[str], graph: GraphSpec, example: Sequence[Tensor]) -> dict:
    out = {}
    for name, t in zip(names, example, strict=True):
        axes = graph.dynamic.get(name, {})
        shape = [axes.get(i, int(n)) for i, n in enumerate(t.shape)]
        out[name] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def _export_one(graph: GraphSpec, path: Path, opset: int) -> None:
    """``torch.onnx.export`` of one graph (TorchScript exporter, see the module docstring)."""
    with torch.no_grad(), warnings.catch_warnings():
        # TracerWarnings (shape checks become constants) and the exporter's deprecation note
        warnings.simplefilter("ignore")
        # nn.MultiheadAttention's fused inference kernel has no ONNX form: trace its layers
        torch.backends.mha.set_fastpath_enabled(False)
        torch.onnx.export(
            graph.module,
            tuple(graph.inputs.values()),
            str(path),
            input_names=list(graph.inputs),
            output_names=list(graph.outputs),
            dynamic_axes=graph.dynamic,
            opset_version=opset,
            dynamo=False,
        )


def export_graphs(
    nets: dict[str, nn.Module],
    out_dir: Path,
    opset: int,
    weights: dict[str, str] | None,
    fingerprint: str,
) -> list[Path]:
    """Export every graph of ``nets`` into ``out_dir`` and write the manifest (last)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.onnx.register_custom_op_symbolic("aten::_upsample_bilinear2d_aa", _resize_antialiased,
                                           opset)  # fmt: skip
    torch.onnx.register_custom_op_symbolic("aten::linalg_inv", _inverse, opset)
    entries, paths = {}, []
    for graph in graph_specs(nets):
        path = out_dir / f"{graph.name}.onnx"
        graph.module.eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            example_out = graph.module(*graph.inputs.values())
        example_out = example_out if isinstance(example_out, tuple) else (example_out,)
        fastpath = torch.backends.mha.get_fastpath_enabled()
        try:
            _export_one(graph, path, opset)
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
        entries[graph.name] = {
            "file": path.name,
            "sha256": sha256(path),
            "bytes": path.stat().st_size,
            "inputs": _io_entry(list(graph.inputs), graph, list(graph.inputs.values())),
            "outputs": _io_entry(graph.outputs, graph, example_out),
            "export_seconds": round(time.perf_counter() - t0, 3),
        }
        paths.append(path)
    manifest = {
        "format": EXPORT_FORMAT,
        "opset": opset,
        "torch": torch.__version__,
        "image_size": CROP_SIZE,
        "fingerprint": fingerprint,
        "weights": weights or {},
        "graphs": entries,
    }
    path = out_dir / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    paths.append(path)
    return paths


def _load_torch_networks(weights_dir: str | os.PathLike | None) -> dict[str, nn.Module]:
    from im2hands_model.pretrained import load_pretrained

    return {name: load_pretrained(name, "cpu", weights_dir) for name in NETWORKS}


def _source_weights(weights_dir: str | os.PathLike | None) -> dict[str, str]:
    """SHA-256 of each weights file the graphs come from (``init_occ`` is ``ref_occ``'s I)."""
    from im2hands_model.pretrained import manifest

    models = manifest(weights_dir)["models"]
    names = ("kpts_pred", "kpts_ref", "halo", "init_occ", "ref_occ")
    return {name: models[name].get("sha256", "") for name in names if name in models}


def export_onnx(
    out_dir: str | os.PathLike,
    weights_dir: str | os.PathLike | None = None,
    opset: int = DEFAULT_OPSET,
) -> list[Path]:
    """Export every network of the pipeline as ONNX graphs (see the module docstring).

    Args:
        out_dir: folder for the ``.onnx`` files and :data:`MANIFEST` (created if needed).
        weights_dir: a weights folder with ``manifest.json``; ``None``: the shipped weights.
        opset: ONNX opset (18 or newer).

    Returns:
        The written files: one ``.onnx`` per entry of :data:`GRAPHS`, then the manifest (graph
        names, inputs and outputs with their dynamic axes, SHA-256 of each graph and of the
        source weights files).
    """
    if opset < 18:
        raise ValueError(f"opset must be >= 18 (antialiased Resize), got {opset}")
    nets = _load_torch_networks(weights_dir)
    return export_graphs(
        nets, Path(out_dir), opset, _source_weights(weights_dir), weights_fingerprint(nets)
    )
