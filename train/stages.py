"""The stage registry: everything that differs between the training stages.

  siglip     SigLIP vision + text towers, sigmoid loss on image-caption pairs.
  visualizer the diffusion decoder (adapter + UNet) learns to draw images from their own
             visual tokens; the vision encoder (and a VAE) stay frozen.
  language   a toy LLM's pretraining on text-only records: only the LLM trains, text loss
             (stands in for the pretrained LLM that VPiT starts from).
  connector  VPiT stage 1: only the input projector and the new token rows of the
             embedding (and of an untied LM head) train; no vision loss.
  vpit       VPiT stage 2: everything but the vision encoder trains, with the vision loss.

The trainer looks the stage up once (``get(config.stage)``) and then only calls its fields:
the model it builds (a spec builder of ``train.model_init``), what trains, its batches (a
pipeline of ``train.data``), its loss and normalisers, whether the vision loss is on, its
FLOPs formula (``train.metrics``), its sample hook, micro-batch support, how it exports and
which earlier runs its config names. Nothing outside this module branches on a stage's name.

The vision loss is the stage's choice (``Stage.vision_loss``): where it is off (language,
connector) the built model's ``vision_coef`` is 0 whatever ``model.vision_coef`` says; the
checkpoints' meta (``vision_loss``) and the exported model's config (``vision_coef``) record it.

Adding a stage means adding one ``Stage`` entry to ``STAGES`` below, reusing the builders,
pipelines, losses and formulas here or adding its own next to them (a new model: a spec
builder in ``train.model_init``; a new input: a pipeline in ``train.data``).
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from metamorph.data.conversation import TokenLayout
from metamorph.layers import target_logits
from metamorph.models.metamorph import MetaMorph, loss_masks, vpit_loss
from metamorph.models.siglip import Siglip
from train import data, metrics, model_init
from train.model_init import ModelSpec

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]
SpecBuilder = Callable[..., ModelSpec]  # (config, *, vision_loss, load_weights) -> ModelSpec
Pipeline = Callable[..., data.ShardedBatches]  # (DataSettings, ModelSpec, split, *, seed, num_epochs)
FlopsFn = Callable[[ModelSpec, Any, int], tuple[float, float]]  # (spec, abstract state, seq_len)
SampleFn = Callable[[nnx.Module, dict[str, np.ndarray], str], None]  # (model, local batch, png path)
ExportFn = Callable[[nnx.Module, ModelSpec, str], None]  # (trained model, spec, folder)


@dataclasses.dataclass(frozen=True)
class Start:
  """An earlier run that a stage's config names."""
  field: str             # its config field: "model.siglip_init", "init_from", "model.visualizer_from"
  stage: str             # the stage whose run (workdir) it names
  required: bool = True  # False: the stage also runs without it (connector: from a random LLM)


def export_model(model: nnx.Module, spec: ModelSpec, dst: str) -> None:
  """Our format, with the tokenizer; a MetaMorph model names its visualizer run."""
  model_init.export(model, spec.tokenizer, dst, visualizer=spec.visualizer)


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  model: SpecBuilder                 # how its model spec is built from the config (called with
                                     # vision_loss=this stage's vision_loss)
  trainable: Any                     # nnx filter: (path, value) -> trains?
  batches: Pipeline                  # its inputs
  loss: LossFn                       # (model, batch, normalisers, rng) -> (loss, metrics)
  normalisers: Callable[[Batch], Any]  # whole-batch quantities micro-batches divide by
  flops: FlopsFn                     # (model FLOPs per trained token, per image) of a step
  vision_loss: bool = False          # the VPiT vision loss (x model.vision_coef) is on; off, the
                                     # model's vision_coef is 0 whatever model.vision_coef says
  supports_micro_batches: bool = True  # False: the loss couples the whole batch
  new_rows_only: bool = False        # of the embedding / LM head only the rows of the tokens the
                                     # model spec added train (``with_new_tokens``)
  sample: SampleFn | None = None     # every train.sample_every steps (single-process runs)
  export: ExportFn = export_model
  starts_from: tuple[Start, ...] = ()  # the earlier runs its config names
  new_token_ids: tuple[int, ...] = ()  # set by ``with_new_tokens``

  def with_new_tokens(self, spec: ModelSpec, rows_only: bool = False) -> Stage:
    """The stage for ``spec``'s model: with its new token ids when only their rows train (the
    stage's choice, or ``rows_only``: the tuning mode's, ``TuningMode.new_rows_only``)."""
    if not (self.new_rows_only or rows_only):
      return self
    return dataclasses.replace(self, new_rows_only=True, new_token_ids=spec.new_token_ids)


def _is_param(value) -> bool:
  return isinstance(value, nnx.Param)


# ----------------------------------------------------------------------------- inputs

def _conversations(d: data.DataSettings, spec: ModelSpec, split: str, **kw) -> data.ShardedBatches:
  layout = TokenLayout.from_tokenizer(spec.tokenizer, spec.config.num_visual_tokens)
  return data.vpit_batches(d, spec.tokenizer, layout, split, **kw)


