"""Reading and writing JSON, safetensors and tokenizer files, with errors that name the file.

Every reader of a checkpoint goes through these functions, so every bad file gets
the same clear error: which file, which tensor, what was expected.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np
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


def read_sharded(index: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, {tensor name: file}) of the shards a safetensors ``*.index.json`` lists
  (shard paths relative to the index's folder); every tensor it lists must be found."""
  weight_map = read_json(index).get("weight_map")
  if not isinstance(weight_map, dict):
    raise ConversionError(f"{index}: no 'weight_map' object")
  tensors, files = {}, {}
  for shard in sorted(set(weight_map.values())):
    path = os.path.join(os.path.dirname(index), shard)
    for name, value in read_safetensors_file(path).items():
      tensors[name], files[name] = value, path
  missing = sorted(set(weight_map) - set(tensors))
  if missing:
    raise ConversionError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")
  return tensors, files


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
  """All tensors of a folder: ``model.safetensors`` or a sharded index of them."""
  index = os.path.join(folder, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    return read_sharded(index)[0]
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


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(folder: str, **kwargs):
  """The folder's transformers tokenizer, or None when it ships none."""
  if not any(os.path.isfile(os.path.join(folder, f)) for f in _TOKENIZER_FILES):
    return None
  from transformers import AutoTokenizer  # slow import: transformers
  try:
    return AutoTokenizer.from_pretrained(folder, **kwargs)
  except (OSError, ValueError) as e:
    raise ConversionError(f"{folder}: the tokenizer files could not be loaded ({e})") from e
