"""SigLIP vision and text towers in Flax NNX, and MetaMorph's visual tokens.

Numerics follow transformers' ``SiglipVisionModel`` / ``SiglipTextModel``:
pre-LN encoder layers, tanh-approximated GELU, LayerNorm statistics and softmax
in float32, matmuls in ``dtype``. Images are NHWC floats already normalised to
[-1, 1] (mean = std = 0.5). One addition: ``SiglipVisionConfig.attention_window``
(default 0, transformers' global attention) restricts the vision encoder to windows.

Visual tokens (DESIGN.md, "Visual tokens"): the last encoder layer's output
(before ``post_ln``) on the square patch grid, bilinearly reduced to
sqrt(m) x sqrt(m) exactly as ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` does it (no antialiasing), then L2-normalised per token.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.layers.attention import VIT_NAMES, Attention
from metamorph.layers.dense import conv, dense, dtypes, table
from metamorph.layers.mlp import ACTIVATIONS, Mlp
from metamorph.layers.norms import layer_norm
from metamorph.models.config import ModelConfig
from metamorph.sharding import constrain, logical_init

# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class _EncoderConfig(ModelConfig):
  """Fields shared by both towers; defaults are transformers' (SigLIP base)."""
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  layer_norm_eps: float = 1e-6
  hidden_act: str = "gelu_pytorch_tanh"
  dtype: str = "float32"        # compute dtype
  param_dtype: str = "float32"  # storage dtype

  def __post_init__(self):
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{type(self).__name__}.{name} must be positive, got {getattr(self, name)}")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of "
                       f"num_attention_heads ({self.num_attention_heads})")
    if self.hidden_act not in ACTIVATIONS:
      raise ValueError(f"hidden_act {self.hidden_act!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)  # raises on a bad dtype name

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads



  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides):
    """From a transformers config dict. Keys we do not model (dropout, token ids,
    ``architectures``, HF's own ``dtype``) are ignored; ``overrides`` set our fields."""
    names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
    values = {k: hf[k] for k in names if hf.get(k) is not None}
    return cls(**{**values, **overrides})