def _caption_pairs(d: data.DataSettings, spec: ModelSpec, split: str, **kw) -> data.ShardedBatches:
  return data.caption_pairs(d, spec.tokenizer, split, **kw)


def _images(d: data.DataSettings, spec: ModelSpec, split: str, **kw) -> data.ShardedBatches:
  del spec  # images only
  return data.image_batches(d, split, **kw)


# ----------------------------------------------------------------------------- losses

def vpit_objective(model: MetaMorph, batch: Batch, counts, rng, *, logits_chunk: int = target_logits.CHUNK
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Text cross-entropy + ``model.config.vision_coef`` x the vision loss (``vpit_loss``; the LM
  head on the text targets' positions, ``logits_chunk`` at a time)."""
  del rng  # deterministic
  tokens = jax.lax.stop_gradient(model.encode_images(batch["images"]))  # [B, I, m, Dv]
  inputs = {**batch, "visual_tokens": tokens}
  hidden = model.hidden(inputs)  # [B, T, H]
  return vpit_loss(model.llm.logits, hidden, model.predict_visual(hidden), inputs, model.config.vision_coef, counts,
                   logits_chunk)


def _vpit_counts(batch: Batch) -> tuple[jax.Array, jax.Array]:
  text, visual = loss_masks(batch)
  return text.sum(), visual.sum()


def _siglip_loss(model: Siglip, batch: Batch, _, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
  del rng  # deterministic
  loss = model.loss(batch["images"], batch["text_ids"])
  return loss, {"loss_siglip": loss}


def _visualizer_loss(model, batch: Batch, batch_rows, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over this micro-batch, rescaled so micro-batch losses sum to the batch mean."""
  loss, metrics = model.loss(batch["images"], rng)
  scale = batch["images"].shape[0] / batch_rows
  return loss * scale, {k: v * scale for k, v in metrics.items()}


# ----------------------------------------------------------------------------- what trains

def _every_param(path, value) -> bool:
  return _is_param(value)


def _llm_only(path, value) -> bool:
  return _is_param(value) and path[0] == "llm"


def _projector_and_token_tables(path, value) -> bool:
  return _is_param(value) and (path[0] == "projector" or path[:2] in (("llm", "embed_tokens"), ("llm", "lm_head")))


def _all_but_vision(path, value) -> bool:
  return _is_param(value) and path[0] != "vision"


def _visualizer_trainable(path, value) -> bool:
  """The adapter and UNet (``VisualizerModel.TRAINABLE``): not the vision encoder, not the VAE."""
  from metamorph.models.visualizer import VisualizerModel  # slow import: diffusers
  return VisualizerModel.TRAINABLE(path, value)


# ----------------------------------------------------------------------------- samples

def _visualizer_samples(model, local: dict[str, np.ndarray], path: str) -> None:
  """Up to 8 images of the batch (top) above their reconstructions (bottom), as a PNG."""
  from metamorph.models.visualizer import reconstruct, to_uint8  # slow import: diffusers
  originals = np.asarray(to_uint8(local["images"][:8]))
  rebuilt = reconstruct(model.visualizer, model.vision, originals)
  grid = np.concatenate([np.concatenate(list(originals), 1), np.concatenate(list(rebuilt), 1)], 0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path)


# ----------------------------------------------------------------------------- the registry

_SIGLIP = Start("model.siglip_init", "siglip")
_VISUALIZER = Start("model.visualizer_from", "visualizer")

_METAMORPH = dict(model=model_init.metamorph_spec, batches=_conversations, loss=vpit_objective,
                  normalisers=_vpit_counts, flops=metrics.metamorph_flops)

STAGES: dict[str, Stage] = {s.name: s for s in (  # in training order
    Stage("siglip", model=model_init.siglip_spec, trainable=_every_param, batches=_caption_pairs,
          loss=_siglip_loss, normalisers=lambda batch: None, flops=metrics.siglip_flops,
          supports_micro_batches=False),
    Stage("visualizer", model=model_init.visualizer_spec, trainable=_visualizer_trainable, batches=_images,
          loss=_visualizer_loss, normalisers=lambda batch: batch["images"].shape[0],
          flops=metrics.unmodelled_flops, sample=_visualizer_samples, starts_from=(_SIGLIP,)),
    Stage("language", trainable=_llm_only, starts_from=(_SIGLIP,), **_METAMORPH),
    Stage("connector", trainable=_projector_and_token_tables, new_rows_only=True,
          starts_from=(_SIGLIP, _VISUALIZER, Start("init_from", "language", required=False)), **_METAMORPH),
    Stage("vpit", trainable=_all_but_vision, vision_loss=True,
          starts_from=(_SIGLIP, _VISUALIZER, Start("init_from", "connector")), **_METAMORPH),
)}


def get(name: str) -> Stage:
  """The stage called ``name``; a clear error naming the known ones."""
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; use one of {', '.join(STAGES)}")
  return STAGES[name]
