"""The ONNX graphs of the pipeline's networks: one wrapper module per graph and its example
inputs, output names and dynamic axes (:func:`graph_specs`); :mod:`.export` writes them.

Each wrapper calls exactly the torch method its runtime drop-in stands for (:mod:`.runtime`):
I's per-hand kernel (``TwoHandInitialOccupancy.hand_kernel`` without culling) and R's three
kernels (:class:`~im2hands_model.networks.ref_occ.RefinementKernels`), so the orchestration
around them stays in torch, written once.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from im2hands_model.canonical import HandPose, canonicalize
from im2hands_model.hands import NORM_SCALE
from im2hands_model.networks.backbone import ImageFeatures
from im2hands_model.networks.init_occ import TwoHandInitialOccupancy
from im2hands_model.networks.point_ops import knn
from im2hands_model.networks.ref_occ import AnchorGraph, RefinementContext
from im2hands_model.pipeline.crop import CROP_SIZE

#: Version of the graph layout below; part of every manifest (bump it when a graph changes).
EXPORT_FORMAT = 2
#: The networks the ONNX backend replaces.
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
HAND_SUFFIX = ("left", "right")


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

    The same computation as ``TwoHandInitialOccupancy.hand_kernel`` without part culling:
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
    """R's anchor encoder (``encode_anchors``) on a precomputed :class:`AnchorGraph`."""

    def __init__(self, refine: nn.Module, stride: int) -> None:
        super().__init__()
        self.refine, self.stride = refine, stride

    def forward(self, anchors: Tensor, present: Tensor, K: Tensor, center: Tensor, fmap: Tensor,
                global_code: Tensor, *graph: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
        feats = ImageFeatures(fmap, global_code, self.stride)
        ctx = self.refine.encode_anchors(anchors, present, K, center, feats, AnchorGraph(*graph))
        return ctx.anchors, ctx.features, ctx.latent


class _RefineFeaturesGraph(nn.Module):
    """R's ``decode_features`` of per-hand queries ``[B, H, Q, 3]`` on precomputed neighbours
    (I's logits and the presence only enter the head)."""

    def __init__(self, refine: nn.Module, stride: int) -> None:
        super().__init__()
        self.refine, self.stride = refine, stride

    def forward(self, queries: Tensor, neighbours: Tensor, anchors: Tensor, features: Tensor,
                latent: Tensor, K: Tensor, center: Tensor, fmap: Tensor,
                global_code: Tensor) -> Tensor:  # fmt: skip
        feats = ImageFeatures(fmap, global_code, self.stride)
        present = queries.new_ones(queries.shape[:2], dtype=torch.bool)  # unused by the features
        ctx = RefinementContext(anchors, features, latent, present)
        return self.refine.decode_features(queries, neighbours, ctx, K, feats, center)


class _RefineHeadGraph(nn.Module):
    def __init__(self, refine: nn.Module) -> None:
        super().__init__()
        self.refine = refine

    def forward(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        return self.refine.decode_head(features, init_logits, present)


@dataclass
class GraphSpec:
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


def graph_specs(nets: dict[str, Any]) -> list[GraphSpec]:
    """The :data:`GRAPHS` of the torch networks ``nets`` (the dict the pipeline holds)."""
    b, bq = {0: "batch"}, {0: "batch", 1: "points"}
    image, K = _example_image(2)
    joints = _example_pose(2)
    kpts = torch.stack([joints.joints_norm * NORM_SCALE + 0.5] * 2, 1)  # [2, 2, 21, 3]
    present = torch.tensor([[True, True], [False, True]])
    graphs = [
        GraphSpec("kpts_pred", _KeypointPredictorGraph(nets["kpts_pred"]), {"image": image, "K": K},
               ("joints", "joints_2d", "presence_logit", "rel_depth", "root_depth"),
               {n: b for n in ("image", "K", "joints", "joints_2d", "presence_logit",
                               "rel_depth", "root_depth")}),
        GraphSpec("kpts_ref", _KeypointRefinerGraph(nets["kpts_ref"]),
               {"joints": kpts, "present": present, "image": image, "K": K}, ("refined",),
               {n: b for n in ("joints", "present", "image", "K", "refined")}),
    ]  # fmt: skip
    init = nets["ref_occ"].init
    graphs.append(
        GraphSpec("init_encoder", _InitEncoderGraph(init), {"image": image},
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
                GraphSpec(f"{prefix}_hand_{HAND_SUFFIX[h]}", _HandGraph(net, h),
                       {**pose_in, **extra}, ("logits",),
                       {**pose_axes, **{n: bq if n == "query_pos" else b for n in extra}})
            )  # fmt: skip

    refined = nets["ref_occ"]
    refine = refined.refine
    stride = refined.encoder.stride
    graphs.append(
        GraphSpec("refine_encoder", _ImageEncoderGraph(refined.encoder), {"image": image},
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
        GraphSpec("refine_context", _RefineContextGraph(refine, stride), ctx_in,
               ("anchors_norm", "features", "latent"), ctx_axes)
    )  # fmt: skip
    with torch.no_grad():
        ctx = refine.encode_anchors(anchors, present, K, center, feats, graph)
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
        GraphSpec("refine_features", module, inputs, ("query_features",),
               {"queries": hq, "neighbours": {0: "clouds", 1: "points"}, "anchors_norm": ha,
                "features": ha, "latent": {0: "batch", 1: "hands"}, "K": b, "center": b,
                "fmap": b, "global_code": b, "query_features": hq})
    )  # fmt: skip
    with torch.no_grad():
        query_features = module(*inputs.values())
    graphs.append(
        GraphSpec("refine_head", _RefineHeadGraph(refine),
               {"query_features": query_features,
                "init_logits": torch.randn(2, 2, 200, generator=gen), "present": present},
               ("logits",),
               {"query_features": hq, "init_logits": hq, "present": {0: "batch", 1: "hands"},
                "logits": hq})
    )  # fmt: skip
    return graphs
