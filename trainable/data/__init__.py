"""Data layer: NIH metadata and splits, decode-once cache, batches, batched augmentation, synthetic data."""
