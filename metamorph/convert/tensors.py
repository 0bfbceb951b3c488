"""Reading and writing parameter tensors: safetensors files and NNX modules.

Every converter goes through these functions, so every bad file gets the same
clear error: which file, which tensor, what was expected.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

SAFETENSORS_INDEX = "model.safetensors.index.json"


class ConversionError(ValueError):
  """A checkpoint file is missing, corrupt, or does not fit the model."""


def read_json(path: str) -> dict:
  """Reads a JSON object; raises ``ConversionError`` naming the file on failure."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  try:
    with open(path) as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConversionError(f"{path}: not valid JSON ({e})") from e
  if not isinstance(data, dict):
    raise ConversionError(f"{path}: expected a JSON object, got {type(data).__name__}")
  return data


def write_json(path: str, data: Mapping) -> None:
  with open(path, "w") as f:
    json.dump(data, f, indent=2, sort_keys=True)
    f.write("\n")


def read_safetensors_file(path: str) -> dict[str, np.ndarray]:
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  try:
    return load_file(path)
  except (SafetensorError, OSError) as e:
    raise ConversionError(
        f"{path}: not a readable safetensors file ({e}); it may be truncated or "
        "corrupt, re-download or re-export it") from e


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a folder: ``model.safetensors`` or a sharded index of them."""
  index = os.path.join(folder, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ConversionError(f"{index}: no 'weight_map' object")
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      tensors.update(read_safetensors_file(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
      raise ConversionError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")
    return tensors
  files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if not files:
    raise ConversionError(f"{folder}: no *.safetensors file (and no {SAFETENSORS_INDEX})")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors_file(os.path.join(folder, name)))
  return tensors


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path)


def take(tensors: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], source: str) -> np.ndarray:
  """Tensor ``name`` of the given shape, or a ``ConversionError`` naming it."""
  if name not in tensors:
    raise ConversionError(f"{source}: tensor '{name}' is missing")
  value = tensors[name]
  if tuple(value.shape) != tuple(shape):
    raise ConversionError(
        f"{source}: tensor '{name}' has shape {tuple(value.shape)}, the config implies {tuple(shape)}")
  return value


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Our parameter ``ours`` [shape] <-> a transformers tensor ``hf`` [hf_shape].

  From transformers: take rows ``rows`` (one part of a fused projection), then
  ``transpose`` (a permutation), then reshape to ``shape``. ``to_hf`` inverts it.
  """
  ours: str
  hf: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: tuple[int, ...] | None = None
  rows: tuple[int, int] | None = None

  def from_hf(self, value: np.ndarray) -> np.ndarray:
    if self.rows is not None:
      value = value[self.rows[0]:self.rows[1]]
    if self.transpose is not None:
      value = value.transpose(self.transpose)
    return value.reshape(self.shape)

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    if self.rows is not None:
      raise NotImplementedError(f"{self.hf}: exporting one part of a fused tensor")
    if self.transpose is None:
      return value.reshape(self.hf_shape)
    permuted = tuple(self.hf_shape[i] for i in self.transpose)
    return value.reshape(permuted).transpose(np.argsort(self.transpose))

  def prefixed(self, ours: str, hf: str) -> TensorMap:
    return dataclasses.replace(self, ours=ours + self.ours, hf=hf + self.hf)


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


# ----------------------------------------------------------------------------- our folders

FORMAT = "metamorph"  # config.json's "format" in folders we write
MODEL_DIR = "model"   # a training workdir's exported model: WORKDIR/model


def exported(path: str) -> str:
  """``path/model`` when ``path`` is a training workdir, else ``path``."""
  candidate = os.path.join(path, MODEL_DIR)
  return candidate if os.path.isdir(candidate) else path


def is_converted(folder: str) -> bool:
  """Whether ``folder`` holds a checkpoint in our format (any kind)."""
  path = os.path.join(folder, "config.json")
  return os.path.isfile(path) and read_json(path).get("format") == FORMAT


def write_converted(dst: str, kind: str, config: Mapping, module: nnx.Module, **meta) -> None:
  """Writes ``dst/config.json`` ({format, kind, config, **meta}) and ``dst/model.safetensors``."""
  os.makedirs(dst, exist_ok=True)
  write_json(os.path.join(dst, "config.json"), {"format": FORMAT, "kind": kind, "config": dict(config), **meta})
  write_safetensors(os.path.join(dst, "model.safetensors"), module_params(module))


def read_converted(folder: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json contents, flat params) of a folder written by ``write_converted``."""
  cfg_path = os.path.join(folder, "config.json")
  meta = read_json(cfg_path)
  if meta.get("kind") != kind:
    raise ConversionError(f"{cfg_path}: holds a {meta.get('kind')!r} checkpoint, not {kind!r}")
  if not isinstance(meta.get("config"), dict):
    raise ConversionError(f"{cfg_path}: no 'config' object")
  return meta, read_safetensors_file(os.path.join(folder, "model.safetensors"))
