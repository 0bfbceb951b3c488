"""The facade: a loaded model that answers interleaved prompts with text and images.

``MetaMorphModel`` serves a MetaMorph checkpoint or a plain LLM (a model without a vision
tower or a visualizer still serves text). What becomes of the visual tokens an answer
produces is the output route's job (``metamorph.routes``, picked once when the model is
built; ``vpit`` by default: the visualizer draws them, and without a visualizer they come
back as visual tokens only, ``Generation.images`` empty).

Images given to ``generate`` / ``chat`` may be ``PIL.Image``s, image file paths,
uint8 arrays [H, W, 3] (all encoded by the model's SigLIP tower) or float arrays
[m, Dv] of visual tokens used as they are (e.g. ``Generation.visual_tokens`` of
an earlier answer).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from metamorph import routes
from metamorph.api.prompts import (Turns, answer_text, chat_conversation, prompt_conversations, text_prompt,
                                   visual_prompts)
from metamorph.data.conversation import TokenLayout
from metamorph.data.images import load_image, preprocess
from metamorph.files import ConversionError
from metamorph.generation.engine import Engine
from metamorph.generation.prompts import Prompt, pad_to_bucket
from metamorph.generation.sampling import SamplingParams
from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph
from metamorph.models.siglip import visual_tokens
from metamorph.tokens import IM_END, IMAGE_END, IMAGE_START


@dataclasses.dataclass
class Generation:
  """One answer."""
  text: str                        # the answer; "<image>" marks each produced image
  token_ids: list[int]             # generated ids (with <image_start><image_end> per image, the stop token last)
  visual_tokens: list[np.ndarray]  # per produced image: [m, Dv] float32, unit norm
  images: list[Image.Image]        # the output route's artifacts: vpit's visualizer drawings (none without one)
  finish_reason: str               # "stop" | "length"


@functools.partial(jax.jit, static_argnames=("graphdef", "m"))
def _encode(graphdef, state, images: jax.Array, *, m: int) -> jax.Array:
  return visual_tokens(nnx.merge(graphdef, state), images, m)  # [N, m, Dv]


class MetaMorphModel:
  """A loaded model with its tokenizer (and optionally a visualizer); ``route``: the output
  route of its answers' visual tokens (a name in ``metamorph.routes.ROUTES``)."""

  def __init__(self, model: MetaMorph | Llama, tokenizer, *, visualizer=None, route: str = "vpit",
               source: str = ""):
    self.model, self.tokenizer, self.visualizer, self.source = model, tokenizer, visualizer, source
    self.route = routes.make_route(route, visualizer=visualizer)
    self.is_metamorph = isinstance(model, MetaMorph)
    llm = model.llm if self.is_metamorph else model
    self.context = llm.config.max_position_embeddings
    vocab = tokenizer.get_vocab()
    stops = {tokenizer.eos_token_id} | ({vocab[IM_END]} if IM_END in vocab else set())
    self.stop_ids = tuple(sorted(t for t in stops if t is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.engine = Engine(model, eos_ids=self.stop_ids, pad_id=pad)
    self._vision, self.layout = None, None
    if self.is_metamorph:
      c = model.config
      self.m, self.vision_dim = c.num_visual_tokens, c.vision_dim
      self.layout = TokenLayout.from_tokenizer(tokenizer, c.num_visual_tokens)
      if (self.layout.image_start_id, self.layout.image_end_id) != (c.image_start_id, c.image_end_id):
        raise ConversionError(f"{source}: the tokenizer's {IMAGE_START}/{IMAGE_END} ids differ from the model's")
      if model.vision is not None:
        self._vision = nnx.split(model.vision)
    if visualizer is not None:
      vc = visualizer.config
      if not self.is_metamorph or (vc.num_tokens, vc.token_dim) != (self.m, self.vision_dim):
        want = (self.m, self.vision_dim) if self.is_metamorph else "none (a text-only model)"
        raise ConversionError(f"the visualizer takes [{vc.num_tokens}, {vc.token_dim}] visual tokens; "
                              f"the model makes {want}")

  def __repr__(self) -> str:
    kind = "MetaMorph" if self.is_metamorph else "text-only LLM"
    parts = [kind, f"source={self.source!r}"]
    if self.is_metamorph:
      parts += [f"vision={'yes' if self._vision else 'no'}", f"visualizer={'yes' if self.visualizer else 'no'}"]
    return f"MetaMorphModel({', '.join(parts)})"

  # --- images
  def encode_image(self, image) -> np.ndarray:
    """An image (PIL, path or uint8 [H, W, 3]) -> its visual tokens [m, Dv] (float32, unit norm)."""
    return self._encode_many([image])[0]

  def _encode_many(self, images: Sequence) -> np.ndarray:
    if not self.is_metamorph or self._vision is None:
      raise ValueError("this model has no vision tower; pass images as visual tokens [m, Dv] instead")
    graphdef, state = self._vision
    size = self.model.config.vision.image_size
    pixels = np.stack([preprocess(_to_pil(x), size) for x in images])  # [N, S, S, 3] in [-1, 1]
    return np.asarray(_encode(graphdef, state, pad_to_bucket(pixels), m=self.m))[:len(images)]

  def render(self, tokens, *, steps: int = 25, guidance: float = 3.0, seed: int = 0) -> list[Image.Image]:
    """Visual tokens [m, Dv] or [n, m, Dv] (or a list of [m, Dv]) -> images, through the visualizer."""
    if self.visualizer is None:
      raise ValueError("this model has no visualizer: load it with metamorph.load(path, visualizer=DIR) "
                       "(a visualizer-stage workdir), or set model.visualizer_from when training")
    tokens = np.asarray(tokens, np.float32)
    tokens = tokens[None] if tokens.ndim == 2 else tokens
    return routes.render(self.visualizer, tokens, steps=steps, guidance=guidance, seed=seed)

  # --- prompts
  def _visual_tokens(self, images: Sequence) -> np.ndarray:
    """Images of one conversation -> [I, m, Dv]."""
    out: list[np.ndarray | None] = [None] * len(images)
    to_encode = []
    for i, x in enumerate(images):
      arr = x if isinstance(x, np.ndarray) else None
      if arr is not None and arr.dtype.kind == "f" and arr.shape == (self.m, self.vision_dim):
        out[i] = arr.astype(np.float32)
      elif arr is not None and arr.dtype.kind == "f":
        raise ValueError(f"a float array image must be visual tokens [{self.m}, {self.vision_dim}], "
                         f"got shape {arr.shape}")
      else:
        to_encode.append(i)
    if to_encode:
      for i, tokens in zip(to_encode, self._encode_many([images[i] for i in to_encode])):
        out[i] = tokens
    return np.stack(out) if out else np.zeros((0, self.m, self.vision_dim), np.float32)

  def _prompt(self, turns: Turns, images: Sequence, uncond: bool) -> tuple[Prompt, Prompt | None]:
    """(prompt, with ``uncond`` the unconditional prompt)."""
    if not self.is_metamorph:
      if images:
        raise ValueError("this model is a text-only LLM; it takes no images")
      return text_prompt(turns, self.tokenizer), None
    return visual_prompts(turns, self._visual_tokens(images), self.tokenizer, self.layout, uncond)

  def _run(self, conversations: Sequence[tuple[Turns, Sequence]], *, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0,
           guidance: float = 1.0, max_images: int = 4, seed: int = 0, render_steps: int = 25,
           render_guidance: float = 3.0) -> list[Generation]:
    """Answers of (turns, images) conversations, in one batch; the options are ``generate``'s."""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p,
                              repetition_penalty=repetition_penalty, guidance=guidance, max_images=max_images)
    use_cfg = self.is_metamorph and sampling.uses_guidance
    pairs = [self._prompt(turns, images, use_cfg) for turns, images in conversations]
    uncond = [u for _, u in pairs] if use_cfg else None
    decoded = self.engine.generate([p for p, _ in pairs], max_new_tokens=max_new_tokens, sampling=sampling,
                                   seed=seed, uncond=uncond)
    texts = [answer_text(d.token_ids, self.tokenizer, self.stop_ids, self.layout) for d in decoded]
    artifacts = self.route.artifacts(decoded, texts, seed=seed, steps=render_steps, guidance=render_guidance)
    return [Generation(text, d.token_ids, list(d.visual_tokens), images, d.finish_reason)
            for text, d, images in zip(texts, decoded, artifacts)]

  # --- public
  def generate(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None, *,
               max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, guidance: float = 1.0, max_images: int = 4, seed: int = 0,
               system: str | None = None, render_steps: int = 25, render_guidance: float = 3.0) -> list[Generation]:
    """One user turn per prompt, answered in one batch.

    ``images[i]``: the images of prompt i; without ``<image>`` placeholders in the prompt
    they are placed before its text. ``temperature`` 0 is greedy; ``guidance`` is
    classifier-free guidance on produced visual tokens (1 = none; see
    ``metamorph.generation.sampling``); ``render_steps`` / ``render_guidance`` drive the visualizer.
    """
    conversations = prompt_conversations(prompts, images, system)
    return self._run(conversations, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, repetition_penalty=repetition_penalty, guidance=guidance,
                     max_images=max_images, seed=seed, render_steps=render_steps,
                     render_guidance=render_guidance)

  def chat(self, messages: Sequence[Mapping[str, Any]], images: Sequence | None = None, **kwargs) -> Generation:
    """The next assistant turn of an OpenAI-style conversation.

    ``messages``: ``[{"role": "system" | "user" | "assistant", "content": str, "images": [...]}]``;
    ``content`` may hold ``<image>`` placeholders; a message's optional ``images`` fill its
    placeholders in order (without placeholders they go before its text). Or pass every
    image at once as ``images=`` (in placeholder order, across messages). Earlier answers'
    images can be given back as their visual tokens (``Generation.visual_tokens``).
    ``kwargs``: those of ``generate``.
    """
    turns, collected = chat_conversation(messages, images)
    [out] = self._run([(turns, collected)], **kwargs)
    return out


def _to_pil(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (str, os.PathLike)):
    return load_image(image)
  arr = np.asarray(image)
  if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
    raise ValueError(f"an image must be a PIL.Image, a path, uint8 [H, W, 3] or visual tokens [m, Dv]; "
                     f"got {arr.dtype} {arr.shape}")
  return Image.fromarray(arr)

