"""LLaMA-family weights: transformers folders, GGUF files and our own checkpoints.

One table (``hf_layout``) says how each of our parameters corresponds to a
transformers tensor; reading HF folders, reading GGUF files (through their HF
names) and exporting back to HF all go through it. No torch is needed.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping

import numpy as np
from flax import nnx

from metamorph.files import ConversionError, read_json, read_safetensors, take, write_json, write_safetensors
from metamorph import model_folder
from metamorph.params import build_module, module_params
from metamorph.convert.tensor_map import TensorMap
from metamorph.models.llama import Llama, LlamaConfig, RopeScaling

_HF_MODEL_TYPES = ("llama",)


def _kernel(ours: str, hf: str, shape: tuple[int, ...], n_in: int) -> TensorMap:
  """Our kernel [in..., out...] <-> a torch Linear weight [out, in]."""
  hf_shape = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
  return TensorMap(ours, hf, hf_shape, shape, transpose=(1, 0))


def _vector(ours: str, hf: str, shape: tuple[int, ...]) -> TensorMap:
  return TensorMap(ours, hf, (math.prod(shape),), shape)


def hf_layout(c: LlamaConfig) -> list[TensorMap]:
  """Every parameter of ``Llama(c)`` with its transformers name and layout."""
  d, h, kv, hd, f = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, c.intermediate_size
  embed = (c.vocab_size, d)
  maps = [TensorMap("embed_tokens/embedding", "model.embed_tokens.weight", embed, embed),
          _vector("norm/scale", "model.norm.weight", (d,))]
  if not c.tie_word_embeddings:
    maps.append(_kernel("lm_head/kernel", "lm_head.weight", (d, c.vocab_size), 1))
  for i in range(c.num_layers):
    ours, hf = f"layers/{i}/", f"model.layers.{i}."
    attn = [("q_proj", (d, h, hd), 1), ("k_proj", (d, kv, hd), 1), ("v_proj", (d, kv, hd), 1),
            ("o_proj", (h, hd, d), 2)]
    for name, shape, n_in in attn:
      maps.append(_kernel(f"{ours}attention/{name}/kernel", f"{hf}self_attn.{name}.weight", shape, n_in))
      if c.attention_bias:
        maps.append(_vector(f"{ours}attention/{name}/bias", f"{hf}self_attn.{name}.bias", shape[n_in:]))
    for name, shape in [("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))]:
      maps.append(_kernel(f"{ours}mlp/{name}/kernel", f"{hf}mlp.{name}.weight", shape, 1))
      if c.mlp_bias:
        maps.append(_vector(f"{ours}mlp/{name}/bias", f"{hf}mlp.{name}.bias", shape[1:]))
    maps.append(_vector(f"{ours}input_norm/scale", f"{hf}input_layernorm.weight", (d,)))
    maps.append(_vector(f"{ours}post_attention_norm/scale", f"{hf}post_attention_layernorm.weight", (d,)))
  return maps


# ----------------------------------------------------------------------------- configs

def _rope_from_hf(cfg: Mapping) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from transformers' legacy ``rope_scaling`` or v5 ``rope_parameters``."""
  params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
  theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
  kind = params.get("rope_type", params.get("type", "default"))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]),
        float(params["high_freq_factor"]),
        int(params.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))))
  raise ConversionError(f"rope type {kind!r} is not supported (supported: default, linear, llama3)")


def config_from_hf(cfg: Mapping, source: str, **overrides) -> LlamaConfig:
  """Our ``LlamaConfig`` from a transformers ``config.json`` dict."""
  if cfg.get("model_type") not in _HF_MODEL_TYPES:
    raise ConversionError(
        f"{source}: model_type {cfg.get('model_type')!r} is not a LLaMA-family model "
        f"(supported: {_HF_MODEL_TYPES})")
  try:
    heads = int(cfg["num_attention_heads"])
    theta, scaling = _rope_from_hf(cfg)
    return LlamaConfig(
        vocab_size=int(cfg["vocab_size"]), hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]), num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        initializer_range=float(cfg.get("initializer_range", 0.02)), **overrides)
  except KeyError as e:
    raise ConversionError(f"{source}: required field {e.args[0]!r} is missing") from e
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{source}: invalid value ({e})") from e


def config_to_hf(c: LlamaConfig, tokenizer=None) -> dict:
  """A transformers ``LlamaForCausalLM`` config dict for ``c``."""
  rope = {"rope_type": "default", "rope_theta": c.rope_theta}
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope.update(rope_type=s.type, factor=s.factor)
    if s.type == "llama3":
      rope.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                  original_max_position_embeddings=s.original_max_position_embeddings)
  cfg = {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
      "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_layers,
      "num_attention_heads": c.num_heads, "num_key_value_heads": c.num_kv_heads,
      "head_dim": c.head_dim, "hidden_act": "silu", "rms_norm_eps": c.rms_norm_eps,
      "rope_theta": c.rope_theta, "rope_parameters": rope,
      "max_position_embeddings": c.max_position_embeddings,
      "tie_word_embeddings": c.tie_word_embeddings, "attention_bias": c.attention_bias,
      "mlp_bias": c.mlp_bias, "initializer_range": c.initializer_range, "torch_dtype": "float32",
  }
  if tokenizer is not None:
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
      cfg[name] = getattr(tokenizer, name)
  return cfg


# ----------------------------------------------------------------------------- params

def params_from_hf(c: LlamaConfig, hf: Mapping[str, np.ndarray], source: str) -> dict[str, np.ndarray]:
  """Our flat params from transformers-named tensors (extra HF tensors are ignored)."""
  return {m.ours: m.from_hf(take(hf, m.hf, m.hf_shape, source)) for m in hf_layout(c)}


def params_to_hf(c: LlamaConfig, ours: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {m.hf: m.to_hf(np.asarray(ours[m.ours])) for m in hf_layout(c)}


def build(config: LlamaConfig, params: Mapping[str, np.ndarray], source: str) -> Llama:
  """A ``Llama`` holding ``params``; no random initialisation is run."""
  return build_module(lambda: Llama(config, rngs=nnx.Rngs(0)), params, source)


# ----------------------------------------------------------------------------- folders

def read_hf_folder(folder: str, **overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """(config, our flat params) from a transformers LLaMA folder."""
  cfg_path = os.path.join(folder, "config.json")
  config = config_from_hf(read_json(cfg_path), cfg_path, **overrides)
  return config, params_from_hf(config, read_safetensors(folder), folder)


def export_hf(model: Llama, tokenizer, dst: str) -> None:
  """Writes ``model`` as a transformers ``LlamaForCausalLM`` folder."""
  os.makedirs(dst, exist_ok=True)
  write_json(os.path.join(dst, "config.json"), config_to_hf(model.config, tokenizer))
  hf = params_to_hf(model.config, module_params(model))
  write_safetensors(os.path.join(dst, "model.safetensors"),
                      {k: v.astype(np.float32) for k, v in hf.items()})
  if tokenizer is not None:
    tokenizer.save_pretrained(dst)


def save_llm(model: Llama, tokenizer, dst: str) -> None:
  """Writes our LLM checkpoint: config.json, model.safetensors, tokenizer."""
  model_folder.write_model(dst, model, tokenizer)


def read_converted(folder: str, **overrides) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  """(config, our flat params) of a folder written by ``save_llm``."""
  meta, params = model_folder.read_converted(folder, model_folder.LLM)
  try:
    config = LlamaConfig.from_dict({**meta["config"], **overrides})
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{folder}/config.json: invalid LLM config ({e})") from e
  return config, params
