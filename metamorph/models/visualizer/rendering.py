"""The visualizer's public, jitted entry points: ``render`` (visual tokens -> uint8 images),
``encode_tokens`` (images -> visual tokens of a SigLIP tower) and ``reconstruct`` (both), and
the image conversions around them."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.models.siglip import SiglipVisionTower, visual_tokens
from metamorph.models.visualizer.model import Visualizer, resize_square
from metamorph.models.visualizer.sampling import check_sampling


def _check_seed(seed) -> int:
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  return int(seed)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] floats -> uint8 in [0, 255] (rounded)."""
  return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampler", "use_cfg"))
def _render_jit(graphdef, state, tokens, guidance, seed, *, steps, sampler, use_cfg):
  visualizer = nnx.merge(graphdef, state)
  images = visualizer._sample(tokens, guidance, steps, jax.random.key(seed), sampler, use_cfg)
  return to_uint8(images)


def render(visualizer: Visualizer, tokens, *, guidance: float = 3.0, steps: int = 25, seed: int = 0,
           sampler: str = "ddim") -> np.ndarray:
  """Visual tokens [B, m, Dv] -> uint8 images [B, H, W, 3]. Jitted over the module's state,
  compiled once per (token shape, steps, sampler, guidance == 1); the seed and the
  guidance scale are traced."""
  visualizer._check_tokens(tokens)
  check_sampling(visualizer.config, steps, guidance, sampler)
  seed = _check_seed(seed)
  graphdef, state = nnx.split(visualizer)
  out = _render_jit(graphdef, state, jnp.asarray(tokens, jnp.float32), jnp.float32(guidance),
                    jnp.uint32(seed), steps=int(steps), sampler=sampler, use_cfg=float(guidance) != 1.0)
  return np.asarray(out)


def images_to_unit(images) -> jax.Array:
  """uint8 [0, 255] -> float32 [-1, 1]; floats are taken as already in [-1, 1]."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) / 127.5 - 1.0
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be uint8 in [0, 255] or floats in [-1, 1], got dtype {images.dtype}")
  return images.astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef", "m"))
def _encode_jit(graphdef, state, images, *, m):
  tower = nnx.merge(graphdef, state)
  return visual_tokens(tower, resize_square(images, tower.config.image_size), m)


def encode_tokens(encoder: SiglipVisionTower, images, m: int) -> jax.Array:
  """Visual tokens [B, m, Dv] of images [B, H, W, 3] (uint8, or floats in [-1, 1]),
  resized to the encoder's resolution when needed (bilinear, antialiased)."""
  shape = tuple(np.shape(images))
  if len(shape) != 4 or shape[-1] != 3 or shape[1] != shape[2]:
    raise ValueError(f"images must be square RGB [B, H, W, 3] (NHWC), got shape {shape}")
  graphdef, state = nnx.split(encoder)
  return _encode_jit(graphdef, state, images_to_unit(images), m=m)


def reconstruct(visualizer: Visualizer, encoder: SiglipVisionTower, images, **render_kwargs) -> np.ndarray:
  """render(visualizer, visual_tokens(encoder, images in [-1, 1], m)): images [B, H, W, 3]
  (uint8 in [0, 255], or floats in [-1, 1]) -> uint8 [B, image_size, image_size, 3]."""
  c = visualizer.config
  if encoder.config.hidden_size != c.token_dim:
    raise ValueError(f"the encoder's width ({encoder.config.hidden_size}) differs from the "
                     f"visualizer's token_dim ({c.token_dim})")
  return render(visualizer, encode_tokens(encoder, images, c.num_tokens), **render_kwargs)
