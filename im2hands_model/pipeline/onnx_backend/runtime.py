"""ONNX Runtime drop-ins for the pipeline's networks (:func:`onnx_networks`).

The drop-ins take and return torch tensors on the pipeline's device and offer the methods the
pipeline calls. The two-hand orchestration of I and R is the torch networks' own (mirroring,
query positions, empty-space skipping, anchor graphs, neighbours): only their per-hand kernels
run in ONNX Runtime (:class:`OrtHandKernel`, :class:`OrtRefinementKernels`).

**Part culling** (each point through its few nearest part MLPs) picks a different subset of parts
per point, which has no efficient static-graph form: the hand graphs run all 16 parts for every
near point. On the CPU that is several times slower than torch with culling
(docs/measurements.md), so there, when the shortcuts ask for culling, I's part MLPs run in torch
on the ONNX encoder's tokens. On a GPU the dense graphs are used.

Execution providers: CUDA (``onnxruntime-gpu``, the ``gpu`` extra) when the device is a GPU and
the provider is available, else CPU; TensorRT only when asked for through ``providers`` (its
engines are built per input shape, and the point counts change with every call). CPU sessions use
``torch.get_num_threads()`` intra-op threads and do not spin between calls (torch runs between
them on the same cores).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from im2hands_model.canonical import HandPose
from im2hands_model.networks.backbone import ImageFeatures
from im2hands_model.networks.init_occ import (
    EXACT,
    ImageContext,
    Shortcuts,
    TwoHandInitialOccupancy,
)
from im2hands_model.networks.ref_occ import (
    AnchorGraph,
    RefinementContext,
    RefinementState,
    refinement_state,
)
from im2hands_model.pipeline.crop import CROP_SIZE
from im2hands_model.pipeline.onnx_backend.cache import cached_export
from im2hands_model.pipeline.onnx_backend.export import DEFAULT_OPSET
from im2hands_model.pipeline.onnx_backend.graphs import HAND_SUFFIX, NETWORKS

#: Points per ONNX Runtime call of the occupancy graphs (bounds the part MLPs' activations,
#: ``16 x 64`` floats per point and layer; results do not depend on it).
MAX_POINTS_PER_RUN = 32768


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


@dataclass
class KeypointOutputs:
    """What the ONNX keypoint predictor returns (the fields of
    :class:`~im2hands_model.networks.kpts_pred.KeypointPrediction` the pipeline reads)."""

    joints: Tensor
    joints_2d: Tensor
    presence_logit: Tensor
    rel_depth: Tensor
    root_depth: Tensor

    def present(self, threshold: float = 0.5) -> Tensor:
        """``[B, 2]`` bool: hands whose presence probability exceeds ``threshold``."""
        return torch.sigmoid(self.presence_logit) > threshold


class OrtKeypointPredictor:
    """ONNX Runtime :class:`~im2hands_model.networks.kpts_pred.KeypointPredictor`."""

    def __init__(self, session: _Session, device: torch.device) -> None:
        self.session, self.device = session, device

    def __call__(self, image: Tensor, K: Tensor) -> KeypointOutputs:
        _check_image(image)
        return KeypointOutputs(*self.session(image=image.float(), K=K.float()))


class OrtKeypointRefiner:
    """ONNX Runtime :class:`~im2hands_model.networks.kpts_ref.KeypointRefiner` (image and
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


class OrtHandKernel:
    """I's per-hand :class:`~im2hands_model.networks.init_occ.HandKernel` as ONNX Runtime
    sessions (one per hand; all 16 parts, ``cull_parts`` has no graph form)."""

    def __init__(self, sessions: list[_Session], image_conditioning: bool) -> None:
        self.sessions, self.image_conditioning = sessions, image_conditioning

    def __call__(self, hand: int, points: Tensor, pose: HandPose, query_pos: Tensor | None,
                 tokens: Tensor | None, dist: Tensor, cull_parts: int | None,
                 ) -> Tensor:  # fmt: skip
        out = []
        for start in range(0, points.shape[1], MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            inputs = {"points": points[:, sl].float(), "transforms": pose.transforms,
                      "lengths": pose.lengths, "joints_norm": pose.joints_norm}  # fmt: skip
            if self.image_conditioning:
                inputs.update(query_pos=query_pos[:, sl].float(), tokens=tokens)
            out.append(self.sessions[hand](**inputs)[0])
        return torch.cat(out, 1) if len(out) > 1 else out[0]


class OrtInitialOccupancy:
    """ONNX Runtime I (or HALO): the image encoder and the hands' kernels in sessions, the rest
    the torch network's (``encode``, ``poses`` and ``forward_normalized`` as there).

    With culling asked for on the CPU, the part MLPs run in ``torch_net`` (module docstring).
    """

    def __init__(self, torch_net: TwoHandInitialOccupancy, hands: list[_Session],
                 encoder: _Session | None, device: torch.device) -> None:  # fmt: skip
        self.torch_net, self.encoder, self.device = torch_net, encoder, device
        self.image_conditioning = torch_net.image_conditioning
        self.stride = torch_net.encoder.stride if self.image_conditioning else 0
        self.kernel = OrtHandKernel(hands, self.image_conditioning)

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
        return self.torch_net.poses(joints)

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
        shortcuts: Shortcuts = EXACT,
    ) -> Tensor:
        """As the torch network's, with the hands' kernels in ONNX Runtime."""
        if return_parts:
            raise ValueError("the ONNX graphs do not return per-part logits")
        culled_in_torch = bool(shortcuts.cull_parts) and self.device.type == "cpu"
        return self.torch_net.forward_normalized(
            points_norm, joints, K, ctx, present, poses, hand=hand, shortcuts=shortcuts,
            kernel=None if culled_in_torch else self.kernel,
        )  # fmt: skip


class OrtImageEncoder:
    """ONNX Runtime :class:`~im2hands_model.networks.backbone.ImageEncoder` (R's)."""

    def __init__(self, session: _Session, stride: int) -> None:
        self.session, self.stride = session, stride

    def __call__(self, image: Tensor) -> ImageFeatures:
        _check_image(image)
        fmap, global_code = self.session(image=image.float())
        return ImageFeatures(fmap, global_code, self.stride)


class OrtRefinementKernels:
    """R's :class:`~im2hands_model.networks.ref_occ.RefinementKernels` as ONNX Runtime sessions
    (the anchor count is fixed at the graph's ``num_anchors``)."""

    def __init__(self, num_anchors: int, context: _Session, features: _Session,
                 head: _Session) -> None:  # fmt: skip
        self.num_anchors = num_anchors
        self.context_session, self.features_session, self.head_session = context, features, head

    def encode_anchors(self, anchors: Tensor, present: Tensor, K: Tensor, center: Tensor,
                       feats: ImageFeatures | None, graph: AnchorGraph,
                       ) -> RefinementContext:  # fmt: skip
        if anchors.shape[2] != self.num_anchors:
            raise ValueError(
                f"the ONNX graph takes {self.num_anchors} anchors per hand, got {anchors.shape[2]}"
            )
        if feats is None:
            raise ValueError("the ONNX refinement needs R's image features")
        inputs = {"anchors": anchors.float(), "present": present, "K": K.float(),
                  "center": center.float(), "fmap": feats.fmap,
                  "global_code": feats.global_code}  # fmt: skip
        inputs.update({name: getattr(graph, name) for name in AnchorGraph.__dataclass_fields__})
        anchors_norm, features, latent = self.context_session(**inputs)
        return RefinementContext(anchors_norm, features, latent, present)

    def decode_features(self, queries: Tensor, neighbours: Tensor, ctx: RefinementContext,
                        K: Tensor, feats: ImageFeatures | None, center: Tensor,
                        ) -> Tensor:  # fmt: skip
        b, nh, q = queries.shape[0], ctx.latent.shape[1], queries.shape[-2]
        if queries.dim() == 3:  # shared queries: the graph takes each hand's own
            queries = queries[:, None].expand(b, nh, q, 3)
        fixed = {"anchors_norm": ctx.anchors, "features": ctx.features, "latent": ctx.latent,
                 "K": K.float(), "center": center.float(), "fmap": feats.fmap,
                 "global_code": feats.global_code}  # fmt: skip
        out = []
        for start in range(0, q, MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            out.append(self.features_session(queries=queries[:, :, sl].float(),
                                             neighbours=neighbours[:, sl], **fixed)[0])  # fmt: skip
        return torch.cat(out, 2) if len(out) > 1 else out[0]

    def decode_head(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        if features.shape[2] == 0:
            return init_logits.clone()
        out = []
        for start in range(0, features.shape[2], MAX_POINTS_PER_RUN):
            sl = slice(start, start + MAX_POINTS_PER_RUN)
            out.append(self.head_session(query_features=features[:, :, sl].float(),
                                         init_logits=init_logits[:, :, sl].float(),
                                         present=present.bool())[0])  # fmt: skip
        return (torch.cat(out, 2) if len(out) > 1 else out[0]).to(init_logits.dtype)


class OrtRefinement:
    """ONNX Runtime R: ``encode_context``, ``decode`` and ``decode_head`` of the torch network
    with its kernels in sessions (farthest-point sampling and kNN stay in torch)."""

    def __init__(self, torch_refine: nn.Module, kernels: OrtRefinementKernels) -> None:
        self.torch_refine, self.kernels = torch_refine, kernels
        self.num_anchors = torch_refine.num_anchors
        self.k_dec = torch_refine.k_dec

    def encode_context(self, anchors: Tensor, hand_present: Tensor, K: Tensor,
                       feats: ImageFeatures, center: Tensor) -> RefinementContext:  # fmt: skip
        return self.torch_refine.encode_context(anchors, hand_present, K, feats, center,
                                                kernels=self.kernels)  # fmt: skip

    def decode(self, queries: Tensor, init_logits: Tensor, ctx: RefinementContext, K: Tensor,
               feats: ImageFeatures, center: Tensor, hand: int | None = None,
               return_features: bool = False) -> Tensor:  # fmt: skip
        return self.torch_refine.decode(queries, init_logits, ctx, K, feats, center, hand=hand,
                                        return_features=return_features,
                                        kernels=self.kernels)  # fmt: skip

    def decode_head(self, features: Tensor, init_logits: Tensor, present: Tensor) -> Tensor:
        return self.kernels.decode_head(features, init_logits, present)


class OrtRefinedOccupancy:
    """ONNX Runtime I+R: ``init`` (I), ``encoder`` (R's image encoder), ``refine`` (R) and
    ``prepare`` (the per-image state, from anchors on I's surface only)."""

    def __init__(self, init: OrtInitialOccupancy, encoder: OrtImageEncoder,
                 refine: OrtRefinement) -> None:  # fmt: skip
        self.init, self.encoder, self.refine = init, encoder, refine

    def prepare(self, joints: Tensor, K: Tensor, image: Tensor, present: Tensor,
                candidates_norm: Tensor | None = None, anchors: Tensor | None = None,
                gen: torch.Generator | None = None) -> RefinementState:  # fmt: skip
        """``RefinedOccupancy.prepare`` with given ``anchors`` (camera frame, on I's surface);
        the training-time anchor search among ``candidates_norm`` is not offered."""
        if anchors is None:
            raise ValueError("the ONNX I+R prepares with anchors= only (no candidate search)")
        return refinement_state(self.init, self.encoder, self.refine, joints, K, image, present,
                                anchors)  # fmt: skip


def default_providers(device: torch.device | str) -> list:
    """CUDA (then CPU) when ``device`` is a GPU and ``onnxruntime-gpu`` offers CUDA, else CPU."""
    import onnxruntime as ort

    device = torch.device(device)
    available = ort.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


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
            :meth:`~im2hands_model.pipeline.model.Im2Hands.from_pretrained`).
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
    folder = cached_export(nets, Path(cache_dir) if cache_dir else None, opset)
    provider_list = list(providers) if providers is not None else default_providers(device)

    def session(name: str) -> _Session:
        return _Session(folder / f"{name}.onnx", provider_list, device)

    def occupancy(prefix: str, torch_net: TwoHandInitialOccupancy) -> OrtInitialOccupancy:
        encoder = session("init_encoder") if torch_net.image_conditioning else None
        hands = [session(f"{prefix}_hand_{HAND_SUFFIX[h]}") for h in range(2)]
        return OrtInitialOccupancy(torch_net, hands, encoder, device)

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
                OrtRefinementKernels(
                    refined.refine.num_anchors,
                    session("refine_context"),
                    session("refine_features"),
                    session("refine_head"),
                ),
            ),
        ),
    }
