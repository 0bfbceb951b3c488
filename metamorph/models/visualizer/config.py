"""The visualizer's configuration: ``VisualizerConfig`` (its checks against diffusers' UNet and
VAE, derived sizes, the ``toy`` and ``sd15`` presets) and ``VisualizerModelConfig`` (the
training wrapper: a SigLIP tower and the visualizer it conditions)."""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from metamorph.models.config import ModelConfig
from metamorph.models.siglip import SiglipVisionConfig
from metamorph.models.visualizer.diffusers_modules import (DDIM_KEYS, SCHEDULE_KEYS, UNET_FIELDS, UNET_GROUPS,
                                                           VAE_FIELDS, tuples, unet_field, vae_field)

MODES = ("pixel", "latent")
ADAPTERS = ("mlp", "resampler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# SD-1.5 (runwayml/stable-diffusion-v1-5) unet/config.json and vae/config.json, as kwargs
# of diffusers' Flax classes.
SD15_UNET: dict[str, Any] = dict(
    sample_size=64, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, attention_head_dim=8,
    cross_attention_dim=768, flip_sin_to_cos=True, freq_shift=0, use_linear_projection=False)
SD15_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, act_fn="silu",
    latent_channels=4, norm_num_groups=32, sample_size=512)


@dataclasses.dataclass(frozen=True)
class VisualizerConfig(ModelConfig):
  """The visualizer. Defaults are the reference's where it has one.

  mode: "pixel" (the UNet denoises RGB in [-1, 1], ``image_size``^2) or "latent"
    (SD-1.5: it denoises ``FlaxAutoencoderKL`` latents x ``vae_scaling_factor``).
  num_tokens, token_dim: m and Dv of the conditioning visual tokens.
  adapter: "mlp" (per token Linear(Dv->adapter_hidden) -> LayerNorm -> ReLU ->
    Linear(->cross_attention_dim), the reference) or "resampler" (``num_queries``
    learned queries cross-attend to the tokens in ``resampler_layers`` pre-LN layers).
  pad_to: condition length after zero-padding (77 in the reference); 0 = none.
  token_positions: add a learned embedding per token index to the tokens before the
    adapter, so cross-attention knows which grid cell each token pooled (the UNet's
    keys are otherwise an unordered set); off in the reference.
  draft_width: width of the draft decoder (0 = none, the reference). ``DraftDecoder``
    regresses the clean sample from the tokens (MSE, weight ``draft_weight``); the UNet
    gets the draft (gradient stopped) concatenated to its noisy input, so its
    ``in_channels`` is ``2 * channels``. It turns the slow part of learning a small
    visualizer, decoding shape from the tokens, into a cheap regression; the UNet
    then learns to refine a draft, which is fast.
  draft_strength: with a draft, sampling starts from the draft noised to this fraction of
    the schedule and runs the last ``strength_steps(steps, draft_strength)`` steps (SDEdit;
    diffusers' img2img ``strength``); 1 = from pure noise, the reference. Sampling only.
  unet / vae: kwargs of diffusers' ``FlaxUNet2DConditionModel`` / ``FlaxAutoencoderKL``
    (without ``dtype``; missing keys take diffusers' defaults). NB diffusers'
    ``attention_head_dim`` is the number of heads.
  Scheduler: the DDPM training schedule (``num_train_timesteps``, ``beta_*``);
    ``set_alpha_to_one`` and ``steps_offset`` are DDIM's options (SD-1.5: False, 1).
    ``clip_sample`` clips the predicted x0 to [-1, 1] at every step of both samplers
    (pixel mode; SD-1.5: False). DPM-Solver++ (order 2, "linspace" spacing) shares
    the schedule.
  cond_drop_prob: probability that a training example's condition is zeros.
  ``VisualizerConfig()`` is ``VisualizerConfig.sd15()``.
  """
  mode: str = "latent"
  image_size: int = 512
  num_tokens: int = 64
  token_dim: int = 1152
  adapter: str = "mlp"
  adapter_hidden: int = 2048
  num_queries: int = 64
  resampler_layers: int = 2
  resampler_heads: int = 8
  pad_to: int = 77
  token_positions: bool = False
  draft_width: int = 0
  draft_weight: float = 1.0
  draft_strength: float = 1.0
  unet: dict = dataclasses.field(default_factory=lambda: dict(SD15_UNET))
  vae: dict | None = dataclasses.field(default_factory=lambda: dict(SD15_VAE))
  vae_scaling_factor: float = 0.18215
  num_train_timesteps: int = 1000
  beta_schedule: str = "scaled_linear"
  beta_start: float = 0.00085
  beta_end: float = 0.012
  prediction_type: str = "epsilon"
  clip_sample: bool = False
  set_alpha_to_one: bool = False
  steps_offset: int = 1
  cond_drop_prob: float = 0.8
  dtype: str = "float32"        # compute dtype (adapter and diffusers modules)
  param_dtype: str = "float32"  # storage dtype

  def __post_init__(self):
    def bad(msg):
      raise ValueError(f"VisualizerConfig: {msg}")

    if not isinstance(self.unet, Mapping):
      bad(f"unet must be a dict of FlaxUNet2DConditionModel kwargs, got {type(self.unet).__name__}")
    object.__setattr__(self, "unet", tuples(self.unet))
    if self.vae is not None:
      if not isinstance(self.vae, Mapping):
        bad(f"vae must be a dict of FlaxAutoencoderKL kwargs or None, got {type(self.vae).__name__}")
      object.__setattr__(self, "vae", tuples(self.vae))
    for name, allowed in (("mode", MODES), ("adapter", ADAPTERS), ("prediction_type", PREDICTION_TYPES),
                          ("beta_schedule", BETA_SCHEDULES)):
      if getattr(self, name) not in allowed:
        bad(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
    for name in ("image_size", "num_tokens", "token_dim", "adapter_hidden", "num_queries",
                 "resampler_layers", "resampler_heads", "num_train_timesteps"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        bad(f"{name} must be a positive int, got {value!r}")
    if not isinstance(self.draft_width, (int, np.integer)) or self.draft_width < 0 or self.draft_width % 2:
      bad(f"draft_width must be an even int >= 0, got {self.draft_width!r}")
    if self.draft_weight < 0:
      bad(f"draft_weight must be >= 0, got {self.draft_weight}")
    if not 0.0 < self.draft_strength <= 1.0:
      bad(f"draft_strength must be in (0, 1], got {self.draft_strength}")
    if self.draft_strength < 1.0 and not self.draft_width:
      bad(f"draft_strength {self.draft_strength} needs a draft decoder (draft_width > 0)")
    if self.draft_width:
      side = self.grid_side
      if side * side != self.num_tokens or self.sample_size % side:
        bad(f"draft_width needs num_tokens ({self.num_tokens}) to be a square grid whose "
            f"side divides the UNet's input side ({self.sample_size})")
    if not (0.0 <= self.cond_drop_prob <= 1.0):
      bad(f"cond_drop_prob must be in [0, 1], got {self.cond_drop_prob}")
    if not (0.0 < self.beta_start < self.beta_end < 1.0):
      bad(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")
    if self.vae_scaling_factor <= 0:
      bad(f"vae_scaling_factor must be positive, got {self.vae_scaling_factor}")
    if self.steps_offset < 0:
      bad(f"steps_offset must be >= 0, got {self.steps_offset}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raises on a bad dtype name
    if self.pad_to < 0 or (self.pad_to and self.pad_to < self.condition_length):
      bad(f"pad_to ({self.pad_to}) must be 0 (no padding) or at least the adapter's output "
          f"length ({self.condition_length})")

    unknown = sorted(set(self.unet) - UNET_FIELDS)
    if unknown:
      bad(f"unknown unet keys {unknown} (dtype comes from VisualizerConfig.dtype); "
          f"known: {sorted(UNET_FIELDS)}")
    blocks = unet_field(self.unet, "block_out_channels")
    downs = unet_field(self.unet, "down_block_types")
    ups = unet_field(self.unet, "up_block_types")
    if not (len(blocks) == len(downs) == len(ups)):
      bad(f"unet block_out_channels ({len(blocks)}), down_block_types ({len(downs)}) and "
          f"up_block_types ({len(ups)}) must have the same length")
    if any(c % UNET_GROUPS for c in blocks):
      bad(f"unet block_out_channels {blocks} must be multiples of {UNET_GROUPS} (GroupNorm groups)")
    if self.mode == "latent":
      if self.vae is None:
        bad("latent mode needs vae (FlaxAutoencoderKL kwargs)")
      unknown = sorted(set(self.vae) - VAE_FIELDS)
      if unknown:
        bad(f"unknown vae keys {unknown}; known: {sorted(VAE_FIELDS)}")
      vae_blocks = vae_field(self.vae, "block_out_channels")
      groups = vae_field(self.vae, "norm_num_groups")
      if any(c % groups for c in vae_blocks):
        bad(f"vae block_out_channels {vae_blocks} must be multiples of norm_num_groups ({groups})")
      if len(vae_field(self.vae, "down_block_types")) != len(vae_blocks):
        bad("vae down_block_types and block_out_channels must have the same length")
      if self.image_size % self.vae_factor:
        bad(f"image_size ({self.image_size}) must be a multiple of the VAE's downsampling "
            f"factor ({self.vae_factor})")
      for key in ("in_channels", "out_channels"):
        if vae_field(self.vae, key) != 3:
          bad(f"vae {key} must be 3 (RGB)")
    elif self.vae is not None:
      bad("pixel mode takes no vae (set vae=None, or mode='latent')")
    for key, want in (("in_channels", self.unet_in_channels), ("out_channels", self.channels)):
      got = unet_field(self.unet, key)
      if got != want:
        why = f"{self.channels} in {self.mode} mode"
        if want != self.channels:
          why = f"twice {why}: the noisy sample and the draft"
        bad(f"unet {key} ({got}) must be {want} ({why})")
    got = unet_field(self.unet, "sample_size")
    if got != self.sample_size:
      bad(f"unet sample_size ({got}) must be {self.sample_size} (image_size {self.image_size} "
          f"in {self.mode} mode)")
    down = 2 ** (len(blocks) - 1)
    if self.sample_size % down:
      bad(f"the UNet's input side ({self.sample_size}) must be a multiple of {down} "
          f"({len(blocks)} blocks)")
    if self.adapter == "resampler" and self.cross_attention_dim % self.resampler_heads:
      bad(f"cross_attention_dim ({self.cross_attention_dim}) must be a multiple of "
          f"resampler_heads ({self.resampler_heads})")

  def __hash__(self):  # the dict fields make the generated hash fail; configs are static jit data
    return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

  # --- derived
  @property
  def vae_factor(self) -> int:
    """Pixels per latent, per side (1 in pixel mode)."""
    if self.vae is None:
      return 1
    return 2 ** (len(vae_field(self.vae, "block_out_channels")) - 1)

  @property
  def channels(self) -> int:
    """Channels of what the UNet denoises: 3 (RGB) or the VAE's latent channels."""
    return 3 if self.mode == "pixel" else vae_field(self.vae, "latent_channels")

  @property
  def sample_size(self) -> int:
    """Side of what the UNet denoises."""
    return self.image_size // self.vae_factor

  @property
  def unet_in_channels(self) -> int:
    """The noisy sample's channels, and the draft's when there is one."""
    return 2 * self.channels if self.draft_width else self.channels

  @property
  def grid_side(self) -> int:
    """k: the side of the tokens' square grid (m = k^2; checked when ``draft_width``)."""
    return math.isqrt(self.num_tokens)

  @property
  def cross_attention_dim(self) -> int:
    return unet_field(self.unet, "cross_attention_dim")

  @property
  def condition_length(self) -> int:
    """Tokens out of the adapter, before padding."""
    return self.num_tokens if self.adapter == "mlp" else self.num_queries

  @property
  def padded_length(self) -> int:
    """L: the condition's length as the UNet sees it."""
    return max(self.pad_to, self.condition_length)

  @property
  def vae_kwargs(self) -> dict[str, Any] | None:
    """``FlaxAutoencoderKL`` kwargs (with the scaling factor), or None in pixel mode."""
    return None if self.vae is None else {**self.vae, "scaling_factor": self.vae_scaling_factor}

  @property
  def schedule(self) -> dict[str, Any]:
    """The DDPM schedule and DDIM's options, as ``diffusers_modules.scheduler`` takes them."""
    return {k: getattr(self, k) for k in (*SCHEDULE_KEYS, *DDIM_KEYS)}

  # --- constructors
  @classmethod
  def toy(cls, image_size: int = 32, num_tokens: int = 16, token_dim: int = 96, **overrides) -> VisualizerConfig:
    """A small pixel-mode UNet for shapes worlds; trains on a 2-core CPU in minutes.

    Three levels (32 -> 16 -> 8 at 32 px), one resnet per level, cross-attention only at
    the lowest level and the middle (cheap on a CPU), the DDPM (linear) schedule, which
    ends at pure noise as pixel-space sampling needs, and v-prediction: at high noise the
    UNet predicts the image itself, so colour, shape and position are learned from the
    condition early (with epsilon-prediction the loss barely weights those timesteps).
    Token positions tell cross-attention which grid cell each visual token pooled, and
    a draft decoder (``draft_width`` 64) regresses the image for the UNet to refine:
    without it the UNet redraws colour and position but not shape (~45% after 1200 steps;
    docs/findings.md). Sampling starts from the draft noised to 30% of the schedule
    (``draft_strength`` 0.3): from pure noise the UNet loses some of the draft's shape.
    """
    blocks = overrides.pop("block_out_channels", (32, 64, 64))
    draft = overrides.setdefault("draft_width", 64)
    unet = dict(sample_size=image_size, in_channels=6 if draft else 3, out_channels=3,
                down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
                block_out_channels=tuple(blocks), layers_per_block=1, attention_head_dim=4,
                cross_attention_dim=128)
    unet.update(overrides.pop("unet", {}))
    values = dict(mode="pixel", image_size=image_size, num_tokens=num_tokens, token_dim=token_dim,
                  adapter="mlp", adapter_hidden=256, num_queries=num_tokens, resampler_heads=4, pad_to=0,
                  token_positions=True, unet=unet, vae=None, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
                  prediction_type="v_prediction", clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                  cond_drop_prob=0.1, draft_strength=0.3 if draft else 1.0)
    return cls(**{**values, **overrides})

  @classmethod
  def sd15(cls, num_tokens: int = 64, token_dim: int = 1152, **overrides) -> VisualizerConfig:
    """The reference: SD-1.5's UNet, VAE and scheduler at 512^2, the MLP adapter
    (hidden 2048, out 768), zero-padding to 77, condition dropout 0.8."""
    values = dict(mode="latent", image_size=512, num_tokens=num_tokens, token_dim=token_dim,
                  adapter="mlp", adapter_hidden=2048, pad_to=77, unet=dict(SD15_UNET), vae=dict(SD15_VAE),
                  vae_scaling_factor=0.18215, num_train_timesteps=1000, beta_schedule="scaled_linear",
                  beta_start=0.00085, beta_end=0.012, prediction_type="epsilon", clip_sample=False,
                  set_alpha_to_one=False, steps_offset=1, cond_drop_prob=0.8)
    return cls(**{**values, **overrides})


@dataclasses.dataclass(frozen=True)
class VisualizerModelConfig(ModelConfig):
  """A frozen SigLIP vision tower and the visualizer it conditions."""
  vision: SiglipVisionConfig
  visualizer: VisualizerConfig

  def __post_init__(self):
    if isinstance(self.vision, Mapping):
      object.__setattr__(self, "vision", SiglipVisionConfig.from_dict(self.vision))
    if isinstance(self.visualizer, Mapping):
      object.__setattr__(self, "visualizer", VisualizerConfig.from_dict(self.visualizer))
    if self.vision.hidden_size != self.visualizer.token_dim:
      raise ValueError(f"visualizer.token_dim ({self.visualizer.token_dim}) must equal the vision "
                       f"tower's hidden_size ({self.vision.hidden_size})")

  def __hash__(self):
    return hash((self.vision, self.visualizer))
