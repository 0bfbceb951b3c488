"""Cross-entropy that runs the LM head only where a position has a text target.

In VPiT batches about one position in ten has a text label (short answers; the rest is prompt,
visual slots and padding), while the LM head over a vocabulary of 49,152 (SmolLM2) or 128,256
(LLaMA-3) is a large share of a step and its [B, T, V] logits the largest activation. So each
row's target positions are moved to its front (a stable sort: their order is kept), the rows
are cut into chunks of ``chunk`` positions, and the head runs, chunk after chunk in a scan,
only on the chunks that some row still has targets in (``lax.cond``); each chunk's logits are
recomputed in the backward pass rather than kept. The cost follows the most targets any row
of the batch holds, never the padded length; no target is ever skipped (there is no cap).
The sort stays within each row, so a batch sharded by rows stays so.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

CHUNK = 64  # positions per chunk of each row


def target_nll(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, labels: jax.Array,
               mask: jax.Array, chunk: int = CHUNK) -> jax.Array:
  """Sum over ``mask`` of -log softmax(logits_fn(hidden))[label] (float32 scalar).

  hidden [B, T, H]; labels [B, T] int (any value where ``mask`` is False); mask [B, T] bool;
  ``logits_fn``: [B, C, H] -> [B, C, V] (the LM head), called on chunks of C = ``chunk``
  positions; ``chunk`` = 0 runs it once on every position (the plain cross-entropy: the
  baseline of ``bench.tuning_modes``).
  """
  b, t, _ = hidden.shape
  if chunk <= 0:
    return _nll(logits_fn, hidden, labels, mask)
  order = jnp.argsort(~mask, axis=1, stable=True)                        # [B, T]: targets first
  hidden = jnp.take_along_axis(hidden, order[..., None], axis=1)         # [B, T, H]
  labels = jnp.take_along_axis(labels, order, axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  n = -(-t // chunk)
  pad = n * chunk - t
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    labels, mask = jnp.pad(labels, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
  per_chunk = lambda x: x.reshape(b, n, chunk, *x.shape[2:]).swapaxes(0, 1)  # [n, B, C, ...]
  most = jnp.max(jnp.sum(mask, axis=1))                                  # targets in the fullest row

  chunk_nll = jax.checkpoint(lambda h, y, m: _nll(logits_fn, h, y, m))

  def step(total, xs):
    i, h, y, m = xs
    part = jax.lax.cond(i * chunk < most, chunk_nll, lambda *_: jnp.zeros((), jnp.float32), h, y, m)
    return total + part, None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                          (jnp.arange(n), per_chunk(hidden), per_chunk(labels), per_chunk(mask)))
  return total


def _nll(logits_fn, hidden: jax.Array, labels: jax.Array, mask: jax.Array) -> jax.Array:
  logp = jax.nn.log_softmax(logits_fn(hidden).astype(jnp.float32), axis=-1)  # [B, C, V]
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(mask, nll, 0.0).sum()
