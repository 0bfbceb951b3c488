"""The reference implementation's way of decoding, for tests and benchmarks: batch 1, no KV
cache, the full forward over the whole sequence at every step (padded to a multiple of
``PROMPT_BUCKET``), the decisions on the host. Same rules, and the same key of ``row`` at
each step, as ``metamorph.generation.engine.Engine``, which the tests hold to it.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.generation.engine import VISUAL_SLOT, Decoded, model_parts
from metamorph.generation.prompts import PROMPT_BUCKET, Prompt, PromptTooLong, round_up
from metamorph.generation.sampling import SamplingParams, apply_repetition_penalty, choose_text, step_keys
from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph
from metamorph.models.siglip import l2_normalize


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward(graphdef, state, ids, visual_index, visual_tokens, segments, last):
  """The whole sequence [1, L], no cache -> (logits [1, V], vision head output [1, Dv]) at ``last``."""
  model = nnx.merge(graphdef, state)
  llm, visual = model_parts(model)
  embeds = model.embed(ids, visual_index, visual_tokens) if visual else llm.embed(ids)
  hidden, _ = llm.forward(embeds, segment_ids=segments)
  h = jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1)  # [1, 1, D]
  predicted = model.predict_visual(h)[:, 0] if visual else jnp.zeros((1, 1), jnp.float32)
  return llm.logits(h)[:, 0], predicted


@jax.jit
def _reference_choice(logits, seen, blocked, key, row, step, sampling) -> jax.Array:
  """The reference's text choice: logits [1, V] -> token id []."""
  logits = apply_repetition_penalty(logits, seen, sampling["repetition_penalty"]).at[:, blocked].set(-jnp.inf)
  return choose_text(logits, step_keys(key, jnp.asarray([row]), step), sampling)[0]


class _Sequence:
  """One growing sequence of the reference loop (a buffer filled from the left)."""

  def __init__(self, prompt: Prompt, size: int, m: int, dv: int, max_images: int):
    n = len(prompt)
    self.length = n
    self.ids = np.zeros((1, size), np.int32)
    self.ids[0, :n] = prompt.input_ids
    self.vidx = np.full((1, size), -1, np.int32)
    if prompt.visual_index is not None:
      self.vidx[0, :n] = prompt.visual_index
    given = 0 if prompt.visual_tokens is None else len(prompt.visual_tokens)
    self.first_new = given
    self.tokens = np.zeros((1, given + max(max_images, 1), m, dv), np.float32)
    if given:
      self.tokens[0, :given] = prompt.visual_tokens

  def append(self, token: int, visual: tuple[int, int, np.ndarray] | None = None) -> None:
    if visual is not None:
      image, k, vtok = visual
      self.tokens[0, self.first_new + image, k] = vtok
      self.vidx[0, self.length] = (self.first_new + image) * self.tokens.shape[2] + k
    self.ids[0, self.length] = token
    self.length += 1

  def predict(self, graphdef, state):
    """The full forward over the sequence so far (padded to a multiple of PROMPT_BUCKET)."""
    size = round_up(self.length, PROMPT_BUCKET)
    segments = (np.arange(size) < self.length).astype(np.int32)[None]
    return _full_forward(graphdef, state, self.ids[:, :size], self.vidx[:, :size], self.tokens, segments,
                         self.length - 1)


def reference_generate(model: MetaMorph | Llama, prompt: Prompt, *, max_new_tokens: int, eos_ids: Sequence[int],
                       sampling: SamplingParams = SamplingParams(), seed: int = 0, row: int = 0,
                       uncond: Prompt | None = None) -> Decoded:
  """The reference implementation's way: batch 1, no KV cache, the full forward over the
  whole sequence at every step, decisions on the host. Same rules (and the same key of
  ``row`` at each step) as ``Engine.generate``; for tests and benchmarks."""
  llm, visual = model_parts(model)
  graphdef, state = nnx.split(model)
  context = llm.config.max_position_embeddings
  if len(prompt) >= context:
    raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
  m = model.config.num_visual_tokens if visual else 1
  dv = model.config.vision_dim if visual else 1
  use_cfg = visual and sampling.uses_guidance
  limit = min(max_new_tokens, context - len(prompt))
  if use_cfg:
    limit = min(limit, context - len(uncond))
  size = round_up(max(len(prompt), len(uncond) if use_cfg else 0) + limit, PROMPT_BUCKET)
  seqs = [_Sequence(x, size, m, dv, sampling.max_images) for x in ([prompt, uncond] if use_cfg else [prompt])]
  traced, key = sampling.traced(), jax.random.key(jnp.uint32(seed))
  seen = np.zeros((1, llm.config.vocab_size), bool)
  text_ids = prompt.input_ids if prompt.visual_index is None else prompt.input_ids[prompt.visual_index < 0]
  seen[0, text_ids] = True
  start_id = model.config.image_start_id if visual else -1
  k = 0 if visual and prompt.input_ids[-1] == start_id and seqs[0].vidx[0, len(prompt) - 1] < 0 else -1
  out, images, current, stopped = [], [], [], False
  for i in range(limit):
    (logits, vis), *twin = [s.predict(graphdef, state) for s in seqs]
    if k < 0:
      blocked = [model.config.image_end_id] if visual else []
      if visual and (len(images) >= sampling.max_images or i + m + 2 > limit):
        blocked.append(start_id)
      token = int(_reference_choice(logits, seen, np.asarray(blocked, np.int32), key, row, i, traced))
      out.append(token)
      seen[0, token] = True
      for s in seqs:
        s.append(token)
      if token in eos_ids:
        stopped = True
        break
      if token == start_id:
        k, current = 0, []
    elif k < m:
      if use_cfg:
        u = twin[0][1]
        vis = l2_normalize(u + traced["guidance"] * (vis - u))
      vtok = np.asarray(vis[0])
      current.append(vtok)
      out.append(VISUAL_SLOT)
      for s in seqs:
        s.append(0, (len(images), k, vtok))
      k += 1
    else:
      out.append(model.config.image_end_id)
      for s in seqs:
        s.append(model.config.image_end_id)
      images.append(np.stack(current))
      k = -1
  visual_tokens = np.stack(images) if images else np.zeros((0, m, dv), np.float32)
  return Decoded(np.asarray(out, np.int32), visual_tokens, "stop" if stopped else "length")
