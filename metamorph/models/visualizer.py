"""The visualizer: a diffusion decoder conditioned on m normalised SigLIP tokens.

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

All use of diffusers stays in this module. The UNet / VAE parameters live in
the NNX module as ``nnx.Param`` leaves of nested ``nnx.Dict``s whose structure
is exactly diffusers' Flax ``params`` dict, so the flat parameter names are
``unet/<diffusers path>`` and ``vae/<diffusers path>``, e.g.
``unet/down_blocks_0/resnets_0/conv1/kernel`` or
``vae/encoder/down_blocks_0/resnets_0/norm1/scale``; ``unet_params()`` /
``vae_params()`` give the plain nested dicts for ``.apply({"params": ...})``
and ``load_unet_params`` / ``load_vae_params`` set them from such dicts (e.g.
diffusers' ``from_pretrained(..., from_pt=True)`` output); a flat
``{"unet/...": array}`` dict loads with ``convert.tensors.build_module``. The
UNet/VAE parameters carry no logical axis names (replicated under a mesh).
Training: optimise ``Visualizer.TRAINABLE`` (``VisualizerModel.TRAINABLE``),
which leaves the VAE (and the SigLIP tower) frozen.
The adapter's names are ``adapter/fc1/kernel``, ``adapter/norm/scale``,
``adapter/fc2/bias``... (see ``MlpAdapter`` and ``Resampler``).

Images are NHWC floats in [-1, 1]; tokens are [B, m, Dv] (unit norm, from
``siglip.visual_tokens``). Diffusers' UNet works in NCHW; this module
transposes at its boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from diffusers.utils import logging as _diffusers_logging
from flax import nnx

from metamorph.models.config import ModelConfig
from metamorph.models.siglip import SiglipVisionConfig, SiglipVisionTower, visual_tokens
from metamorph.sharding import logical_init


class _DropFlaxDeprecation(logging.Filter):
  """diffusers logs "Flax classes are deprecated" at import and at every module setup /
  scheduler construction (hundreds of times per trace); we know, and keep logs readable."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Flax classes are deprecated" not in record.getMessage()


_diffusers_logging.get_logger("diffusers")  # configures diffusers' root logger and its handler
for _handler in logging.getLogger("diffusers").handlers:
  if not any(isinstance(f, _DropFlaxDeprecation) for f in _handler.filters):
    _handler.addFilter(_DropFlaxDeprecation())

from diffusers import (FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler,
                       FlaxUNet2DConditionModel)
from diffusers.schedulers.scheduling_utils_flax import CommonSchedulerState

for _name in list(logging.root.manager.loggerDict):  # runtime messages, whatever handles them
  if _name.startswith("diffusers") and _name.endswith("_flax"):
    logging.getLogger(_name).addFilter(_DropFlaxDeprecation())

SAMPLERS = ("ddim", "dpm")
MODES = ("pixel", "latent")
ADAPTERS = ("mlp", "resampler")
PREDICTION_TYPES = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_UNET_FIELDS = frozenset(f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)) - {"dtype", "parent", "name"}
_VAE_FIELDS = frozenset(f.name for f in dataclasses.fields(FlaxAutoencoderKL)) - {"dtype", "parent", "name"}
_UNET_GROUPS = 32  # diffusers' Flax UNet GroupNorms have 32 groups, fixed

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


