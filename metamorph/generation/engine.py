"""The engine: batched, KV-cached, jitted decoding of interleaved text and visual tokens.

DESIGN.md, "Decoding". One jitted function per bucketed shape runs the prefill
of every prompt of the batch and then a ``lax.while_loop`` over steps; the KV
cache serves text and visual steps of every sequence at once, each sequence in
its own mode:

- text: a token chosen from the LM head's logits (``sampling.choose_text``).
  ``<image_end>`` is never sampled; ``<image_start>`` only while the answer has
  fewer than ``max_images`` images and the whole image (m visual steps and
  ``<image_end>``) still fits in the sequence's step budget. A stop token ends
  the sequence.
- visual, the m steps after ``<image_start>``: the last hidden state -> vision
  head -> L2-normalise -> kept as visual token k -> input projector -> next
  input embedding. After m visual steps ``<image_end>`` is forced, then text
  resumes. A prompt that ends with ``<image_start>`` starts in visual mode.

Prompts are left-padded into one batch (segment id 0 marks the padding), so
every sequence writes the same cache slot at each step while its RoPE position
counts only its own tokens. Every step counts against ``max_new_tokens`` (and
against the model's context), visual ones included.

Classifier-free guidance on visual tokens (``guidance`` != 1): each prompt's
unconditional prompt runs as an extra batch row that follows the conditional
row's choices (same input at every step, text and visual); at a visual step both
rows take the guided token (``sampling.guide``).

Shapes are bucketed (``prompts``: prompt length and ``max_new_tokens`` to
multiples of 32, the batch and input images per prompt to powers of two), and
every sampling parameter, the seed and the step budget are traced: calls with
the same buckets and ``max_images`` reuse one compilation.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.generation.prompts import (NEW_TOKENS_BUCKET, PROMPT_BUCKET, Prompt, PromptTooLong, left_pad,
                                          pow2_bucket, round_up)
from metamorph.generation.sampling import SamplingParams, apply_repetition_penalty, choose_text, guide, step_keys
from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph

VISUAL_SLOT = -1        # raw output id of a visual step
PAD_OUT = -2            # raw output id after a sequence ended

# Number of traces of the decoding function (one per compilation); tests read it.
TRACES: collections.Counter = collections.Counter()


@dataclasses.dataclass
class Decoded:
  """One generated answer."""
  ids: np.ndarray            # [steps] int32: token ids, VISUAL_SLOT at visual steps
  visual_tokens: np.ndarray  # [n_images, m, Dv] float32, the completed images
  finish_reason: str         # "stop" (a stop token) | "length" (the step budget or the context)

  @property
  def token_ids(self) -> list[int]:
    """The generated token ids without the visual slots (``<image_start><image_end>`` per image)."""
    return [int(t) for t in self.ids if t >= 0]


class _State(NamedTuple):
  step: jax.Array        # [] int32, decisions made
  k: jax.Array           # [B] int32: -1 text; 0..m-1 the next step is visual token k; m the next is <image_end>
  images: jax.Array      # [B] int32, completed images
  done: jax.Array        # [B] bool
  stopped: jax.Array     # [B] bool, ended by a stop token
  length: jax.Array      # [B] int32, steps taken
  seen: jax.Array        # [B, V] bool, tokens for the repetition penalty
  out_ids: jax.Array     # [B, N] int32
  out_visual: jax.Array  # [B, I, m, Dv] float32


def model_parts(model) -> tuple[Llama, bool]:
  """(the LLM, whether the model is a MetaMorph that reads and writes visual tokens)."""
  if isinstance(model, MetaMorph):
    return model.llm, True
  if isinstance(model, Llama):
    return model, False
  raise TypeError(f"expected a MetaMorph or a Llama model, got {type(model).__name__}")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_images"))
def _decode(graphdef, state, batch: dict[str, jax.Array], sampling: dict[str, jax.Array], seed: jax.Array,
            *, max_new_tokens: int, max_images: int) -> dict[str, jax.Array]:
  TRACES["decode"] += 1
  model = nnx.merge(graphdef, state)
  llm, visual = model_parts(model)
  ids, segments, positions = batch["input_ids"], batch["segment_ids"], batch["positions"]  # [B, P]
  b, p = ids.shape
  rows = jnp.arange(b)
  limit, source = batch["limit"], batch["source"]  # [B]
  key = jax.random.key(seed)
  if visual:
    c = model.config
    m, start_id, end_id, dv = c.num_visual_tokens, c.image_start_id, c.image_end_id, c.vision_dim
    embeds = model.embed(ids, batch["visual_index"], batch["visual_tokens"])  # [B, P, D]
    text_slots = (segments > 0) & (batch["visual_index"] < 0)
  else:
    m, dv = 1, 1
    embeds = llm.embed(ids)
    text_slots = segments > 0
  cache = llm.init_cache(b, p + max_new_tokens)
  hidden, cache = llm.forward(embeds, positions=positions, segment_ids=segments, cache=cache)

  def decide(s: _State, h: jax.Array):
    """The choice of step ``s.step`` from the last hidden states h [B, D] -> (state,
    next input token [B], whether the next input is visual [B], visual token [B, Dv])."""
    i = s.step
    logits = apply_repetition_penalty(llm.logits(h[:, None])[:, 0], s.seen, sampling["repetition_penalty"])
    in_text = s.k < 0
    if visual:
      allow = (s.images < max_images) & (i + m + 2 <= limit)
      logits = logits.at[:, end_id].set(-jnp.inf)
      logits = logits.at[:, start_id].set(jnp.where(allow, logits[:, start_id], -jnp.inf))
    text = choose_text(logits, step_keys(key, batch["row_ids"], i), sampling)
    if visual:
      in_visual, at_end = (s.k >= 0) & (s.k < m), s.k == m
      token = jnp.where(in_text, text, jnp.where(at_end, end_id, 0))[source]
      vtok = guide(model.predict_visual(h), batch["partner"], sampling["guidance"])[source]  # [B, Dv]
    else:
      in_visual = at_end = jnp.zeros((b,), bool)
      token, vtok = text[source], jnp.zeros((b, dv), jnp.float32)
    live = ~s.done
    out = jnp.where(live, jnp.where(in_visual, VISUAL_SLOT, token), PAD_OUT)
    slot_image = jnp.where(in_visual & live, s.images, s.out_visual.shape[1])  # out of range: dropped
    stop = live & in_text & jnp.isin(token, batch["eos_ids"])
    if visual:
      k = jnp.where(in_text & (token == start_id), 0, jnp.where(in_visual, s.k + 1, jnp.where(at_end, -1, s.k)))
    else:
      k = s.k
    new = _State(
        step=i + 1, k=k, images=s.images + (at_end & live), done=s.done | stop | (i + 1 >= limit),
        stopped=s.stopped | stop, length=jnp.where(live, i + 1, s.length),
        seen=s.seen.at[rows, token].max(live & in_text),
        out_ids=s.out_ids.at[:, i].set(out),
        out_visual=s.out_visual.at[rows, slot_image, jnp.clip(s.k, 0, m - 1)].set(vtok, mode="drop"))
    return new, token, in_visual, vtok

  def next_input(s, token, in_visual, vtok):  # -> [B, 1, D]
    x = llm.embed(token[:, None])
    if visual:
      slot = jnp.clip(s.k - 1, 0, m - 1)  # vtok's index in its image (s.k has moved past it)
      visual_x = model.project_visual(vtok[:, None], slot[:, None]).astype(x.dtype)  # [B, 1, D]
      x = jnp.where(in_visual[:, None, None], visual_x, x)
    return x

  seen = jnp.zeros((b, llm.config.vocab_size), bool).at[rows[:, None], ids].max(text_slots)
  s0 = _State(step=jnp.int32(0), k=jnp.where(batch["start_visual"], 0, -1).astype(jnp.int32),
              images=jnp.zeros((b,), jnp.int32), done=~batch["active"], stopped=jnp.zeros((b,), bool),
              length=jnp.zeros((b,), jnp.int32), seen=seen,
              out_ids=jnp.full((b, max_new_tokens), PAD_OUT, jnp.int32),
              out_visual=jnp.zeros((b, max(max_images, 1), m, dv), jnp.float32))
  first = decide(s0, hidden[:, -1])

  def body(carry):
    (s, token, in_visual, vtok), pos, cache = carry
    h, cache = llm.forward(next_input(s, token, in_visual, vtok), positions=pos[:, None], cache=cache)
    return decide(s, h[:, 0]), pos + 1, cache

  def keep_going(carry):
    s = carry[0][0]
    return ~jnp.all(s.done) & (s.step < max_new_tokens)

  (s, *_), _, _ = jax.lax.while_loop(keep_going, body, (first, positions[:, -1] + 1, cache))
  return {"ids": s.out_ids, "visual": s.out_visual, "images": s.images, "length": s.length,
          "stopped": s.stopped}


class Engine:
  """Generation with one model: split once, one compilation per bucketed shape.

  ``eos_ids``: the stop tokens. ``pad_id``: the id written at padding.
  """

  def __init__(self, model: MetaMorph | Llama, *, eos_ids: Sequence[int], pad_id: int = 0):
    llm, self.visual = model_parts(model)
    self.graphdef, self.state = nnx.split(model)
    self.eos_ids = tuple(int(t) for t in eos_ids)
    self.pad_id = int(pad_id)
    self.context = llm.config.max_position_embeddings
    if self.visual:
      c = model.config
      self.m, self.vision_dim = c.num_visual_tokens, c.vision_dim
      self.image_start_id, self.image_end_id = c.image_start_id, c.image_end_id
      if min(c.image_start_id, c.image_end_id) < 0:
        raise ValueError("the MetaMorph config has no image token ids (image_start_id / image_end_id)")

  def _check(self, i: int, prompt: Prompt) -> None:
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty")
    if len(prompt) >= self.context:
      raise PromptTooLong(f"prompt {i} has {len(prompt)} tokens; the model's context is {self.context} "
                          "(no room for a new token)", i)
    has_images = prompt.visual_index is not None and (np.asarray(prompt.visual_index) >= 0).any()
    if has_images and not self.visual:
      raise ValueError(f"prompt {i} has images but the model is a text-only LLM")
    if has_images:
      tokens = np.asarray(prompt.visual_tokens) if prompt.visual_tokens is not None else np.zeros((0,))
      if tokens.ndim != 3 or tokens.shape[1:] != (self.m, self.vision_dim):
        raise ValueError(f"prompt {i}: visual_tokens must be [I, {self.m}, {self.vision_dim}], "
                         f"got shape {tokens.shape}")
      if np.max(prompt.visual_index) >= tokens.shape[0] * self.m:
        raise ValueError(f"prompt {i}: visual_index refers past its {tokens.shape[0]} images")
      if prompt.visual_index[-1] >= 0:
        raise ValueError(f"prompt {i} ends inside an image")

  def _batch(self, prompts: Sequence[Prompt], uncond: Sequence[Prompt] | None, max_new_tokens: int):
    """Host-side batch of the conditional rows, then the unconditional ones, then idle rows."""
    rows = list(prompts) + list(uncond or [])
    for i, prompt in enumerate(rows):
      self._check(i, prompt)
    n, b = len(prompts), pow2_bucket(len(rows))
    rows += [rows[0]] * (b - len(rows))
    ids, segments, positions = left_pad([r.input_ids for r in rows], self.pad_id, PROMPT_BUCKET)
    p = ids.shape[1]
    limit = np.array([min(max_new_tokens, self.context - len(r)) for r in rows], np.int32)
    source, partner = np.arange(b, dtype=np.int32), np.arange(b, dtype=np.int32)
    if uncond:
      twins = np.arange(n, 2 * n)
      source[twins], partner[:n] = np.arange(n), twins
      limit[:n] = limit[twins] = np.minimum(limit[:n], limit[twins])
    batch = {"input_ids": ids, "segment_ids": segments, "positions": positions, "limit": limit,
             "source": source, "partner": partner, "row_ids": np.arange(b, dtype=np.int32) % max(n, 1),
             "active": np.arange(b) < n + len(uncond or []),
             "eos_ids": np.asarray(self.eos_ids, np.int32), "start_visual": np.zeros(b, bool)}
    if self.visual:
      counts = [0 if r.visual_tokens is None else len(r.visual_tokens) for r in rows]
      vidx = np.full((b, p), -1, np.int32)
      tokens = np.zeros((b, pow2_bucket(max(counts + [1])), self.m, self.vision_dim), np.float32)
      for j, r in enumerate(rows):
        if r.visual_index is not None:
          vidx[j, p - len(r):] = r.visual_index
        if counts[j]:
          tokens[j, :counts[j]] = r.visual_tokens
        batch["start_visual"][j] = r.input_ids[-1] == self.image_start_id and vidx[j, -1] < 0
      batch.update(visual_index=vidx, visual_tokens=tokens)
    return batch

  def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               seed: int = 0, uncond: Sequence[Prompt] | None = None) -> list[Decoded]:
    """Answers of ``prompts``. ``uncond``: one unconditional prompt per prompt, used when
    ``sampling.guidance`` != 1 (required then). Each answer takes at most ``max_new_tokens``
    steps (and stops at the model's context)."""
    if not prompts:
      return []
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    use_cfg = self.visual and sampling.uses_guidance
    if use_cfg and (uncond is None or len(uncond) != len(prompts)):
      raise ValueError("guidance != 1 needs one unconditional prompt per prompt (uncond=)")
    batch = self._batch(prompts, uncond if use_cfg else None, max_new_tokens)
    out = _decode(self.graphdef, self.state, batch, sampling.traced(), jnp.uint32(seed),
                  max_new_tokens=round_up(max_new_tokens, NEW_TOKENS_BUCKET), max_images=sampling.max_images)
    out = jax.device_get(out)
    results = []
    for r in range(len(prompts)):
      length, n = int(out["length"][r]), int(out["images"][r])
      visual = out["visual"][r, :n] if self.visual else np.zeros((0, 1, 1), np.float32)
      results.append(Decoded(out["ids"][r, :length].copy(), np.array(visual),
                             "stop" if out["stopped"][r] else "length"))
    return results


def greedy_generate(model: Llama | MetaMorph, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int], pad_id: int = 0) -> list[list[int]]:
  """Greedy continuations of token-id ``prompts``, each ending with its stop token if one came."""
  engine = Engine(model, eos_ids=eos_ids, pad_id=pad_id)
  return [d.token_ids for d in engine.generate([Prompt.text(p) for p in prompts], max_new_tokens=max_new_tokens)]
