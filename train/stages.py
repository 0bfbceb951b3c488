"""What differs between the training stages: which parameters train, the loss, and
how a batch's loss is normalised.

  siglip     SigLIP vision + text towers, sigmoid loss on image-caption pairs.
  language   a toy LLM's pretraining on text-only records: only the LLM trains, text loss
             (stands in for the pretrained LLM that VPiT starts from).
  connector  VPiT stage 1: only the input projector and the new token rows of the
             embedding (and of an untied LM head) train; no vision loss.
  vpit       VPiT stage 2: everything but the vision encoder trains, with the vision loss.
  visualizer the diffusion decoder (adapter + UNet) learns to draw images from their own
             visual tokens; the vision encoder (and a VAE) stay frozen.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.models.metamorph import MetaMorph, loss_masks, vpit_loss
from metamorph.models.siglip import Siglip
from train.defaults import STAGES

Batch = dict[str, jax.Array]
LossFn = Callable[[nnx.Module, Batch, Any, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  trainable: Callable[[tuple, Any], bool]  # nnx filter: (path, value) -> trains?
  loss: LossFn                              # (model, batch, normalisers, rng) -> (loss, metrics)
  normalisers: Callable[[Batch], Any]       # whole-batch quantities micro-batches divide by
  supports_micro_batches: bool = True
  new_token_ids: tuple[int, ...] = ()       # connector: the only embedding rows that train


def _is_param(value) -> bool:
  return isinstance(value, nnx.Param)


def _vpit_loss(vision_coef: float) -> LossFn:
  def loss(model: MetaMorph, batch: Batch, counts, rng) -> tuple[jax.Array, dict[str, jax.Array]]:
    del rng  # deterministic
    tokens = jax.lax.stop_gradient(model.encode_images(batch["images"]))  # [B, I, m, Dv]
    inputs = {**batch, "visual_tokens": tokens}
    logits, predicted = model(inputs)
    return vpit_loss(logits, predicted, inputs, vision_coef, counts)
  return loss


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


def stage(name: str, *, vision_coef: float = 1.0, new_token_ids: tuple[int, ...] = ()) -> Stage:
  """The ``Stage`` called ``name``."""
  if name == "siglip":
    return Stage(name, lambda path, v: _is_param(v), _siglip_loss, lambda batch: None,
                 supports_micro_batches=False)
  if name == "language":
    return Stage(name, lambda path, v: _is_param(v) and path[0] == "llm", _vpit_loss(0.0), _vpit_counts)
  if name == "connector":
    def trainable(path, v):
      return _is_param(v) and (path[0] == "projector" or path[:2] in (("llm", "embed_tokens"), ("llm", "lm_head")))
    return Stage(name, trainable, _vpit_loss(0.0), _vpit_counts, new_token_ids=new_token_ids)
  if name == "vpit":
    return Stage(name, lambda path, v: _is_param(v) and path[0] != "vision", _vpit_loss(vision_coef), _vpit_counts)
  if name == "visualizer":
    from metamorph.models.visualizer import VisualizerModel
    return Stage(name, VisualizerModel.TRAINABLE, _visualizer_loss, lambda batch: batch["images"].shape[0])
  raise ValueError(f"unknown stage {name!r}; use one of {', '.join(STAGES)}")


def mask_new_token_rows(grads: nnx.State, token_ids: tuple[int, ...]) -> nnx.State:
  """Keeps only the gradient of the ``token_ids`` rows of the embedding (and columns of
  an untied LM head); no-op for an empty ``token_ids``."""
  if not token_ids:
    return grads
  ids = jnp.asarray(token_ids)
  def one(path, variable):
    if path[-2:] == ("embed_tokens", "embedding"):
      return variable.replace(jnp.where(jnp.isin(jnp.arange(variable.shape[0]), ids)[:, None], variable[...], 0))
    if path[-2:] == ("lm_head", "kernel"):
      return variable.replace(jnp.where(jnp.isin(jnp.arange(variable.shape[1]), ids)[None, :], variable[...], 0))
    return variable
  return nnx.map_state(one, grads)
