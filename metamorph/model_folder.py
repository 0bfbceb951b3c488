"""Our model folder format: ``config.json`` ({format, kind, config, ...}) beside
``model.safetensors`` (flat parameters, keys as in ``metamorph.params``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from metamorph.files import ConversionError, read_json, read_safetensors_file, write_json, write_safetensors
from metamorph.params import module_params

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
