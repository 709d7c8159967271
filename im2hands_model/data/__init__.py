"""Data for im2hands: the synthetic two-hand generator on Anny and the shard ``Dataset``.

Heavy modules (Anny, rendering) are imported lazily by the generator, so ``ShardDataset`` loads
without them.
"""

from im2hands_model.data.shards import ShardDataset

__all__ = ["ShardDataset"]
