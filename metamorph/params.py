"""An NNX module's parameters as a flat ``{'a/0/kernel': array}`` dict, and back; nested
parameter dicts (diffusers' Flax trees, ``nnx.Dict``) flattened to the same keys."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.files import ConversionError


def _key(path: tuple) -> str:
  return "/".join(str(p) for p in path)


def module_params(module: nnx.Module) -> dict[str, np.ndarray]:
  """The module's parameters as a flat ``{'a/0/kernel': array}`` dict."""
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  return {_key(path): np.asarray(var.get_value()) for path, var in flat}


def load_module_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Sets every parameter of ``module`` from ``tensors`` (keys as in ``module_params``).

  Keys must match exactly and shapes must agree; values are cast to each
  parameter's dtype. Raises ``ConversionError`` naming ``source`` and the tensor.
  """
  flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
  expected = {_key(path) for path, _ in flat}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise ConversionError(
        f"{source}: parameters do not match the model: missing {missing[:5]}, "
        f"unexpected {unexpected[:5]} (a checkpoint of another model or of an older version "
        f"of this one: convert or train it again)")
  updates = []
  for path, var in flat:
    key, value = _key(path), tensors[_key(path)]
    if tuple(value.shape) != tuple(var.shape):
      raise ConversionError(
          f"{source}: tensor '{key}' has shape {tuple(value.shape)}, the model expects {tuple(var.shape)}")
    updates.append((path, var.replace(jnp.asarray(value, dtype=var.dtype))))
  nnx.update(module, nnx.from_flat_state(updates))


def build_module(factory, params: Mapping[str, np.ndarray], source: str) -> nnx.Module:
  """``factory()``'s module holding ``params``; no random initialisation is run."""
  module = nnx.eval_shape(factory)
  load_module_params(module, params, source)
  return module


def flatten_tree(tree: Mapping, prefix: str = "") -> dict[str, Any]:
  """A nested mapping (a plain dict, or ``nnx.Dict``) -> ``{'a/b/kernel': leaf}``; with
  ``prefix``, every key starts ``prefix/``."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}/{key}" if prefix else str(key)
    if isinstance(value, Mapping):
      out.update(flatten_tree(value, path))
    else:
      out[path] = value
  return out


def unflatten_tree(flat: Mapping[str, Any]) -> dict[str, Any]:
  """``flatten_tree``'s inverse (without a prefix): ``{'a/b': x}`` -> ``{'a': {'b': x}}``."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return out
