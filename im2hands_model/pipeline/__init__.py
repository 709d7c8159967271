"""The inference pipeline: an image and its intrinsics in, two hand meshes, keypoints and
contacts out (:class:`Im2Hands`). See :mod:`im2hands_model.pipeline.model`."""

from im2hands_model.pipeline.frame import InputError
from im2hands_model.pipeline.model import Im2Hands, PipelineConfig
from im2hands_model.pipeline.result import ContactReport, HandResult, Keypoints, Reconstruction

__all__ = [
    "ContactReport",
    "HandResult",
    "Im2Hands",
    "InputError",
    "Keypoints",
    "PipelineConfig",
    "Reconstruction",
]
