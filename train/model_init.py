"""Building a stage's model from the config: architecture, tokenizer, pretrained weights.

Runs export their final model to ``WORKDIR/model`` (our converted format), so a
later stage can start from an earlier one (``init_from``, ``model.siglip_init``).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from metamorph.convert import ConversionError, read_llm
from metamorph.convert import siglip as siglip_convert
from metamorph.files import read_safetensors_file
from metamorph.model_folder import MODEL_DIR, write_converted
from metamorph.params import load_module_params, module_params
from metamorph.model_folder import exported
from metamorph.models.llama import LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from metamorph.tokens import IMAGE_END, IMAGE_START
from metamorph.models.siglip import Siglip, SiglipConfig, SiglipTextConfig, SiglipVisionConfig

MODEL_DIR = MODEL_DIR  # WORKDIR/model: the exported model of a run
METAMORPH_KIND = "metamorph"
VISUALIZER_KIND = "visualizer"


@dataclasses.dataclass
class ModelSpec:
  """What a stage trains: the model config, its tokenizer and the image token ids."""
  config: Any                        # MetaMorphConfig | SiglipConfig
  tokenizer: Any = None
  new_token_ids: tuple[int, ...] = ()  # the image tokens and rows added for them
  llm_params: dict | None = None     # pretrained LLM weights (flat), resized later
  llm_vocab: int | None = None


def _dtypes(config: ml_collections.ConfigDict) -> dict[str, str]:
  return {"dtype": config.model.dtype, "param_dtype": config.model.param_dtype}


def _load_tokenizer(config: ml_collections.ConfigDict, fallback):
  if not config.data.tokenizer:
    return fallback
  from transformers import AutoTokenizer
  if not os.path.isdir(config.data.tokenizer):
    raise ConversionError(f"config.data.tokenizer: {config.data.tokenizer} is not a folder")
  return AutoTokenizer.from_pretrained(config.data.tokenizer)


def _vision_config(config: ml_collections.ConfigDict, load_weights: bool = True) -> SiglipVisionConfig:
  # without weights, an architecture given in the config wins over reading siglip_init
  if config.model.siglip_init and (load_weights or not config.model.siglip.get("vision")):
    path = exported(config.model.siglip_init)
    return siglip_convert.read_siglip(path, tower="vision", **_dtypes(config))[0]
  return SiglipVisionConfig(**config.model.siglip.vision.to_dict(), **_dtypes(config))


def siglip_spec(config: ml_collections.ConfigDict) -> ModelSpec:
  if config.model.siglip_init:
    cfg = siglip_convert.read_siglip(exported(config.model.siglip_init), **_dtypes(config))[0]
  else:
    cfg = SiglipConfig(SiglipVisionConfig(**config.model.siglip.vision.to_dict(), **_dtypes(config)),
                       SiglipTextConfig(**config.model.siglip.text.to_dict(), **_dtypes(config)))
  return ModelSpec(cfg, tokenizer=_load_tokenizer(config, None))


def metamorph_spec(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> ModelSpec:
  """The unified model's config; adds the image tokens to the tokenizer."""
  llm_params, tokenizer = None, None
  if config.model.llm_init and load_weights:
    llm_cfg, llm_params, tokenizer = read_llm(exported(config.model.llm_init), **_dtypes(config))
  else:
    llm_cfg = LlamaConfig(**config.model.llm.to_dict(), **_dtypes(config))
  llm_cfg = llm_cfg.replace(remat=config.model.remat)
  tokenizer = _load_tokenizer(config, tokenizer)
  vocab, start_id, end_id, new_start = llm_cfg.vocab_size, -1, -1, None
  if tokenizer is not None:
    tokenizer.add_tokens([IMAGE_START, IMAGE_END], special_tokens=True)
    start_id, end_id = tokenizer.convert_tokens_to_ids([IMAGE_START, IMAGE_END])
    if len(tokenizer) > vocab:
      new_start, vocab = vocab, len(tokenizer)
  vision = _vision_config(config, load_weights)
  cfg = MetaMorphConfig(llm=llm_cfg.replace(vocab_size=vocab), vision_dim=vision.hidden_size,
                        num_visual_tokens=config.model.num_visual_tokens,
                        vision_coef=0.0 if config.stage in ("language", "connector") else config.model.vision_coef,
                        slot_embeddings=config.model.slot_embeddings, image_start_id=start_id,
                        image_end_id=end_id, vision=vision)
  new_ids = tuple(sorted({start_id, end_id} | set(range(new_start or vocab, vocab)) - {-1}))
  return ModelSpec(cfg, tokenizer, new_ids, llm_params, llm_cfg.vocab_size)