def _square_size(value: int | list | tuple, name: str) -> int:
  """An int, or a pair of equal ints as transformers allows, as one int."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ValueError(f"{name} must be square, got {value}")
    value = value[0]
  return int(value)


@dataclasses.dataclass(frozen=True)
class SiglipVisionConfig(_EncoderConfig):
  """Vision tower: a ViT on ``image_size``^2 images cut into ``patch_size``^2 patches
  (``image_size // patch_size`` per side)."""
  image_size: int = 224
  patch_size: int = 16
  num_channels: int = 3
  vision_use_head: bool = True  # the multi-head attention pooling (MAP) head
  # 0: global attention (SigLIP). w > 0: each patch attends only within its w x w block of
  # patches (non-overlapping windows, as ViTDet's window blocks), so each token describes its
  # own block; the MAP head still pools over all of them. Not a transformers field.
  attention_window: int = 0

  def __post_init__(self):
    object.__setattr__(self, "image_size", _square_size(self.image_size, "image_size"))
    object.__setattr__(self, "patch_size", _square_size(self.patch_size, "patch_size"))
    super().__post_init__()
    # like transformers' stride-patch_size convolution, trailing pixels that fill no whole
    # patch are dropped: SO400M/14@384 has 27 x 27 patches
    if self.image_size < self.patch_size:
      raise ValueError(f"image_size ({self.image_size}) must be at least patch_size ({self.patch_size})")
    w = self.attention_window
    if w < 0 or (w and self.grid_size % w):
      raise ValueError(f"attention_window must be 0 (global) or divide the {self.grid_size} patches "
                       f"per side, got {w}")

  @property
  def grid_size(self) -> int:
    """Patches per side."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size ** 2

  def attention_mask(self) -> np.ndarray | None:
    """None (global attention), or bool [N, N]: True where patch i may attend to patch j,
    i.e. both lie in the same ``attention_window`` block of the row-major grid."""
    if not self.attention_window:
      return None
    rows, cols = np.divmod(np.arange(self.num_patches), self.grid_size)
    block = (rows // self.attention_window) * self.grid_size + cols // self.attention_window  # [N]
    return block[:, None] == block[None, :]


@dataclasses.dataclass(frozen=True)
class SiglipTextConfig(_EncoderConfig):
  """Text tower; ``projection_size`` (default ``hidden_size``) is the pooled width."""
  vocab_size: int = 32000
  max_position_embeddings: int = 64
  projection_size: int | None = None

  def __post_init__(self):
    if self.projection_size is None:
      object.__setattr__(self, "projection_size", self.hidden_size)
    super().__post_init__()


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """Both towers of a SigLIP model (``logit_scale``/``logit_bias`` are parameters)."""
  vision: SiglipVisionConfig = dataclasses.field(default_factory=SiglipVisionConfig)
  text: SiglipTextConfig = dataclasses.field(default_factory=SiglipTextConfig)

  def __post_init__(self):
    if not self.vision.vision_use_head:
      raise ValueError("a SigLIP model needs the vision MAP head (vision_use_head=True)")
    if self.vision.hidden_size != self.text.projection_size:
      raise ValueError(f"vision hidden_size ({self.vision.hidden_size}) must equal the text "
                       f"projection_size ({self.text.projection_size})")

  def to_dict(self) -> dict[str, Any]:
    return {"vision": self.vision.to_dict(), "text": self.text.to_dict()}

  @classmethod
  def from_dict(cls, data: Mapping[str, Any]) -> SiglipConfig:
    unknown = sorted(set(data) - {"vision", "text"})
    if unknown:
      raise ValueError(f"unknown SiglipConfig fields {unknown}; known: ['text', 'vision']")
    return cls(SiglipVisionConfig.from_dict(data.get("vision", {})),
               SiglipTextConfig.from_dict(data.get("text", {})))

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> SiglipConfig:
    """From a transformers ``SiglipConfig`` dict; ``overrides`` apply to both towers."""
    return cls(SiglipVisionConfig.from_hf(hf.get("vision_config") or {}, **overrides),
               SiglipTextConfig.from_hf(hf.get("text_config") or {}, **overrides))

  def replace(self, **changes) -> SiglipConfig:
    """Applies tower-field ``changes`` (e.g. ``dtype``) to both towers."""
    return SiglipConfig(self.vision.replace(**changes), self.text.replace(**changes))


# ----------------------------------------------------------------------------- layers


def _layer_norm(config: _EncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return layer_norm(config.hidden_size, config.layer_norm_eps, rngs=rngs, **dtypes(config))


def _embedding_param(rows: int, config: _EncoderConfig, rngs: nnx.Rngs) -> nnx.Param:
  """A learned position table [rows, D], normal(1/sqrt(D)) as transformers inits it."""
  return table((rows, config.hidden_size), ("positions", "embed"), nnx.initializers.normal(config.hidden_size ** -0.5),
               param_dtype=config.param_dtype, rngs=rngs)


def _attention(config: _EncoderConfig, rngs: nnx.Rngs) -> Attention:
  """Multi-head attention with biases (xavier-uniform kernels); queries and keys/values may
  come from different inputs (the MAP head)."""
  return Attention(config.hidden_size, config.num_attention_heads, config.head_dim, names=VIT_NAMES,
                   rngs=rngs, **dtypes(config))


def _mlp(config: _EncoderConfig, rngs: nnx.Rngs) -> Mlp:
  """fc2(act(fc1(x))), xavier-uniform kernels, biases init normal(1e-6) as big_vision."""
  return Mlp(config.hidden_size, config.intermediate_size, config.hidden_size, act=ACTIVATIONS[config.hidden_act],
             hidden_axes=("batch", "length", "act_mlp"), kernel_init=nnx.initializers.xavier_uniform(),
             bias_init=nnx.initializers.normal(1e-6), rngs=rngs, **dtypes(config))


class EncoderLayer(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(self, config: _EncoderConfig, *, rngs: nnx.Rngs):
    self.ln1 = _layer_norm(config, rngs)
    self.attn = _attention(config, rngs)
    self.ln2 = _layer_norm(config, rngs)
    self.mlp = _mlp(config, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """x [B, T, D], mask bool broadcastable to [B, T, S] (True = attend) -> [B, T, D]."""
    h = self.ln1(x)
    x = x + self.attn(h, h, mask)
    x = x + self.mlp(self.ln2(x))
    return constrain(x, "batch", "length", "act_embed")


class Encoder(nnx.Module):
  """A stack of ``EncoderLayer``s."""

  def __init__(self, config: _EncoderConfig, *, rngs: nnx.Rngs):
    self.layers = nnx.List([EncoderLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array | None = None, *,
               return_hidden_states: bool = False) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """x [B, T, D], mask as ``EncoderLayer``'s -> (last layer output [B, T, D],
    (x, layer 1, ..., layer L) or None)."""
    states = [x]
    for layer in self.layers:
      x = layer(x, mask)
      states.append(x)
    return x, tuple(states) if return_hidden_states else None


class MapHead(nnx.Module):
  """Multi-head attention pooling: a learned probe attends over the tokens, then
  ``h + mlp(ln(h))`` (transformers' ``SiglipMultiheadAttentionPoolingHead``)."""

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
    self.probe = table((1, 1, config.hidden_size), (None, None, "embed"), nnx.initializers.xavier_uniform(),
                       param_dtype=config.param_dtype, rngs=rngs)
    self.attn = _attention(config, rngs)
    self.ln = _layer_norm(config, rngs)
    self.mlp = _mlp(config, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, N, D] -> [B, D]."""
    probe = jnp.broadcast_to(self.probe[...], (x.shape[0], 1, x.shape[-1])).astype(x.dtype)
    h = self.attn(probe, x)  # [B, 1, D]
    h = h + self.mlp(self.ln(h))
    return h[:, 0]


# ----------------------------------------------------------------------------- towers


class SiglipVisionOutput(NamedTuple):
  last_hidden_state: jax.Array                      # [B, N, D], after post_ln
  pooled: jax.Array | None                          # [B, D] from the MAP head, or None
  encoder_output: jax.Array                         # [B, N, D], last layer, before post_ln
  hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + every layer, L+1 x [B, N, D]


class SiglipTextOutput(NamedTuple):
  last_hidden_state: jax.Array                      # [B, T, D], after final_ln
  pooled: jax.Array                                 # [B, P]: head(last token)
  hidden_states: tuple[jax.Array, ...] | None = None  # embeddings + every layer, L+1 x [B, T, D]


class SiglipVisionTower(nnx.Module):
  """SigLIP ViT. ``tower(images [B, H, W, C] in [-1, 1])`` -> ``SiglipVisionOutput``."""

  def __init__(self, config: SiglipVisionConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(c.dtype)
    self.patch_embed = conv(c.num_channels, c.hidden_size, (c.patch_size,) * 2, ("patch", "patch", "channels", "embed"),
                            strides=(c.patch_size,) * 2, padding="VALID", rngs=rngs, **dtypes(c))
    self.pos_embed = _embedding_param(c.num_patches, c, rngs)  # [N, D]
    self.encoder = Encoder(c, rngs=rngs)
    self.post_ln = _layer_norm(c, rngs)
    self.head = MapHead(c, rngs=rngs) if c.vision_use_head else None

  def embed(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> patch + position embeddings [B, N, D] (row-major patches)."""
    c = self.config
    expected = (c.image_size, c.image_size, c.num_channels)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(f"images must be [B, {c.image_size}, {c.image_size}, {c.num_channels}] "
                       f"(NHWC), got {tuple(images.shape)}")
    x = self.patch_embed(images.astype(self.dtype))  # [B, g, g, D]
    x = x.reshape(x.shape[0], -1, x.shape[-1]) + self.pos_embed[...].astype(self.dtype)
    return constrain(x, "batch", "length", "act_embed")

  def features(self, images: jax.Array) -> jax.Array:
    """[B, H, W, C] -> last encoder layer output [B, N, D], before ``post_ln``."""
    return self.encoder(self.embed(images), self.config.attention_mask())[0]

  def __call__(self, images: jax.Array, *, return_hidden_states: bool = False) -> SiglipVisionOutput:
    x, states = self.encoder(self.embed(images), self.config.attention_mask(),
                             return_hidden_states=return_hidden_states)
    last = self.post_ln(x)
    pooled = self.head(last) if self.head is not None else None
    return SiglipVisionOutput(last, pooled, x, states)


class SiglipTextTower(nnx.Module):
  """SigLIP text transformer. ``tower(input_ids [B, T])`` -> ``SiglipTextOutput``.

  Pooling takes the LAST position (SigLIP pads to ``max_length``), as transformers does.
  """

  def __init__(self, config: SiglipTextConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    self.dtype = jnp.dtype(c.dtype)
    self.token_embed = nnx.Embed(
        c.vocab_size, c.hidden_size, **dtypes(c),
        embedding_init=logical_init(nnx.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0),
                                    "vocab", "embed"), rngs=rngs)
    self.pos_embed = _embedding_param(c.max_position_embeddings, c, rngs)  # [P, D]
    self.encoder = Encoder(c, rngs=rngs)
    self.final_ln = _layer_norm(c, rngs)
    # No logical name for the projection width; it stays replicated.
    self.head = dense(c.hidden_size, c.projection_size, ("embed", None),
                      kernel_init=nnx.initializers.xavier_uniform(), rngs=rngs, **dtypes(c))

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               return_hidden_states: bool = False) -> SiglipTextOutput:
    """input_ids [B, T] int; attention_mask [B, T] (1 = real token, 0 = padding keys)."""
    t = input_ids.shape[-1]
    if t > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {t} exceeds max_position_embeddings "
                       f"({self.config.max_position_embeddings})")
    x = self.token_embed(input_ids) + self.pos_embed[:t].astype(self.dtype)  # [B, T, D]
    x = constrain(x, "batch", "length", "act_embed")
    key_mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, :]  # [B, 1, T]
    x, states = self.encoder(x, key_mask, return_hidden_states=return_hidden_states)
    last = self.final_ln(x)
    return SiglipTextOutput(last, self.head(last[:, -1]), states)


