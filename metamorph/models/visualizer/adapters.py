"""Adapters: the visual tokens [B, m, Dv] -> the UNet's cross-attention condition
[B, L, cross_dim]. ``MlpAdapter`` (the reference, token by token) and ``Resampler``
(learned queries cross-attending to the tokens)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.layers.attention import VIT_NAMES, Attention
from metamorph.layers.dense import dense, dtypes, table
from metamorph.layers.norms import layer_norm
from metamorph.models.visualizer.config import VisualizerConfig

LAYER_NORM_EPS = 1e-5


def _dense(d_in: int, d_out: int, names: tuple[str | None, str | None], config: VisualizerConfig,
           rngs: nnx.Rngs) -> nnx.LinearGeneral:
  """A dense layer: lecun-normal kernel [d_in, d_out] named ``names``, zero bias."""
  return dense(d_in, d_out, names, rngs=rngs, **dtypes(config))


def _layer_norm(width: int, config: VisualizerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layer_norm(width, LAYER_NORM_EPS, rngs=rngs, **dtypes(config))


class MlpAdapter(nnx.Module):
  """The reference adapter, per token: fc1 (Dv -> hidden) -> norm -> ReLU -> fc2 (-> cross dim).
  Params: fc1/{kernel,bias}, norm/{scale,bias}, fc2/{kernel,bias}."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    self.fc1 = _dense(config.token_dim, config.adapter_hidden, ("vis_embed", "mlp"), config, rngs)
    self.norm = _layer_norm(config.adapter_hidden, config, rngs)
    self.fc2 = _dense(config.adapter_hidden, config.cross_attention_dim, ("mlp", "embed"), config, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, m, Dv] -> [B, m, cross_dim]."""
    return self.fc2(jax.nn.relu(self.norm(self.fc1(tokens))))


class _ResamplerLayer(nnx.Module):
  """queries += attn(norm_q(queries), norm_kv(tokens)); queries += mlp(norm_mlp(queries))."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    d, heads = config.cross_attention_dim, config.resampler_heads
    self.norm_q = _layer_norm(d, config, rngs)
    self.norm_kv = _layer_norm(d, config, rngs)
    self.attn = Attention(d, heads, d // heads, names=VIT_NAMES, rngs=rngs, **dtypes(config))
    self.norm_mlp = _layer_norm(d, config, rngs)
    self.fc1 = _dense(d, 4 * d, ("embed", "mlp"), config, rngs)
    self.fc2 = _dense(4 * d, d, ("mlp", "embed"), config, rngs)

  def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
    queries = queries + self.attn(self.norm_q(queries), self.norm_kv(tokens))
    return queries + self.fc2(jax.nn.gelu(self.fc1(self.norm_mlp(queries)), approximate=False))


class Resampler(nnx.Module):
  """``num_queries`` learned queries cross-attend to the projected tokens.
  Params: queries, proj_in/*, layers/<i>/{norm_q,norm_kv,attn/{query,key,value,out},norm_mlp,fc1,fc2}/*,
  norm_out/*."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    d = config.cross_attention_dim
    self.queries = table((config.num_queries, d), ("positions", "embed"), nnx.initializers.normal(d ** -0.5),
                         param_dtype=config.param_dtype, rngs=rngs)
    self.proj_in = _dense(config.token_dim, d, ("vis_embed", "embed"), config, rngs)
    self.layers = nnx.List([_ResamplerLayer(config, rngs=rngs) for _ in range(config.resampler_layers)])
    self.norm_out = _layer_norm(d, config, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, m, Dv] -> [B, num_queries, cross_dim]."""
    x = self.proj_in(tokens)
    q = jnp.broadcast_to(self.queries[...].astype(x.dtype), (x.shape[0], *self.queries.shape))
    for layer in self.layers:
      q = layer(q, x)
    return self.norm_out(q)


ADAPTER_CLASSES = {"mlp": MlpAdapter, "resampler": Resampler}
