"""The visualizer: a diffusion decoder conditioned on m normalised SigLIP tokens.

``config`` (VisualizerConfig, VisualizerModelConfig, presets), ``diffusers_modules`` (the
glue to diffusers' Flax UNet, VAE and schedulers), ``adapters`` (MlpAdapter, Resampler),
``draft`` (DraftDecoder), ``model`` (Visualizer, VisualizerModel), ``sampling`` (the
sampling loop) and ``rendering`` (the jitted ``render`` / ``encode_tokens`` /
``reconstruct``). The names below are the public ones.
"""
from metamorph.models.visualizer.adapters import MlpAdapter, Resampler
from metamorph.models.visualizer.config import (ADAPTERS, BETA_SCHEDULES, MODES, PREDICTION_TYPES, SD15_UNET,
                                                SD15_VAE, VisualizerConfig, VisualizerModelConfig)
from metamorph.models.visualizer.diffusers_modules import SAMPLERS, scheduler
from metamorph.models.visualizer.draft import DraftDecoder
from metamorph.models.visualizer.model import Condition, Visualizer, VisualizerModel, diffusion_targets
from metamorph.models.visualizer.rendering import encode_tokens, images_to_unit, reconstruct, render, to_uint8
from metamorph.models.visualizer.sampling import check_sampling, denoise, strength_steps

__all__ = [
    "ADAPTERS", "BETA_SCHEDULES", "MODES", "PREDICTION_TYPES", "SAMPLERS", "SD15_UNET", "SD15_VAE",
    "Condition", "DraftDecoder", "MlpAdapter", "Resampler", "Visualizer", "VisualizerConfig",
    "VisualizerModel", "VisualizerModelConfig", "check_sampling", "denoise", "diffusion_targets", "encode_tokens",
    "images_to_unit", "reconstruct", "render", "scheduler", "strength_steps", "to_uint8",
]
