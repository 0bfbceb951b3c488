"""Data: the synthetic shapes world and its oracle, conversation formatting, batching."""
