"""Reference mode: the occupancy stages run the way the paper's protocol describes them.

What :class:`~im2hands_model.pipeline.model.Im2Hands` does fast, done literally (for the
benchmark's speed ratio and IoU difference, and as a check of the shortcuts):

* one hand at a time, each stage with its own image encoding;
* MISE from 32³ with 3 subdivisions (256³ effective) and a one-cell dilation at every level;
* every part MLP evaluated for every query (no empty-space skipping, no part culling);
* R meshed with its own MISE, I recomputed for both hands inside R at every query.

Anchors for R are sampled on I's meshes exactly as in the fast mode, so the two modes differ only
in how the occupancy is evaluated and meshed.
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from im2hands_model.hands import from_normalized, root_frame
from im2hands_model.meshing import (
    THRESHOLD_I,
    THRESHOLD_R,
    extract_meshes_with_stats,
    mesh_to_camera,
    synchronize,
)
from im2hands_model.networks.ref_occ import mesh_anchors

__all__ = ["REFERENCE_COARSE", "REFERENCE_STEPS", "reference_meshes"]

REFERENCE_COARSE = 32  #: paper protocol: 32³ start
REFERENCE_STEPS = 3  #: and 3 subdivisions (256³ effective)


def _mesh_one_hand(occ_fn, hand: int, threshold: float, device: torch.device):
    valid = [h == hand for h in range(2)]
    meshes, stats = extract_meshes_with_stats(
        occ_fn, 2, REFERENCE_COARSE, REFERENCE_STEPS, threshold, device=device, valid=valid
    )
    return meshes[hand], stats.points_per_hand[hand]


@torch.inference_mode()
def reference_meshes(
    init_net,
    refined_net,
    image: Tensor,
    K: Tensor,
    joints: Tensor,
    present: Tensor,
    threshold_i: float = THRESHOLD_I,
    threshold_r: float = THRESHOLD_R,
    seed: int = 0,
) -> tuple[list, dict[str, int], dict[str, float]]:
    """Both hands' meshes by the paper protocol (module docstring).

    Args:
        init_net: I (or HALO); refined_net: I+R (``None``: stop after I).
        image, K, joints, present: the crop ``[1, 3, S, S]``, its intrinsics ``[1, 3, 3]``,
            keypoints ``[1, 2, 21, 3]`` and presence ``[1, 2]``, as in the fast mode.

    Returns:
        ``(meshes [left, right] in the camera frame, queries per stage, seconds per stage)``.
    """
    device = joints.device
    rot, origin = root_frame(joints[0])
    seconds = {"I": 0.0, "R": 0.0}
    queries = {"I": 0, "R": 0}

    def to_camera(mesh, h):
        return mesh_to_camera(mesh, rot[h], origin[h])

    meshes: list = [None, None]
    for h in range(2):
        if not bool(present[0, h]):
            continue
        t0 = time.perf_counter()
        ctx = init_net.encode(image) if init_net.image_conditioning else None

        poses = init_net.poses(joints)

        def occ_i(points: Tensor, ctx=ctx, poses=poses, h=h) -> Tensor:
            logits = init_net.forward_normalized(points[None], joints, K, ctx, present, poses,
                                                 hand=h)  # fmt: skip
            return torch.sigmoid(logits[0])

        mesh, count = _mesh_one_hand(occ_i, h, threshold_i, device)
        meshes[h] = to_camera(mesh, h)
        synchronize(device)
        seconds["I"] += time.perf_counter() - t0
        queries["I"] += count
    if refined_net is None or not any(m is not None for m in meshes):
        return meshes, queries, seconds

    anchors, has_mesh = mesh_anchors(meshes, refined_net.refine.num_anchors, seed, device)
    refined_meshes: list = [None, None]
    for h in range(2):
        if meshes[h] is None:
            continue
        t0 = time.perf_counter()
        state = refined_net.prepare(joints, K, image, present & has_mesh, anchors=anchors)

        def occ_r(points: Tensor, state=state, h=h) -> Tensor:
            # I recomputed at every query, then R's decoder for this hand
            init = refined_net.init.forward_normalized(
                points[None], joints, K, state.init_ctx, present, state.poses, hand=h
            )
            pose = state.poses[h]
            cam = from_normalized(points[h][None], pose.rot, pose.origin)  # [1, P, 3]
            refined = refined_net.refine.decode(cam[:, None], init[:, h : h + 1],
                                                state.ctx, K, state.feats, state.center,
                                                hand=h)  # fmt: skip
            out = torch.zeros_like(init[0])
            out[h] = torch.sigmoid(refined[0, 0])
            return out

        mesh, count = _mesh_one_hand(occ_r, h, threshold_r, device)
        refined_meshes[h] = to_camera(mesh, h)
        synchronize(device)
        seconds["R"] += time.perf_counter() - t0
        queries["R"] += count
    return refined_meshes, queries, seconds
