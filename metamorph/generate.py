"""Batched, KV-cached, jitted decoding of interleaved text and visual tokens.

DESIGN.md, "Decoding". One jitted function per bucketed shape runs the prefill
of every prompt of the batch and then a ``lax.while_loop`` over steps; the KV
cache serves text and visual steps of every sequence at once, each sequence in
its own mode:

- text: the LM head's logits -> repetition penalty -> greedy (temperature 0)
  or temperature / top-k / top-p sampling. ``<image_end>`` is never sampled;
  ``<image_start>`` only while the answer has fewer than ``max_images`` images
  and the whole image (m visual steps and ``<image_end>``) still fits in the
  sequence's step budget. A stop token ends the sequence.
- visual, the m steps after ``<image_start>``: the last hidden state -> vision
  head -> L2-normalise -> kept as visual token k -> input projector -> next
  input embedding. After m visual steps ``<image_end>`` is forced, then text
  resumes. A prompt that ends with ``<image_start>`` starts in visual mode.

Prompts are left-padded into one batch (segment id 0 marks the padding), so
every sequence writes the same cache slot at each step while its RoPE position
counts only its own tokens. Every step counts against ``max_new_tokens`` (and
against the model's context), visual ones included.

Classifier-free guidance on visual tokens (``guidance`` != 1): each prompt's
unconditional prompt runs as an extra batch row that follows the conditional
row's choices (same input at every step, text and visual). At a visual step,
with c and u the two rows' vision-head outputs (L2-normalised), the visual
token of both rows is ``normalize(u + guidance * (c - u))``.

Shapes are bucketed (prompt length and ``max_new_tokens`` to multiples of 32,
the batch to a power of two, input images per prompt to a power of two), and
every sampling parameter, the seed and the step budget are traced: calls with
the same buckets and ``max_images`` reuse one compilation. Randomness: the key
of row r at step i is ``fold_in(fold_in(key(seed), r), i)``, so a sequence's
sample depends on its seed and row, not on the rest of the batch.

``reference_generate`` is the reference implementation's way (batch 1, no
cache: the full forward over the whole sequence at every step, one host round
trip per step), kept for tests and benchmarks.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph
from metamorph.models.siglip import l2_normalize

PROMPT_BUCKET = 32      # prompt lengths are rounded up to this, so similar prompts share one compilation
NEW_TOKENS_BUCKET = 32  # and so is max_new_tokens (the exact budget is traced)
VISUAL_SLOT = -1        # raw output id of a visual step
PAD_OUT = -2            # raw output id after a sequence ended

# Number of traces of the decoding function (one per compilation); tests read it.
TRACES: collections.Counter = collections.Counter()


class PromptTooLong(ValueError):
  """A prompt leaves no room for a new token in the model's context; ``index``: which."""

  def __init__(self, message: str, index: int = 0):
    super().__init__(message)
    self.index = index


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One tokenized prompt, as ``metamorph.data.conversation.format_conversation`` makes it."""
  input_ids: np.ndarray                   # [L] int
  visual_index: np.ndarray | None = None  # [L] int, -1 for text, else image * m + k
  visual_tokens: np.ndarray | None = None  # [I, m, Dv] float, the prompt's images

  @classmethod
  def text(cls, ids: Sequence[int]) -> Prompt:
    return cls(np.asarray(ids, np.int32))

  def __len__(self) -> int:
    return len(self.input_ids)


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
    return {"temperature": jnp.float32(self.temperature), "top_k": jnp.int32(self.top_k),
            "top_p": jnp.float32(self.top_p), "repetition_penalty": jnp.float32(self.repetition_penalty),
            "guidance": jnp.float32(self.guidance)}


@dataclasses.dataclass
class Decoded:
  """One generated answer."""
  ids: np.ndarray            # [steps] int32: token ids, VISUAL_SLOT at visual steps
  visual_tokens: np.ndarray  # [n_images, m, Dv] float32, the completed images
  finish_reason: str         # "stop" (a stop token) | "length" (the step budget or the context)

  @property
  def token_ids(self) -> list[int]:
    """The generated token ids without the visual slots (``<image_start><image_end>`` per image)."""
    return [int(t) for t in self.ids if t >= 0]


# ----------------------------------------------------------------------------- sampling

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


# ----------------------------------------------------------------------------- the engine

class _State(NamedTuple):
  step: jax.Array        # [] int32, decisions made
  k: jax.Array           # [B] int32: -1 text; 0..m-1 the next step is visual token k; m the next is <image_end>
  images: jax.Array      # [B] int32, completed images
  done: jax.Array        # [B] bool
  stopped: jax.Array     # [B] bool, ended by a stop token
  length: jax.Array      # [B] int32, steps taken
  seen: jax.Array        # [B, V] bool, tokens for the repetition penalty
  out_ids: jax.Array     # [B, N] int32
  out_visual: jax.Array  # [B, I, m, Dv] float32


def _parts(model) -> tuple[Llama, bool]:
  if isinstance(model, MetaMorph):
    return model.llm, True
  if isinstance(model, Llama):
    return model, False
  raise TypeError(f"expected a MetaMorph or a Llama model, got {type(model).__name__}")


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "max_images"))
def _decode(graphdef, state, batch: dict[str, jax.Array], sampling: dict[str, jax.Array], seed: jax.Array,
            *, max_new_tokens: int, max_images: int) -> dict[str, jax.Array]:
  TRACES["decode"] += 1
  model = nnx.merge(graphdef, state)
  llm, visual = _parts(model)
  ids, segments, positions = batch["input_ids"], batch["segment_ids"], batch["positions"]  # [B, P]
  b, p = ids.shape
  rows = jnp.arange(b)
  limit, source = batch["limit"], batch["source"]  # [B]
  key = jax.random.key(seed)
  if visual:
    c = model.config
    m, start_id, end_id, dv = c.num_visual_tokens, c.image_start_id, c.image_end_id, c.vision_dim
    embeds = model.embed(ids, batch["visual_index"], batch["visual_tokens"])  # [B, P, D]
    text_slots = (segments > 0) & (batch["visual_index"] < 0)
  else:
    m, dv = 1, 1
    embeds = llm.embed(ids)
    text_slots = segments > 0
  cache = llm.init_cache(b, p + max_new_tokens)
  hidden, cache = llm.forward(embeds, positions=positions, segment_ids=segments, cache=cache)

  def decide(s: _State, h: jax.Array):
    """The choice of step ``s.step`` from the last hidden states h [B, D] -> (state,
    next input token [B], whether the next input is visual [B], visual token [B, Dv])."""
    i = s.step
    logits = apply_repetition_penalty(llm.logits(h[:, None])[:, 0], s.seen, sampling["repetition_penalty"])
    in_text = s.k < 0
    if visual:
      allow = (s.images < max_images) & (i + m + 2 <= limit)
      logits = logits.at[:, end_id].set(-jnp.inf)
      logits = logits.at[:, start_id].set(jnp.where(allow, logits[:, start_id], -jnp.inf))
    text = choose_text(logits, step_keys(key, batch["row_ids"], i), sampling)
    if visual:
      in_visual, at_end = (s.k >= 0) & (s.k < m), s.k == m
      token = jnp.where(in_text, text, jnp.where(at_end, end_id, 0))[source]
      vtok = guide(model.predict_visual(h), batch["partner"], sampling["guidance"])[source]  # [B, Dv]
    else:
      in_visual = at_end = jnp.zeros((b,), bool)
      token, vtok = text[source], jnp.zeros((b, dv), jnp.float32)
    live = ~s.done
    out = jnp.where(live, jnp.where(in_visual, VISUAL_SLOT, token), PAD_OUT)
    slot_image = jnp.where(in_visual & live, s.images, s.out_visual.shape[1])  # out of range: dropped
    stop = live & in_text & jnp.isin(token, batch["eos_ids"])
    if visual:
      k = jnp.where(in_text & (token == start_id), 0, jnp.where(in_visual, s.k + 1, jnp.where(at_end, -1, s.k)))
    else:
      k = s.k
    new = _State(
        step=i + 1, k=k, images=s.images + (at_end & live), done=s.done | stop | (i + 1 >= limit),
        stopped=s.stopped | stop, length=jnp.where(live, i + 1, s.length),
        seen=s.seen.at[rows, token].max(live & in_text),
        out_ids=s.out_ids.at[:, i].set(out),
        out_visual=s.out_visual.at[rows, slot_image, jnp.clip(s.k, 0, m - 1)].set(vtok, mode="drop"))
    return new, token, in_visual, vtok

  def next_input(s, token, in_visual, vtok):  # -> [B, 1, D]
    x = llm.embed(token[:, None])
    if visual:
      slot = jnp.clip(s.k - 1, 0, m - 1)  # vtok's index in its image (s.k has moved past it)
      visual_x = model.project_visual(vtok[:, None], slot[:, None]).astype(x.dtype)  # [B, 1, D]
      x = jnp.where(in_visual[:, None, None], visual_x, x)
    return x

  seen = jnp.zeros((b, llm.config.vocab_size), bool).at[rows[:, None], ids].max(text_slots)
  s0 = _State(step=jnp.int32(0), k=jnp.where(batch["start_visual"], 0, -1).astype(jnp.int32),
              images=jnp.zeros((b,), jnp.int32), done=~batch["active"], stopped=jnp.zeros((b,), bool),
              length=jnp.zeros((b,), jnp.int32), seen=seen,
              out_ids=jnp.full((b, max_new_tokens), PAD_OUT, jnp.int32),
              out_visual=jnp.zeros((b, max(max_images, 1), m, dv), jnp.float32))
  first = decide(s0, hidden[:, -1])

  def body(carry):
    (s, token, in_visual, vtok), pos, cache = carry
    h, cache = llm.forward(next_input(s, token, in_visual, vtok), positions=pos[:, None], cache=cache)
    return decide(s, h[:, 0]), pos + 1, cache

  def keep_going(carry):
    s = carry[0][0]
    return ~jnp.all(s.done) & (s.step < max_new_tokens)

  (s, *_), _, _ = jax.lax.while_loop(keep_going, body, (first, positions[:, -1] + 1, cache))
  return {"ids": s.out_ids, "visual": s.out_visual, "images": s.images, "length": s.length,
          "stopped": s.stopped}


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, multiple: int = 1):
  """(ids [B, P], segment_ids [B, P], positions [B, P]) with P rounded up to ``multiple``."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("every prompt needs at least one token")
  length = _round_up(max(len(p) for p in prompts), multiple)
  ids = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for i, p in enumerate(prompts):
    ids[i, length - len(p):] = p
    segments[i, length - len(p):] = 1
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  return ids, segments, positions