def _tuples(value):
  """JSON lists -> tuples, recursively (diffusers' linen modules must be hashable)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  return value


def _field(kwargs: Mapping[str, Any], cls, name: str):
  """``kwargs[name]``, or the default of the diffusers class' field."""
  if name in kwargs:
    return kwargs[name]
  return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# ----------------------------------------------------------------------------- config


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
    object.__setattr__(self, "unet", _tuples(self.unet))
    if self.vae is not None:
      if not isinstance(self.vae, Mapping):
        bad(f"vae must be a dict of FlaxAutoencoderKL kwargs or None, got {type(self.vae).__name__}")
      object.__setattr__(self, "vae", _tuples(self.vae))
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

    unknown = sorted(set(self.unet) - _UNET_FIELDS)
    if unknown:
      bad(f"unknown unet keys {unknown} (dtype comes from VisualizerConfig.dtype); "
          f"known: {sorted(_UNET_FIELDS)}")
    blocks = _field(self.unet, FlaxUNet2DConditionModel, "block_out_channels")
    downs = _field(self.unet, FlaxUNet2DConditionModel, "down_block_types")
    ups = _field(self.unet, FlaxUNet2DConditionModel, "up_block_types")
    if not (len(blocks) == len(downs) == len(ups)):
      bad(f"unet block_out_channels ({len(blocks)}), down_block_types ({len(downs)}) and "
          f"up_block_types ({len(ups)}) must have the same length")
    if any(c % _UNET_GROUPS for c in blocks):
      bad(f"unet block_out_channels {blocks} must be multiples of {_UNET_GROUPS} (GroupNorm groups)")
    if self.mode == "latent":
      if self.vae is None:
        bad("latent mode needs vae (FlaxAutoencoderKL kwargs)")
      unknown = sorted(set(self.vae) - _VAE_FIELDS)
      if unknown:
        bad(f"unknown vae keys {unknown}; known: {sorted(_VAE_FIELDS)}")
      vae_blocks = _field(self.vae, FlaxAutoencoderKL, "block_out_channels")
      groups = _field(self.vae, FlaxAutoencoderKL, "norm_num_groups")
      if any(c % groups for c in vae_blocks):
        bad(f"vae block_out_channels {vae_blocks} must be multiples of norm_num_groups ({groups})")
      if len(_field(self.vae, FlaxAutoencoderKL, "down_block_types")) != len(vae_blocks):
        bad("vae down_block_types and block_out_channels must have the same length")
      if self.image_size % self.vae_factor:
        bad(f"image_size ({self.image_size}) must be a multiple of the VAE's downsampling "
            f"factor ({self.vae_factor})")
      for key in ("in_channels", "out_channels"):
        if _field(self.vae, FlaxAutoencoderKL, key) != 3:
          bad(f"vae {key} must be 3 (RGB)")
    elif self.vae is not None:
      bad("pixel mode takes no vae (set vae=None, or mode='latent')")
    for key, want in (("in_channels", self.unet_in_channels), ("out_channels", self.channels)):
      got = _field(self.unet, FlaxUNet2DConditionModel, key)
      if got != want:
        why = f"{self.channels} in {self.mode} mode"
        if want != self.channels:
          why = f"twice {why}: the noisy sample and the draft"
        bad(f"unet {key} ({got}) must be {want} ({why})")
    got = _field(self.unet, FlaxUNet2DConditionModel, "sample_size")
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
    return 2 ** (len(_field(self.vae, FlaxAutoencoderKL, "block_out_channels")) - 1)

  @property
  def channels(self) -> int:
    """Channels of what the UNet denoises: 3 (RGB) or the VAE's latent channels."""
    return 3 if self.mode == "pixel" else _field(self.vae, FlaxAutoencoderKL, "latent_channels")

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
    return _field(self.unet, FlaxUNet2DConditionModel, "cross_attention_dim")

  @property
  def condition_length(self) -> int:
    """Tokens out of the adapter, before padding."""
    return self.num_tokens if self.adapter == "mlp" else self.num_queries

  @property
  def padded_length(self) -> int:
    """L: the condition's length as the UNet sees it."""
    return max(self.pad_to, self.condition_length)

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


# ----------------------------------------------------------------------------- diffusers glue


def _unet_module(config: VisualizerConfig) -> FlaxUNet2DConditionModel:
  return _diffusers_module("unet", _freeze(config.unet), config.dtype)


def _vae_module(config: VisualizerConfig) -> FlaxAutoencoderKL:
  return _diffusers_module("vae", _freeze({**config.vae, "scaling_factor": config.vae_scaling_factor}),
                           config.dtype)


def _freeze(kwargs: Mapping[str, Any]) -> tuple:
  return tuple(sorted(kwargs.items()))


