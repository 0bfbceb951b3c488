"""Our checkpoint format: the folders this library writes and reads back.

A folder holds ``config.json`` = ``{"format": "metamorph", "kind": KIND, "config": {...}, ...}``,
``model.safetensors`` (flat parameters, keys as in ``metamorph.params``) and, for a model that
reads text, its tokenizer's files. ``kind`` says which model the folder holds; every kind is
named here once (``KINDS``), and each kind's writer sits beside its reader:

  kind              holds                                   writer / reader
  llm               a LLaMA-family LLM                      convert.llama: save_llm / read_converted
  siglip            a SigLIP model or one of its towers     convert.siglip: save_siglip / read_converted
  stable_diffusion  a converted Stable Diffusion UNet + VAE convert.visualizer: write_converted_visualizer /
                                                            read_converted_visualizer
  metamorph         a trained MetaMorph model               here: write_metamorph / read_metamorph
  visualizer        a trained visualizer (+ SigLIP tower)   here: write_visualizer / read_visualizer

The converters' kinds need their source format's knowledge (towers, diffusers trees) and stay
with their converters; all of them go through ``write_model`` / ``write_converted`` and
``read_converted`` below. A training run exports its model to ``WORKDIR/model`` (``MODEL_DIR``).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from metamorph.files import ConversionError, load_tokenizer, read_json, read_safetensors_file, write_json, write_safetensors
from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from metamorph.models.siglip import Siglip, SiglipTextTower, SiglipVisionTower
from metamorph.params import build_module, module_params

FORMAT = "metamorph"  # config.json's "format" in folders we write
MODEL_DIR = "model"   # a training workdir's exported model: WORKDIR/model

LLM, SIGLIP, STABLE_DIFFUSION = "llm", "siglip", "stable_diffusion"
METAMORPH, VISUALIZER = "metamorph", "visualizer"
KINDS = {  # kind -> what such a folder holds and what writes it (for messages)
    LLM: "a LLaMA-family LLM (written by `python -m metamorph.convert llm`)",
    SIGLIP: "a SigLIP model or tower (written by `python -m metamorph.convert siglip` or a siglip-stage run)",
    STABLE_DIFFUSION: "a Stable Diffusion UNet and VAE (written by `python -m metamorph.convert visualizer`)",
    METAMORPH: "a MetaMorph model (written by a language-, connector- or vpit-stage run)",
    VISUALIZER: "a trained visualizer (written by a visualizer-stage run)",
}


def exported(path: str) -> str:
  """``path/model`` when ``path`` is a training workdir, else ``path``."""
  candidate = os.path.join(path, MODEL_DIR)
  return candidate if os.path.isdir(candidate) else path


def kind_of(folder: str) -> str | None:
  """The kind of our checkpoint in ``folder``; None when the folder is not one of ours (e.g. a
  transformers folder). A kind this version does not know is a ``ConversionError``."""
  path = os.path.join(folder, "config.json")
  if not os.path.isfile(path):
    return None
  meta = read_json(path)
  if meta.get("format") != FORMAT:
    return None
  kind = meta.get("kind")
  if kind not in KINDS:
    raise ConversionError(
        f"{folder}: a checkpoint of kind {kind!r}, which this version of metamorph does not read (it reads "
        f"{', '.join(map(repr, KINDS))}); convert or train it again with this version")
  return kind


def is_converted(folder: str) -> bool:
  """Whether ``folder`` holds a checkpoint in our format (any kind)."""
  return kind_of(folder) is not None


def write_converted(dst: str, kind: str, config: Mapping, params: Mapping[str, np.ndarray], **meta) -> None:
  """Writes ``dst/config.json`` ({format, kind, config, **meta}) and ``dst/model.safetensors`` (``params``)."""
  if kind not in KINDS:
    raise ValueError(f"unknown checkpoint kind {kind!r}; known: {sorted(KINDS)}")
  os.makedirs(dst, exist_ok=True)
  write_json(os.path.join(dst, "config.json"), {"format": FORMAT, "kind": kind, "config": dict(config), **meta})
  write_safetensors(os.path.join(dst, "model.safetensors"), params)


def read_converted(folder: str, kind: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json contents, flat params) of our folder of ``kind``; a ``ConversionError``
  naming the folder, the kind found and the kind wanted otherwise."""
  found = kind_of(folder)
  if found is None:
    raise ConversionError(f"{folder}: not one of our checkpoints (no config.json with \"format\": \"{FORMAT}\"); "
                          f"expected {KINDS[kind]}")
  if found != kind:
    raise ConversionError(f"{folder}: holds {KINDS[found]}, kind {found!r}; expected {KINDS[kind]}, kind "
                          f"{kind!r}: pass a folder of that kind")
  cfg_path = os.path.join(folder, "config.json")
  meta = read_json(cfg_path)
  if not isinstance(meta.get("config"), dict):
    raise ConversionError(f"{cfg_path}: no 'config' object")
  return meta, read_safetensors_file(os.path.join(folder, "model.safetensors"))


