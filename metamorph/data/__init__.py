"""The generic data pipeline: records, images, conversation formatting, TFDS, grain, packing (no flax)."""
