"""Projections and learned tables whose parameters carry logical axis names.

``dense`` is ``nnx.LinearGeneral`` (an ``int -> int`` one is ``nnx.Linear``'s kernel [in, out]
and bias [out], drawn and computed the same way); ``conv`` is ``nnx.Conv``; ``table`` is one
``nnx.Param``. ``names`` lists one logical axis name (or None) per parameter dimension; biases
take the output dimensions' names. ``dtype`` is the compute dtype, ``param_dtype`` the storage
dtype (a name such as "bfloat16" or a dtype).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.sharding import logical_init

Names = tuple[str | None, ...]
Initializer = Callable[..., jax.Array]


def dtypes(config: Any) -> dict[str, jnp.dtype]:
  """``dtype`` and ``param_dtype`` keywords from a model config with those two fields."""
  return dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype))


def dense(in_shape: int | tuple[int, ...], out_shape: int | tuple[int, ...], names: Names, *,
          dtype: Any, param_dtype: Any, rngs: nnx.Rngs, axis: int | tuple[int, ...] = -1,
          use_bias: bool = True, kernel_init: Initializer = nnx.initializers.lecun_normal(),
          bias_init: Initializer = nnx.initializers.zeros) -> nnx.LinearGeneral:
  """x [..., *in_shape] (contracted over ``axis``) -> [..., *out_shape]; kernel
  [*in_shape, *out_shape] named ``names``, bias [*out_shape]. ``kernel_init`` sees the
  kernel as a matrix [prod(in_shape), prod(out_shape)] (fan-in and fan-out as for a Linear)."""
  n_out = len(out_shape) if isinstance(out_shape, tuple) else 1
  return nnx.LinearGeneral(
      in_shape, out_shape, axis=axis, use_bias=use_bias,
      dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
      kernel_init=logical_init(kernel_init, *names),
      bias_init=logical_init(bias_init, *names[-n_out:]), rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: Sequence[int], names: Names, *,
         dtype: Any, param_dtype: Any, rngs: nnx.Rngs, strides: int | Sequence[int] = 1,
         padding: str = "SAME", kernel_init: Initializer = nnx.initializers.lecun_normal(),
         bias_init: Initializer = nnx.initializers.zeros) -> nnx.Conv:
  """Convolution over NHWC: kernel [*kernel_size, in, out] named ``names``, bias [out]."""
  return nnx.Conv(
      in_features, out_features, tuple(kernel_size), strides=strides, padding=padding,
      dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
      kernel_init=logical_init(kernel_init, *names),
      bias_init=logical_init(bias_init, names[-1]), rngs=rngs)


def table(shape: tuple[int, ...], names: Names, init: Initializer, *, param_dtype: Any,
          rngs: nnx.Rngs | None = None) -> nnx.Param:
  """A learned parameter of ``shape`` (a position table, learned queries, ...) drawn by
  ``init``; ``rngs`` None for a deterministic ``init`` (ones, identity), which draws no key."""
  key = None if rngs is None else rngs.params()
  return nnx.Param(logical_init(init, *names)(key, shape, jnp.dtype(param_dtype)))
