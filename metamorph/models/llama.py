"""LLaMA-family decoder (LLaMA-2, LLaMA-3/3.1, SmolLM2, ...) in Flax NNX.

RMSNorm, RoPE (plain, "linear" or "llama3" scaling), grouped-query attention,
SwiGLU MLP, tied or untied output embedding. Numerics follow transformers'
``LlamaForCausalLM``: norms, softmax and RoPE in float32, matmuls in ``dtype``.

Masking has one rule for every case: a query attends to a key iff both carry
the same non-zero segment id and the key's slot is not after the query's slot.
Training packs records with segment ids (0 = padding); generation keeps the
segment ids of the cached keys in the ``KVCache`` (0 = empty or left padding).

``LlamaConfig.remat`` ("full" / "dots") wraps each decoder layer of a cache-free
forward pass in ``jax.checkpoint``: training memory, not numerics, changes.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.layers.attention import Attention, KVSlots
from metamorph.layers.dense import dense, dtypes
from metamorph.layers.mlp import GatedMlp
from metamorph.layers.norms import RMSNorm
from metamorph.models.config import ModelConfig
from metamorph.sharding import constrain, logical_init

# LlamaConfig.remat -> what jax.checkpoint may keep from a decoder layer's forward pass
# ("full": nothing but the layer's inputs; "dots": also matmul outputs without batch dims).
REMAT_POLICIES = {"none": None, "full": jax.checkpoint_policies.nothing_saveable,
                  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling, as transformers' ``rope_scaling`` dict describes it."""
  type: str  # "linear" | "llama3"
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ("linear", "llama3"):
      raise ValueError(f"rope_scaling type {self.type!r} is not supported (use 'linear' or 'llama3')")


