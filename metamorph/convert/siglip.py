"""SigLIP weights: transformers folders and our own converted checkpoints.

One table (``hf_layout``) says how each of our parameters is read from a
transformers tensor. Reading needs no torch. Accepted transformers folders hold
a ``SiglipModel`` (``model_type`` "siglip"), a ``SiglipVisionModel`` or a
``SiglipTextModel``; standalone towers may name their tensors with or without
the ``vision_model.`` / ``text_model.`` prefix (transformers 4 vs 5).
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping

import numpy as np
from flax import nnx

from metamorph.files import ConversionError, SAFETENSORS_INDEX, read_json, read_safetensors, take
from metamorph import model_folder
from metamorph.params import build_module
from metamorph.convert.tensor_map import TensorMap
from metamorph.models.siglip import (Siglip, SiglipConfig, SiglipTextConfig, SiglipTextTower,
                                     SiglipVisionConfig, SiglipVisionTower)

TOWERS = ("vision", "text")

AnyConfig = SiglipConfig | SiglipVisionConfig | SiglipTextConfig
AnyModel = Siglip | SiglipVisionTower | SiglipTextTower

_HF_MODEL_TYPES = {"siglip": SiglipConfig, "siglip_vision_model": SiglipVisionConfig,
                   "siglip_text_model": SiglipTextConfig}
_HF_PREFIX = {"vision": "vision_model.", "text": "text_model."}
_MODULES = {SiglipConfig: Siglip, SiglipVisionConfig: SiglipVisionTower, SiglipTextConfig: SiglipTextTower}
# Image-processor and tokenizer files copied alongside a converted checkpoint.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer_config.json",
                   "tokenizer.json", "spiece.model", "special_tokens_map.json", "added_tokens.json")


def tower_of(config: AnyConfig) -> str:
  """'full', 'vision' or 'text'."""
  return {SiglipConfig: "full", SiglipVisionConfig: "vision", SiglipTextConfig: "text"}[type(config)]


# ----------------------------------------------------------------------------- layout


def _dense(ours: str, hf: str, d_in: tuple[int, ...], d_out: tuple[int, ...],
           rows: tuple[int, int] | None = None) -> list[TensorMap]:
  """Our kernel [*d_in, *d_out] and bias [*d_out] <- a torch Linear (weight [out, in])."""
  n_in, n_out = math.prod(d_in), math.prod(d_out)
  if rows is None:  # a plain nn.Linear
    return [TensorMap(f"{ours}/kernel", f"{hf}.weight", (n_out, n_in), (*d_in, *d_out), (1, 0)),
            TensorMap(f"{ours}/bias", f"{hf}.bias", (n_out,), d_out)]
  fused = 3 * n_out  # nn.MultiheadAttention's in_proj_weight [3D, D] / in_proj_bias [3D]
  return [TensorMap(f"{ours}/kernel", f"{hf}_weight", (fused, n_in), (*d_in, *d_out), (1, 0), rows),
          TensorMap(f"{ours}/bias", f"{hf}_bias", (fused,), d_out, None, rows)]


def _norm(ours: str, hf: str, d: int) -> list[TensorMap]:
  return [TensorMap(f"{ours}/scale", f"{hf}.weight", (d,), (d,)),
          TensorMap(f"{ours}/bias", f"{hf}.bias", (d,), (d,))]


def _attention(ours: str, hf: str, c, *, fused: bool = False) -> list[TensorMap]:
  """Our query/key/value [D, H, Dh] and out [H, Dh, D]; ``fused``: torch MultiheadAttention."""
  d, heads = (c.hidden_size,), (c.num_attention_heads, c.head_dim)
  maps = []
  for i, (name, hf_name) in enumerate([("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")]):
    if fused:
      maps += _dense(f"{ours}/{name}", f"{hf}.in_proj", d, heads, rows=(i * d[0], (i + 1) * d[0]))
    else:
      maps += _dense(f"{ours}/{name}", f"{hf}.{hf_name}", d, heads)
  return maps + _dense(f"{ours}/out", f"{hf}.out_proj", heads, d)


def _mlp(ours: str, hf: str, c) -> list[TensorMap]:
  d, f = (c.hidden_size,), (c.intermediate_size,)
  return _dense(f"{ours}/fc1", f"{hf}.fc1", d, f) + _dense(f"{ours}/fc2", f"{hf}.fc2", f, d)


def _encoder(c) -> list[TensorMap]:
  maps = []
  for i in range(c.num_hidden_layers):
    ours, hf = f"encoder/layers/{i}", f"encoder.layers.{i}"
    maps += _norm(f"{ours}/ln1", f"{hf}.layer_norm1", c.hidden_size)
    maps += _attention(f"{ours}/attn", f"{hf}.self_attn", c)
    maps += _norm(f"{ours}/ln2", f"{hf}.layer_norm2", c.hidden_size)
    maps += _mlp(f"{ours}/mlp", f"{hf}.mlp", c)
  return maps


def vision_layout(c: SiglipVisionConfig) -> list[TensorMap]:
  """Every parameter of ``SiglipVisionTower(c)``, HF names without a prefix."""
  d, p = c.hidden_size, c.patch_size
  maps = [
      # torch Conv2d weight [D, C, p, p] -> our nnx.Conv kernel [p, p, C, D]
      TensorMap("patch_embed/kernel", "embeddings.patch_embedding.weight", (d, c.num_channels, p, p),
                (p, p, c.num_channels, d), (2, 3, 1, 0)),
      TensorMap("patch_embed/bias", "embeddings.patch_embedding.bias", (d,), (d,)),
      TensorMap("pos_embed", "embeddings.position_embedding.weight", (c.num_patches, d), (c.num_patches, d)),
      *_encoder(c),
      *_norm("post_ln", "post_layernorm", d),
  ]
  if c.vision_use_head:
    maps += [TensorMap("head/probe", "head.probe", (1, 1, d), (1, 1, d)),
             *_attention("head/attn", "head.attention", c, fused=True),
             *_norm("head/ln", "head.layernorm", d),
             *_mlp("head/mlp", "head.mlp", c)]
  return maps


def text_layout(c: SiglipTextConfig) -> list[TensorMap]:
  """Every parameter of ``SiglipTextTower(c)``, HF names without a prefix."""
  d = c.hidden_size
  return [
      TensorMap("token_embed/embedding", "embeddings.token_embedding.weight", (c.vocab_size, d),
                (c.vocab_size, d)),
      TensorMap("pos_embed", "embeddings.position_embedding.weight", (c.max_position_embeddings, d),
                (c.max_position_embeddings, d)),
      *_encoder(c),
      *_norm("final_ln", "final_layer_norm", d),
      *_dense("head", "head", (d,), (c.projection_size,)),
  ]


def hf_layout(config: AnyConfig, hf_prefix: str = "") -> list[TensorMap]:
  """Every parameter of the module for ``config`` with its transformers tensor.
  ``hf_prefix`` prefixes the HF names of a standalone tower."""
  if isinstance(config, SiglipVisionConfig):
    return [m.prefixed("", hf_prefix) for m in vision_layout(config)]
  if isinstance(config, SiglipTextConfig):
    return [m.prefixed("", hf_prefix) for m in text_layout(config)]
  return [*(m.prefixed("vision/", _HF_PREFIX["vision"]) for m in vision_layout(config.vision)),
          *(m.prefixed("text/", _HF_PREFIX["text"]) for m in text_layout(config.text)),
          TensorMap("logit_scale", "logit_scale", (1,), (1,)),
          TensorMap("logit_bias", "logit_bias", (1,), (1,))]


def params_from_hf(config: AnyConfig, hf: Mapping[str, np.ndarray], source: str,
                   hf_prefix: str = "") -> dict[str, np.ndarray]:
  """Our flat params from transformers-named tensors (extra HF tensors are ignored)."""
  return {m.ours: m.from_hf(take(hf, m.hf, m.hf_shape, source)) for m in hf_layout(config, hf_prefix)}


# ----------------------------------------------------------------------------- reading


def config_from_hf(hf: Mapping, source: str, **overrides) -> AnyConfig:
  """Our config from a transformers SigLIP ``config.json`` dict."""
  model_type = hf.get("model_type")
  if model_type not in _HF_MODEL_TYPES:
    raise ConversionError(f"{source}: model_type {model_type!r} is not a SigLIP model "
                          f"(supported: {sorted(_HF_MODEL_TYPES)})")
  try:
    return _HF_MODEL_TYPES[model_type].from_hf(hf, **overrides)
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{source}: invalid SigLIP config ({e})") from e


def _weights_source(folder: str) -> str:
  """The file to name in errors about the folder's tensors."""
  files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
  if os.path.isfile(os.path.join(folder, SAFETENSORS_INDEX)) or len(files) != 1:
    return os.path.join(folder, "*.safetensors")
  return os.path.join(folder, files[0])


