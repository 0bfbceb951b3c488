"""The unified MetaMorph model: an LLM that reads and predicts SigLIP visual tokens.

Inputs interleave text tokens and visual slots. A slot's embedding is the input
projector (the input interface ``image_interface``, mlp2x_gelu by default) applied to its visual token (with ``slot_embeddings``, plus a
learned vector for the token's index in its image); the vision head maps the
last hidden state to an L2-normalised visual token. The VPiT loss is
cross-entropy on response text plus ``vision_coef`` x (-cosine) between the
vision head's output at position i and the target visual token at i + 1.

Batch contract (all [B, T] unless stated; produced by ``metamorph.data``):
  input_ids           int32, any id at visual slots (ignored there)
  positions           int32 RoPE positions
  segment_ids         int32, 0 = padding, packed records count 1, 2, ...
  labels              int32 aligned with input_ids: the id to predict *at* t
                      (from position t - 1); -100 = no text loss
  visual_index        int32, -1 for text, else an index into the row's
                      flattened visual tokens [I * m]
  visual_target_mask  bool, True at response visual slots (regression targets)
  visual_tokens       float [B, I, m, Dv], L2-normalised SigLIP tokens
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.layers.dense import dtypes, table
from metamorph.layers.mlp import Mlp
from metamorph.layers import target_logits
from metamorph.models.config import ModelConfig
from metamorph.models.interfaces import build_interface, check_interface
from metamorph.models.llama import Llama, LlamaConfig
from metamorph.models.siglip import SiglipVisionConfig, SiglipVisionTower, l2_normalize, visual_tokens
from metamorph.sharding import constrain
from metamorph.tokens import IGNORE


@dataclasses.dataclass(frozen=True)
class MetaMorphConfig(ModelConfig):
  llm: LlamaConfig
  vision_dim: int               # width Dv of the visual tokens (SigLIP hidden size)
  num_visual_tokens: int = 64   # m tokens per image
  vision_coef: float = 1.0      # weight of the cosine loss; 0 in the connector stage
  # a learned vector per visual slot (a token's index in its image) added after the projector,
  # so the LLM reads a token's grid cell directly, not from RoPE offsets (toy; off for converted models)
  slot_embeddings: bool = False
  image_start_id: int = -1      # token ids set by ``add_image_tokens``
  image_end_id: int = -1
  vision: SiglipVisionConfig | None = None  # the (frozen) encoder; None: tokens come from outside
  image_interface: str = "mlp2x_gelu"  # visual tokens -> LLM embeddings (``interfaces.INTERFACES``)

  def __post_init__(self):
    if isinstance(self.llm, dict):
      object.__setattr__(self, "llm", LlamaConfig.from_dict(self.llm))
    if isinstance(self.vision, dict):
      object.__setattr__(self, "vision", SiglipVisionConfig.from_dict(self.vision))
    if self.vision is not None and self.vision.hidden_size != self.vision_dim:
      raise ValueError(f"vision_dim ({self.vision_dim}) must equal the encoder width "
                       f"({self.vision.hidden_size})")
    if self.vision_dim <= 0 or self.num_visual_tokens <= 0:
      raise ValueError(f"vision_dim and num_visual_tokens must be positive, got "
                       f"{self.vision_dim} and {self.num_visual_tokens}")
    if self.vision_coef < 0:
      raise ValueError(f"vision_coef must be >= 0, got {self.vision_coef}")
    check_interface(self.image_interface)


class MetaMorph(nnx.Module):
  """LLM + input projector + vision head (+ the SigLIP encoder when configured)."""

  def __init__(self, config: MetaMorphConfig, *, rngs: nnx.Rngs, llm: Llama | None = None,
               vision: SiglipVisionTower | None = None):
    if llm is not None and llm.config != config.llm:
      raise ValueError("the given llm's config differs from config.llm")
    if vision is not None and vision.config != config.vision:
      raise ValueError("the given vision tower's config differs from config.vision")
    self.config = config
    c = config.llm
    kw = dict(rngs=rngs, **dtypes(c))
    self.llm = llm if llm is not None else Llama(c, rngs=rngs)
    if config.vision is not None:
      self.vision = vision if vision is not None else SiglipVisionTower(config.vision, rngs=rngs)
    else:
      self.vision = None
    self.projector = build_interface(config.image_interface, config.vision_dim, c.hidden_size, **kw)
    if not self.projector.tokenwise:
      raise ValueError(f"MetaMorph feeds visual tokens to the LLM one per position; the input interface "
                       f"{config.image_interface!r} is not token-wise")
    if config.slot_embeddings:  # under projector/: trains wherever the projector does
      self.projector.slots = table((config.num_visual_tokens, c.hidden_size), (None, "embed"),
                                   nnx.initializers.zeros, param_dtype=c.param_dtype, rngs=rngs)  # [m, H]
    # Linear(H -> H), GELU, Linear(H -> Dv)
    self.vision_head = Mlp(c.hidden_size, c.hidden_size, config.vision_dim, axes=("embed", "vis_embed"), **kw)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """images [..., H, W, 3] in [-1, 1] -> visual tokens [..., m, Dv] (float32, unit norm)."""
    if self.vision is None:
      raise ValueError("this model has no vision encoder (MetaMorphConfig.vision is None)")
    lead = images.shape[:-3]
    tokens = visual_tokens(self.vision, images.reshape(-1, *images.shape[-3:]), self.config.num_visual_tokens)
    return tokens.reshape(*lead, *tokens.shape[1:])

  def project_visual(self, tokens: jax.Array, slot: jax.Array) -> jax.Array:
    """Visual tokens [..., Dv] at slots [...] (index in their image) -> embeddings [..., H]."""
    out = self.projector(tokens)
    if self.config.slot_embeddings:
      out = out + self.projector.slots[...][slot].astype(out.dtype)
    return out

  def embed(self, input_ids: jax.Array, visual_index: jax.Array,
            visual_tokens: jax.Array) -> jax.Array:
    """Text embeddings with visual slots replaced by projected visual tokens -> [B, T, H]."""
    text = self.llm.embed(input_ids)  # [B, T, H]
    slot = jnp.maximum(visual_index, 0) % self.config.num_visual_tokens  # [B, T]
    visual = self.project_visual(gather_visual(visual_tokens, visual_index), slot)  # [B, T, H]
    return constrain(jnp.where((visual_index >= 0)[..., None], visual.astype(text.dtype), text),
                     "batch", "length", "act_embed")

  def predict_visual(self, hidden: jax.Array) -> jax.Array:
    """[B, T, H] -> L2-normalised visual tokens [B, T, Dv] (float32)."""
    return l2_normalize(self.vision_head(hidden))

  def hidden(self, batch: dict[str, jax.Array]) -> jax.Array:
    """-> the LLM's last hidden states [B, T, H] (after its final norm), which the LM head
    (``llm.logits``) and the vision head (``predict_visual``) read."""
    embeds = self.embed(batch["input_ids"], batch["visual_index"], batch["visual_tokens"])
    hidden, _ = self.llm.forward(embeds, positions=batch["positions"], segment_ids=batch["segment_ids"])
    return hidden

  def __call__(self, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """-> (logits [B, T, V] float32, predicted visual tokens [B, T, Dv] float32)."""
    hidden = self.hidden(batch)
    return self.llm.logits(hidden), self.predict_visual(hidden)


def gather_visual(visual_tokens: jax.Array, visual_index: jax.Array) -> jax.Array:
  """visual_tokens [B, I, m, Dv] or [B, I*m, Dv], visual_index [B, T] -> [B, T, Dv]
  (rows of text positions, index -1, hold token 0 and must be masked by the caller)."""
  b, dv = visual_tokens.shape[0], visual_tokens.shape[-1]
  flat = visual_tokens.reshape(b, -1, dv)
  return jnp.take_along_axis(flat, jnp.maximum(visual_index, 0)[..., None], axis=1)


def loss_masks(batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(text targets, visual targets), each [B, T - 1] bool: position t predicts t + 1
  within the same (non-padding) segment."""
  segments = batch["segment_ids"]
  same_segment = (segments[:, 1:] == segments[:, :-1]) & (segments[:, 1:] > 0)
  return ((batch["labels"][:, 1:] != IGNORE) & same_segment,
          batch["visual_target_mask"][:, 1:] & same_segment)


