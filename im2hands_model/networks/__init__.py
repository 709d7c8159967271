"""Neural networks of im2hands, one module per paper stage (SPEC §3).

=====================  ===================================================================
module                 what
=====================  ===================================================================
``backbone``           shared ResNet-style image encoder-decoder, patch tokens, pixel features
``keypoint_pred``      image -> both hands' 21 3D keypoints + presence (2.5D heatmaps)
``keypoint_ref``       K: two-hand skeleton GCN with image attention, refines keypoints
``init_occ``           I: per-hand HALO part networks + query-image attention
``ref_occ``            R: two-hand point-transformer refinement of I's occupancy
``point_ops``          pure-PyTorch farthest-point sampling, kNN, gathering
=====================  ===================================================================
"""

from im2hands_model.networks.backbone import ImageEncoder, ImageFeatures, PatchTokenizer
from im2hands_model.networks.init_occ import InitialOccupancy, TwoHandInitialOccupancy
from im2hands_model.networks.keypoint_pred import KeypointPrediction, KeypointPredictor
from im2hands_model.networks.keypoint_ref import KeypointRefiner
from im2hands_model.networks.ref_occ import TwoHandRefinement

__all__ = [
    "ImageEncoder",
    "ImageFeatures",
    "InitialOccupancy",
    "KeypointPrediction",
    "KeypointPredictor",
    "KeypointRefiner",
    "PatchTokenizer",
    "TwoHandInitialOccupancy",
    "TwoHandRefinement",
]
