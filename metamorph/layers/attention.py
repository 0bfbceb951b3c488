"""Multi-head dot-product attention: one block for self- and cross-attention.

Queries come from ``x_q`` [B, T, Dq], keys and values from ``x_kv`` [B, S, Dkv] (``x_q`` for
self-attention). Keys/values may have fewer heads than the queries (grouped-query attention:
query head h reads kv head h // (H / KVH)). A mask is bool, broadcastable to [B, T, S], True
where a query may attend to a key. ``Attention.extend`` runs self-attention over a KV cache.

Numerics: projections in the compute dtype; scores, the mask and the softmax in float32; keys,
values and probabilities cast to the queries' dtype.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.layers.dense import Initializer, dense
from metamorph.sharding import constrain

NEG_INF = -1e30  # finite, so a fully masked (padding) row stays NaN-free

# The attribute names of the four projections (query, key, value, output) in a checkpoint.
HF_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")  # transformers' LLaMA family
VIT_NAMES = ("query", "key", "value", "out")         # big_vision's / Flax's ViT

Rotate = Callable[[jax.Array], jax.Array]  # [B, L, N, Dh] -> [B, L, N, Dh], e.g. RoPE


class KVSlots(NamedTuple):
  """One attention layer's cache: keys and values of S slots, and where the next go."""
  keys: jax.Array    # [B, S, KVH, Dh]
  values: jax.Array  # [B, S, KVH, Dh]
  index: jax.Array   # [] int32, the first slot to write


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          mask: jax.Array | None = None) -> jax.Array:
  """q [B, T, H, Dh], k/v [B, S, KVH, Dh] (H a multiple of KVH), mask bool broadcastable to
  [B, T, S] or None (attend everywhere) -> [B, T, H, Dh]: softmax(q k / sqrt(Dh)) v."""
  b, t, h, d = q.shape
  kvh = k.shape[2]
  k, v = k.astype(q.dtype), v.astype(q.dtype)
  grouped = kvh != h
  if grouped:  # head h = kv * groups + g
    q = q.reshape(b, t, kvh, h // kvh, d)
  spec = ("btkgd,bskd->bkgts", "bkgts,bskd->btkgd") if grouped else ("bthd,bshd->bhts", "bhts,bshd->bthd")
  scores = jnp.einsum(spec[0], q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
  if mask is not None:  # [.., T, S] -> [.., 1(, 1), T, S]: the same for every head
    mask = jnp.asarray(mask)
    scores = jnp.where(jnp.expand_dims(mask, (-3, -4) if grouped else -3), scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  return jnp.einsum(spec[1], probs, v).reshape(b, t, h, d)


class Attention(nnx.Module):
  """Multi-head attention with query, key, value and output projections.

  ``width``: Dq, the queries' and the output's width; ``kv_width``: Dkv (default Dq);
  ``num_kv_heads``: KVH (default ``num_heads``). Params, under the attribute names ``names``
  (``HF_NAMES`` or ``VIT_NAMES``): query kernel [Dq, H, Dh] ("embed", "heads", "head_dim"),
  key/value kernels [Dkv, KVH, Dh] ("embed", "kv_heads", "head_dim"), output kernel
  [H, Dh, Dq] ("heads", "head_dim", "embed"), and biases [H, Dh] / [KVH, Dh] / [Dq] when
  ``use_bias``. The projected q, k and v are sharding-constrained per head.
  """

  def __init__(self, width: int, num_heads: int, head_dim: int, *, num_kv_heads: int | None = None,
               kv_width: int | None = None, names: tuple[str, str, str, str] = HF_NAMES,
               use_bias: bool = True, kernel_init: Initializer = nnx.initializers.xavier_uniform(),
               bias_init: Initializer = nnx.initializers.zeros, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if num_heads % kv_heads:
      raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({kv_heads})")
    kv_width = width if kv_width is None else kv_width
    kw = dict(use_bias=use_bias, kernel_init=kernel_init, bias_init=bias_init, dtype=dtype,
              param_dtype=param_dtype, rngs=rngs)
    self.names = tuple(names)
    q, k, v, o = self.names
    setattr(self, q, dense(width, (num_heads, head_dim), ("embed", "heads", "head_dim"), **kw))
    setattr(self, k, dense(kv_width, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **kw))
    setattr(self, v, dense(kv_width, (kv_heads, head_dim), ("embed", "kv_heads", "head_dim"), **kw))
    setattr(self, o, dense((num_heads, head_dim), width, ("heads", "head_dim", "embed"), axis=(-2, -1), **kw))

  def project(self, x_q: jax.Array, x_kv: jax.Array,
              rotate: Rotate | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x_q [B, T, Dq], x_kv [B, S, Dkv] -> q [B, T, H, Dh], k and v [B, S, KVH, Dh];
    ``rotate`` (e.g. RoPE) is applied to q and k."""
    q_proj, k_proj, v_proj, _ = (getattr(self, n) for n in self.names)
    q, k, v = q_proj(x_q), k_proj(x_kv), v_proj(x_kv)
    if rotate is not None:
      q, k = rotate(q), rotate(k)
    return (constrain(q, "batch", "length", "act_heads", None),
            constrain(k, "batch", "length", "act_kv_heads", None),
            constrain(v, "batch", "length", "act_kv_heads", None))

  def output(self, heads: jax.Array) -> jax.Array:
    """[B, T, H, Dh] -> [B, T, Dq]."""
    return getattr(self, self.names[3])(heads)

  def __call__(self, x_q: jax.Array, x_kv: jax.Array | None = None, mask: jax.Array | None = None, *,
               rotate: Rotate | None = None) -> jax.Array:
    """x_q [B, T, Dq], x_kv [B, S, Dkv] (None: x_q), mask bool broadcastable to [B, T, S] or
    None -> [B, T, Dq]."""
    q, k, v = self.project(x_q, x_q if x_kv is None else x_kv, rotate)
    return self.output(dot_product_attention(q, k, v, mask))

  def extend(self, x: jax.Array, cache: KVSlots, mask: jax.Array, *,
             rotate: Rotate | None = None) -> tuple[jax.Array, KVSlots]:
    """Self-attention of x [B, T, Dq] over the cache: x's keys and values are written to
    slots ``cache.index .. cache.index + T - 1`` (in the cache's dtype), then the T queries
    attend to all S slots under ``mask`` (bool, broadcastable to [B, T, S]).
    -> ([B, T, Dq], the updated cache, its index advanced by T)."""
    q, k, v = self.project(x, x, rotate)
    keys = jax.lax.dynamic_update_slice(cache.keys, k.astype(cache.keys.dtype), (0, cache.index, 0, 0))
    values = jax.lax.dynamic_update_slice(cache.values, v.astype(cache.values.dtype), (0, cache.index, 0, 0))
    out = self.output(dot_product_attention(q, keys, values, mask))
    return out, KVSlots(keys, values, cache.index + x.shape[1])