class Engine:
  """Generation with one model: split once, one compilation per bucketed shape.

  ``eos_ids``: the stop tokens. ``pad_id``: the id written at padding.
  """

  def __init__(self, model: MetaMorph | Llama, *, eos_ids: Sequence[int], pad_id: int = 0):
    llm, self.visual = _parts(model)
    self.graphdef, self.state = nnx.split(model)
    self.eos_ids = tuple(int(t) for t in eos_ids)
    self.pad_id = int(pad_id)
    self.context = llm.config.max_position_embeddings
    if self.visual:
      c = model.config
      self.m, self.vision_dim = c.num_visual_tokens, c.vision_dim
      self.image_start_id, self.image_end_id = c.image_start_id, c.image_end_id
      if min(c.image_start_id, c.image_end_id) < 0:
        raise ValueError("the MetaMorph config has no image token ids (image_start_id / image_end_id)")

  def _check(self, i: int, prompt: Prompt) -> None:
    if len(prompt) == 0:
      raise ValueError(f"prompt {i} is empty")
    if len(prompt) >= self.context:
      raise PromptTooLong(f"prompt {i} has {len(prompt)} tokens; the model's context is {self.context} "
                          "(no room for a new token)", i)
    has_images = prompt.visual_index is not None and (np.asarray(prompt.visual_index) >= 0).any()
    if has_images and not self.visual:
      raise ValueError(f"prompt {i} has images but the model is a text-only LLM")
    if has_images:
      tokens = np.asarray(prompt.visual_tokens) if prompt.visual_tokens is not None else np.zeros((0,))
      if tokens.ndim != 3 or tokens.shape[1:] != (self.m, self.vision_dim):
        raise ValueError(f"prompt {i}: visual_tokens must be [I, {self.m}, {self.vision_dim}], "
                         f"got shape {tokens.shape}")
      if np.max(prompt.visual_index) >= tokens.shape[0] * self.m:
        raise ValueError(f"prompt {i}: visual_index refers past its {tokens.shape[0]} images")
      if prompt.visual_index[-1] >= 0:
        raise ValueError(f"prompt {i} ends inside an image")

  def _batch(self, prompts: Sequence[Prompt], uncond: Sequence[Prompt] | None, max_new_tokens: int):
    """Host-side batch of the conditional rows, then the unconditional ones, then idle rows."""
    rows = list(prompts) + list(uncond or [])
    for i, prompt in enumerate(rows):
      self._check(i, prompt)
    n, b = len(prompts), _pow2(len(rows))
    rows += [rows[0]] * (b - len(rows))
    ids, segments, positions = left_pad([r.input_ids for r in rows], self.pad_id, PROMPT_BUCKET)
    p = ids.shape[1]
    limit = np.array([min(max_new_tokens, self.context - len(r)) for r in rows], np.int32)
    source, partner = np.arange(b, dtype=np.int32), np.arange(b, dtype=np.int32)
    if uncond:
      twins = np.arange(n, 2 * n)
      source[twins], partner[:n] = np.arange(n), twins
      limit[:n] = limit[twins] = np.minimum(limit[:n], limit[twins])
    batch = {"input_ids": ids, "segment_ids": segments, "positions": positions, "limit": limit,
             "source": source, "partner": partner, "row_ids": np.arange(b, dtype=np.int32) % max(n, 1),
             "active": np.arange(b) < n + len(uncond or []),
             "eos_ids": np.asarray(self.eos_ids, np.int32), "start_visual": np.zeros(b, bool)}
    if self.visual:
      counts = [0 if r.visual_tokens is None else len(r.visual_tokens) for r in rows]
      vidx = np.full((b, p), -1, np.int32)
      tokens = np.zeros((b, _pow2(max(counts + [1])), self.m, self.vision_dim), np.float32)
      for j, r in enumerate(rows):
        if r.visual_index is not None:
          vidx[j, p - len(r):] = r.visual_index
        if counts[j]:
          tokens[j, :counts[j]] = r.visual_tokens
        batch["start_visual"][j] = r.input_ids[-1] == self.image_start_id and vidx[j, -1] < 0
      batch.update(visual_index=vidx, visual_tokens=tokens)
    return batch

  def generate(self, prompts: Sequence[Prompt], *, max_new_tokens: int, sampling: SamplingParams = SamplingParams(),
               seed: int = 0, uncond: Sequence[Prompt] | None = None) -> list[Decoded]:
    """Answers of ``prompts``. ``uncond``: one unconditional prompt per prompt, used when
    ``sampling.guidance`` != 1 (required then). Each answer takes at most ``max_new_tokens``
    steps (and stops at the model's context)."""
    if not prompts:
      return []
    if max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2 ** 32:
      raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    use_cfg = self.visual and sampling.uses_guidance
    if use_cfg and (uncond is None or len(uncond) != len(prompts)):
      raise ValueError("guidance != 1 needs one unconditional prompt per prompt (uncond=)")
    batch = self._batch(prompts, uncond if use_cfg else None, max_new_tokens)
    out = _decode(self.graphdef, self.state, batch, sampling.traced(), jnp.uint32(seed),
                  max_new_tokens=_round_up(max_new_tokens, NEW_TOKENS_BUCKET), max_images=sampling.max_images)
    out = jax.device_get(out)
    results = []
    for r in range(len(prompts)):
      length, n = int(out["length"][r]), int(out["images"][r])
      visual = out["visual"][r, :n] if self.visual else np.zeros((0, 1, 1), np.float32)
      results.append(Decoded(out["ids"][r, :length].copy(), np.array(visual),
                             "stop" if out["stopped"][r] else "length"))
    return results


