"""KV-cached text generation over ``nnx.split`` state, one jitted loop per call.

Prompts are left-padded into one batch (segment id 0 marks the padding), so
every sequence writes the same cache slot at each step while its RoPE position
counts only its own tokens.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.models.llama import Llama

PROMPT_BUCKET = 32  # prompt lengths are rounded up to this, so similar prompts share one compilation


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1):
  """(ids [B, P], segment_ids [B, P], positions [B, P]) with P rounded up to ``multiple``."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  length = -(-max(len(p) for p in prompts) // multiple) * multiple
  ids = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = p
    segments[i, length - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return ids, segments, positions


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"))
def _greedy(graphdef, state, ids, segments, positions, eos_ids, max_new_tokens: int):
  model: Llama = nnx.merge(graphdef, state)
  batch, prompt_len = ids.shape
  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  hidden, cache = model.forward(model.embed(ids), positions=positions, segment_ids=segments, cache=cache)
  first = jnp.argmax(model.logits(hidden[:, -1:])[:, 0], axis=-1).astype(jnp.int32)  # [B]
  out = jnp.zeros((batch, max_new_tokens), jnp.int32).at[:, 0].set(first)
  done = jnp.isin(first, eos_ids)

  def step(carry):
    i, token, pos, cache, out, done = carry
    hidden, cache = model.forward(model.embed(token[:, None]), positions=pos[:, None], cache=cache)
    token = jnp.argmax(model.logits(hidden)[:, 0], axis=-1).astype(jnp.int32)
    token = jnp.where(done, eos_ids[0], token)
    out = out.at[:, i].set(token)
    return i + 1, token, pos + 1, cache, out, done | jnp.isin(token, eos_ids)

  def keep_going(carry):
    i, *_, done = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  carry = (jnp.int32(1), first, positions[:, -1] + 1, cache, out, done)
  return jax.lax.while_loop(keep_going, step, carry)[4]


def greedy_generate(model: Llama, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int], pad_id: int = 0) -> list[list[int]]:
  """Greedy continuations of token-id ``prompts``, each cut after its first EOS."""
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  ids, segments, positions = left_pad(prompts, pad_id, multiple=PROMPT_BUCKET)
  graphdef, state = nnx.split(model)
  eos = jnp.asarray(list(eos_ids), jnp.int32)
  out = np.asarray(_greedy(graphdef, state, ids, segments, positions, eos, max_new_tokens))
  results = []
  for row in out.tolist():
    stop = next((i for i, t in enumerate(row) if t in set(eos_ids)), None)
    results.append(row if stop is None else row[:stop + 1])
  return results
