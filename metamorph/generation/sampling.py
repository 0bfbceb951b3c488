"""How the decoder chooses a text token and guides a visual one, in jitted code.

Text: the LM head's logits -> repetition penalty -> greedy (temperature 0) or temperature /
top-k / top-p sampling. Visual tokens under classifier-free guidance: with c and u the
conditional and unconditional rows' vision-head outputs (L2-normalised), the visual token
is ``normalize(u + guidance * (c - u))``. The key of row r at step i is
``fold_in(fold_in(key(seed), r), i)``, so a sequence's sample depends on its seed and row,
not on the rest of the batch.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from metamorph.models.siglip import l2_normalize


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How text tokens are chosen and visual tokens guided. temperature 0 = greedy;
  top_k 0 and top_p 1 disable those filters; repetition_penalty follows transformers
  (logits of tokens seen in the prompt or the answer: positive / p, negative * p)."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  repetition_penalty: float = 1.0
  guidance: float = 1.0  # classifier-free guidance on visual tokens; 1 = none
  max_images: int = 4    # images per answer

  def __post_init__(self):
    checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
              (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
              (self.repetition_penalty > 0, "repetition_penalty must be > 0"),
              (self.guidance >= 0, "guidance must be >= 0"), (self.max_images >= 0, "max_images must be >= 0")]
    for ok, message in checks:
      if not ok:
        raise ValueError(f"{message}, got {self}")

  @property
  def uses_guidance(self) -> bool:
    return self.guidance != 1.0

  def traced(self) -> dict[str, jax.Array]:
    """The parameters as traced values (changing one does not recompile)."""
    return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p), "repetition_penalty": jnp.float32(self.repetition_penalty),
            "guidance": jnp.float32(self.guidance)}


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
  """logits [B, V], seen [B, V] bool: seen tokens' logits / penalty if positive, * penalty if not."""
  return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
  """[B, V] -> the same with -inf outside each row's top-k, then outside its nucleus: the
  fewest highest tokens whose probability (after top-k) reaches top_p. top_k 0 = all; ties
  with the last kept logit are kept."""
  v = logits.shape[-1]
  ordered = -jnp.sort(-logits, axis=-1)  # [B, V] descending
  ranks = jnp.arange(v)
  in_k = (top_k <= 0) | (ranks < top_k)  # [V]
  probs = jax.nn.softmax(jnp.where(in_k, ordered, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the higher tokens
  keep = in_k & ((before < top_p) | (ranks == 0))  # a prefix of each row
  threshold = jnp.take_along_axis(ordered, keep.sum(-1, keepdims=True) - 1, axis=-1)  # [B, 1]
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def choose_text(logits: jax.Array, keys: jax.Array, sampling: dict[str, jax.Array]) -> jax.Array:
  """logits [B, V] (penalised and masked), keys [B] -> token ids [B] int32: argmax when
  temperature is 0, else a sample of softmax(filter_logits(logits / temperature))."""
  def greedy():
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sample():
    scaled = logits / sampling["temperature"]
    scaled = jax.lax.cond((sampling["top_k"] > 0) | (sampling["top_p"] < 1),
                          lambda: filter_logits(scaled, sampling["top_k"], sampling["top_p"]), lambda: scaled)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  return jax.lax.cond(sampling["temperature"] > 0, sample, greedy)


def guide(predicted: jax.Array, partner: jax.Array, guidance: jax.Array) -> jax.Array:
  """predicted [B, Dv] unit visual tokens; partner [B] the row of each row's unconditional
  twin (itself when none) -> normalize(u + guidance (c - u)) where a twin exists."""
  u = predicted[partner]
  mixed = l2_normalize(u + guidance * (predicted - u))
  return jnp.where((partner != jnp.arange(partner.shape[0]))[:, None], mixed, predicted)


def step_keys(key: jax.Array, rows: jax.Array, step: jax.Array) -> jax.Array:
  """The sampling key of each row at ``step``: fold_in(fold_in(key, row), step)."""
  return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(key, r), step))(rows)
