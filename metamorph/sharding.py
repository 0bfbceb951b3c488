"""Logical axis names and the one table that maps them onto the device mesh.

Every parameter is created with logical axis names (``logical_init``); the big
activations are annotated with ``constrain``. ``AXIS_RULES`` is the single place
that says which mesh axis (``data``, ``fsdp``, ``tensor``) each logical name is
split over. Outside a mesh context ``constrain`` is a no-op, so the models run
unchanged on one device.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or axes). Names absent here are replicated.
AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("norm", None),
    ("vis_embed", None),
    ("patch", None),
    ("channels", None),
    ("positions", None),
)

Names = tuple[str | None, ...]


def logical_init(init: Callable[..., jax.Array], *names: str | None) -> Callable[..., jax.Array]:
  """Wraps a parameter initializer so the parameter carries logical axis names."""
  return nnx.with_partitioning(init, names, eager_sharding=False)


def logical_to_spec(names: Sequence[str | None] | None,
                    rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> PartitionSpec:
  """Maps logical axis names to a mesh ``PartitionSpec`` through ``rules``."""
  if not names:
    return PartitionSpec()
  table = dict(rules)
  return PartitionSpec(*(table.get(n) if n is not None else None for n in names))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Sharding constraint on an activation, by logical names; no-op without a mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  spec = logical_to_spec(names, spmd.get_logical_axis_rules() or AXIS_RULES)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fit(spec, mesh)))


def _fit(spec: PartitionSpec, mesh) -> PartitionSpec:
  """Drops mesh axes that the mesh does not have (e.g. a 1-axis test mesh)."""
  def keep(axis):
    if axis is None:
      return None
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    axes = tuple(a for a in axes if a in mesh.axis_names)
    return axes if len(axes) > 1 else (axes[0] if axes else None)
  return PartitionSpec(*map(keep, spec))


def state_shardings(state: nnx.State, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = AXIS_RULES) -> nnx.State:
  """``NamedSharding`` for every leaf of an ``nnx.State`` from its logical names."""
  def one(leaf):
    names = leaf.get_metadata().get("out_sharding") if isinstance(leaf, nnx.Variable) else None
    return NamedSharding(mesh, _fit(logical_to_spec(names, rules), mesh))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
