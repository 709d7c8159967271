"""ONNX export of the networks and an ONNX Runtime backend for the pipeline.

:func:`export_onnx` writes every network the pipeline runs as ONNX graphs with a JSON manifest;
:func:`onnx_networks` turns the pipeline's torch networks into drop-ins that run those graphs
with ONNX Runtime (exporting them into a per-user cache on first use). The drop-ins take and
return torch tensors on the pipeline's device and offer exactly the methods the pipeline calls
(:mod:`~im2hands_model.pipeline.occupancy`, :mod:`~im2hands_model.pipeline.keypoints`).

Graphs (float32; the batch ``B``, the point count ``Q`` and R's hand count ``H`` are dynamic;
images are fixed at :data:`~im2hands_model.pipeline.crop.CROP_SIZE` = 256 px, the only size the
pipeline feeds, because the patch tokenizer's adaptive pooling and the predictor's antialiased
resize export only for static sizes; R's anchors per hand are fixed at its ``num_anchors``, 512,
because the traced multi-head attention of its coarsest level keeps its sequence length):

==================  ===========================================================================
``kpts_pred``       image, K -> joints, joints_2d, presence_logit, rel_depth, root_depth
``kpts_ref``        K: joints, present, image, K -> refined joints
``init_encoder``    I's image encoder + patch tokenizer: image -> fmap, global_code, tokens
``init_hand_left``  I's query attention + part MLPs of one hand (``_right`` likewise): points
                    (mirrored for the left hand), transforms, lengths, joints_norm, query_pos,
                    tokens -> logits
``halo_hand_left``  HALO's part MLPs of one hand (``_right`` likewise), no image inputs
``refine_encoder``  R's image encoder: image -> fmap, global_code
``refine_context``  R's anchor encoder on a given anchor graph -> anchors_norm, features, latent
``refine_features`` R's decoder up to its head (attention over the given neighbours, pixel
                    features): queries -> features
``refine_head``     the decoder's head: features, I's logits -> refined logits
==================  ===========================================================================

What stays in torch: the keypoints' canonicalisation (:meth:`poses`), mirroring and query
positions, empty-space skipping (only points within ``skip_distance`` of a bone go to ONNX
Runtime, as in the torch path), and R's geometry -- farthest-point sampling and kNN, which are
loops or data-dependent (:meth:`~im2hands_model.networks.ref_occ.TwoHandRefinement.anchor_graph`
and each query's neighbours); the graphs take those indices as inputs.

**Part culling** (each point through its few nearest part MLPs) picks a different subset of parts
per point, which has no efficient static-graph form: the ``*_hand_*`` graphs run all 16 parts
for every near point (the exact, unculled I). On the CPU that is several times slower than
torch with culling (docs/measurements.md), so there, with ``cull_parts`` set (the
pipeline's default), I's part MLPs run in torch on the ONNX encoder's tokens and everything else
in ONNX Runtime; ``cull_parts=None`` runs I's graphs too. On a GPU the dense graphs are used.

The graphs come from the TorchScript-based exporter (``dynamo=False``): it exports all eleven in
about 3 s on a 2-core CPU (the ``torch.export``-based default took 7 s for one hand graph alone),
takes ``dynamic_axes`` without specialising example sizes of 0 or 1 (``torch.export`` fixed the
batch of an example of 1), and needs ``onnx`` but not ``onnxscript``. It is deprecated since
torch 2.9 but present in 2.13; its warnings are silenced. Two operators it lacks get symbolics
here: the predictor's antialiased resize (ONNX ``Resize`` with ``antialias``) and its ``K^-1``
(ONNX Runtime's ``com.microsoft.Inverse``, so the ``kpts_pred`` graph needs ONNX Runtime).

Execution providers: CUDA (``onnxruntime-gpu``, the ``gpu`` extra) when the device is a GPU and
the provider is available, else CPU; TensorRT only when asked for through ``providers`` (its
engines are built per input shape, and the point counts change with every call). CPU sessions use
``torch.get_num_threads()`` intra-op threads and do not spin between calls (torch runs between
them on the same cores).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from im2hands_model.canonical import HandPose, canonicalize
from im2hands_model.hands import NORM_SCALE, from_normalized, mirror_normalized
from im2hands_model.io import sha256, weights_fingerprint
from im2hands_model.networks.backbone import ImageFeatures
from im2hands_model.networks.init_occ import (
    EMPTY_LOGIT,
    ImageContext,
    TwoHandInitialOccupancy,
    part_distances,
)
from im2hands_model.networks.point_ops import knn
from im2hands_model.networks.ref_occ import (
    AnchorGraph,
    RefinementContext,
    RefinementState,
    hands_center,
)
from im2hands_model.pipeline.crop import CROP_SIZE

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMAT",
    "GRAPHS",
    "KeypointOutputs",
    "default_cache_dir",
    "default_providers",
    "export_onnx",
    "onnx_networks",
    "weights_fingerprint",
]

#: Version of the graph layout below; part of every manifest (bump it when a graph changes).
EXPORT_FORMAT = 1
#: ONNX opset of the exported graphs (18: Resize with antialiasing, LayerNormalization).
DEFAULT_OPSET = 18
#: Name of the manifest written next to the graphs.
MANIFEST = "onnx_manifest.json"
#: The networks :func:`onnx_networks` replaces.
NETWORKS = ("kpts_pred", "kpts_ref", "halo", "ref_occ")
#: Every graph, in export order.
GRAPHS = (
    "kpts_pred",
    "kpts_ref",
    "init_encoder",
    "init_hand_left",
    "init_hand_right",
    "halo_hand_left",
    "halo_hand_right",
    "refine_encoder",
    "refine_context",
    "refine_features",
    "refine_head",
)
#: Points per ONNX Runtime call of the occupancy graphs (bounds the part MLPs' activations,
#: ``16 x 64`` floats per point and layer; results do not depend on it).
MAX_POINTS_PER_RUN = 32768
HAND_SUFFIX = ("left", "right")


# ---------------------------------------------------------------------------------- graph modules
class _KeypointPredictorGraph(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, K: Tensor) -> tuple[Tensor, ...]:
        p = self.net(image, K)
        return p.joints, p.joints_2d, p.presence_logit, p.rel_depth, p.root_depth


class _KeypointRefinerGraph(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, joints: Tensor, present: Tensor, image: Tensor, K: Tensor) -> Tensor:
        return self.net(joints, present, image=image, K=K)


class _InitEncoderGraph(nn.Module):
    def __init__(self, net: TwoHandInitialOccupancy) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ctx = self.net.encode(image)
        return ctx.feats.fmap, ctx.feats.global_code, ctx.tokens


class _HandGraph(nn.Module):
    """One hand of I (query attention + part MLPs) or of HALO, with the pose as tensors.

    The same computation as ``TwoHandInitialOccupancy._near_only`` without part culling:
    ``hands[h](points, pose, attention[h](query_pos, tokens))``.
    """

    def __init__(self, net: TwoHandInitialOccupancy, hand: int) -> None:
        super().__init__()
        self.hand = net.hands[hand]
        self.attention = net.attention[hand] if net.image_conditioning else None

    def forward(
        self,
        points: Tensor,
        transforms: Tensor,
        lengths: Tensor,
        joints_norm: Tensor,
        query_pos: Tensor | None = None,
        tokens: Tensor | None = None,
    ) -> Tensor:
        # the part MLPs read only these three fields of the HandPose
        pose = SimpleNamespace(transforms=transforms, lengths=lengths, joints_norm=joints_norm)
        img = None if self.attention is None else self.attention(query_pos, tokens)
        return self.hand(points, pose, img)


class _ImageEncoderGraph(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        feats = self.encoder(image)
        return feats.fmap, feats.global_code


class _RefineContextGraph(nn.Module):
    """R's ``encode_context`` on a precomputed :class:`AnchorGraph` (its checks are constant)."""

    def __init__(self, refine: nn.Module, stride: int) -> None:
        super().__init__()
        self.refine, self.stride = refine, stride

    def forward(self, anchors: Tensor, present: Tensor, K: Tensor, center: Tensor, fmap: Tensor,
                global_code: Tensor, *graph: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        feats = ImageFeatures(fmap, global_code, self.stride)
        ctx = self.refine.encode_context(
            anchors, present, K, feats, center, graph=AnchorGraph(*graph)
        )
        return ctx.anchors, ctx.features, ctx.latent


class _RefineFeaturesGraph(nn.Module):
    """R's ``decode(..., return_features=True)`` of per-hand queries ``[B, H, Q, 3]`` on
    precomputed neighbours (I's logits and the presence only enter the head)."""

    def __init__(self, refine: nn.Module, stride: int) -> None:
        super().__init__()
        self.refine, self.stride = refine, stride

    def forward(self, queries: Tensor, neighbours: Tensor, anchors: Tensor, features: Tensor,
                latent: Tensor, K: Tensor, center: Tensor, fmap: Tensor,
                global_code: Tensor) -> Tensor:  # fmt: skip
        feats = ImageFeatures(fmap, global_code, self.stride)
        unused = queries.new_zeros(queries.shape[:-1])  # logits: shape checks only
        ctx = RefinementContext(anchors, features, latent, unused.bool()[:, :, 0])
        return self.refine.decode(queries, unused, ctx, K, feats, center,
                                  neighbours=neighbours, return_features=True)  # fmt: skip


class _RefineHeadGraph(nn.Module):
    def __init__(self, refine: nn.Module) -> None:
        super().__init__()
        self.refine = refine

    def forward(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        return self.refine.decode_head(features, init_logits, present)


@dataclass
class _Graph:
    """One graph to export: module, example inputs (in ``forward`` order), output names and the
    dynamic axes of inputs and outputs."""

    name: str
    module: nn.Module
    inputs: dict[str, Tensor]
    outputs: tuple[str, ...]
    dynamic: dict[str, dict[int, str]]


def _example_pose(batch: int) -> HandPose:
    """Canonicalisation of a plausible right hand (stand-in joints, slightly perturbed)."""
    from im2hands_model.canonical import stand_in_joints

    gen = torch.Generator().manual_seed(0)
    joints = stand_in_joints() * NORM_SCALE + torch.tensor([0.0, 0.0, 0.5])
    joints = joints[None] + 0.003 * torch.randn(batch, 21, 3, generator=gen)
    return canonicalize(joints, False)


def _example_image(batch: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    image = torch.rand(batch, 3, CROP_SIZE, CROP_SIZE, generator=gen)
    K = torch.tensor([[600.0, 0.0, CROP_SIZE / 2], [0.0, 600.0, CROP_SIZE / 2], [0.0, 0.0, 1.0]])
    return image, K.expand(batch, 3, 3).contiguous()


def _graphs(nets: dict[str, Any]) -> list[_Graph]:
    """The :data:`GRAPHS` of the torch networks ``nets`` (the dict the pipeline holds)."""
    b, bq = {0: "batch"}, {0: "batch", 1: "points"}
    image, K = _example_image(2)
    joints = _example_pose(2)
    kpts = torch.stack([joints.joints_norm * NORM_SCALE + 0.5] * 2, 1)  # [2, 2, 21, 3]
    present = torch.tensor([[True, True], [False, True]])
    graphs = [
        _Graph("kpts_pred", _KeypointPredictorGraph(nets["kpts_pred"]), {"image": image, "K": K},
               ("joints", "joints_2d", "presence_logit", "rel_depth", "root_depth"),
               {n: b for n in ("image", "K", "joints", "joints_2d", "presence_logit",
                               "rel_depth", "root_depth")}),
        _Graph("kpts_ref", _KeypointRefinerGraph(nets["kpts_ref"]),
               {"joints": kpts, "present": present, "image": image, "K": K}, ("refined",),
               {n: b for n in ("joints", "present", "image", "K", "refined")}),
    ]  # fmt: skip
    init = nets["ref_occ"].init
    graphs.append(
        _Graph("init_encoder", _InitEncoderGraph(init), {"image": image},
               ("fmap", "global_code", "tokens"),
               {n: b for n in ("image", "fmap", "global_code", "tokens")})
    )  # fmt: skip
    gen = torch.Generator().manual_seed(2)
    pose_in = {
        "points": 0.1 * torch.randn(2, 300, 3, generator=gen),
        "transforms": joints.transforms,
        "lengths": joints.lengths,
        "joints_norm": joints.joints_norm,
    }
    pose_axes = {"points": bq, "transforms": b, "lengths": b, "joints_norm": b, "logits": bq}
    with torch.no_grad():
        tokens = init.encode(image).tokens
    image_in = {"query_pos": torch.rand(2, 300, 3, generator=gen) * 2 - 1, "tokens": tokens}
    for prefix, net, extra in (("init", init, image_in), ("halo", nets["halo"], {})):
        for h in range(2):
            graphs.append(
                _Graph(f"{prefix}_hand_{HAND_SUFFIX[h]}", _HandGraph(net, h),
                       {**pose_in, **extra}, ("logits",),
                       {**pose_axes, **{n: bq if n == "query_pos" else b for n in extra}})
            )  # fmt: skip

    refined = nets["ref_occ"]
    refine = refined.refine
    stride = refined.encoder.stride
    graphs.append(
        _Graph("refine_encoder", _ImageEncoderGraph(refined.encoder), {"image": image},
               ("fmap", "global_code"), {n: b for n in ("image", "fmap", "global_code")})
    )  # fmt: skip
    with torch.no_grad():
        feats = refined.encoder(image)
    a = refine.num_anchors
    center = torch.tensor([[0.0, 0.0, 0.5], [0.05, 0.0, 0.6]])
    anchors = center[:, None, None] + 0.05 * torch.randn(2, 2, a, 3, generator=gen)
    pos = (anchors - center[:, None, None]) / NORM_SCALE
    graph = refine.anchor_graph(pos.reshape(4, a, 3))
    fields = list(AnchorGraph.__dataclass_fields__)
    ctx_in = {"anchors": anchors, "present": present, "K": K, "center": center,
              "fmap": feats.fmap, "global_code": feats.global_code}  # fmt: skip
    # the anchor count stays fixed: the traced nn.MultiheadAttention of the coarsest level bakes
    # in its sequence length (A / 4)
    ctx_axes = {"anchors": b, "present": b, "K": b, "center": b, "fmap": b, "global_code": b,
                "anchors_norm": b, "features": b, "latent": b}  # fmt: skip
    for name in fields:
        ctx_in[name] = getattr(graph, name)
        ctx_axes[name] = {0: "clouds"}
    graphs.append(
        _Graph("refine_context", _RefineContextGraph(refine, stride), ctx_in,
               ("anchors_norm", "features", "latent"), ctx_axes)
    )  # fmt: skip
    with torch.no_grad():
        ctx = refine.encode_context(anchors, present, K, feats, center, graph=graph)
    queries = center[:, None, None] + 0.05 * torch.randn(2, 2, 200, 3, generator=gen)
    qpos = ((queries - center[:, None, None]) / NORM_SCALE).reshape(4, 200, 3)
    _, neighbours = knn(qpos, ctx.anchors.reshape(4, a, 3), min(refine.k_dec, a))
    hq = {0: "batch", 1: "hands", 2: "points"}
    ha = {0: "batch", 1: "hands"}
    module = _RefineFeaturesGraph(refine, stride)
    inputs = {"queries": queries, "neighbours": neighbours, "anchors_norm": ctx.anchors,
              "features": ctx.features, "latent": ctx.latent, "K": K, "center": center,
              "fmap": feats.fmap, "global_code": feats.global_code}  # fmt: skip
    graphs.append(
        _Graph("refine_features", module, inputs, ("query_features",),
               {"queries": hq, "neighbours": {0: "clouds", 1: "points"}, "anchors_norm": ha,
                "features": ha, "latent": {0: "batch", 1: "hands"}, "K": b, "center": b,
                "fmap": b, "global_code": b, "query_features": hq})
    )  # fmt: skip
    with torch.no_grad():
        query_features = module(*inputs.values())
    graphs.append(
        _Graph("refine_head", _RefineHeadGraph(refine),
               {"query_features": query_features,
                "init_logits": torch.randn(2, 2, 200, generator=gen), "present": present},
               ("logits",),
               {"query_features": hq, "init_logits": hq, "present": {0: "batch", 1: "hands"},
                "logits": hq})
    )  # fmt: skip
    return graphs


# ---------------------------------------------------------------------------------- export
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


def _io_entry(names: Sequence[str], graph: _Graph, example: Sequence[Tensor]) -> dict:
    out = {}
    for name, t in zip(names, example, strict=True):
        axes = graph.dynamic.get(name, {})
        shape = [axes.get(i, int(n)) for i, n in enumerate(t.shape)]
        out[name] = {"shape": shape, "dtype": str(t.dtype).removeprefix("torch.")}
    return out


def _export_one(graph: _Graph, path: Path, opset: int) -> None:
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


def _export_graphs(
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
    for graph in _graphs(nets):
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
    return _export_graphs(
        nets, Path(out_dir), opset, _source_weights(weights_dir), weights_fingerprint(nets)
    )


# ---------------------------------------------------------------------------------- sessions
def default_cache_dir() -> Path:
    """``$IM2HANDS_CACHE/onnx`` or ``$XDG_CACHE_HOME/im2hands/onnx`` (``~/.cache/...``)."""
    if os.environ.get("IM2HANDS_CACHE"):
        return Path(os.environ["IM2HANDS_CACHE"]) / "onnx"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "im2hands" / "onnx"


def default_providers(device: torch.device | str) -> list:
    """CUDA (then CPU) when ``device`` is a GPU and ``onnxruntime-gpu`` offers CUDA, else CPU."""
    import onnxruntime as ort

    device = torch.device(device)
    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _cache_valid(folder: Path, fingerprint: str, opset: int) -> bool:
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


def _cached_export(nets: dict[str, nn.Module], cache_dir: Path | None, opset: int) -> Path:
    """The folder holding ``nets``' graphs, exported there unless already present."""
    fingerprint = weights_fingerprint(nets)
    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / fingerprint[:16]
    if _cache_valid(folder, fingerprint, opset):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # export beside the cache entry, then move it in whole (concurrent processes never see a
    # half-written folder; the first to finish wins)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _export_graphs(_on_cpu(nets), tmp, opset, None, fingerprint)
        if _cache_valid(folder, fingerprint, opset):  # another process was faster
            return folder
        if folder.exists():  # stale (other torch, opset or format)
            shutil.rmtree(folder, ignore_errors=True)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not _cache_valid(folder, fingerprint, opset):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _on_cpu(nets: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """The networks on the CPU, where the example inputs of the export live (copies of those on
    another device; the pipeline's own networks are left where they are)."""
    out = {}
    for name, net in nets.items():
        devices = {t.device.type for t in list(net.parameters()) + list(net.buffers())}
        out[name] = net if devices <= {"cpu"} else copy.deepcopy(net).cpu()
    return out


class _Session:
    """One ONNX Runtime session: torch tensors in (any device), torch tensors out on ``device``."""

    def __init__(self, path: Path, providers: list, device: torch.device) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        # torch works between the calls on the same cores: idle ORT threads must not spin
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), opts, providers=providers)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.device = device

    def __call__(self, **inputs: Tensor) -> list[Tensor]:
        feed = {}
        for name in self.inputs:
            t = inputs[name]
            feed[name] = t.detach().to("cpu", copy=False).contiguous().numpy()
        outs = self.session.run(None, feed)
        return [torch.from_numpy(o).to(self.device) for o in outs]


def _check_image(image: Tensor) -> None:
    if image.dim() != 4 or tuple(image.shape[1:]) != (3, CROP_SIZE, CROP_SIZE):
        raise ValueError(
            f"the ONNX graphs take [B, 3, {CROP_SIZE}, {CROP_SIZE}] images, got "
            f"{tuple(image.shape)}"
        )


# ---------------------------------------------------------------------------------- drop-ins
@dataclass
class KeypointOutputs:
    """What the ONNX keypoint predictor returns (the fields of
    :class:`~im2hands_model.networks.keypoint_pred.KeypointPrediction` the pipeline reads)."""

    joints: Tensor
    joints_2d: Tensor
    presence_logit: Tensor
    rel_depth: Tensor
    root_depth: Tensor

    def present(self, threshold: float = 0.5) -> Tensor:
        """``[B, 2]`` bool: hands whose presence probability exceeds ``threshold``."""
        return torch.sigmoid(self.presence_logit) > threshold


class OrtKeypointPredictor:
    """ONNX Runtime :class:`~im2hands_model.networks.keypoint_pred.KeypointPredictor`."""

    def __init__(self, session: _Session, device: torch.device) -> None:
        self.session, self.device = session, device

    def __call__(self, image: Tensor, K: Tensor) -> KeypointOutputs:
        _check_image(image)
        return KeypointOutputs(*self.session(image=image.float(), K=K.float()))


class OrtKeypointRefiner:
    """ONNX Runtime :class:`~im2hands_model.networks.keypoint_ref.KeypointRefiner` (image and
    ``K`` required: the graph is the image-conditioned refiner)."""

    def __init__(self, session: _Session, device: torch.device) -> None:
        self.session, self.device = session, device

    def __call__(
        self,
        joints: Tensor,
        present: Tensor,
        feats: ImageFeatures | None = None,
        image: Tensor | None = None,
        K: Tensor | None = None,
    ) -> Tensor:
        if feats is not None or image is None or K is None:
            raise ValueError("the ONNX keypoint refiner takes image= and K= (no feats)")
        _check_image(image)
        (out,) = self.session(joints=joints.float(), present=present.bool(), image=image.float(),
                              K=K.float())  # fmt: skip
        return out.to(joints.dtype)


class OrtInitialOccupancy:
    """ONNX Runtime :class:`~im2hands_model.networks.init_occ.TwoHandInitialOccupancy` (I or
    HALO): ``encode``, ``poses`` and ``forward_normalized`` as there.

    ``skip_distance`` works as in the torch network (only near points run). With ``cull_parts``
    set on the CPU the part MLPs run in ``torch_net`` instead (module docstring).
    """

    def __init__(self, image_conditioning: bool, hands: list[_Session], encoder: _Session | None,
                 stride: int, device: torch.device,
                 torch_net: TwoHandInitialOccupancy | None = None) -> None:  # fmt: skip
        self.image_conditioning = image_conditioning
        self.hand_sessions, self.encoder, self.device = hands, encoder, device
        self.stride = stride
        self.torch_net = torch_net
        self.skip_distance: float | None = None
        self.cull_parts: int | None = None

    def encode(self, image: Tensor | None) -> ImageContext | None:
        """Image ``[B, 3, 256, 256]`` -> the context the queries attend to (None for HALO)."""
        if not self.image_conditioning:
            return None
        if image is None:
            raise ValueError("this I is image-conditioned: pass the image crop")
        _check_image(image)
        fmap, global_code, tokens = self.encoder(image=image.float())
        feats = ImageFeatures(fmap, global_code, self.stride)
        return ImageContext(feats, tokens, tuple(image.shape[-2:]))

    def poses(self, joints: Tensor) -> list[HandPose]:
        """Canonicalise both hands of ``joints [B, 2, 21, 3]`` (left mirrored; torch)."""
        return [canonicalize(joints[:, h], is_left=h == 0) for h in range(2)]

    def _run_hand(self, h: int, points: Tensor, pose: HandPose, b: int,
                  qpos: Tensor | None, ctx: ImageContext | None) -> Tensor:  # fmt: skip
        """Logits ``[n]`` of batch element ``b``'s points ``[n, 3]`` (mirrored if left)."""
        out = []
        for start in range(0, points.shape[0], MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            inputs = {
                "points": points[None, sl],
                "transforms": pose.transforms[b : b + 1],
                "lengths": pose.lengths[b : b + 1],
                "joints_norm": pose.joints_norm[b : b + 1],
            }
            if self.image_conditioning:
                inputs.update(query_pos=qpos[None, sl], tokens=ctx.tokens[b : b + 1])
            out.append(self.hand_sessions[h](**inputs)[0][0])
        return torch.cat(out) if len(out) > 1 else out[0]

    def forward_normalized(
        self,
        points_norm: Tensor,
        joints: Tensor,
        K: Tensor | None = None,
        ctx: ImageContext | None = None,
        present: Tensor | None = None,
        poses: list[HandPose] | None = None,
        return_parts: bool = False,
        hand: int | None = None,
    ) -> Tensor:
        """Logits ``[B, 2, Q]`` at points ``[B, 2, Q, 3]`` in each hand's own normalised space
        (as the torch network; ``hand``: only that hand, the other row is EMPTY_LOGIT)."""
        if return_parts:
            raise ValueError("the ONNX graphs do not return per-part logits")
        if self.cull_parts and self.torch_net is not None and self.device.type == "cpu":
            net = self.torch_net  # the culled torch path on the ONNX encoder's tokens
            net.skip_distance, net.cull_parts = self.skip_distance, self.cull_parts
            return net.forward_normalized(points_norm, joints, K, ctx, present, poses, hand=hand)
        poses = poses or self.poses(joints)
        batch, _, q, _ = points_norm.shape
        out = []
        for h, pose in enumerate(poses):
            logits = points_norm.new_full((batch, q), EMPTY_LOGIT, dtype=torch.float32)
            keep = pose.valid if present is None else pose.valid & present[:, h]
            if hand is not None and h != hand:
                out.append(logits)
                continue
            p = points_norm[:, h].float()
            if h == 0:  # the left hand's network sees it mirrored into a right hand
                p = mirror_normalized(p)
            qpos = None
            if self.image_conditioning:
                if ctx is None or K is None:
                    raise ValueError("image-conditioned I needs K and the image context")
                cam = from_normalized(points_norm[:, h], pose.rot, pose.origin)
                qpos = TwoHandInitialOccupancy.query_position(cam, pose, K, ctx)
            if self.skip_distance is not None:
                limit = self.skip_distance / NORM_SCALE
                near = part_distances(p, pose.joints_norm).min(1).values <= limit  # [B, Q]
            else:
                near = torch.ones(batch, q, dtype=torch.bool, device=p.device)
            for b in range(batch):
                if not bool(keep[b]):
                    continue
                idx = near[b].nonzero()[:, 0]
                if idx.numel() == 0:
                    continue
                sub_q = None if qpos is None else qpos[b, idx]
                logits[b, idx] = self._run_hand(h, p[b, idx], pose, b, sub_q, ctx)
            out.append(torch.where(keep[:, None], logits, logits.new_full((), EMPTY_LOGIT)))
        return torch.stack(out, 1).to(points_norm.dtype)


class OrtImageEncoder:
    """ONNX Runtime :class:`~im2hands_model.networks.backbone.ImageEncoder` (R's)."""

    def __init__(self, session: _Session, stride: int) -> None:
        self.session, self.stride = session, stride

    def __call__(self, image: Tensor) -> ImageFeatures:
        _check_image(image)
        fmap, global_code = self.session(image=image.float())
        return ImageFeatures(fmap, global_code, self.stride)


class OrtRefinement:
    """ONNX Runtime :class:`~im2hands_model.networks.ref_occ.TwoHandRefinement`:
    ``encode_context``, ``decode`` and ``decode_head`` as there (farthest-point sampling and kNN
    in torch).

    Args:
        torch_refine: the torch network, used for its settings and its weightless geometry
            (:meth:`~im2hands_model.networks.ref_occ.TwoHandRefinement.anchor_graph`).
    """

    def __init__(self, torch_refine: nn.Module, context: _Session, features: _Session,
                 head: _Session) -> None:  # fmt: skip
        self._geometry = torch_refine
        self.num_anchors = torch_refine.num_anchors
        self.k_dec = torch_refine.k_dec
        self.context_session, self.features_session, self.head_session = context, features, head

    def encode_context(
        self,
        anchors: Tensor,
        hand_present: Tensor,
        K: Tensor,
        feats: ImageFeatures,
        center: Tensor,
    ) -> RefinementContext:
        """Encode both hands' anchors ``[B, 2, A, 3]`` (``A = num_anchors``) and the image
        features (required) once, as the torch network."""
        if anchors.dim() != 4 or anchors.shape[1] != 2 or anchors.shape[-1] != 3:
            raise ValueError(f"anchors must be [B, 2, A, 3], got {tuple(anchors.shape)}")
        b, _, a, _ = anchors.shape
        if a != self.num_anchors:
            raise ValueError(f"the ONNX graph takes {self.num_anchors} anchors per hand, got {a}")
        present = hand_present.to(device=anchors.device, dtype=torch.bool)
        p = present[:, :, None, None]
        if not bool(torch.isfinite(torch.where(p, anchors, 0.0)).all()):
            raise ValueError("anchors of a present hand contain NaN/inf")
        if center.shape != (b, 3) or not bool(torch.isfinite(center).all()):
            raise ValueError(f"center must be finite [B, 3], got {tuple(center.shape)}")
        cam = torch.where(p, anchors, center[:, None, None, :].to(anchors.dtype)).float()
        pos = (cam - center[:, None, None, :]) / NORM_SCALE
        graph = self._geometry.anchor_graph(pos.reshape(b * 2, a, 3))
        inputs = {"anchors": cam, "present": present, "K": K.float(), "center": center.float(),
                  "fmap": feats.fmap, "global_code": feats.global_code}  # fmt: skip
        inputs.update({name: getattr(graph, name) for name in AnchorGraph.__dataclass_fields__})
        anchors_norm, features, latent = self.context_session(**inputs)
        return RefinementContext(anchors_norm, features, latent, present)

    def decode(
        self,
        queries: Tensor,
        init_logits: Tensor,
        ctx: RefinementContext,
        K: Tensor,
        feats: ImageFeatures,
        center: Tensor,
        hand: int | None = None,
        return_features: bool = False,
    ) -> Tensor:
        """Refined logits ``[B, H, Q]`` of each hand at its queries ``[B, H, Q, 3]`` (or shared
        queries ``[B, Q, 3]``); ``hand``: only that hand (``H = 1``); ``return_features``: the
        features ``[B, H, Q, D]`` for :meth:`decode_head` instead (as the torch network)."""
        if hand is not None:
            sl = slice(hand, hand + 1)
            ctx = RefinementContext(ctx.anchors[:, sl], ctx.features[:, sl], ctx.latent[:, sl],
                                    ctx.present[:, sl])  # fmt: skip
        nh = ctx.latent.shape[1]
        b, q = queries.shape[0], queries.shape[-2]
        if queries.dim() == 3:  # shared queries: the same points for every hand
            queries = queries[:, None].expand(b, nh, q, 3)
        if queries.shape != (b, nh, q, 3) or init_logits.shape != (b, nh, q):
            raise ValueError(
                f"queries [B, Q, 3] or [B, {nh}, Q, 3] and init_logits [B, {nh}, Q] expected, "
                f"got {tuple(queries.shape)} and {tuple(init_logits.shape)}"
            )
        if q == 0 or b == 0:
            return init_logits.clone()
        if not bool(torch.isfinite(queries).all()):
            raise ValueError("queries contain NaN/inf")
        a = ctx.anchors.shape[2]
        apos = ctx.anchors.reshape(b * nh, a, 3)
        fixed = {"anchors_norm": ctx.anchors, "features": ctx.features, "latent": ctx.latent,
                 "K": K.float(), "center": center.float(), "fmap": feats.fmap,
                 "global_code": feats.global_code}  # fmt: skip
        out = []
        for start in range(0, q, MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            chunk = queries[:, :, sl].float()
            qpos = (chunk - center[:, None, None, :]) / NORM_SCALE
            qpos = qpos.reshape(b * nh, chunk.shape[2], 3)
            _, idx = knn(qpos, apos, min(self.k_dec, a))
            features = self.features_session(queries=chunk, neighbours=idx, **fixed)[0]
            if not return_features:
                features = self.decode_head(features, init_logits[:, :, sl], ctx.present)
            out.append(features)
        return torch.cat(out, 2) if len(out) > 1 else out[0]

    def decode_head(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        """Refined logits ``[B, H, Q]`` from :meth:`decode` features ``[B, H, Q, D]`` and I's
        logits ``[B, H, Q]`` (``present [B, H]``), as the torch network."""
        if features.shape[2] == 0:
            return init_logits.clone()
        out = []
        for start in range(0, features.shape[2], MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            out.append(self.head_session(query_features=features[:, :, sl].float(),
                                         init_logits=init_logits[:, :, sl].float(),
                                         present=present.bool())[0])  # fmt: skip
        return (torch.cat(out, 2) if len(out) > 1 else out[0]).to(init_logits.dtype)


class OrtRefinedOccupancy:
    """ONNX Runtime I+R: ``init`` (I), ``encoder`` (R's image encoder), ``refine`` (R) and
    ``prepare`` (the per-image state of the reference mode)."""

    def __init__(self, init: OrtInitialOccupancy, encoder: OrtImageEncoder,
                 refine: OrtRefinement) -> None:  # fmt: skip
        self.init, self.encoder, self.refine = init, encoder, refine

    def prepare(self, joints: Tensor, K: Tensor, image: Tensor, present: Tensor,
                candidates_norm: Tensor | None = None, anchors: Tensor | None = None,
                gen: torch.Generator | None = None) -> Any:  # fmt: skip
        """``RefinedOccupancy.prepare`` with given ``anchors`` (camera frame, on I's surface);
        the training-time anchor search among ``candidates_norm`` is not offered."""
        if anchors is None:
            raise ValueError("the ONNX I+R prepares with anchors= only (no candidate search)")
        poses, init_ctx = self.init.poses(joints), self.init.encode(image)
        state = RefinementState(joints=joints, K=K, present=present, poses=poses, init_ctx=init_ctx)
        state.feats = self.encoder(image)
        state.center = hands_center(joints, present)
        state.ctx = self.refine.encode_context(anchors, present, K, state.feats, state.center)
        return state


def onnx_networks(
    nets: dict[str, Any],
    device: torch.device | str,
    cache_dir: str | os.PathLike | None = None,
    providers: Sequence[Any] | None = None,
    opset: int = DEFAULT_OPSET,
) -> dict[str, Any]:
    """ONNX Runtime drop-ins for the pipeline's torch networks.

    The graphs are exported into ``cache_dir / <weights fingerprint[:16]>`` on first use and
    reused while their manifest matches (same weights, export format, opset and torch).

    Args:
        nets: ``{"kpts_pred", "kpts_ref", "halo", "ref_occ"}`` torch networks (as loaded by
            :meth:`~im2hands_model.pipeline.model.Im2Hands.from_pretrained`); their
            ``skip_distance`` and ``cull_parts`` settings are carried over.
        device: torch device of the pipeline's tensors (inputs and outputs).
        cache_dir: default :func:`default_cache_dir`.
        providers: ONNX Runtime execution providers (names or ``(name, options)``), e.g.
            ``["CPUExecutionProvider"]``; default :func:`default_providers`.
        opset: ONNX opset of a fresh export.

    Returns:
        The same keys, each an ONNX Runtime drop-in.
    """
    missing = set(NETWORKS) - set(nets)
    if missing:
        raise ValueError(f"onnx_networks needs the networks {sorted(missing)}")
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError(
            "backend='onnxruntime' needs onnxruntime and onnx: pip install 'im2hands_ros[onnx]'"
        ) from exc
    device = torch.device(device)
    folder = _cached_export(nets, Path(cache_dir) if cache_dir else None, opset)
    provider_list = list(providers) if providers is not None else default_providers(device)

    def session(name: str) -> _Session:
        return _Session(folder / f"{name}.onnx", provider_list, device)

    def occupancy(prefix: str, torch_net: TwoHandInitialOccupancy) -> OrtInitialOccupancy:
        encoder = session("init_encoder") if torch_net.image_conditioning else None
        hands = [session(f"{prefix}_hand_{HAND_SUFFIX[h]}") for h in range(2)]
        stride = torch_net.encoder.stride if torch_net.image_conditioning else 0
        net = OrtInitialOccupancy(torch_net.image_conditioning, hands, encoder, stride, device,
                                  torch_net)  # fmt: skip
        net.skip_distance, net.cull_parts = torch_net.skip_distance, torch_net.cull_parts
        return net

    refined = nets["ref_occ"]
    return {
        "kpts_pred": OrtKeypointPredictor(session("kpts_pred"), device),
        "kpts_ref": OrtKeypointRefiner(session("kpts_ref"), device),
        "halo": occupancy("halo", nets["halo"]),
        "ref_occ": OrtRefinedOccupancy(
            occupancy("init", refined.init),
            OrtImageEncoder(session("refine_encoder"), refined.encoder.stride),
            OrtRefinement(
                refined.refine,
                session("refine_context"),
                session("refine_features"),
                session("refine_head"),
            ),  # fmt: skip
        ),
    }
