"""Low-rank adapters (LoRA, Hu et al. 2021) on the projections of a model.

``LoraDense`` wraps a ``dense`` projection (``nnx.LinearGeneral``, kernel [*in, *out]) and adds
``scale * (dropout(x) . a) . b`` to its output, with ``a`` [*in, r] and ``b`` [r, *out]
(``LoraParam``s; ``b`` starts at zero, so a fresh adapter changes nothing) and ``scale`` =
alpha / r. The factors carry the base kernel's logical axis names on its in / out dimensions
and ``lora_rank`` (replicated) on r, so they shard with the kernel they adapt.

``add_lora`` swaps every projection whose attribute name is in ``targets`` (below a path
prefix) for its ``LoraDense``; ``merge_lora`` folds each adapter into its kernel,
``kernel + scale * a . b`` (in f32, stored in the kernel's dtype), and puts the plain
projection back, so the merged model has the base model's parameter paths. ``lora_factors``
reads the factors by the projection's path (the PEFT export).

``a`` is drawn like PEFT's ``lora_A`` (``kaiming_uniform(a=sqrt(5))`` over fan-in = prod(in),
i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))). Dropout acts on the adapter's input only, and only
while ``dropout_key`` is set (the train step sets it; evaluation, export and decoding do not).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.sharding import logical_init

RANK_AXIS = "lora_rank"


class LoraParam(nnx.Param):
  """A low-rank factor: trains under LoRA while the kernel it adapts stays frozen."""


class LoraConfigError(ValueError):
  """A LoRA setting that does not fit the model; ``field`` names it: "targets" or "rank"."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


def _kernel_names(kernel: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
  names = kernel.get_metadata().get("out_sharding")
  return tuple(names) if names else (None,) * ndim


class LoraDense(nnx.Module):
  """``base(x) + scale * (dropout(x) . a) . b`` for a ``dense`` projection ``base``.

  ``base``: an ``nnx.LinearGeneral`` contracting x's ``base.axis`` dims [*in] into [*out];
  ``a`` [*in, r] and ``b`` [r, *out] in the kernel's parameter dtype, computed in its dtype.
  """

  def __init__(self, base: nnx.LinearGeneral, rank: int, alpha: float, dropout: float, *, rngs: nnx.Rngs):
    in_shape, out_shape = tuple(base.in_features), tuple(base.out_features)
    most = min(math.prod(in_shape), math.prod(out_shape))
    if rank < 1 or rank > most:
      raise LoraConfigError("rank", f"LoRA rank {rank} must be in 1..{most} for a projection {in_shape} -> {out_shape}")
    names = _kernel_names(base.kernel, len(in_shape) + len(out_shape))
    in_names, out_names = names[:len(in_shape)], names[len(in_shape):]
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    dtype = base.kernel[...].dtype
    self.base = base
    self.a = LoraParam(logical_init(uniform, *in_names, RANK_AXIS)(rngs.params(), (*in_shape, rank), dtype))
    self.b = LoraParam(logical_init(nnx.initializers.zeros, RANK_AXIS, *out_names)(
        None, (rank, *out_shape), dtype))
    self.rank, self.alpha, self.dropout = rank, float(alpha), float(dropout)
    # a key while training with dropout (set by the train step); a data attribute, so a module
    # split while it is set (e.g. under remat) carries it as a state leaf
    self.dropout_key = nnx.data(None)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., *in] -> [..., *out]."""
    y = self.base(x)
    axes = tuple(a % x.ndim for a in (self.base.axis if isinstance(self.base.axis, tuple)
                                      else (self.base.axis,)))
    dtype = self.base.dtype or x.dtype
    h = x.astype(dtype)
    if self.dropout and self.dropout_key is not None:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout, h.shape)
      h = jnp.where(keep, h / (1.0 - self.dropout), jnp.zeros_like(h))
    h = jnp.tensordot(h, self.a[...].astype(dtype), axes=(axes, tuple(range(len(axes)))))  # [..., r]
    update = jnp.tensordot(h, self.b[...].astype(dtype), axes=1)                          # [..., *out]
    return y + (self.scale * update).astype(y.dtype)

  def delta(self) -> jax.Array:
    """scale * a . b: [*in, *out] in f32, what the adapter adds to the kernel."""
    a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
    return self.scale * jnp.tensordot(a, b, axes=1)


def _children(module: nnx.Module) -> Iterator[tuple[str | int, Any]]:
  if isinstance(module, nnx.List):
    yield from enumerate(module)
  else:
    yield from vars(module).items()


def _set(parent: nnx.Module, name: str | int, value: Any) -> None:
  if isinstance(parent, nnx.List):
    parent[name] = value
  else:
    setattr(parent, name, value)


def _walk(module: nnx.Module, path: tuple = ()) -> Iterator[tuple[tuple, nnx.Module, str | int, Any]]:
  """(path of the child, parent, name, child) for every module below ``module``, depth first."""
  for name, child in list(_children(module)):
    if isinstance(child, nnx.Module):
      yield (*path, name), module, name, child
      yield from _walk(child, (*path, name))


def add_lora(model: nnx.Module, targets: Iterable[str], *, rank: int, alpha: float, dropout: float = 0.0,
             under: tuple[str, ...] = (), seed: int = 0) -> list[tuple]:
  """Wraps, in place, each ``nnx.LinearGeneral`` named one of ``targets`` whose path starts with
  ``under`` in a ``LoraDense``; returns the adapted paths. Raises ValueError naming a target that
  matches no projection (with the projection names that exist) or a rank too large
  (``LoraConfigError``, whose ``field`` says which)."""
  targets = tuple(targets)
  if not targets:
    raise LoraConfigError("targets", "LoRA needs at least one target module")
  rngs = nnx.Rngs(params=seed)
  adapted, seen = [], set()
  for path, parent, name, child in list(_walk(model)):
    if path[:len(under)] != tuple(under):
      continue
    if isinstance(child, nnx.LinearGeneral):
      seen.add(name)
      if name in targets:
        try:
          _set(parent, name, LoraDense(child, rank, alpha, dropout, rngs=rngs))
        except LoraConfigError as e:
          raise LoraConfigError(e.field, f"LoRA on {'.'.join(map(str, path))}: {e}") from e
        adapted.append(path)
  missing = [t for t in targets if t not in seen]
  if missing:
    where = ".".join(under) or "the model"
    raise LoraConfigError("targets", f"LoRA target modules {missing} name no projection of {where}; its projections are "
                     f"{sorted(str(s) for s in seen)}")
  return adapted


def lora_layers(model: nnx.Module) -> Iterator[tuple[tuple, LoraDense]]:
  """(path, adapter) of every ``LoraDense`` in ``model``."""
  for path, _, _, child in _walk(model):
    if isinstance(child, LoraDense):
      yield path, child


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel and puts the plain projection back (in place);
  returns ``model``."""
  for path, parent, name, child in list(_walk(model)):
    if isinstance(child, LoraDense):
      kernel = child.base.kernel
      kernel[...] = (kernel[...].astype(jnp.float32) + child.delta()).astype(kernel[...].dtype)
      _set(parent, name, child.base)
  return model


def set_dropout_key(model: nnx.Module, key: jax.Array | None) -> None:
  """Gives each adapter with dropout its own key (None: dropout off)."""
  for i, (_, layer) in enumerate(lora_layers(model)):
    if layer.dropout:
      layer.dropout_key = None if key is None else jax.random.fold_in(key, i)
