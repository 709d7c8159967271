"""Neural networks of im2hands: image encoder, keypoint prediction and refinement, occupancy."""
