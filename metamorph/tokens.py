"""The special tokens and placeholders of the record format and the unified model.

The lowest module of the library: the data pipeline, the models, the shapes world and
the API all read these names from here, so none of them imports another for a string.
"""
from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"  # in a record's text: the next image of its "image" list
IMAGE_START, IMAGE_END = "<image_start>", "<image_end>"  # added to the tokenizer around m visual slots
IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # ChatML turns (SmolLM2, the shapes world)
IGNORE = -100  # label of a position that carries no text loss
