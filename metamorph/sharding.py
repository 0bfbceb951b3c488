"""Logical axis names and the one table that maps them onto the device mesh.

Every parameter is created with logical axis names (``logical_init``); the big
activations are annotated with ``constrain``. ``AXIS_RULES`` is the single place
that says which mesh axis (``data``, ``fsdp``, ``tensor``) each logical name is
split over. Outside a mesh context ``constrain`` is a no-op, so the models run
unchanged on one device.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import nnx
from flax.core import spmd
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

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
    ("lora_rank", None),
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
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, fit_spec(spec, x.shape, mesh)))


def use_cpu_devices(n: int) -> None:
  """Splits the CPU backend into ``n`` XLA devices (``jax_num_cpu_devices``) so that a
  data-parallel mesh runs its shards side by side on a CPU-only host's cores (the toy
  visualizer trains 1.2x faster on two; docs/findings.md). Call it before JAX runs
  anything; ``n`` <= 0, or a device count set in ``XLA_FLAGS``, leaves JAX's default.
  Accelerator backends are unaffected."""
  if n <= 0 or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  if jax.config.jax_num_cpu_devices == n:
    return
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # the backends are up: the count can no longer change
    warnings.warn(f"{n} CPU devices (mesh.cpu_devices) ignored: JAX started before they were asked "
                  f"for and keeps {len(jax.devices('cpu'))}; set them before running anything", stacklevel=2)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None) -> Mesh:
  """A ``(data, fsdp, tensor)`` mesh over all devices; one size may be -1 (the rest)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes (data, fsdp, tensor) = {tuple(sizes)}: each must be >= 1, "
                     "and at most one may be -1")
  known = -math.prod(sizes) if -1 in sizes else math.prod(sizes)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices cannot be split into a mesh with fixed sizes "
                       f"{tuple(sizes)}")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh (data, fsdp, tensor) = {tuple(sizes)} needs {math.prod(sizes)} devices, "
                     f"but {len(devices)} are available; use -1 for one axis to take the rest")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """``spec`` without the mesh axes a dimension is not divisible by (they replicate)."""
  out = []
  for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axis is None else ((axis,) if isinstance(axis, str) else tuple(axis))
    axes = tuple(a for a in axes if a in mesh.axis_names)
    while axes and dim % math.prod(mesh.shape[a] for a in axes):
      axes = axes[:-1]
    out.append(axes if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*out)


def unnamed_spec(shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Parameters without logical names (diffusers' Flax UNet/VAE): matrices and conv
  kernels are split over ``fsdp`` along their largest divisible dimension; the rest
  is replicated."""
  size = mesh.shape.get("fsdp", 1)
  if len(shape) < 2 or size == 1:
    return PartitionSpec()
  candidates = [d for d in range(len(shape)) if shape[d] % size == 0]
  if not candidates:
    return PartitionSpec()
  dim = max(candidates, key=lambda d: shape[d])
  return PartitionSpec(*("fsdp" if d == dim else None for d in range(len(shape))))


def tree_shardings(tree, mesh: Mesh, rules: Sequence[tuple[str, Any]] = AXIS_RULES):
  """``NamedSharding`` for every array leaf of ``tree`` (params, optimizer state...):
  from the logical names of ``nnx.Variable`` leaves (``unnamed_spec`` for variables
  without names), replicated for the other leaves (step counters, RNG keys)."""
  def one(leaf):
    if isinstance(leaf, nnx.Variable):
      names = leaf.get_metadata().get("out_sharding")
      if names is None:
        spec = unnamed_spec(leaf.shape, mesh)
      else:
        spec = fit_spec(logical_to_spec(names, rules), leaf.shape, mesh)
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