def greedy_generate(model: Llama | MetaMorph, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_ids: Sequence[int], pad_id: int = 0) -> list[list[int]]:
  """Greedy continuations of token-id ``prompts``, each ending with its stop token if one came."""
  engine = Engine(model, eos_ids=eos_ids, pad_id=pad_id)
  return [d.token_ids for d in engine.generate([Prompt.text(p) for p in prompts], max_new_tokens=max_new_tokens)]


# ----------------------------------------------------------------------------- the reference

@functools.partial(jax.jit, static_argnames=("graphdef",))
def _full_forward(graphdef, state, ids, visual_index, visual_tokens, segments, last):
  """The whole sequence [1, L], no cache -> (logits [1, V], vision head output [1, Dv]) at ``last``."""
  model = nnx.merge(graphdef, state)
  llm, visual = _parts(model)
  embeds = model.embed(ids, visual_index, visual_tokens) if visual else llm.embed(ids)
  hidden, _ = llm.forward(embeds, segment_ids=segments)
  h = jax.lax.dynamic_slice_in_dim(hidden, last, 1, axis=1)  # [1, 1, D]
  predicted = model.predict_visual(h)[:, 0] if visual else jnp.zeros((1, 1), jnp.float32)
  return llm.logits(h)[:, 0], predicted


