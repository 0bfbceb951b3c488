"""``Visualizer``, a diffusion decoder conditioned on m normalised SigLIP tokens, and
``VisualizerModel``, its training wrapper with a frozen SigLIP tower.

DESIGN.md, "Visualizer (diffusion decoder)". An adapter maps each visual token
to the UNet's cross-attention width (the reference: Linear -> LayerNorm -> ReLU
-> Linear, hidden 2048, out 768), the condition is zero-padded (to 77 in the
reference), and diffusers' Flax ``FlaxUNet2DConditionModel`` predicts the noise
(or v) of a DDPM-noised image: RGB pixels in [-1, 1] ("pixel" mode, small
worlds) or SD-1.5 VAE latents x ``vae_scaling_factor`` ("latent" mode, 512^2).
Classifier-free guidance: training replaces a whole condition by zeros with
probability ``cond_drop_prob``; sampling mixes the conditional and the zero
(unconditional) prediction, ``eps_u + g (eps_c - eps_u)``. Optionally (the toy
preset; not in the reference) a small deterministic decoder first regresses a draft
of the sample from the tokens, and the UNet denoises conditioned on it too, by
concatenation (``draft_width``, ``DraftDecoder``, ``Condition``).

All use of diffusers stays in ``diffusers_modules``. The UNet / VAE parameters live in
the NNX module as ``nnx.Param`` leaves of nested ``nnx.Dict``s whose structure
is exactly diffusers' Flax ``params`` dict, so the flat parameter names are
``unet/<diffusers path>`` and ``vae/<diffusers path>``, e.g.
``unet/down_blocks_0/resnets_0/conv1/kernel`` or
``vae/encoder/down_blocks_0/resnets_0/norm1/scale``; ``unet_params()`` /
``vae_params()`` give the plain nested dicts for ``.apply({"params": ...})``
and ``load_unet_params`` / ``load_vae_params`` set them from such dicts (e.g.
diffusers' ``from_pretrained(..., from_pt=True)`` output); a flat
``{"unet/...": array}`` dict loads with ``metamorph.params.build_module``. The
UNet/VAE parameters carry no logical axis names (replicated under a mesh).
Training: optimise ``Visualizer.TRAINABLE`` (``VisualizerModel.TRAINABLE``),
which leaves the VAE (and the SigLIP tower) frozen.
The adapter's names are ``adapter/fc1/kernel``, ``adapter/norm/scale``,
``adapter/fc2/bias``... (see ``MlpAdapter`` and ``Resampler``).

Images are NHWC floats in [-1, 1]; tokens are [B, m, Dv] (unit norm, from
``siglip.visual_tokens``). Diffusers' UNet works in NCHW; ``Visualizer``
transposes at its boundary.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.layers.dense import table
from metamorph.models.siglip import SiglipVisionTower, visual_tokens
from metamorph.models.visualizer.adapters import ADAPTER_CLASSES
from metamorph.models.visualizer.config import VisualizerConfig, VisualizerModelConfig
from metamorph.models.visualizer.diffusers_modules import (alphas_cumprod, init_weights, load_tree, to_params,
                                                           to_plain, unet_field, unet_module, vae_decode,
                                                           vae_encode, vae_module)
from metamorph.models.visualizer.draft import DraftDecoder
from metamorph.models.visualizer.sampling import check_sampling, denoise, static_number


class Condition(NamedTuple):
  """What the UNet is conditioned on: ``context`` [B, L, cross_dim] (cross-attention) and,
  with ``draft_width``, ``draft`` [B, C, S, S] (concatenated to the noisy sample). A pytree:
  jit and ``jax.tree.map`` see both."""
  context: jax.Array
  draft: jax.Array | None = None

  def drop(self, dropped: jax.Array) -> Condition:
    """Each example's condition with ``dropped`` [B] bool set to zeros (the unconditional)."""
    return jax.tree.map(lambda x: jnp.where(dropped.reshape(-1, *(1,) * (x.ndim - 1)), 0, x).astype(x.dtype), self)

  def concat(self, other: Condition) -> Condition:
    """The two conditions as one batch (self first)."""
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b.astype(a.dtype)]), self, other)