# ----------------------------------------------------------------------------- SigLIP


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """``x / max(||x||, eps)`` along ``axis`` in float32 (torch's ``F.normalize``)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def sigmoid_logits(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                   logit_bias: jax.Array) -> jax.Array:
  """[B_i, P], [B_t, P] -> logits_per_text [B_t, B_i] = <t, i> * exp(scale) + bias,
  on L2-normalised embeddings, in float32."""
  scale = jnp.exp(jnp.reshape(logit_scale, ()).astype(jnp.float32))
  bias = jnp.reshape(logit_bias, ()).astype(jnp.float32)
  sims = jnp.einsum("tp,ip->ti", l2_normalize(text_emb), l2_normalize(image_emb),
                    precision=jax.lax.Precision.HIGHEST)
  return sims * scale + bias


def sigmoid_loss(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array,
                 logit_bias: jax.Array) -> jax.Array:
  """SigLIP pairwise sigmoid loss (scalar): pair (i, j) is positive iff i == j.

  ``-mean_t sum_i log_sigmoid(z_ti * logit_ti)`` with z = +1 on the diagonal, -1
  elsewhere (transformers' ``return_loss``; big_vision's ``/ batch_size``).
  """
  logits = sigmoid_logits(image_emb, text_emb, logit_scale, logit_bias)  # [B, B]
  labels = 2.0 * jnp.eye(logits.shape[0], logits.shape[1]) - 1.0
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(labels * logits), axis=-1))


class Siglip(nnx.Module):
  """Both towers plus the sigmoid loss's learned temperature and bias.

  ``logit_scale`` starts at log(10) and ``logit_bias`` at -10 (the SigLIP paper's
  init); converted checkpoints overwrite both.
  """

  def __init__(self, config: SiglipConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.vision = SiglipVisionTower(config.vision, rngs=rngs)
    self.text = SiglipTextTower(config.text, rngs=rngs)
    param_dtype = jnp.dtype(config.vision.param_dtype)
    init = lambda v: table((1,), (None,), nnx.initializers.constant(v), param_dtype=param_dtype)
    self.logit_scale = init(math.log(10.0))  # [1]
    self.logit_bias = init(-10.0)            # [1]

  def __call__(self, images: jax.Array, input_ids: jax.Array,
               attention_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """-> (image embeddings [B_i, D], text embeddings [B_t, D]), L2-normalised, float32."""
    image_emb = self.vision(images).pooled
    text_emb = self.text(input_ids, attention_mask).pooled
    return l2_normalize(image_emb), l2_normalize(text_emb)

  def loss(self, images: jax.Array, input_ids: jax.Array,
           attention_mask: jax.Array | None = None) -> jax.Array:
    """Sigmoid loss of matching pairs (images[i], input_ids[i])."""
    image_emb, text_emb = self(images, input_ids, attention_mask)
    return sigmoid_loss(image_emb, text_emb, self.logit_scale[...], self.logit_bias[...])


# ----------------------------------------------------------------------------- visual tokens


def bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] float32 weights of 1-D linear interpolation, as torch's
  ``interpolate(mode="bilinear", align_corners=False)`` without antialiasing:
  source = (dst + 0.5) * in / out - 0.5, clamped at 0; the upper neighbour is
  clamped to the last index."""
  src = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lo), 1.0 - frac)
  np.add.at(weights, (rows, hi), frac)
  return weights.astype(np.float32)


