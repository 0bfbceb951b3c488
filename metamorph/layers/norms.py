"""Normalisation layers, statistics in float32; scale (and bias) named "norm"."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.layers.dense import table
from metamorph.sharding import logical_init


class RMSNorm(nnx.Module):
  """``x / rms(x) * scale``, normalised in float32 (transformers' LlamaRMSNorm), then cast to
  ``dtype``. Params: scale [dim] (ones)."""

  def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
    self.eps, self.dtype = eps, jnp.dtype(dtype)
    self.scale = table((dim,), ("norm",), nnx.initializers.ones, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return xf.astype(self.dtype) * self.scale[...].astype(self.dtype)


def layer_norm(dim: int, eps: float, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis. nnx computes mean and variance in float32 and normalises
  in float32 (the float32 statistics promote the arithmetic), then casts to ``dtype``.
  Params: scale [dim] (ones), bias [dim] (zeros)."""
  return nnx.LayerNorm(
      dim, epsilon=eps, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
      scale_init=logical_init(nnx.initializers.ones, "norm"),
      bias_init=logical_init(nnx.initializers.zeros, "norm"), rngs=rngs)