def module_kind(module: nnx.Module) -> str:
  """The kind of folder ``module`` is written as."""
  if isinstance(module, Llama):
    return LLM
  if isinstance(module, (Siglip, SiglipVisionTower, SiglipTextTower)):
    return SIGLIP
  if isinstance(module, MetaMorph):
    return METAMORPH
  from metamorph.models.visualizer.model import VisualizerModel  # slow import: diffusers
  if isinstance(module, VisualizerModel):
    return VISUALIZER
  raise TypeError(f"no checkpoint kind for a {type(module).__name__}")


def write_model(dst: str, module: nnx.Module, tokenizer=None, **meta) -> None:
  """Writes ``module`` (its config and parameters) to ``dst`` as its kind of folder, with the
  tokenizer's files when given."""
  write_converted(dst, module_kind(module), module.config.to_dict(), module_params(module), **meta)
  if tokenizer is not None:
    tokenizer.save_pretrained(dst)


# ----------------------------------------------------------------------------- the kinds training writes

def write_metamorph(dst: str, model: MetaMorph, tokenizer, *, visualizer: str = "") -> None:
  """A MetaMorph model with its tokenizer; ``visualizer``: the visualizer checkpoint to render
  its images with (config.json's ``"visualizer"``, a path as given or relative to the folder)."""
  write_model(dst, model, tokenizer, **({"visualizer": visualizer} if visualizer else {}))


def read_metamorph(folder: str, **llm_overrides) -> tuple[MetaMorph, Any, dict]:
  """(model, tokenizer or None, config.json contents) of a folder written by ``write_metamorph``;
  ``llm_overrides`` replace fields of the LLM's config (e.g. ``remat="none"``)."""
  meta, params = read_converted(folder, METAMORPH)
  try:
    config = MetaMorphConfig.from_dict(meta["config"])
    config = config.replace(llm=config.llm.replace(**llm_overrides)) if llm_overrides else config
  except (TypeError, ValueError) as e:
    raise ConversionError(f"{folder}/config.json: invalid MetaMorph config ({e})") from e
  model = build_module(lambda: MetaMorph(config, rngs=nnx.Rngs(0)), params, folder)
  return model, load_tokenizer(folder), meta


def write_visualizer(dst: str, model: nnx.Module, tokenizer=None) -> None:
  """A ``VisualizerModel`` (its SigLIP tower and the visualizer)."""
  write_model(dst, model, tokenizer)


def read_visualizer(folder: str) -> nnx.Module:
  """The ``VisualizerModel`` of a folder written by ``write_visualizer``."""
  from metamorph.models.visualizer.config import VisualizerModelConfig  # slow import: diffusers
  from metamorph.models.visualizer.model import VisualizerModel  # slow import: diffusers
  meta, params = read_converted(folder, VISUALIZER)
  try:
    config = VisualizerModelConfig.from_dict(meta["config"])
  except (TypeError, ValueError, KeyError) as e:
    raise ConversionError(f"{folder}/config.json: invalid visualizer config ({e})") from e
  return build_module(lambda: VisualizerModel(config, rngs=nnx.Rngs(0)), params, folder)