def diffusion_targets(config: VisualizerConfig, x0: jax.Array, noise: jax.Array,
                      t: jax.Array) -> tuple[jax.Array, jax.Array]:
  """DDPM's forward process and the training target, as diffusers' ``DDPMScheduler`` has them
  (``add_noise``, ``get_velocity``; tests/test_diffusion_targets.py holds them equal): with
  a_t = ``alphas_cumprod(config.schedule)[t]``, the noised sample x_t = sqrt(a_t) x0 +
  sqrt(1 - a_t) noise and the target, ``noise`` (epsilon) or v = sqrt(a_t) noise - sqrt(1 - a_t) x0
  (v_prediction). x0, noise [B, ...] float32 (NCHW), t [B] int in [0, num_train_timesteps)."""
  a = alphas_cumprod(config.schedule)[t].reshape(-1, *(1,) * (x0.ndim - 1))
  x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
  target = noise if config.prediction_type == "epsilon" else jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
  return x_t, target


class Visualizer(nnx.Module):
  """Adapter + diffusers UNet (+ frozen VAE in latent mode). See the module docstring."""

  # everything but the VAE trains (use as the optimizer's ``wrt``)
  TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vae")))

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.adapter = ADAPTER_CLASSES[config.adapter](config, rngs=rngs)
    if config.token_positions:
      self.token_positions = table((config.num_tokens, config.token_dim), ("positions", "vis_embed"),
                                   nnx.initializers.normal(config.token_dim ** -0.5),
                                   param_dtype=config.param_dtype, rngs=rngs)
    else:
      self.token_positions = None
    self.draft = DraftDecoder(config, rngs=rngs) if config.draft_width else None
    param_dtype = jnp.dtype(config.param_dtype)
    self.unet = to_params(init_weights(unet_module(config.unet, config.dtype), rngs.params()), param_dtype)
    if config.mode == "latent":
      self.vae = to_params(init_weights(vae_module(config.vae_kwargs, config.dtype), rngs.params()), param_dtype)
    else:
      self.vae = None

  # --- parameters
  def unet_params(self) -> dict:
    """The UNet's plain nested ``params`` dict (for ``FlaxUNet2DConditionModel.apply``)."""
    return to_plain(self.unet)

  def vae_params(self) -> dict | None:
    """The VAE's plain nested ``params`` dict, or None in pixel mode."""
    return None if self.vae is None else to_plain(self.vae)

  def load_unet_params(self, params: Mapping) -> None:
    """Sets the UNet from a diffusers Flax ``params`` nested dict (e.g. what
    ``FlaxUNet2DConditionModel.from_pretrained(..., from_pt=True)`` returns); the keys and
    shapes must match this config's UNet exactly; values are cast to ``param_dtype``."""
    load_tree(self.unet, params, "unet")

  def load_vae_params(self, params: Mapping) -> None:
    """As ``load_unet_params``, for the VAE (latent mode)."""
    if self.vae is None:
      raise ValueError("this visualizer has no VAE (pixel mode)")
    load_tree(self.vae, params, "vae")

  # --- checks
  def _check_tokens(self, tokens) -> None:
    c = self.config
    shape = tuple(np.shape(tokens))
    if len(shape) != 3:
      raise ValueError(f"tokens must be [B, m, Dv] = [B, {c.num_tokens}, {c.token_dim}], got shape {shape}")
    if shape[1] != c.num_tokens:
      raise ValueError(f"expected {c.num_tokens} visual tokens per image (num_tokens), got {shape[1]} "
                       f"(tokens shape {shape})")
    if shape[2] != c.token_dim:
      raise ValueError(f"expected visual tokens of width {c.token_dim} (token_dim), got {shape[2]} "
                       f"(tokens shape {shape})")

  def _check_images(self, images) -> None:
    c = self.config
    shape = tuple(np.shape(images))
    expected = (c.image_size, c.image_size, 3)
    if len(shape) != 4 or shape[1:] != expected:
      raise ValueError(f"images must be [B, {c.image_size}, {c.image_size}, 3] (NHWC, RGB), got shape {shape}")

  # --- pieces
  def condition(self, tokens: jax.Array) -> Condition:
    """Visual tokens [B, m, Dv] -> the UNet's condition: the adapter's output zero-padded to
    ``pad_to`` [B, L, cross_dim], and the draft [B, C, S, S] (or None), gradient stopped."""
    return self._condition(tokens)[0]

  def _condition(self, tokens: jax.Array) -> tuple[Condition, jax.Array | None]:
    """(``condition(tokens)``, the draft with its gradient, or None)."""
    self._check_tokens(tokens)
    c = self.config
    tokens = tokens.astype(jnp.dtype(c.dtype))
    draft = None if self.draft is None else self.draft(tokens)
    if self.token_positions is not None:
      tokens = tokens + self.token_positions[...].astype(tokens.dtype)
    context = self.adapter(tokens)
    pad = c.padded_length - context.shape[1]
    context = jnp.pad(context, ((0, 0), (0, pad), (0, 0))) if pad else context
    return Condition(context, None if draft is None else jax.lax.stop_gradient(draft)), draft

  def training_condition(self, tokens: jax.Array, rng: jax.Array) -> Condition:
    """``condition(tokens)`` with each example's whole condition set to zeros with
    probability ``cond_drop_prob`` (classifier-free guidance training)."""
    return self._drop(self.condition(tokens), rng)

  def _drop(self, cond: Condition, rng: jax.Array) -> Condition:
    return cond.drop(jax.random.bernoulli(rng, self.config.cond_drop_prob, (cond.context.shape[0],)))

  def unconditional(self, batch: int) -> Condition:
    """The unconditional (all-zero) condition of ``batch`` examples."""
    c, dtype = self.config, jnp.dtype(self.config.dtype)
    draft = jnp.zeros((batch, c.channels, c.sample_size, c.sample_size), jnp.float32) if c.draft_width else None
    return Condition(jnp.zeros((batch, c.padded_length, c.cross_attention_dim), dtype), draft)

  def predict(self, x: jax.Array, timesteps: jax.Array, cond: Condition, *, train: bool = False,
              rng: jax.Array | None = None) -> jax.Array:
    """The UNet: noisy sample x [B, C, S, S] (NCHW), timesteps [B] int, ``cond`` ->
    epsilon (or v) [B, C, S, S] float32."""
    dtype = jnp.dtype(self.config.dtype)
    x = x.astype(dtype)
    if cond.draft is not None:
      x = jnp.concatenate([x, cond.draft.astype(dtype)], axis=1)  # [B, 2C, S, S]
    rngs = {"dropout": rng} if (train and rng is not None) else None
    out = unet_module(self.config.unet, self.config.dtype).apply(
        {"params": self.unet_params()}, x, timesteps, cond.context, train=train, rngs=rngs)
    return out.sample.astype(jnp.float32)

  def guided_prediction(self, x: jax.Array, t: jax.Array, cond: Condition, guidance,
                        use_cfg: bool = True) -> jax.Array:
    """Classifier-free guidance at one timestep t (scalar): eps_u + g (eps_c - eps_u),
    computed as eps_c + (g - 1)(eps_c - eps_u), which is exactly eps_c at g = 1.
    Conditional and unconditional halves run as one batch; ``use_cfg=False`` runs only
    the conditional half (the result for g = 1)."""
    b = x.shape[0]
    if not use_cfg:
      return self.predict(x, jnp.full((b,), t, jnp.int32), cond)
    both = self.predict(jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.int32),
                        cond.concat(self.unconditional(b)))
    eps_c, eps_u = both[:b], both[b:]
    return eps_c + (jnp.asarray(guidance, jnp.float32) - 1.0) * (eps_c - eps_u)

  def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
    """What the UNet denoises, NCHW float32: images [B, H, W, 3] in [-1, 1] (pixel mode), or
    VAE latents x scaling factor (latent mode; a posterior sample, or its mean without rng).
    The VAE is frozen: no gradient flows into it."""
    images = images.astype(jnp.float32)
    if self.config.mode == "pixel":
      return jnp.transpose(images, (0, 3, 1, 2))
    vae = jax.lax.stop_gradient(self.vae_params())
    posterior = vae_encode(self.config.vae_kwargs, self.config.dtype, vae, jnp.transpose(images, (0, 3, 1, 2)))
    latents = posterior.mean if rng is None else posterior.sample(rng)  # NHWC
    latents = jax.lax.stop_gradient(latents.astype(jnp.float32) * self.config.vae_scaling_factor)
    return jnp.transpose(latents, (0, 3, 1, 2))

  def decode(self, x: jax.Array) -> jax.Array:
    """Inverse of ``encode``: NCHW sample -> images [B, H, W, 3] float32 clipped to [-1, 1]."""
    x = jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))  # NHWC
    if self.config.mode == "latent":
      out = vae_decode(self.config.vae_kwargs, self.config.dtype, self.vae_params(),
                       x / self.config.vae_scaling_factor)  # NCHW
      x = jnp.transpose(out.astype(jnp.float32), (0, 2, 3, 1))
    return jnp.clip(x, -1.0, 1.0)

  # --- training
  def loss(self, images: jax.Array, tokens: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Diffusion loss: MSE between the UNet's output and epsilon (or v) on DDPM-noised
    images at t ~ U{0..T-1}, conditions dropped to zeros with prob ``cond_drop_prob``, plus
    ``draft_weight`` x the draft's MSE to the clean sample (with ``draft_width``).
    images [B, H, W, 3] in [-1, 1], tokens [B, m, Dv] -> (loss, {"loss_diffusion"[, "loss_draft"]})."""
    self._check_images(images)
    self._check_tokens(tokens)
    if images.shape[0] != tokens.shape[0]:
      raise ValueError(f"images ({images.shape[0]}) and tokens ({tokens.shape[0]}) batch sizes differ")
    c = self.config
    k_t, k_noise, k_drop, k_vae, k_dropout = jax.random.split(rng, 5)
    x0 = self.encode(images, k_vae)
    b = x0.shape[0]
    t = jax.random.randint(k_t, (b,), 0, c.num_train_timesteps)
    noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
    x_t, target = diffusion_targets(c, x0, noise, t)
    cond, draft = self._condition(tokens)
    dropout = unet_field(c.unet, "dropout") > 0
    pred = self.predict(x_t, t, self._drop(cond, k_drop), train=dropout, rng=k_dropout)
    loss = jnp.mean(jnp.square(pred - target))
    if draft is None:
      return loss, {"loss_diffusion": loss}
    loss_draft = jnp.mean(jnp.square(draft - x0))
    return loss + c.draft_weight * loss_draft, {"loss_diffusion": loss, "loss_draft": loss_draft}

  # --- sampling
  def sample(self, tokens: jax.Array, *, guidance: float, steps: int, rng: jax.Array,
             sampler: str = "ddim") -> jax.Array:
    """Images [B, H, W, 3] float32 in [-1, 1] from visual tokens [B, m, Dv].

    ``steps`` of diffusers' DDIM (eta 0) or DPM-Solver++ (order 2), the whole loop in one
    ``jax.lax.fori_loop``; classifier-free guidance with the zero condition in the same
    batch (a concrete ``guidance`` of 1 skips the unconditional half; a traced one of 1 gives
    the conditional prediction exactly too). Deterministic given ``rng`` (the initial noise).
    """
    check_sampling(self.config, steps, guidance, sampler)
    g = static_number(guidance)
    return self._sample(tokens, guidance, steps, rng, sampler, use_cfg=g is None or g != 1.0)

  def _sample(self, tokens, guidance, steps: int, rng, sampler: str, use_cfg: bool) -> jax.Array:
    c = self.config
    cond = self.condition(tokens)
    shape = (tokens.shape[0], c.channels, c.sample_size, c.sample_size)
    eps_fn = lambda x, t: self.guided_prediction(x, t, cond, guidance, use_cfg)
    return self.decode(denoise(c, eps_fn, shape, steps=steps, rng=rng, sampler=sampler,
                               init=cond.draft, strength=c.draft_strength))


def resize_square(images: jax.Array, size: int) -> jax.Array:
  """Square images [B, H, W, C] -> [B, size, size, C] (bilinear, antialiased; unchanged at size)."""
  if images.shape[1] == size and images.shape[2] == size:
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear", antialias=True)


# ----------------------------------------------------------------------------- training model


class VisualizerModel(nnx.Module):
  """Training wrapper: tokens come from the frozen ``vision`` tower.

  Images are given at ``visualizer.image_size``; they are resized (bilinear,
  antialiased) for the tower when its resolution differs (SD-1.5: 512 vs 384).
  """

  # the visualizer's adapter and UNet train; the vision tower and the VAE stay frozen
  TRAINABLE = nnx.All(nnx.Param, nnx.PathContains("visualizer"), nnx.Not(nnx.PathContains("vae")))

  def __init__(self, config: VisualizerModelConfig, *, rngs: nnx.Rngs,
               vision: SiglipVisionTower | None = None, visualizer: Visualizer | None = None):
    if vision is not None and vision.config != config.vision:
      raise ValueError("the given vision tower's config differs from config.vision")
    if visualizer is not None and visualizer.config != config.visualizer:
      raise ValueError("the given visualizer's config differs from config.visualizer")
    self.config = config
    self.vision = vision if vision is not None else SiglipVisionTower(config.vision, rngs=rngs)
    self.visualizer = visualizer if visualizer is not None else Visualizer(config.visualizer, rngs=rngs)

  def tokens(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> visual tokens [B, m, Dv], no gradient."""
    x = resize_square(images.astype(jnp.float32), self.config.vision.image_size)
    return jax.lax.stop_gradient(visual_tokens(self.vision, x, self.config.visualizer.num_tokens))

  def loss(self, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images [B, H, W, 3] in [-1, 1] (visualizer resolution) -> (loss, {"loss_diffusion"})."""
    self.visualizer._check_images(images)
    return self.visualizer.loss(images, self.tokens(images), rng)
