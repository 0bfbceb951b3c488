"""GGUF files (llama.cpp) of LLaMA-family models -> transformers-named tensors.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised with the ``gguf`` package.
llama.cpp stores Q and K projection rows permuted for its interleaved RoPE;
``unpermute_rows`` restores transformers' half-split order.
"""
from __future__ import annotations

import os

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from metamorph.files import ConversionError

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's Q/K row permutation; w is [n_heads * head_dim, ...]."""
  half = w.shape[0] // n_heads // 2
  return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(gguf_name: str) -> str | None:
  """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight' (None if unknown)."""
  parts = gguf_name.split(".")
  if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
  if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
    return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
  return None


def _open(path: str):
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: file not found")
  try:
    return GGUFReader(path)
  except (ValueError, OSError, IndexError) as e:
    raise ConversionError(f"{path}: not a readable GGUF file ({e}); it may be truncated") from e


def _field(reader, key: str, path: str, default=None):
  field = reader.fields.get(key)
  if field is None:
    if default is None:
      raise ConversionError(f"{path}: GGUF metadata '{key}' is missing")
    return default
  return field.contents()


def hf_config(reader, path: str) -> dict:
  """A transformers-style config dict from the GGUF metadata."""
  arch = _field(reader, "general.architecture", path)
  if arch != "llama":
    raise ConversionError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported")
  get = lambda key, default=None: _field(reader, f"llama.{key}", path, default)
  heads = int(get("attention.head_count"))
  hidden = int(get("embedding_length"))
  names = {t.name for t in reader.tensors}
  return {
      "model_type": "llama", "vocab_size": int(get("vocab_size", 0)) or None,
      "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
      "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
      "num_key_value_heads": int(get("attention.head_count_kv", heads)),
      "head_dim": int(get("rope.dimension_count", hidden // heads)),
      "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
      "rope_theta": float(get("rope.freq_base", 10000.0)),
      "max_position_embeddings": int(get("context_length", 2048)),
      "tie_word_embeddings": "output.weight" not in names,
  }


def read_gguf(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(transformers-style config dict, transformers-named float32 tensors)."""
  reader = _open(path)
  cfg = hf_config(reader, path)
  tensors = {}
  for t in reader.tensors:
    name = hf_name(t.name)
    if name is None:
      continue
    try:
      value = dequantize(t.data, t.tensor_type).astype(np.float32)
    except (NotImplementedError, ValueError) as e:
      raise ConversionError(f"{path}: tensor '{t.name}' ({t.tensor_type.name}) cannot be dequantised ({e})") from e
    value = value.reshape(tuple(int(d) for d in reversed(t.shape)))
    if name.endswith("q_proj.weight"):
      value = unpermute_rows(value, cfg["num_attention_heads"])
    elif name.endswith("k_proj.weight"):
      value = unpermute_rows(value, cfg["num_key_value_heads"])
    tensors[name] = value
  if cfg["vocab_size"] is None:
    cfg["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
  return cfg, tensors


def load_gguf_tokenizer(path: str):
  """The transformers tokenizer (with chat template) stored in the GGUF file."""
  from transformers import AutoTokenizer  # slow import: transformers
  try:
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)),
                                         gguf_file=os.path.basename(path))
  except (OSError, ValueError, KeyError) as e:
    raise ConversionError(f"{path}: the GGUF tokenizer could not be loaded ({e})") from e
