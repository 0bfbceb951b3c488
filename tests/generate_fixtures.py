"""Tiny random models and checkpoints for the generation, API and sampling-script tests."""
from __future__ import annotations

import functools
import os

import numpy as np
from flax import nnx

from metamorph.models.llama import LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from metamorph.models.siglip import SiglipVisionConfig

M, DV, IMAGE_SIZE = 4, 16, 16  # visual tokens per image, their width, the images' size
CONTEXT = 256                  # the tiny models' max_position_embeddings


def tiny_vision() -> SiglipVisionConfig:
  return SiglipVisionConfig(hidden_size=DV, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            image_size=IMAGE_SIZE, patch_size=4)


def tiny_metamorph(tokenizer, *, seed: int = 0, **llm_fields) -> MetaMorph:
  """A random 2-layer MetaMorph over ``tokenizer`` (which has the image tokens) with a tiny
  SigLIP tower reading 16 px images."""
  start, end = tokenizer.convert_tokens_to_ids(["<image_start>", "<image_end>"])
  fields = {"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_layers": 2,
            "num_heads": 4, "num_kv_heads": 2, "head_dim": 8, "max_position_embeddings": CONTEXT}
  config = MetaMorphConfig(llm=LlamaConfig(**{**fields, **llm_fields}), vision_dim=DV, num_visual_tokens=M,
                           image_start_id=start, image_end_id=end, vision=tiny_vision())
  return MetaMorph(config, rngs=nnx.Rngs(seed))


def drawing_metamorph(tokenizer, stop_id: int) -> MetaMorph:
  """A tiny MetaMorph whose greedy answer to anything is images, then ``stop_id``: the last
  MLP's bias writes a large constant direction u into the residual stream, and the LM head
  scores ``<image_start>`` (3u) above the stop token (2u) above everything else (small)."""
  model = tiny_metamorph(tokenizer, mlp_bias=True, tie_word_embeddings=False)
  u = np.random.default_rng(1).normal(size=model.config.llm.hidden_size).astype(np.float32)
  u /= np.linalg.norm(u)
  model.llm.layers[-1].mlp.down_proj.bias[...] = 50.0 * u
  kernel = np.array(model.llm.lm_head.kernel[...])  # [D, V]
  kernel[:, model.config.image_start_id] = 3.0 * u
  kernel[:, stop_id] = 2.0 * u
  model.llm.lm_head.kernel[...] = kernel
  return model


def tiny_visualizer(vision=None):
  """A random pixel-mode visualizer for [M, DV] tokens (16 px), with the SigLIP tower
  ``vision`` (a ``tiny_vision`` tower; default: one of its own)."""
  from metamorph.models import visualizer as V
  unet = {"down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"), "mid_block_type": None,
          "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"), "cross_attention_dim": 32,
          "attention_head_dim": 2}
  config = V.VisualizerConfig.toy(image_size=IMAGE_SIZE, num_tokens=M, token_dim=DV, block_out_channels=(32, 32),
                                  unet=unet, adapter_hidden=32)
  return V.VisualizerModel(V.VisualizerModelConfig(vision=tiny_vision(), visualizer=config), rngs=nnx.Rngs(0),
                           vision=vision)


def write_workdir(run: str, model: MetaMorph, tokenizer, *, visualizer_entry: str = "") -> str:
  """Exports ``model`` as the training workdir ``run`` (RUN/model), its config naming
  ``visualizer_entry``; returns ``run``."""
  from train import model_init
  model_init.export(model, tokenizer, os.path.join(run, model_init.MODEL_DIR), visualizer=visualizer_entry)
  return run


@functools.cache
def toy_checkpoint(root: str) -> str:
  """ROOT/run: the drawing MetaMorph over the world tokenizer (a training workdir) with a
  visualizer workdir ROOT/run/vis (trained, as it were, on the model's SigLIP tower), named
  in its config by the relative path "vis".
  Built once per process (the visualizer's initialisation takes seconds)."""
  from metamorph.shapes.tokenizer import build_world_tokenizer
  from train import model_init
  tokenizer = build_world_tokenizer()
  model = drawing_metamorph(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
  run = write_workdir(os.path.join(root, "run"), model, tokenizer, visualizer_entry="vis")
  model_init.export(tiny_visualizer(model.vision), None, os.path.join(run, "vis", model_init.MODEL_DIR))
  return run