@functools.cache
def _diffusers_module(which: str, kwargs: tuple, dtype: str):
  cls = FlaxUNet2DConditionModel if which == "unet" else FlaxAutoencoderKL
  return cls(**dict(kwargs), dtype=jnp.dtype(dtype))


def _schedule_kwargs(config: VisualizerConfig) -> dict[str, Any]:
  return dict(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
              beta_start=config.beta_start, beta_end=config.beta_end,
              prediction_type=config.prediction_type, dtype=jnp.float32)


@functools.cache
def _scheduler(config: VisualizerConfig, sampler: str):
  if sampler == "ddim":
    return FlaxDDIMScheduler(**_schedule_kwargs(config), clip_sample=config.clip_sample,
                             set_alpha_to_one=config.set_alpha_to_one, steps_offset=config.steps_offset)
  return FlaxDPMSolverMultistepScheduler(**_schedule_kwargs(config), solver_order=2,
                                         algorithm_type="dpmsolver++", solver_type="midpoint",
                                         lower_order_final=True, timestep_spacing="linspace")


def _fast_key(key: jax.Array) -> jax.Array:
  """An ``unsafe_rbg`` key derived from ``key``. diffusers' inits draw ~100 arrays; with
  threefry keys XLA:CPU spends ~10 s compiling the draws of even a tiny UNet, with
  ``unsafe_rbg`` a few. The initializers (and so the distributions) are diffusers'."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key)
  else:
    data = jnp.asarray(key)
  data = data.reshape(-1).astype(jnp.uint32)
  if data.shape[0] < 4:
    data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]
  return jax.random.wrap_key_data(data[:4], impl="unsafe_rbg")


@functools.partial(jax.jit, static_argnums=0)
def _init_weights(module, key: jax.Array) -> dict:
  """diffusers' ``init_weights`` of the UNet or the VAE, jitted (one compilation per module
  config, a few seconds; eager it runs ~200 small compilations) with an ``unsafe_rbg`` key."""
  return module.init_weights(_fast_key(key))


def _to_params(tree, dtype) -> nnx.Dict:
  """diffusers' nested ``params`` dict -> nested ``nnx.Dict`` of ``nnx.Param`` (same keys)."""
  if isinstance(tree, Mapping):
    return nnx.Dict({str(k): _to_params(v, dtype) for k, v in tree.items()})
  return nnx.Param(jnp.asarray(tree, dtype))


def _to_plain(tree) -> dict:
  """Inverse of ``_to_params``: a plain nested dict of arrays."""
  if isinstance(tree, (nnx.Dict, Mapping)):
    return {k: _to_plain(v) for k, v in tree.items()}
  return tree[...]


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, (nnx.Dict, Mapping)):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def _load_tree(target: nnx.Dict, params: Mapping, name: str) -> None:
  """Copies a nested dict of arrays into the matching ``nnx.Param`` leaves of ``target``."""
  ours, theirs = _flatten(target), _flatten(params)
  missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
  if missing or unexpected:
    raise ValueError(f"{name} params do not match the config: missing {missing[:5]} "
                     f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
  for key, var in ours.items():
    if tuple(np.shape(theirs[key])) != tuple(var.shape):
      raise ValueError(f"{name} param '{key}' has shape {tuple(np.shape(theirs[key]))}, "
                       f"the config implies {tuple(var.shape)}")
  for key, var in ours.items():
    var.set_value(jnp.asarray(theirs[key], var.dtype))


# ----------------------------------------------------------------------------- adapters


def _linear(d_in: int, d_out: int, names: tuple[str | None, str | None], config: VisualizerConfig,
            rngs: nnx.Rngs) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                    kernel_init=logical_init(nnx.initializers.lecun_normal(), *names),
                    bias_init=logical_init(nnx.initializers.zeros, names[1]), rngs=rngs)


def _conv(d_in: int, d_out: int, config: VisualizerConfig, rngs: nnx.Rngs) -> nnx.Conv:
  """A 3x3 'SAME' convolution over NHWC."""
  return nnx.Conv(d_in, d_out, (3, 3), dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
                  kernel_init=logical_init(nnx.initializers.lecun_normal(), None, None, "channels", "channels"),
                  bias_init=logical_init(nnx.initializers.zeros, "channels"), rngs=rngs)


