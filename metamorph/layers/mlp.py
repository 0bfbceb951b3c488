"""Feed-forward blocks: the two-layer MLP (``Mlp``) and the gated one (``GatedMlp``, SwiGLU)."""
from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from metamorph.layers.dense import Initializer, Names, dense
from metamorph.sharding import constrain

Activation = Callable[[jax.Array], jax.Array]

# activations by their transformers name
ACTIVATIONS: dict[str, Activation] = {
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


class Mlp(nnx.Module):
  """fc2(act(fc1(x))): x [..., d_in] -> [..., d_out].

  Params: fc1/{kernel [d_in, d_hidden], bias}, fc2/{kernel [d_hidden, d_out], bias}; kernels
  named (``axes[0]``, "mlp") and ("mlp", ``axes[1]``). ``hidden_axes``: the logical names the
  hidden activation is sharding-constrained to (e.g. ("batch", "length", "act_mlp") for
  [B, T, F] inputs), or None for no constraint (inputs of any rank).
  """

  def __init__(self, d_in: int, d_hidden: int, d_out: int, *, axes: tuple[str, str] = ("embed", "embed"),
               act: Activation = ACTIVATIONS["gelu"], hidden_axes: Names | None = None,
               kernel_init: Initializer = nnx.initializers.lecun_normal(),
               bias_init: Initializer = nnx.initializers.zeros, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(kernel_init=kernel_init, bias_init=bias_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act, self.hidden_axes = act, hidden_axes
    self.fc1 = dense(d_in, d_hidden, (axes[0], "mlp"), **kw)
    self.fc2 = dense(d_hidden, d_out, ("mlp", axes[1]), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.fc1(x))  # [..., d_hidden]
    if self.hidden_axes is not None:
      h = constrain(h, *self.hidden_axes)
    return self.fc2(h)


class GatedMlp(nnx.Module):
  """down(act(gate(x)) * up(x)) (SwiGLU with ``act`` silu): [B, T, D] -> [B, T, D].

  Params: gate_proj, up_proj {kernel [D, F] ("embed", "mlp"), bias}, down_proj {kernel [F, D]
  ("mlp", "embed"), bias}; biases when ``use_bias``. The hidden [B, T, F] is
  sharding-constrained to ("batch", "length", "act_mlp").
  """

  def __init__(self, width: int, hidden: int, *, act: Activation = jax.nn.silu, use_bias: bool = False,
               kernel_init: Initializer = nnx.initializers.lecun_normal(), dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    kw = dict(use_bias=use_bias, kernel_init=kernel_init, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = act
    self.gate_proj = dense(width, hidden, ("embed", "mlp"), **kw)
    self.up_proj = dense(width, hidden, ("embed", "mlp"), **kw)
    self.down_proj = dense(hidden, width, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.act(self.gate_proj(x)) * self.up_proj(x)
    return self.down_proj(constrain(h, "batch", "length", "act_mlp"))