def vpit_loss(logits_fn: Callable[[jax.Array], jax.Array], hidden: jax.Array, predicted: jax.Array,
              batch: dict[str, jax.Array], vision_coef: float, counts: tuple[jax.Array, jax.Array] | None = None,
              logits_chunk: int = target_logits.CHUNK) -> tuple[jax.Array, dict[str, jax.Array]]:
  """VPiT loss -> (total, {loss_text, loss_vision, text_tokens, visual_targets}).

  ``hidden`` [B, T, H]: the LLM's last hidden states; ``logits_fn`` maps them to logits
  ([B, C, H] -> [B, C, V], the LM head), run only on the positions with a text target
  (``layers.target_logits``, in chunks of ``logits_chunk`` positions; 0: on every position at
  once); ``predicted`` [B, T, Dv]: the vision head's output.
  Position t predicts the label / visual token at t + 1 within the same segment.
  Sums are divided by ``counts`` = (text targets, visual targets), by default this
  batch's (pass the global counts when accumulating micro-batches); 0 targets
  give a loss of 0.
  """
  text_mask, vis_mask = loss_masks(batch)
  text_count, vis_count = counts if counts is not None else (text_mask.sum(), vis_mask.sum())
  nll = target_logits.target_nll(logits_fn, hidden[:, :-1], batch["labels"][:, 1:], text_mask, logits_chunk)
  loss_text = nll / jnp.maximum(text_count, 1)

  targets = jax.lax.stop_gradient(gather_visual(batch["visual_tokens"], batch["visual_index"])[:, 1:])
  cosine = jnp.sum(predicted[:, :-1].astype(jnp.float32) * targets.astype(jnp.float32), axis=-1)
  loss_vision = -jnp.where(vis_mask, cosine, 0.0).sum() / jnp.maximum(vis_count, 1)

  total = loss_text + vision_coef * loss_vision
  return total, {"loss_text": loss_text, "loss_vision": loss_vision,
                 "text_tokens": text_mask.sum(), "visual_targets": vis_mask.sum()}