def _layer_norm(width: int, config: VisualizerConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(width, epsilon=1e-5, dtype=jnp.dtype(config.dtype),
                       param_dtype=jnp.dtype(config.param_dtype),
                       scale_init=logical_init(nnx.initializers.ones, "norm"),
                       bias_init=logical_init(nnx.initializers.zeros, "norm"), rngs=rngs)


class MlpAdapter(nnx.Module):
  """The reference adapter, per token: fc1 (Dv -> hidden) -> norm -> ReLU -> fc2 (-> cross dim).
  Params: fc1/{kernel,bias}, norm/{scale,bias}, fc2/{kernel,bias}."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    self.fc1 = _linear(config.token_dim, config.adapter_hidden, ("vis_embed", "mlp"), config, rngs)
    self.norm = _layer_norm(config.adapter_hidden, config, rngs)
    self.fc2 = _linear(config.adapter_hidden, config.cross_attention_dim, ("mlp", "embed"), config, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, m, Dv] -> [B, m, cross_dim]."""
    return self.fc2(jax.nn.relu(self.norm(self.fc1(tokens))))


class _Attention(nnx.Module):
  """Multi-head attention with biases (queries and keys/values from different inputs)."""

  def __init__(self, width: int, heads: int, config: VisualizerConfig, *, rngs: nnx.Rngs):
    dh = width // heads
    kw = dict(dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype), rngs=rngs)
    init = nnx.initializers.xavier_uniform()
    proj = lambda: nnx.LinearGeneral(width, (heads, dh), **kw,
                                      kernel_init=logical_init(init, "embed", "heads", "head_dim"),
                                      bias_init=logical_init(nnx.initializers.zeros, "heads", "head_dim"))
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = nnx.LinearGeneral((heads, dh), width, axis=(-2, -1), **kw,
                                 kernel_init=logical_init(init, "heads", "head_dim", "embed"),
                                 bias_init=logical_init(nnx.initializers.zeros, "embed"))

  def __call__(self, x_q: jax.Array, x_kv: jax.Array) -> jax.Array:
    q, k, v = self.query(x_q), self.key(x_kv), self.value(x_kv)
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return self.out(jnp.einsum("bhts,bshd->bthd", probs, v))


