"""The default keypoint source: MediaPipe's hand models, both hands, in the camera frame, tracked.

* :mod:`.models` -- the model files (from the ``mediapipe==0.10.21`` wheel), checksums, fetching;
* :mod:`.detector` -- the palm detector and landmark model run by LiteRT, and their regions;
* :mod:`.two_hands` -- the search for the second hand, de-duplication, handedness;
* :mod:`.placement` -- each hand's translation from its landmarks, or from a depth image;
* :mod:`.filters` -- the One-Euro filter;
* :mod:`.source` -- :class:`MediaPipeHands` (one image) and :class:`HandTracker` (video);
* :mod:`.bench` -- ``im2hands bench-keypoints``.
"""

from im2hands_model.hand_tracking.models import ModelFileError, fetch_models, model_dir
from im2hands_model.hand_tracking.source import DetectorConfig, HandTracker, MediaPipeHands

__all__ = ["DetectorConfig", "HandTracker", "MediaPipeHands", "ModelFileError", "fetch_models",
           "model_dir"]  # fmt: skip