def _hf_prefix(hf: Mapping[str, np.ndarray], tower: str) -> str:
  """'vision_model.' / 'text_model.' if a standalone tower's tensors carry it, else ''."""
  prefix = _HF_PREFIX[tower]
  return prefix if any(k.startswith(prefix) for k in hf) else ""


def _select(config: AnyConfig, tower: str | None, source: str) -> AnyConfig:
  """``config`` itself (tower None) or its ``tower`` ('vision' / 'text')."""
  if tower is None:
    return config
  if tower not in TOWERS:
    raise ValueError(f"tower must be one of {TOWERS} or None, got {tower!r}")
  if isinstance(config, SiglipConfig):
    return getattr(config, tower)
  if tower_of(config) != tower:
    raise ConversionError(f"{source}: holds a SigLIP {tower_of(config)} tower, not a {tower} tower")
  return config


def load_hf_siglip(folder: str, tower: str | None = None,
                   **overrides) -> tuple[AnyConfig, dict[str, np.ndarray]]:
  """(config, our flat params) from a transformers SigLIP folder, without torch.

  ``tower`` ('vision' / 'text') keeps one tower of a full ``SiglipModel``.
  ``overrides`` set config fields of every tower, e.g. ``dtype="bfloat16"``.
  """
  cfg_path = os.path.join(folder, "config.json")
  full = config_from_hf(read_json(cfg_path), cfg_path, **overrides)
  config = _select(full, tower, cfg_path)
  hf = read_safetensors(folder)
  if isinstance(full, SiglipConfig):
    hf_prefix = "" if config is full else _HF_PREFIX[tower_of(config)]
  else:
    hf_prefix = _hf_prefix(hf, tower_of(config))
  return config, params_from_hf(config, hf, _weights_source(folder), hf_prefix)