class _ResamplerLayer(nnx.Module):
  """queries += attn(norm_q(queries), norm_kv(tokens)); queries += mlp(norm_mlp(queries))."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    d = config.cross_attention_dim
    self.norm_q = _layer_norm(d, config, rngs)
    self.norm_kv = _layer_norm(d, config, rngs)
    self.attn = _Attention(d, config.resampler_heads, config, rngs=rngs)
    self.norm_mlp = _layer_norm(d, config, rngs)
    self.fc1 = _linear(d, 4 * d, ("embed", "mlp"), config, rngs)
    self.fc2 = _linear(4 * d, d, ("mlp", "embed"), config, rngs)

  def __call__(self, queries: jax.Array, tokens: jax.Array) -> jax.Array:
    queries = queries + self.attn(self.norm_q(queries), self.norm_kv(tokens))
    return queries + self.fc2(jax.nn.gelu(self.fc1(self.norm_mlp(queries)), approximate=False))


class Resampler(nnx.Module):
  """``num_queries`` learned queries cross-attend to the projected tokens.
  Params: queries, proj_in/*, layers/<i>/{norm_q,norm_kv,attn/{query,key,value,out},norm_mlp,fc1,fc2}/*,
  norm_out/*."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    d = config.cross_attention_dim
    init = logical_init(nnx.initializers.normal(d ** -0.5), "positions", "embed")
    self.queries = nnx.Param(init(rngs.params(), (config.num_queries, d), jnp.dtype(config.param_dtype)))
    self.proj_in = _linear(config.token_dim, d, ("vis_embed", "embed"), config, rngs)
    self.layers = nnx.List([_ResamplerLayer(config, rngs=rngs) for _ in range(config.resampler_layers)])
    self.norm_out = _layer_norm(d, config, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, m, Dv] -> [B, num_queries, cross_dim]."""
    x = self.proj_in(tokens)
    q = jnp.broadcast_to(self.queries[...].astype(x.dtype), (x.shape[0], *self.queries.shape))
    for layer in self.layers:
      q = layer(q, x)
    return self.norm_out(q)


# ----------------------------------------------------------------------------- the visualizer


class DraftDecoder(nnx.Module):
  """Visual tokens [B, m, Dv] -> a draft of the clean sample [B, C, S, S] (NCHW, the UNet's
  layout), by regression. Each token: fc1 (Dv -> 8w) -> GELU; the m tokens' features are
  mixed by a learned [m, m] matrix ``mix`` (identity at init), since an encoder's tokens
  carry more than their own cell (SigLIP's each the whole image, the toy's windowed
  encoder's its 2 x 2-cell quadrant); then fc2 (-> r*r*w/2), unfolded
  over the r x r pixels the token's grid cell covers (r = S / sqrt(m)); then three 3x3
  convs (w/2 -> w -> w -> C, GELU between) mix neighbouring cells. w = ``draft_width``.
  Params: fc1/{kernel,bias}, mix, fc2/..., conv1/..., conv2/..., conv3/...."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    w, c = config.draft_width, config
    self.side = config.grid_side
    self.cell = config.sample_size // self.side
    self.features = w // 2
    self.fc1 = _linear(c.token_dim, 8 * w, ("vis_embed", "mlp"), c, rngs)
    self.mix = nnx.Param(logical_init(lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype), "positions",
                                      "positions")(None, (c.num_tokens, c.num_tokens), jnp.dtype(c.param_dtype)))
    self.fc2 = _linear(8 * w, self.cell * self.cell * self.features, ("mlp", "channels"), c, rngs)
    self.conv1 = _conv(self.features, w, c, rngs)
    self.conv2 = _conv(w, w, c, rngs)
    self.conv3 = _conv(w, c.channels, c, rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, k, r = tokens.shape[0], self.side, self.cell
    h = jax.nn.gelu(self.fc1(tokens))                                     # [B, m, 8w]
    h = jnp.einsum("bmf,mn->bnf", h, self.mix[...].astype(h.dtype))      # token n reads all m
    cells = self.fc2(h)                                                   # [B, m, r*r*F]
    cells = cells.reshape(b, k, k, r, r, self.features).transpose(0, 1, 3, 2, 4, 5)
    x = cells.reshape(b, k * r, k * r, self.features)                     # [B, S, S, F]
    x = self.conv3(jax.nn.gelu(self.conv2(jax.nn.gelu(self.conv1(x)))))  # [B, S, S, C]
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)


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


def _static_number(x) -> float | None:
  """x as a Python float when it is concrete, else None (a tracer)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


class Visualizer(nnx.Module):
  """Adapter + diffusers UNet (+ frozen VAE in latent mode). See the module docstring."""

  # everything but the VAE trains (use as the optimizer's ``wrt``)
  TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vae")))

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.adapter = MlpAdapter(config, rngs=rngs) if config.adapter == "mlp" else Resampler(config, rngs=rngs)
    if config.token_positions:
      init = logical_init(nnx.initializers.normal(config.token_dim ** -0.5), "positions", "vis_embed")
      self.token_positions = nnx.Param(init(rngs.params(), (config.num_tokens, config.token_dim),
                                            jnp.dtype(config.param_dtype)))
    else:
      self.token_positions = None
    self.draft = DraftDecoder(config, rngs=rngs) if config.draft_width else None
    param_dtype = jnp.dtype(config.param_dtype)
    self.unet = _to_params(_init_weights(_unet_module(config), rngs.params()), param_dtype)
    if config.mode == "latent":
      self.vae = _to_params(_init_weights(_vae_module(config), rngs.params()), param_dtype)
    else:
      self.vae = None

  # --- parameters
  def unet_params(self) -> dict:
    """The UNet's plain nested ``params`` dict (for ``FlaxUNet2DConditionModel.apply``)."""
    return _to_plain(self.unet)

  def vae_params(self) -> dict | None:
    """The VAE's plain nested ``params`` dict, or None in pixel mode."""
    return None if self.vae is None else _to_plain(self.vae)

  def load_unet_params(self, params: Mapping) -> None:
    """Sets the UNet from a diffusers Flax ``params`` nested dict (e.g. what
    ``FlaxUNet2DConditionModel.from_pretrained(..., from_pt=True)`` returns); the keys and
    shapes must match this config's UNet exactly; values are cast to ``param_dtype``."""
    _load_tree(self.unet, params, "unet")

  def load_vae_params(self, params: Mapping) -> None:
    """As ``load_unet_params``, for the VAE (latent mode)."""
    if self.vae is None:
      raise ValueError("this visualizer has no VAE (pixel mode)")
    _load_tree(self.vae, params, "vae")

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
    out = _unet_module(self.config).apply({"params": self.unet_params()}, x, timesteps, cond.context,
                                          train=train, rngs=rngs)
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
    posterior = _vae_module(self.config).apply({"params": vae}, jnp.transpose(images, (0, 3, 1, 2)),
                                               method=FlaxAutoencoderKL.encode).latent_dist
    latents = posterior.mean if rng is None else posterior.sample(rng)  # NHWC
    latents = jax.lax.stop_gradient(latents.astype(jnp.float32) * self.config.vae_scaling_factor)
    return jnp.transpose(latents, (0, 3, 1, 2))

  def decode(self, x: jax.Array) -> jax.Array:
    """Inverse of ``encode``: NCHW sample -> images [B, H, W, 3] float32 clipped to [-1, 1]."""
    x = jnp.transpose(x.astype(jnp.float32), (0, 2, 3, 1))  # NHWC
    if self.config.mode == "latent":
      out = _vae_module(self.config).apply({"params": self.vae_params()}, x / self.config.vae_scaling_factor,
                                           method=FlaxAutoencoderKL.decode).sample  # NCHW
      x = jnp.transpose(out.astype(jnp.float32), (0, 2, 3, 1))
    return jnp.clip(x, -1.0, 1.0)

  def _common(self) -> CommonSchedulerState:
    return CommonSchedulerState.create(_scheduler(self.config, "ddim"))

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
    a = self._common().alphas_cumprod[t][:, None, None, None]
    x_t = jnp.sqrt(a) * x0 + jnp.sqrt(1.0 - a) * noise
    target = noise if c.prediction_type == "epsilon" else jnp.sqrt(a) * noise - jnp.sqrt(1.0 - a) * x0
    cond, draft = self._condition(tokens)
    dropout = _field(c.unet, FlaxUNet2DConditionModel, "dropout") > 0
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
    g = _static_number(guidance)
    return self._sample(tokens, guidance, steps, rng, sampler, use_cfg=g is None or g != 1.0)

  def _sample(self, tokens, guidance, steps: int, rng, sampler: str, use_cfg: bool) -> jax.Array:
    c = self.config
    cond = self.condition(tokens)
    shape = (tokens.shape[0], c.channels, c.sample_size, c.sample_size)
    eps_fn = lambda x, t: self.guided_prediction(x, t, cond, guidance, use_cfg)
    return self.decode(denoise(c, eps_fn, shape, steps=steps, rng=rng, sampler=sampler,
                               init=cond.draft, strength=c.draft_strength))


def _clipping(config: VisualizerConfig, eps_fn, alphas_cumprod: jax.Array):
  """``eps_fn`` rewritten so that the x0 it implies is clipped to [-1, 1] (``clip_sample`` for
  DPM-Solver++, which diffusers' Flax version lacks: in pixel space at high noise,
  x0 = (x - sigma eps) / alpha amplifies the model's errors ~100x and the samples saturate)."""
  def clipped(x, t):
    out = eps_fn(x, t)
    a = jnp.sqrt(alphas_cumprod[t])
    s = jnp.sqrt(1.0 - alphas_cumprod[t])
    if config.prediction_type == "epsilon":
      x0 = jnp.clip((x - s * out) / a, -1.0, 1.0)
      return (x - a * x0) / s
    x0 = jnp.clip(a * x - s * out, -1.0, 1.0)  # v-prediction
    return (a * x - x0) / s
  return clipped


def strength_steps(steps: int, strength: float) -> int:
  """How many of ``steps`` an img2img run at ``strength`` takes: diffusers' int(steps * strength),
  but at least one (where diffusers would run none)."""
  return max(1, min(int(steps * strength), steps))


def denoise(config: VisualizerConfig, eps_fn, shape: tuple[int, ...], *, steps: int, rng: jax.Array,
            sampler: str = "ddim", init: jax.Array | None = None, strength: float = 1.0) -> jax.Array:
  """The sampling loop: noise of ``shape`` (NCHW) from ``rng``, then ``steps`` of diffusers'
  DDIM (eta 0) or DPM-Solver++ (order 2) with ``eps_fn(x, t) -> model output`` (epsilon or v,
  per ``config.prediction_type``), all inside one ``jax.lax.fori_loop``. Returns the final
  sample (DDIM: x_0; diffusers' Flax DPM-Solver stops at timestep 0, sigma ~ 0.01).

  With ``init`` (a clean sample of ``shape``) and ``strength`` < 1, as diffusers' img2img:
  ``init`` noised to the timestep of step ``steps - strength_steps(steps, strength)``, then
  the remaining steps."""
  scheduler = _scheduler(config, sampler)
  state = scheduler.set_timesteps(scheduler.create_state(), steps, shape)
  noise = jax.random.normal(rng, shape, jnp.float32)
  start = 0
  if init is not None and strength < 1.0:
    start = steps - strength_steps(steps, strength)
    x = scheduler.add_noise(state, init.astype(jnp.float32), noise, state.timesteps[start])
  else:
    x = noise * state.init_noise_sigma
  if config.clip_sample and sampler == "dpm":
    eps_fn = _clipping(config, eps_fn, state.common.alphas_cumprod)

  def body(i, carry):
    x, state = carry
    t = state.timesteps[i]
    return scheduler.step(state, eps_fn(x, t), t, x, return_dict=False)

  if sampler == "ddim":  # DDIM's state is constant: close over it (keeps num_inference_steps static)
    return jax.lax.fori_loop(start, steps, lambda i, x: body(i, (x, state))[0], x)
  return jax.lax.fori_loop(start, steps, body, (x, state))[0]


def check_sampling(config: VisualizerConfig, steps, guidance, sampler) -> None:
  """ValueErrors for bad sampling arguments."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  if steps > config.num_train_timesteps:
    raise ValueError(f"steps ({steps}) must be at most num_train_timesteps ({config.num_train_timesteps})")
  g = _static_number(guidance)
  if g is not None and not g >= 0:
    raise ValueError(f"guidance must be >= 0, got {guidance!r}")


def _check_seed(seed) -> int:
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
    raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
  return int(seed)


# ----------------------------------------------------------------------------- public functions


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


def _resize(images: jax.Array, size: int) -> jax.Array:
  if images.shape[1] == size and images.shape[2] == size:
    return images
  return jax.image.resize(images, (images.shape[0], size, size, images.shape[3]), "bilinear", antialias=True)


@functools.partial(jax.jit, static_argnames=("graphdef", "m"))
def _encode_jit(graphdef, state, images, *, m):
  tower = nnx.merge(graphdef, state)
  return visual_tokens(tower, _resize(images, tower.config.image_size), m)


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


# ----------------------------------------------------------------------------- training model


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
    x = _resize(images.astype(jnp.float32), self.config.vision.image_size)
    return jax.lax.stop_gradient(visual_tokens(self.vision, x, self.config.visualizer.num_tokens))

  def loss(self, images: jax.Array, rng: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """images [B, H, W, 3] in [-1, 1] (visualizer resolution) -> (loss, {"loss_diffusion"})."""
    self.visualizer._check_images(images)
    return self.visualizer.loss(images, self.tokens(images), rng)