@jax.jit
def _reference_choice(logits, seen, blocked, key, row, step, sampling) -> jax.Array:
  """The reference's text choice: logits [1, V] -> token id []."""
  logits = apply_repetition_penalty(logits, seen, sampling["repetition_penalty"]).at[:, blocked].set(-jnp.inf)
  return choose_text(logits, step_keys(key, jnp.asarray([row]), step), sampling)[0]


class _Sequence:
  """One growing sequence of the reference loop (a buffer filled from the left)."""

  def __init__(self, prompt: Prompt, size: int, m: int, dv: int, max_images: int):
    n = len(prompt)
    self.length = n
    self.ids = np.zeros((1, size), np.int32)
    self.ids[0, :n] = prompt.input_ids
    self.vidx = np.full((1, size), -1, np.int32)
    if prompt.visual_index is not None:
      self.vidx[0, :n] = prompt.visual_index
    given = 0 if prompt.visual_tokens is None else len(prompt.visual_tokens)
    self.first_new = given
    self.tokens = np.zeros((1, given + max(max_images, 1), m, dv), np.float32)
    if given:
      self.tokens[0, :given] = prompt.visual_tokens

  def append(self, token: int, visual: tuple[int, int, np.ndarray] | None = None) -> None:
    if visual is not None:
      image, k, vtok = visual
      self.tokens[0, self.first_new + image, k] = vtok
      self.vidx[0, self.length] = (self.first_new + image) * self.tokens.shape[2] + k
    self.ids[0, self.length] = token
    self.length += 1

  def predict(self, graphdef, state):
    """The full forward over the sequence so far (padded to a multiple of PROMPT_BUCKET)."""
    size = _round_up(self.length, PROMPT_BUCKET)
    segments = (np.arange(size) < self.length).astype(np.int32)[None]
    return _full_forward(graphdef, state, self.ids[:, :size], self.vidx[:, :size], self.tokens, segments,
                         self.length - 1)