def save_siglip(module: AnyModel, dst: str, tokenizer=None) -> None:
  """Writes our checkpoint: ``config.json`` (with the ``tower``), ``model.safetensors`` and the
  tokenizer's files when given."""
  model_folder.write_model(dst, module, tokenizer, tower=tower_of(module.config))


def read_converted(folder: str, tower: str | None = None,
                   **overrides) -> tuple[AnyConfig, dict[str, np.ndarray]]:
  """(config, our flat params) from a folder written by ``save_siglip``."""
  cfg_path = os.path.join(folder, "config.json")
  meta, params = model_folder.read_converted(folder, model_folder.SIGLIP)
  classes = {"full": SiglipConfig, "vision": SiglipVisionConfig, "text": SiglipTextConfig}
  if meta.get("tower") not in classes:
    raise ConversionError(f"{cfg_path}: 'tower' must be one of {sorted(classes)}, got {meta.get('tower')!r}")
  try:
    full = classes[meta["tower"]].from_dict(meta["config"])
    full = full.replace(**overrides) if overrides else full
  except (KeyError, TypeError, ValueError) as e:
    raise ConversionError(f"{cfg_path}: invalid SigLIP config ({e})") from e
  config = _select(full, tower, cfg_path)
  if config is not full:
    prefix = f"{tower}/"
    params = {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}
  return config, params


def read_siglip(folder: str, tower: str | None = None,
                **overrides) -> tuple[AnyConfig, dict[str, np.ndarray]]:
  """(config, our flat params) from our converted folder or a transformers folder."""
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder (expected a transformers SigLIP folder or "
                          "one written by `python -m metamorph.convert siglip`)")
  if model_folder.is_converted(folder):
    return read_converted(folder, tower, **overrides)
  return load_hf_siglip(folder, tower, **overrides)


# ----------------------------------------------------------------------------- modules and folders


def build(config: AnyConfig, params: Mapping[str, np.ndarray], source: str) -> AnyModel:
  """The module for ``config`` holding ``params``; no random initialisation is run."""
  return build_module(lambda: _MODULES[type(config)](config, rngs=nnx.Rngs(0)), params, source)


def load_siglip(folder: str, tower: str | None = None, **overrides) -> AnyModel:
  """A ``Siglip``, ``SiglipVisionTower`` or ``SiglipTextTower`` from either kind of folder.

  ``tower='vision'`` returns just the vision tower of a full model (what MetaMorph
  uses); ``overrides`` set config fields, e.g. ``dtype="bfloat16"``.
  """
  config, params = read_siglip(folder, tower, **overrides)
  return build(config, params, folder)


def convert_siglip(src: str, dst: str, tower: str | None = None) -> AnyModel:
  """Converts a SigLIP folder (transformers or ours) into our format at ``dst``, with
  the image-processor / tokenizer files of ``src``. Returns the loaded module."""
  module = load_siglip(src, tower)
  save_siglip(module, dst)
  for name in PROCESSOR_FILES:
    path = os.path.join(src, name)
    if os.path.isfile(path) and os.path.abspath(src) != os.path.abspath(dst):
      shutil.copy2(path, os.path.join(dst, name))
  return module