_SCHEDULER_FIELDS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type",
                     "clip_sample", "set_alpha_to_one", "steps_offset")


def visualizer_spec(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> ModelSpec:
  """The visualizer stage: ``model.visualizer`` = {"preset": "toy" | "sd15", **fields}; with
  ``model.visualizer_init`` the UNet/VAE/scheduler configs come from that Stable Diffusion folder."""
  from metamorph.models.visualizer import VisualizerConfig, VisualizerModelConfig
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
  if config.model.visualizer_init and load_weights:
    sd = visualizer_convert().read_stable_diffusion(exported(config.model.visualizer_init))["config"]
    fields.update(unet=dict(sd["unet"]), vae=dict(sd["vae"]),
                  **{k: sd["scheduler"][k] for k in _SCHEDULER_FIELDS if k in sd["scheduler"]})
  return ModelSpec(VisualizerModelConfig(vision=vision, visualizer=presets[preset](**fields)),
                   tokenizer=_load_tokenizer(config, None))


def visualizer_convert():
  from metamorph.convert import visualizer
  return visualizer


def spec(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> ModelSpec:
  if config.stage == "siglip":
    return siglip_spec(config)
  if config.stage == "visualizer":
    return visualizer_spec(config, load_weights=load_weights)
  return metamorph_spec(config, load_weights=load_weights)


def random_model(model_spec: ModelSpec, seed: int) -> nnx.Module:
  from metamorph.models.visualizer import VisualizerModel, VisualizerModelConfig
  classes = {SiglipConfig: Siglip, MetaMorphConfig: MetaMorph, VisualizerModelConfig: VisualizerModel}
  return classes[type(model_spec.config)](model_spec.config, rngs=nnx.Rngs(seed))


def _resized_llm_params(model_spec: ModelSpec) -> dict[str, np.ndarray]:
  """Pretrained LLM params with the new token rows appended (mean of the old rows)."""
  from metamorph.models.metamorph import resize_vocab
  from metamorph.convert.llama import build
  old = model_spec.config.llm.replace(vocab_size=model_spec.llm_vocab)
  llm = build(old, model_spec.llm_params, "config.model.llm_init")
  return module_params(resize_vocab(llm, model_spec.config.llm.vocab_size))


def load_pretrained(model: nnx.Module, model_spec: ModelSpec, config: ml_collections.ConfigDict) -> None:
  """Overwrites parts of ``model`` with the pretrained weights the config names."""
  if isinstance(model, Siglip):
    if config.model.siglip_init:
      load_module_params(model, module_params(siglip_convert.load_siglip(
          exported(config.model.siglip_init), **_dtypes(config))), config.model.siglip_init)
    return
  if config.stage == "visualizer" and config.model.visualizer_init:
    _load_stable_diffusion(model.visualizer, config.model.visualizer_init)
  if model_spec.llm_params is not None:
    load_module_params(model.llm, _resized_llm_params(model_spec), config.model.llm_init)
  if config.model.siglip_init:
    load_module_params(model.vision, module_params(siglip_convert.load_siglip(
        exported(config.model.siglip_init), tower="vision", **_dtypes(config))), config.model.siglip_init)


def _load_stable_diffusion(visualizer: nnx.Module, path: str) -> None:
  """The UNet and VAE weights of a Stable Diffusion folder; the adapter keeps its init."""
  sd = visualizer_convert().read_stable_diffusion(exported(path))["params"]
  params = module_params(visualizer)
  for part in ("unet", "vae"):
    flat = {f"{part}/" + "/".join(k): v for k, v in _flatten(sd[part] or {})}
    params.update(flat)
  load_module_params(visualizer, params, path)


def _flatten(tree: dict, prefix: tuple = ()):
  for key, value in tree.items():
    if isinstance(value, dict):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def load_run(model: nnx.Module, workdir: str) -> None:
  """Overwrites ``model``'s parameters with another run's exported model (init_from)."""
  path = os.path.join(exported(workdir), "model.safetensors")
  load_module_params(model, read_safetensors_file(path), path)


def export(model: nnx.Module, tokenizer, dst: str, visualizer: str = "") -> None:
  """Writes the trained model to ``dst`` (our format), with its tokenizer; a MetaMorph
  model's config.json names ``visualizer`` (``model.visualizer_from``) when given."""
  if isinstance(model, Siglip):
    siglip_convert.save_siglip(model, dst)
  else:
    kind = METAMORPH_KIND if isinstance(model, MetaMorph) else VISUALIZER_KIND
    meta = {"visualizer": visualizer} if visualizer and kind == METAMORPH_KIND else {}
    write_converted(dst, kind, model.config.to_dict(), model, **meta)
  if tokenizer is not None:
    tokenizer.save_pretrained(dst)
