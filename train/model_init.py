"""Building a stage's model from the config: architecture, tokenizer, pretrained weights.

The one place that reads ``config.model.*`` (and ``config.data.tokenizer``): a spec builder
(``siglip_spec``, ``metamorph_spec``, ``visualizer_spec``; the stage registry names which)
resolves them into a ``ModelSpec``, which the trainer then uses without the config.

Runs export their final model to ``WORKDIR/model`` (our converted format), so a
later stage can start from an earlier one (``init_from``, ``model.siglip_init``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import Any

import ml_collections
from flax import nnx
from flax.traverse_util import flatten_dict

from metamorph.convert import ConversionError, read_llm
from metamorph.convert import siglip as siglip_convert
from metamorph.convert.llama import build as build_llm
from metamorph.files import load_tokenizer
from metamorph.model_folder import (MODEL_DIR, exported, module_kind, read_converted, write_metamorph,
                                    write_visualizer)
from metamorph.params import load_module_params, module_params
from metamorph.models.llama import LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from metamorph.models.siglip import Siglip, SiglipConfig, SiglipTextConfig, SiglipVisionConfig
from metamorph.models.vocab import add_image_token_ids, resize_vocab

MODEL_DIR = MODEL_DIR  # WORKDIR/model: the exported model of a run


@dataclasses.dataclass
class ModelSpec:
  """What a stage trains: the model, its tokenizer, the image token ids, and how its
  pretrained weights load."""
  config: Any                        # MetaMorphConfig | SiglipConfig | VisualizerModelConfig
  module: type                       # the nnx.Module class built from ``config``
  tokenizer: Any = None
  new_token_ids: tuple[int, ...] = ()  # the image tokens and rows added for them
  llm_params: dict | None = None     # pretrained LLM weights (flat, before the new rows)
  load_pretrained: Callable[[nnx.Module], None] | None = None  # overwrites a built model's parts
                                     # with the weights the config names; None: nothing to load
  visualizer: str = ""               # the visualizer run the export names (model.visualizer_from)


def _dtypes(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}


def _load_tokenizer(config: ml_collections.ConfigDict, fallback):
  if not config.data.tokenizer:
    return fallback
  if not os.path.isdir(config.data.tokenizer):
    raise ConversionError(f"config.data.tokenizer: {config.data.tokenizer} is not a folder")
  tokenizer = load_tokenizer(config.data.tokenizer)
  if tokenizer is None:
    raise ConversionError(f"config.data.tokenizer: {config.data.tokenizer} holds no tokenizer files")
  return tokenizer


def _vision_config(config: ml_collections.ConfigDict, load_weights: bool = True) -> SiglipVisionConfig:
  # without weights, an architecture given in the config wins over reading siglip_init
  if config.model.siglip_init and (load_weights or not config.model.siglip.get("vision")):
    path = exported(config.model.siglip_init)
    return siglip_convert.read_siglip(path, tower="vision", **_dtypes(config))[0]
  return SiglipVisionConfig(**config.model.siglip.vision.to_dict(), **_dtypes(config))


def _loader(*steps: Callable[[nnx.Module], None] | None) -> Callable[[nnx.Module], None] | None:
  """One loader running ``steps`` in order (None ones skipped); None when there are none."""
  steps = tuple(s for s in steps if s is not None)
  if not steps:
    return None
  def load(model: nnx.Module) -> None:
    for step in steps:
      step(model)
  return load


def _load_siglip(path: str, dtypes: dict[str, str], tower: str, part: str, model: nnx.Module) -> None:
  """SigLIP weights (``tower``: "full" or "vision") into ``model`` or its ``part``."""
  kwargs = {} if tower == "full" else {"tower": tower}
  target = getattr(model, part) if part else model
  load_module_params(target, module_params(siglip_convert.load_siglip(exported(path), **kwargs, **dtypes)), path)


def _vision_loader(config: ml_collections.ConfigDict, load_weights: bool):
  """Loads the frozen vision tower of ``model.siglip_init`` into ``model.vision``."""
  if not (load_weights and config.model.siglip_init):
    return None
  return functools.partial(_load_siglip, config.model.siglip_init, _dtypes(config), "vision", "vision")


def siglip_spec(config: ml_collections.ConfigDict, *, vision_loss: bool = False,
                load_weights: bool = True) -> ModelSpec:
  """SigLIP's two towers, random (``model.siglip``) or from ``model.siglip_init``."""
  del vision_loss  # only the MetaMorph model has a vision loss
  if config.model.siglip_init:
    cfg = siglip_convert.read_siglip(exported(config.model.siglip_init), **_dtypes(config))[0]
  else:
    cfg = SiglipConfig(SiglipVisionConfig(**config.model.siglip.vision.to_dict(), **_dtypes(config)),
                       SiglipTextConfig(**config.model.siglip.text.to_dict(), **_dtypes(config)))
  load = None
  if load_weights and config.model.siglip_init:
    load = functools.partial(_load_siglip, config.model.siglip_init, _dtypes(config), "full", "")
  return ModelSpec(cfg, Siglip, tokenizer=_load_tokenizer(config, None), load_pretrained=load)


def _load_llm(config: LlamaConfig, params: dict, vocab_size: int, path: str, model: nnx.Module) -> None:
  """The pretrained LLM with the new token rows appended (mean of the old rows)."""
  llm = resize_vocab(build_llm(config, params, "config.model.llm_init"), vocab_size)
  load_module_params(model.llm, module_params(llm), path)


