"""The LLM's input interfaces: what turns an encoder's visual tokens into LLM input embeddings.

An interface is an ``nnx.Module`` built by ``INTERFACES[name](vision_dim, hidden, *, dtype,
param_dtype, rngs)`` (``build_interface`` checks the name), with

- ``__call__(tokens)``: visual tokens [B, I, m, Dv] (I items of m tokens each) or [N, m, Dv]
  -> embeddings [B, I, n_out, H] or [N, n_out, H] in the compute dtype;
- ``tokens_per_item(m)``: n_out, the LLM positions one item of m tokens takes;
- ``tokenwise``: True when each output embedding depends only on its own token (n_out = m),
  so the interface also maps single tokens [..., Dv] -> [..., H]. MetaMorph's interleaved
  embedding and its VPiT decoding (each predicted visual token is fed back on its own) need it.

``MetaMorphConfig.image_interface`` names the one for images; ``MetaMorph`` builds it once,
as its ``projector``, so the parameters are ``projector/...``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from metamorph.layers.mlp import ACTIVATIONS, Mlp


class Mlp2xGelu(Mlp):
  """LLaVA's and MetaMorph's ``mlp2x_gelu``, token by token: Linear(Dv -> H), GELU (exact),
  Linear(H -> H); [..., Dv] (any leading axes) -> [..., H].
  Params: fc1/{kernel [Dv, H], bias}, fc2/{kernel [H, H], bias}."""

  tokenwise = True

  def __init__(self, vision_dim: int, hidden: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    super().__init__(vision_dim, hidden, hidden, axes=("vis_embed", "embed"), act=ACTIVATIONS["gelu"],
                     dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def tokens_per_item(self, m: int) -> int:
    return m


INTERFACES: dict[str, Callable[..., nnx.Module]] = {
    "mlp2x_gelu": Mlp2xGelu,
}


def check_interface(name: str) -> None:
  """A ValueError naming the known interfaces when ``name`` is not one of them."""
  if name not in INTERFACES:
    raise ValueError(f"unknown input interface {name!r}; known interfaces: {sorted(INTERFACES)}")


def build_interface(name: str, vision_dim: int, hidden: int, *, dtype: Any, param_dtype: Any,
                    rngs: nnx.Rngs) -> nnx.Module:
  """The interface ``name`` from visual tokens of width ``vision_dim`` to LLM width ``hidden``."""
  check_interface(name)
  return INTERFACES[name](vision_dim, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
