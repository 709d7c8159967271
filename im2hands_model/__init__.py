"""im2hands: two-hand implicit reconstruction from an image (Im2Hands, CVPR 2023).

``from im2hands_model import Im2Hands`` gives the pipeline; the subpackages hold the networks,
data, meshing, metrics and training. The pipeline is imported on first use, so tools that only
need the data generator do not pay for it.
"""

from typing import Any

__all__ = ["Im2Hands"]


def __getattr__(name: str) -> Any:
    if name == "Im2Hands":
        from im2hands_model.pipeline import Im2Hands

        return Im2Hands
    raise AttributeError(f"module 'im2hands_model' has no attribute {name!r}")
