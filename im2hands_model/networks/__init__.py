"""Neural networks of im2hands, one module per paper stage (SPEC §3).

=====================  ===================================================================
module                 what
=====================  ===================================================================
``backbone``           shared ResNet-style image encoder-decoder, patch tokens, pixel features
``kpts_pred``          image -> both hands' 21 3D keypoints + presence (2.5D heatmaps)
``kpts_ref``           K: two-hand skeleton GCN with image attention, refines keypoints
``init_occ``           I: per-hand HALO part networks + query-image attention
``ref_occ``            R: two-hand point-transformer refinement of I's occupancy
``point_ops``          pure-PyTorch farthest-point sampling, kNN, gathering
=====================  ===================================================================

Each network builds itself from a run config (``Class.from_config``); :data:`NETWORKS` maps a
training stage to its class and :func:`build_network` is the one place a stage name becomes an
untrained network (the shipped weights, checkpoints and training all go through it).
"""

from __future__ import annotations

from torch import nn

from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures, PatchTokenizer
from im2hands_model.networks.init_occ import InitialOccupancy, TwoHandInitialOccupancy
from im2hands_model.networks.kpts_pred import KeypointPrediction, KeypointPredictor
from im2hands_model.networks.kpts_ref import KeypointRefiner
from im2hands_model.networks.ref_occ import RefinedOccupancy, TwoHandRefinement

#: Training stage -> the network it trains (``ref_occ`` is I+R: R on a frozen I).
NETWORKS: dict[str, type[nn.Module]] = {
    "kpts_pred": KeypointPredictor,
    "kpts_ref": KeypointRefiner,
    "init_occ": TwoHandInitialOccupancy,
    "ref_occ": RefinedOccupancy,
}


def build_network(stage: str, config: dict, init: nn.Module | None = None) -> nn.Module:
    """An untrained network of a training ``stage`` from its run config.

    ``ref_occ`` reads the whole config (R's ``model`` and I's ``init.init_occ_model``) and takes
    a built I as ``init``; the others read ``config["model"]``.
    """
    if stage not in NETWORKS:
        raise ValueError(f"unknown stage {stage!r}; known: {', '.join(NETWORKS)}")
    if stage == "ref_occ":
        return RefinedOccupancy.from_config(config, init=init)
    return NETWORKS[stage].from_config(dict(config.get("model") or {}))


__all__ = [
    "build_network",
    "ImageEncoder",
    "ImageFeatures",
    "InitialOccupancy",
    "KeypointPrediction",
    "KeypointPredictor",
    "KeypointRefiner",
    "NETWORKS",
    "PatchTokenizer",
    "RefinedOccupancy",
    "TwoHandInitialOccupancy",
    "TwoHandRefinement",
]
