"""ONNX export of the networks and an ONNX Runtime backend for the pipeline, by job:

==============  =============================================================================
``graphs``      the wrapper module, example inputs and dynamic axes of every graph
``export``      :func:`export_onnx`: the graphs and a JSON manifest into a folder
``cache``       the per-user cache: graphs exported on first use, reused while they match
``runtime``     :func:`onnx_networks`: drop-ins for the pipeline's torch networks
==============  =============================================================================

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

What stays in torch: the two-hand orchestration of I and R (canonicalisation, mirroring, query
positions, empty-space skipping; R's farthest-point sampling and kNN, which are loops or
data-dependent): the graphs take those results as inputs.
"""

from im2hands_model.io import weights_fingerprint
from im2hands_model.pipeline.onnx_backend.cache import default_cache_dir
from im2hands_model.pipeline.onnx_backend.export import DEFAULT_OPSET, MANIFEST, export_onnx
from im2hands_model.pipeline.onnx_backend.graphs import EXPORT_FORMAT, GRAPHS, NETWORKS
from im2hands_model.pipeline.onnx_backend.runtime import (
    KeypointOutputs,
    default_providers,
    onnx_networks,
)

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_FORMAT",
    "GRAPHS",
    "MANIFEST",
    "NETWORKS",
    "KeypointOutputs",
    "default_cache_dir",
    "default_providers",
    "export_onnx",
    "onnx_networks",
    "weights_fingerprint",
]
