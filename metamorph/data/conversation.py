"""Formatting a conversation into model inputs with the tokenizer's own chat template.

The template is rendered with a sentinel in place of each turn's text, so the
character span of every assistant turn in the final text is known; the text is
tokenized once and each token labelled by its character offsets. Each
``<image>`` becomes ``<image_start>``, m visual slots, ``<image_end>``.

Labels (aligned with ``input_ids``, -100 = no loss) cover assistant text, the
assistant's ``<image_start>``/``<image_end>``, and the end-of-turn token that
closes each assistant turn (the first special token after it).
Visual slots of assistant images are regression targets (``visual_target_mask``).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

from metamorph.data.records import RecordError
from metamorph.tokens import IGNORE, IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START

_SENTINEL = re.compile("\ue000(\\d+)\ue001")


@dataclasses.dataclass(frozen=True)
class TokenLayout:
  """What the formatter needs to know about the tokenizer and the visual tokens."""
  image_start_id: int
  image_end_id: int
  num_visual_tokens: int  # m slots per image
  slot_id: int            # id written at visual slots (its embedding is replaced)
  special_ids: frozenset[int]

  @classmethod
  def from_tokenizer(cls, tokenizer, num_visual_tokens: int) -> TokenLayout:
    """Reads the image token ids; they must have been added (``add_image_tokens``)."""
    start, end = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    unk = tokenizer.unk_token_id
    if start is None or end is None or unk in (start, end):
      raise ValueError(f"the tokenizer has no {IMAGE_START}/{IMAGE_END} tokens; "
                       "add them with metamorph.models.vocab.add_image_tokens")
    slot = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return cls(start, end, num_visual_tokens, slot, frozenset(tokenizer.all_special_ids) | {start, end})


@dataclasses.dataclass
class Formatted:
  """One formatted conversation, every array [L]."""
  input_ids: np.ndarray           # int32
  labels: np.ndarray              # int32, IGNORE where no text loss
  visual_index: np.ndarray        # int32, -1 for text, else image * m + k
  visual_target_mask: np.ndarray  # bool, response visual slots
  num_images: int

  def __len__(self) -> int:
    return len(self.input_ids)


def _render(tokenizer, turns: Sequence[tuple[str, str]],
            add_generation_prompt: bool) -> tuple[str, list[tuple[int, int]]]:
  """The chat-template text of ``turns`` (each ``<image>`` written as
  ``<image_start><image_end>``) and the character spans of assistant turns."""
  messages = [{"role": r, "content": f"\ue000{i}\ue001"} for i, (r, _) in enumerate(turns)]
  rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
  parts = _SENTINEL.split(rendered)  # [scaffold, "0", scaffold, "1", ..., scaffold]
  if len(parts) != 2 * len(turns) + 1 or [int(p) for p in parts[1::2]] != list(range(len(turns))):
    raise ValueError("the chat template dropped, repeated or reordered a turn; it cannot be used")
  text, spans = parts[0], []
  for index, scaffold in zip(parts[1::2], parts[2::2]):
    role, content = turns[int(index)]
    content = content.strip().replace(IMAGE_PLACEHOLDER, IMAGE_START + IMAGE_END)
    if role == "assistant":
      spans.append((len(text), len(text) + len(content)))
    text += content + scaffold
  return text, spans


def _trained(offsets: Sequence[tuple[int, int]], ids: np.ndarray, spans: Sequence[tuple[int, int]],
             special_ids: frozenset[int]) -> np.ndarray:
  """[L] bool: the token overlaps an assistant span, or is the first special token
  after one (the end-of-turn token that closes it)."""
  starts, ends = np.asarray(offsets, np.int64).reshape(-1, 2).T  # [L] each
  special = np.isin(ids, list(special_ids))
  train = np.zeros(len(ids), bool)
  for lo, hi in spans:
    train |= (starts < hi) & (ends > lo)
    closing = np.flatnonzero(special & (starts >= hi))
    if closing.size:
      train[closing[0]] = True
  return train


def _expand_images(ids: np.ndarray, train: np.ndarray, layout: TokenLayout) -> Formatted:
  """Inserts m visual slots after each ``<image_start>``."""
  m = layout.num_visual_tokens
  starts = np.flatnonzero(ids == layout.image_start_id)
  pieces = np.split(np.arange(len(ids)), starts + 1)  # each piece ends at an <image_start>
  out_ids, out_train, visual, targets = [], [], [], []
  for image, piece in enumerate(pieces):
    if image:
      slot_train = bool(train[starts[image - 1]])
      out_ids.append(np.full(m, layout.slot_id, np.int32))
      out_train.append(np.zeros(m, bool))
      visual.append((image - 1) * m + np.arange(m, dtype=np.int32))
      targets.append(np.full(m, slot_train))
    out_ids.append(ids[piece])
    out_train.append(train[piece])
    visual.append(np.full(len(piece), -1, np.int32))
    targets.append(np.zeros(len(piece), bool))
  input_ids = np.concatenate(out_ids).astype(np.int32)
  labels = np.where(np.concatenate(out_train), input_ids, IGNORE).astype(np.int32)
  return Formatted(input_ids, labels, np.concatenate(visual), np.concatenate(targets), len(starts))


def format_conversation(turns: Sequence[tuple[str, str]], tokenizer, layout: TokenLayout, *,
                        add_generation_prompt: bool = False, max_length: int | None = None) -> Formatted:
  """(role, text) turns -> ``Formatted``; roles in {system, user, assistant}.

  The whole template text is tokenized at once, so text-only ids equal
  ``tokenizer(apply_chat_template(...))``. Each turn's text is stripped of
  surrounding whitespace. Raises ``RecordError('too_long')`` beyond ``max_length``.
  """
  text, spans = _render(tokenizer, turns, add_generation_prompt)
  encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
  ids = np.asarray(encoded["input_ids"], np.int32)
  train = _trained(encoded["offset_mapping"], ids, spans, layout.special_ids)
  formatted = _expand_images(ids, train, layout)
  if max_length is not None and len(formatted) > max_length:
    raise RecordError("too_long", f"{len(formatted)} tokens > {max_length}")
  return formatted