def reference_generate(model: MetaMorph | Llama, prompt: Prompt, *, max_new_tokens: int, eos_ids: Sequence[int],
                       sampling: SamplingParams = SamplingParams(), seed: int = 0, row: int = 0,
                       uncond: Prompt | None = None) -> Decoded:
  """The reference implementation's way: batch 1, no KV cache, the full forward over the
  whole sequence at every step, decisions on the host. Same rules (and the same key of
  ``row`` at each step) as ``Engine.generate``; for tests and benchmarks."""
  llm, visual = _parts(model)
  graphdef, state = nnx.split(model)
  context = llm.config.max_position_embeddings
  if len(prompt) >= context:
    raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the model's context is {context}")
  m = model.config.num_visual_tokens if visual else 1
  dv = model.config.vision_dim if visual else 1
  use_cfg = visual and sampling.uses_guidance
  limit = min(max_new_tokens, context - len(prompt))
  if use_cfg:
    limit = min(limit, context - len(uncond))
  size = _round_up(max(len(prompt), len(uncond) if use_cfg else 0) + limit, PROMPT_BUCKET)
  seqs = [_Sequence(x, size, m, dv, sampling.max_images) for x in ([prompt, uncond] if use_cfg else [prompt])]
  traced, key = sampling.traced(), jax.random.key(jnp.uint32(seed))
  seen = np.zeros((1, llm.config.vocab_size), bool)
  text_ids = prompt.input_ids if prompt.visual_index is None else prompt.input_ids[prompt.visual_index < 0]
  seen[0, text_ids] = True
  start_id = model.config.image_start_id if visual else -1
  k = 0 if visual and prompt.input_ids[-1] == start_id and seqs[0].vidx[0, len(prompt) - 1] < 0 else -1
  out, images, current, stopped = [], [], [], False
  for i in range(limit):
    (logits, vis), *twin = [s.predict(graphdef, state) for s in seqs]
    if k < 0:
      blocked = [model.config.image_end_id] if visual else []
      if visual and (len(images) >= sampling.max_images or i + m + 2 > limit):
        blocked.append(start_id)
      token = int(_reference_choice(logits, seen, np.asarray(blocked, np.int32), key, row, i, traced))
      out.append(token)
      seen[0, token] = True
      for s in seqs:
        s.append(token)
      if token in eos_ids:
        stopped = True
        break
      if token == start_id:
        k, current = 0, []
    elif k < m:
      if use_cfg:
        u = twin[0][1]
        vis = l2_normalize(u + traced["guidance"] * (vis - u))
      vtok = np.asarray(vis[0])
      current.append(vtok)
      out.append(VISUAL_SLOT)
      for s in seqs:
        s.append(0, (len(images), k, vtok))
      k += 1
    else:
      out.append(model.config.image_end_id)
      for s in seqs:
        s.append(model.config.image_end_id)
      images.append(np.stack(current))
      k = -1
  visual_tokens = np.stack(images) if images else np.zeros((0, m, dv), np.float32)
  return Decoded(np.asarray(out, np.int32), visual_tokens, "stop" if stopped else "length")