def _isqrt_exact(n: int, what: str) -> int:
  """sqrt(n) for a positive perfect square ``n``, else a ValueError about ``what``."""
  if n <= 0 or math.isqrt(n) ** 2 != n:
    raise ValueError(f"{what} must be a positive perfect square, got {n}")
  return math.isqrt(n)


def reduce_grid(features: jax.Array, m: int) -> jax.Array:
  """[B, N, D] tokens on a square row-major grid -> [B, m, D] float32 tokens on a
  sqrt(m) x sqrt(m) grid, by bilinear interpolation (down- or up-sampling)."""
  b, n, d = features.shape
  g = _isqrt_exact(n, "the number of patch tokens N")
  k = _isqrt_exact(m, "the number of visual tokens m")
  weights = jnp.asarray(bilinear_matrix(k, g))  # [k, g]
  grid = features.astype(jnp.float32).reshape(b, g, g, d)
  out = jnp.einsum("ih,jw,bhwd->bijd", weights, weights, grid, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(b, m, d)


def visual_tokens(tower: SiglipVisionTower, images: jax.Array, m: int) -> jax.Array:
  """MetaMorph visual tokens: images [B, H, W, C] in [-1, 1] -> [B, m, D] float32,
  each of unit L2 norm (last encoder layer, before ``post_ln``; bilinear grid reduction)."""
  _isqrt_exact(m, "the number of visual tokens m")
  return l2_normalize(reduce_grid(tower.features(images), m))