def metamorph_spec(config: ml_collections.ConfigDict, *, vision_loss: bool,
                   load_weights: bool = True) -> ModelSpec:
  """The unified model; adds the image tokens to the tokenizer. Without ``vision_loss``
  the model's ``vision_coef`` is 0, whatever ``model.vision_coef`` says."""
  llm_params, tokenizer = None, None
  if config.model.llm_init and load_weights:
    llm_cfg, llm_params, tokenizer = read_llm(exported(config.model.llm_init), **_dtypes(config))
  else:
    llm_cfg = LlamaConfig(**config.model.llm.to_dict(), **_dtypes(config))
  llm_cfg = llm_cfg.replace(remat=config.model.remat)
  tokenizer = _load_tokenizer(config, tokenizer)
  vocab, start_id, end_id = llm_cfg.vocab_size, -1, -1
  if tokenizer is not None:
    start_id, end_id, vocab = add_image_token_ids(tokenizer, llm_cfg.vocab_size)
  vision = _vision_config(config, load_weights)
  cfg = MetaMorphConfig(llm=llm_cfg.replace(vocab_size=vocab), vision_dim=vision.hidden_size,
                        num_visual_tokens=config.model.num_visual_tokens,
                        vision_coef=config.model.vision_coef if vision_loss else 0.0,
                        slot_embeddings=config.model.slot_embeddings, image_start_id=start_id,
                        image_end_id=end_id, vision=vision)
  new_ids = tuple(sorted({start_id, end_id} | set(range(llm_cfg.vocab_size, vocab))))
  llm = None if llm_params is None else functools.partial(_load_llm, llm_cfg, llm_params, vocab,
                                                          config.model.llm_init)
  return ModelSpec(cfg, MetaMorph, tokenizer, new_ids, llm_params,
                   load_pretrained=_loader(llm, _vision_loader(config, load_weights)),
                   visualizer=config.model.visualizer_from)


_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                     "clip_sample", "set_alpha_to_one", "steps_offset")


def visualizer_spec(config: ml_collections.ConfigDict, *, vision_loss: bool = False,
                    load_weights: bool = True) -> ModelSpec:
  """The visualizer stage: ``model.visualizer`` = {"preset": "toy" | "sd15", **fields}; with
  ``model.visualizer_init`` the UNet/VAE/scheduler configs come from that Stable Diffusion folder."""
  del vision_loss  # only the MetaMorph model has a vision loss
  from metamorph.models.visualizer import VisualizerConfig, VisualizerModel, VisualizerModelConfig  # slow import: diffusers
  vision = _vision_config(config, load_weights)
  fields = config.model.visualizer.to_dict()
  preset = fields.pop("preset", "toy")
  presets = {"toy": VisualizerConfig.toy, "sd15": VisualizerConfig.sd15}
  if preset not in presets:
    raise ValueError(f"config.model.visualizer.preset is {preset!r}; use one of {sorted(presets)}")
  fields = {"num_tokens": config.model.num_visual_tokens, "token_dim": vision.hidden_size, **fields,
            "dtype": config.model.dtype, "param_dtype": config.model.param_dtype}
  if preset == "toy":
    fields.setdefault("image_size", config.data.image_size)
  diffusion = None
  if config.model.visualizer_init and load_weights:
    sd = visualizer_convert().read_stable_diffusion(exported(config.model.visualizer_init))["config"]
    fields.update(unet=dict(sd["unet"]), vae=dict(sd["vae"]),
                  **{k: sd["scheduler"][k] for k in _SCHEDULER_FIELDS if k in sd["scheduler"]})
    diffusion = functools.partial(_load_stable_diffusion, config.model.visualizer_init)
  return ModelSpec(VisualizerModelConfig(vision=vision, visualizer=presets[preset](**fields)), VisualizerModel,
                   tokenizer=_load_tokenizer(config, None),
                   load_pretrained=_loader(diffusion, _vision_loader(config, load_weights)))


def visualizer_convert():
  from metamorph.convert import visualizer  # slow import: diffusers
  return visualizer


def random_model(model_spec: ModelSpec, seed: int) -> nnx.Module:
  return model_spec.module(model_spec.config, rngs=nnx.Rngs(seed))


def _load_stable_diffusion(path: str, model: nnx.Module) -> None:
  """The UNet and VAE weights of a Stable Diffusion folder into ``model.visualizer``; the
  adapter keeps its init."""
  sd = visualizer_convert().read_stable_diffusion(exported(path))["params"]
  params = module_params(model.visualizer)
  for part in ("unet", "vae"):
    params.update({f"{part}/{k}": v for k, v in flatten_dict(sd[part] or {}, sep="/").items()})
  load_module_params(model.visualizer, params, path)


def load_run(model: nnx.Module, workdir: str) -> None:
  """Overwrites ``model``'s parameters with another run's exported model (init_from)."""
  folder = exported(workdir)
  _, params = read_converted(folder, module_kind(model))
  load_module_params(model, params, os.path.join(folder, "model.safetensors"))


def export(model: nnx.Module, tokenizer, dst: str, visualizer: str = "") -> None:
  """Writes the trained model to ``dst`` (our format), with its tokenizer; a MetaMorph
  model's config.json names ``visualizer`` (``model.visualizer_from``) when given."""
  if isinstance(model, MetaMorph):
    write_metamorph(dst, model, tokenizer, visualizer=visualizer)
  elif isinstance(model, Siglip):
    siglip_convert.save_siglip(model, dst, tokenizer)
  else:
    write_visualizer(dst, model, tokenizer)
