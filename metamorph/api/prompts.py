"""Prompt formatting for the API: user prompts and chat messages -> turns -> tokenized prompts,
and generated ids -> answer text.

A conversation is a list of turns ``(role, content)``; ``content`` holds one ``<image>``
placeholder per image, filled in order from the conversation's image list.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from metamorph.data.conversation import TokenLayout, format_conversation
from metamorph.generation.prompts import Prompt
from metamorph.tokens import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START

ROLES = ("system", "user", "assistant")
Turns = list[tuple[str, str]]


def with_placeholders(text: str, n: int) -> str:
  """``text`` with ``n`` image placeholders: as written, or prepended when it has none."""
  have = text.count(IMAGE_PLACEHOLDER)
  if have == n:
    return text
  if have == 0:
    return "\n".join([IMAGE_PLACEHOLDER] * n + [text])
  raise ValueError(f"{text!r} has {have} {IMAGE_PLACEHOLDER} placeholders but {n} images")


def images_only(text: str) -> str:
  """A user turn of the unconditional prompt: its placeholders, no text."""
  return "\n".join([IMAGE_PLACEHOLDER] * text.count(IMAGE_PLACEHOLDER))


def prompt_conversations(prompts: Sequence[str], images: Sequence[Sequence] | None,
                         system: str | None) -> list[tuple[Turns, list]]:
  """One (turns, images) conversation per prompt: the optional system turn, then the prompt as
  a user turn (its images before its text unless it places them with ``<image>``)."""
  if isinstance(prompts, str):
    raise TypeError("prompts must be a list of strings")
  images = [[] for _ in prompts] if images is None else [list(x) for x in images]
  if len(images) != len(prompts):
    raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
  head = [("system", system)] if system else []
  return [(head + [("user", with_placeholders(text, len(imgs)))], imgs) for text, imgs in zip(prompts, images)]


def chat_conversation(messages: Sequence[Mapping[str, Any]], images: Sequence | None) -> tuple[Turns, list]:
  """(turns, images) of OpenAI-style messages (see ``MetaMorphModel.chat``), checked: every
  placeholder has its image, and the conversation ends with a user or system message."""
  turns, collected = [], []
  for i, message in enumerate(messages):
    role, content = message.get("role"), message.get("content", "")
    if role not in ROLES or not isinstance(content, str):
      raise ValueError(f"message {i}: needs a role in {ROLES} and a string content, got {dict(message)}")
    own = list(message.get("images") or [])
    if own and images is not None:
      raise ValueError("give images either in the messages or as images=, not both")
    turns.append((role, with_placeholders(content, len(own)) if own else content))
    collected += own
  collected = list(images) if images is not None else collected
  placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
  if placeholders != len(collected):
    raise ValueError(f"the messages have {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                     f"{len(collected)} images")
  if not turns or turns[-1][0] == "assistant":
    raise ValueError("the conversation must end with a user (or system) message")
  return turns, collected


def visual_prompts(turns: Turns, visual_tokens: np.ndarray, tokenizer, layout: TokenLayout,
                   uncond: bool) -> tuple[Prompt, Prompt | None]:
  """A MetaMorph prompt of ``turns`` with its images' tokens [I, m, Dv]; with ``uncond`` also
  the unconditional prompt (every user turn's text dropped, its images kept)."""
  variants = [turns] + ([[(r, images_only(c) if r == "user" else c) for r, c in turns]] if uncond else [])
  prompts = []
  for t in variants:
    f = format_conversation(t, tokenizer, layout, add_generation_prompt=True)
    prompts.append(Prompt(f.input_ids, f.visual_index, visual_tokens))
  return prompts[0], (prompts[1] if uncond else None)


def text_prompt(turns: Turns, tokenizer) -> Prompt:
  """A text-only LLM's prompt: its chat template, or without one the turns' text as a plain completion."""
  if tokenizer.chat_template:
    messages = [{"role": r, "content": c} for r, c in turns]
    return Prompt.text(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])
  return Prompt.text(tokenizer("\n".join(c for _, c in turns))["input_ids"])


def answer_text(token_ids: Sequence[int], tokenizer, stop_ids: Sequence[int], layout: TokenLayout | None) -> str:
  """The answer's text, stop tokens dropped; with a MetaMorph ``layout`` each produced image
  (``<image_start><image_end>``) becomes ``<image>``."""
  ids = [t for t in token_ids if t not in stop_ids]
  if layout is None:
    return tokenizer.decode(ids, skip_special_tokens=True).strip()
  keep = {layout.image_start_id, layout.image_end_id}
  ids = [t for t in ids if t in keep or t not in layout.special_ids]
  text = tokenizer.decode(ids, skip_special_tokens=False)
  text = re.sub(f"{re.escape(IMAGE_START)}\\s*{re.escape(IMAGE_END)}", IMAGE_PLACEHOLDER, text)
  return text.replace(IMAGE_END, IMAGE_PLACEHOLDER).strip()  # an image the prompt started