@dataclasses.dataclass(frozen=True)
class LlamaConfig(ModelConfig):
  """Architecture and numerics of a LLaMA-family decoder."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float = 1e-5
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 2048
  tie_word_embeddings: bool = False
  attention_bias: bool = False
  mlp_bias: bool = False
  initializer_range: float = 0.02  # std of the normal init of every kernel and the embedding
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage (master) dtype
  remat: str = "none"           # rematerialise each decoder layer in training: "none" | "full" | "dots"

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"LlamaConfig.remat {self.remat!r} is not one of {sorted(REMAT_POLICIES)}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim",
                 "initializer_range"):
      if getattr(self, name) <= 0:
        raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raises on a bad dtype name


class KVCache(NamedTuple):
  """Keys/values of every layer plus the segment id of each cache slot."""
  keys: tuple[jax.Array, ...]    # L x [B, S, KVH, Dh]
  values: tuple[jax.Array, ...]  # L x [B, S, KVH, Dh]
  segment_ids: jax.Array         # [B, S], 0 = empty / padding
  index: jax.Array               # [] int32, next slot to write

  @property
  def max_length(self) -> int:
    return self.segment_ids.shape[1]


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [Dh/2] in float32, with the config's scaling applied."""
  dim = config.head_dim
  inv_freq = 1.0 / (np.float32(config.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  if scaling.type == "linear":
    return (inv_freq / scaling.factor).astype(np.float32)
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
            / (scaling.high_freq_factor - scaling.low_freq_factor))
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates ``x`` [B, T, N, Dh] by ``positions`` [B, T] (half-split convention)."""
  freqs = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [B, T, Dh/2]
  cos = jnp.cos(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([freqs, freqs], -1))[:, :, None, :]
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


# ----------------------------------------------------------------------------- layers

def attention_mask(q_segments: jax.Array, k_segments: jax.Array, q_slots: jax.Array,
                   k_slots: jax.Array) -> jax.Array:
  """[B, T, S] bool: same non-zero segment and key slot <= query slot."""
  same = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
  causal = k_slots[None, :] <= q_slots[:, None]  # [T, S]
  return same & causal[None]


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attention(input_norm(x)) with RoPE, then x + mlp(post_attention_norm(x))."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    init = nnx.initializers.normal(c.initializer_range)
    self.input_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **dtypes(c))
    self.attention = Attention(c.hidden_size, c.num_heads, c.head_dim, num_kv_heads=c.num_kv_heads,
                               use_bias=c.attention_bias, kernel_init=init, rngs=rngs, **dtypes(c))
    self.post_attention_norm = RMSNorm(c.hidden_size, c.rms_norm_eps, **dtypes(c))
    self.mlp = GatedMlp(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, kernel_init=init,
                        rngs=rngs, **dtypes(c))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array,
               cache: tuple[jax.Array, jax.Array, jax.Array, jax.Array] | None = None):
    """x [B, T, D] -> ([B, T, D], updated (keys, values) or None).

    ``cache`` is (keys [B, S, KVH, Dh], values, slot segment ids [B, S] already holding
    this step's ids, write index []).
    """
    inv_freq = rope_inv_freq(self.config)
    rotate = lambda h: apply_rope(h, positions, inv_freq)
    h = self.input_norm(x)
    if cache is None:
      mask = attention_mask(segment_ids, segment_ids, jnp.arange(x.shape[1]), jnp.arange(x.shape[1]))
      h, new_kv = self.attention(h, mask=mask, rotate=rotate), None
    else:
      keys, values, slot_segments, index = cache
      mask = attention_mask(segment_ids, slot_segments, index + jnp.arange(x.shape[1]),
                            jnp.arange(keys.shape[1]))
      h, slots = self.attention.extend(h, KVSlots(keys, values, index), mask, rotate=rotate)
      new_kv = (slots.keys, slots.values)
    x = x + h
    x = x + self.mlp(self.post_attention_norm(x))
    return constrain(x, "batch", "length", "act_embed"), new_kv


def _remat_layer(layer: DecoderLayer, remat: str, x, positions, segment_ids) -> jax.Array:
  """``layer(x)`` under ``jax.checkpoint``: its activations are recomputed in the
  backward pass instead of being kept (``REMAT_POLICIES[remat]`` says what is kept)."""
  graphdef, state = nnx.split(layer)

  def run(state, x, positions, segment_ids):
    return nnx.merge(graphdef, state)(x, positions, segment_ids)[0]

  return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, x, positions, segment_ids)


# ----------------------------------------------------------------------------- model

class Llama(nnx.Module):
  """Decoder-only LM. ``llm(input_ids)`` -> logits [B, T, V] (float32)."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.dtype = jnp.dtype(config.dtype)
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=self.dtype,
        param_dtype=jnp.dtype(config.param_dtype),
        embedding_init=logical_init(nnx.initializers.normal(config.initializer_range), "vocab", "embed"),
        rngs=rngs)
    self.layers = nnx.List([DecoderLayer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **dtypes(config))
    if not config.tie_word_embeddings:
      self.lm_head = dense(config.hidden_size, config.vocab_size, ("embed", "vocab"), use_bias=False,
                           kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
                           **dtypes(config))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """[B, T] int -> [B, T, D] in the compute dtype."""
    return constrain(self.embed_tokens(input_ids), "batch", "length", "act_embed")

  def init_cache(self, batch: int, max_length: int, dtype=None) -> KVCache:
    """An empty cache of ``max_length`` slots (all segment ids 0)."""
    c = self.config
    shape = (batch, max_length, c.num_kv_heads, c.head_dim)
    zeros = lambda: jnp.zeros(shape, dtype or self.dtype)
    return KVCache(tuple(zeros() for _ in self.layers), tuple(zeros() for _ in self.layers),
                   jnp.zeros((batch, max_length), jnp.int32), jnp.zeros((), jnp.int32))

  def forward(self, inputs_embeds: jax.Array, *, positions: jax.Array | None = None,
              segment_ids: jax.Array | None = None,
              cache: KVCache | None = None) -> tuple[jax.Array, KVCache | None]:
    """inputs_embeds [B, T, D] -> (final-normed hidden states [B, T, D], cache).

    positions [B, T]: RoPE positions (default: slot index). segment_ids [B, T]:
    0 marks padding (default: all 1). With a cache, the T inputs fill slots
    ``cache.index .. cache.index + T - 1`` and the updated cache is returned.
    """
    b, t, _ = inputs_embeds.shape
    start = 0 if cache is None else cache.index
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    x = inputs_embeds.astype(self.dtype)
    if cache is not None:
      slot_segments = jax.lax.dynamic_update_slice(cache.segment_ids, segment_ids.astype(jnp.int32), (0, start))
    keys, values = [], []
    for i, layer in enumerate(self.layers):
      if cache is None and self.config.remat != "none":
        x = _remat_layer(layer, self.config.remat, x, positions, segment_ids)
        continue
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i], slot_segments, start)
      x, new_kv = layer(x, positions, segment_ids, layer_cache)
      if new_kv is not None:
        keys.append(new_kv[0])
        values.append(new_kv[1])
    hidden = self.norm(x)
    if cache is None:
      return hidden, None
    return hidden, KVCache(tuple(keys), tuple(values), slot_segments, start + t)

  def logits(self, hidden: jax.Array) -> jax.Array:
    """[B, T, D] -> [B, T, V] float32."""
    if self.config.tie_word_embeddings:
      table = self.embed_tokens.embedding[...].astype(self.dtype)
      out = jnp.einsum("btd,vd->btv", hidden, table, preferred_element_type=jnp.float32)
    else:
      out = self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), "batch", "length", "act_vocab")

  def __call__(self, input_ids: jax.Array, *, positions: jax.Array | None = None,
               segment_ids: jax.Array | None = None) -> jax.Array:
    hidden, _ = self.forward(self.embed(input_ids), positions=positions, segment_ids=segment_ids)
    return self.logits(hidden)
