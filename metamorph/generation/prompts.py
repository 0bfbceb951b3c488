"""Tokenized prompts and how a batch of them is shaped for the decoder.

Shapes are bucketed so that similar calls share one compilation: prompt lengths and
``max_new_tokens`` are rounded up to multiples of 32, batch sizes and image counts to
powers of two.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

PROMPT_BUCKET = 32      # prompt lengths are rounded up to this, so similar prompts share one compilation
NEW_TOKENS_BUCKET = 32  # and so is max_new_tokens (the exact budget is traced)


class PromptTooLong(ValueError):
  """A prompt leaves no room for a new token in the model's context; ``index``: which."""

  def __init__(self, message: str, index: int = 0):
    super().__init__(message)
    self.index = index


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One tokenized prompt, as ``metamorph.data.conversation.format_conversation`` makes it."""
  input_ids: np.ndarray                   # [L] int
  visual_index: np.ndarray | None = None  # [L] int, -1 for text, else image * m + k
  visual_tokens: np.ndarray | None = None  # [I, m, Dv] float, the prompt's images

  @classmethod
  def text(cls, ids: Sequence[int]) -> Prompt:
    return cls(np.asarray(ids, np.int32))

  def __len__(self) -> int:
    return len(self.input_ids)


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of ``multiple`` >= ``n``."""
  return -(-n // multiple) * multiple


def pow2_bucket(n: int) -> int:
  """The smallest power of two >= ``n`` (1 for ``n`` <= 1): the bucket of a batch size."""
  return 1 << max(n - 1, 0).bit_length()


def pad_to_bucket(batch: np.ndarray) -> np.ndarray:
  """``batch`` [n, ...] (n >= 1) padded to ``pow2_bucket(n)`` rows with copies of its first row."""
  return np.concatenate([batch, np.repeat(batch[:1], pow2_bucket(len(batch)) - len(batch), 0)])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1):
  """(ids [B, P], segment_ids [B, P], positions [B, P]) with P rounded up to ``multiple``."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  length = round_up(max(len(p) for p in prompts), multiple)
  ids = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = p
    segments[i, length - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return ids, segments, positions
