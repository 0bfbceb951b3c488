"""Growing an LLM's vocabulary: new token rows and the image marker tokens.

``add_image_token_ids`` is the one place that adds ``<image_start>``/``<image_end>`` to a
tokenizer: ``add_image_tokens`` (a built LLM, resized to match) and training's model specs
(``train/model_init``: the sizes only; the weights are resized when they load) use it.
"""
from __future__ import annotations

import numpy as np
from flax import nnx

from metamorph.models.llama import Llama
from metamorph.params import build_module, module_params
from metamorph.tokens import IMAGE_END, IMAGE_START


def resize_vocab(llm: Llama, vocab_size: int) -> Llama:
  """A copy of ``llm`` with ``vocab_size`` rows; new embedding (and untied LM-head)
  rows are the mean of the existing ones."""
  old = llm.config.vocab_size
  if vocab_size < old:
    raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size}")
  params = module_params(llm)
  extra = vocab_size - old
  table = params["embed_tokens/embedding"]  # [V, D]
  params["embed_tokens/embedding"] = np.concatenate([table, np.repeat(table.mean(0, keepdims=True), extra, 0)])
  if "lm_head/kernel" in params:
    head = params["lm_head/kernel"]  # [D, V]
    params["lm_head/kernel"] = np.concatenate([head, np.repeat(head.mean(1, keepdims=True), extra, 1)], 1)
  config = llm.config.replace(vocab_size=vocab_size)
  return build_module(lambda: Llama(config, rngs=nnx.Rngs(0)), params, "resize_vocab")


def add_image_token_ids(tokenizer, vocab_size: int) -> tuple[int, int, int]:
  """Adds ``<image_start>``/``<image_end>`` to ``tokenizer`` (in place; a no-op if present) and
  returns (image_start_id, image_end_id, the vocabulary size an LLM of ``vocab_size`` rows needs)."""
  tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
  start, end = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
  return start, end, max(len(tokenizer), vocab_size)


def add_image_tokens(llm: Llama, tokenizer) -> tuple[Llama, int, int]:
  """Adds ``<image_start>``/``<image_end>`` to ``tokenizer`` (in place) and returns
  (llm resized to the tokenizer, image_start_id, image_end_id)."""
  start, end, vocab = add_image_token_ids(tokenizer, llm.config.vocab_size)
  return (resize_vocab(llm, vocab) if vocab > llm.config.vocab_size else llm), start, end
