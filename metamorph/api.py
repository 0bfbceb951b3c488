"""The Python API: load a checkpoint, answer interleaved prompts with text and images.

    import metamorph
    mm = metamorph.load("runs/toy")            # a training workdir or a converted checkpoint
    out = mm.generate(["Generate an image of a red circle."], max_new_tokens=96, seed=0)
    out[0].text, out[0].images[0]              # str, PIL.Image
    mm.generate(["What colour is the shape?"], images=[[pil_image]])
    mm.chat(messages)                          # multi-turn, images in and out
    mm.encode_image(img); mm.render(tokens)

``load`` reads a MetaMorph checkpoint (a training workdir or its ``model``
folder) or a plain LLM (a ``.gguf`` file, a transformers folder, our converted
LLM folder, or ``"smollm2"``): a model without a vision tower or a visualizer
still serves text. Images produced by a model without a visualizer come back as
visual tokens only (``Generation.images`` empty).

Images given to ``generate`` / ``chat`` may be ``PIL.Image``s, image file paths,
uint8 arrays [H, W, 3] (all encoded by the model's SigLIP tower) or float arrays
[m, Dv] of visual tokens used as they are (e.g. ``Generation.visual_tokens`` of
an earlier answer).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from PIL import Image

from metamorph.convert import ConversionError, load_llm, smollm2_gguf_path
from metamorph.files import read_json
from metamorph.model_folder import exported, is_converted, read_converted
from metamorph.params import build_module, module_params
from metamorph.data.conversation import TokenLayout, format_conversation
from metamorph.data.images import load_image, preprocess
from metamorph.generate import Engine, Prompt, SamplingParams
from metamorph.models.llama import Llama
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from metamorph.tokens import IM_END, IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START

METAMORPH_KIND, VISUALIZER_KIND, LLM_KIND = "metamorph", "visualizer", "llm"
ROLES = ("system", "user", "assistant")


@dataclasses.dataclass
class Generation:
  """One answer."""
  text: str                        # the answer; "<image>" marks each produced image
  token_ids: list[int]             # generated ids (with <image_start><image_end> per image, the stop token last)
  visual_tokens: list[np.ndarray]  # per produced image: [m, Dv] float32, unit norm
  images: list[Image.Image]        # rendered by the visualizer (empty without one)
  finish_reason: str               # "stop" | "length"


def load_visualizer(path: str):
  """The ``Visualizer`` of a visualizer-stage workdir or its exported folder."""
  return load_visualizer_model(path).visualizer


def load_visualizer_model(path: str):
  """The ``VisualizerModel`` (frozen SigLIP tower + visualizer) of a visualizer-stage
  workdir or its exported folder."""
  from metamorph.models.visualizer import VisualizerModel, VisualizerModelConfig
  folder = exported(path)
  if not is_converted(folder):
    raise ConversionError(f"{path}: not a visualizer checkpoint (a visualizer-stage workdir or its "
                          "exported 'model' folder)")
  meta, params = read_converted(folder, VISUALIZER_KIND)
  config = VisualizerModelConfig.from_dict(meta["config"])
  return build_module(lambda: VisualizerModel(config, rngs=nnx.Rngs(0)), params, folder)


def _resolve(entry: str, checkpoint: str, folder: str) -> str | None:
  """A path from a checkpoint's meta: as given (relative to the working directory),
  else relative to the checkpoint; None when neither exists."""
  candidates = [entry] if os.path.isabs(entry) else [entry, os.path.join(checkpoint, entry),
                                                     os.path.join(folder, entry)]
  return next((c for c in candidates if os.path.exists(c)), None)


def load(path: str, visualizer: Any = None) -> MetaMorphModel:
  """A ``MetaMorphModel`` from a MetaMorph checkpoint or a plain LLM (see the module doc).

  ``visualizer``: a visualizer checkpoint path (or a ``Visualizer`` module); by default
  the one the checkpoint names (``config.json``'s ``"visualizer"``, written from
  ``model.visualizer_from`` at training time), else none. A path's SigLIP tower must
  have the checkpoint's weights (``ConversionError`` otherwise).
  """
  source = smollm2_gguf_path() if path == "smollm2" else os.fspath(path)
  if not os.path.exists(source):
    raise ConversionError(f"{source}: no such checkpoint (a training workdir, a converted folder, "
                          "a transformers folder, a .gguf file, or 'smollm2')")
  folder = exported(source) if os.path.isdir(source) else source
  kind = read_json(os.path.join(folder, "config.json")).get("kind") if is_converted(folder) else None
  if kind == VISUALIZER_KIND:
    raise ConversionError(f"{source}: holds a visualizer; load the MetaMorph checkpoint and pass this "
                          "one as visualizer=")
  if kind == METAMORPH_KIND:
    from metamorph.convert.llama import load_tokenizer
    meta, params = read_converted(folder, METAMORPH_KIND)
    try:
      config = MetaMorphConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
      raise ConversionError(f"{folder}/config.json: invalid MetaMorph config ({e})") from e
    config = config.replace(llm=config.llm.replace(remat="none"))
    model = build_module(lambda: MetaMorph(config, rngs=nnx.Rngs(0)), params, folder)
    tokenizer = load_tokenizer(folder)
    if visualizer is None and meta.get("visualizer"):
      visualizer = _resolve(meta["visualizer"], source, folder)
      if visualizer is None:
        warnings.warn(f"{folder}: its visualizer {meta['visualizer']!r} was not found; images will come "
                      "back as visual tokens only", stacklevel=2)
  else:
    model, tokenizer = load_llm(folder)
  if tokenizer is None:
    raise ConversionError(f"{source}: ships no tokenizer; generation needs one")
  if isinstance(visualizer, (str, os.PathLike)):
    trained = load_visualizer_model(os.fspath(visualizer))
    if kind == METAMORPH_KIND and model.vision is not None:
      _check_same_encoder(model.vision, trained.vision, source, os.fspath(visualizer))
    visualizer = trained.visualizer
  return MetaMorphModel(model, tokenizer, visualizer=visualizer, source=source)


# bf16 rounding (a relative error <= 2**-8) when one of the two stages stored its tower in bf16
_ENCODER_RTOL, _ENCODER_ATOL = 1e-2, 1e-6


def _token_params(tower: nnx.Module) -> dict[str, np.ndarray]:
  """The SigLIP tower's tensors its visual tokens depend on (not the MAP head, not post_ln)."""
  return {k: v for k, v in module_params(tower).items() if not k.startswith(("head/", "post_ln/"))}


def _check_same_encoder(ours: nnx.Module, theirs: nnx.Module, source: str, visualizer: str) -> None:
  """Raises unless the visualizer's SigLIP tower (whose tokens it learned to draw) has the
  checkpoint's tower's weights: another encoder's tokens would be drawn as noise."""
  a, b = _token_params(ours), _token_params(theirs)
  differ = sorted(set(a) ^ set(b)) or [
    k for k in sorted(a) if a[k].shape != b[k].shape or not np.allclose(
      a[k].astype(np.float32), b[k].astype(np.float32), rtol=_ENCODER_RTOL, atol=_ENCODER_ATOL)]
  if differ:
    raise ConversionError(
      f"{visualizer}: this visualizer was trained on another SigLIP encoder's tokens than {source} predicts "
      f"({len(differ)} of the vision towers' tensors differ, e.g. {differ[0]!r}); pass a visualizer trained "
      "with the same encoder (the same model.siglip_init in both stages)")


@functools.partial(jax.jit, static_argnames=("graphdef", "m"))
def _encode(graphdef, state, images: jax.Array, *, m: int) -> jax.Array:
  from metamorph.models.siglip import visual_tokens
  return visual_tokens(nnx.merge(graphdef, state), images, m)  # [N, m, Dv]


def _bucket(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


class MetaMorphModel:
  """A loaded model with its tokenizer (and optionally a visualizer)."""

  def __init__(self, model: MetaMorph | Llama, tokenizer, *, visualizer=None, source: str = ""):
    self.model, self.tokenizer, self.visualizer, self.source = model, tokenizer, visualizer, source
    self.is_metamorph = isinstance(model, MetaMorph)
    llm = model.llm if self.is_metamorph else model
    self.context = llm.config.max_position_embeddings
    vocab = tokenizer.get_vocab()
    stops = {tokenizer.eos_token_id} | ({vocab[IM_END]} if IM_END in vocab else set())
    self.stop_ids = tuple(sorted(t for t in stops if t is not None))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    self.engine = Engine(model, eos_ids=self.stop_ids, pad_id=pad)
    self._vision = None
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
    padded = np.concatenate([pixels, np.repeat(pixels[:1], _bucket(len(pixels)) - len(pixels), 0)])
    return np.asarray(_encode(graphdef, state, padded, m=self.m))[:len(images)]

  def render(self, tokens, *, steps: int = 25, guidance: float = 3.0, seed: int = 0) -> list[Image.Image]:
    """Visual tokens [m, Dv] or [n, m, Dv] (or a list of [m, Dv]) -> images, through the visualizer."""
    if self.visualizer is None:
      raise ValueError("this model has no visualizer: load it with metamorph.load(path, visualizer=DIR) "
                       "(a visualizer-stage workdir), or set model.visualizer_from when training")
    from metamorph.models.visualizer import render
    tokens = np.asarray(tokens, np.float32)
    tokens = tokens[None] if tokens.ndim == 2 else tokens
    if len(tokens) == 0:
      return []
    n = len(tokens)
    padded = np.concatenate([tokens, np.repeat(tokens[:1], _bucket(n) - n, 0)])
    pixels = render(self.visualizer, padded, guidance=guidance, steps=steps, seed=seed)[:n]
    return [Image.fromarray(p) for p in pixels]

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

  def _prompt(self, turns: list[tuple[str, str]], images: Sequence,
              uncond: bool) -> tuple[Prompt, Prompt | None]:
    """(prompt, with ``uncond`` the unconditional prompt: every user turn's text dropped,
    its images kept)."""
    if not self.is_metamorph:
      if images:
        raise ValueError("this model is a text-only LLM; it takes no images")
      return self._text_prompt(turns), None
    tokens = self._visual_tokens(images)
    variants = [turns] + ([[(r, _images_only(c) if r == "user" else c) for r, c in turns]] if uncond else [])
    prompts = []
    for t in variants:
      f = format_conversation(t, self.tokenizer, self.layout, add_generation_prompt=True)
      prompts.append(Prompt(f.input_ids, f.visual_index, tokens))
    return prompts[0], (prompts[1] if uncond else None)

  def _text_prompt(self, turns: list[tuple[str, str]]) -> Prompt:
    tok = self.tokenizer
    if tok.chat_template:
      messages = [{"role": r, "content": c} for r, c in turns]
      return Prompt.text(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)["input_ids"])
    return Prompt.text(tok("\n".join(c for _, c in turns))["input_ids"])  # no template: plain completion

  def _text(self, token_ids: list[int]) -> str:
    ids = [t for t in token_ids if t not in self.stop_ids]
    if not self.is_metamorph:
      return self.tokenizer.decode(ids, skip_special_tokens=True).strip()
    keep = {self.layout.image_start_id, self.layout.image_end_id}
    ids = [t for t in ids if t in keep or t not in self.layout.special_ids]
    text = self.tokenizer.decode(ids, skip_special_tokens=False)
    text = re.sub(f"{re.escape(IMAGE_START)}\\s*{re.escape(IMAGE_END)}", IMAGE_PLACEHOLDER, text)
    return text.replace(IMAGE_END, IMAGE_PLACEHOLDER).strip()  # an image the prompt started

  def _run(self, conversations: Sequence[tuple[list[tuple[str, str]], Sequence]], *, max_new_tokens: int = 256,
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
    produced = [t for d in decoded for t in d.visual_tokens]
    pictures = self.render(np.stack(produced), steps=render_steps, guidance=render_guidance, seed=seed) \
        if produced and self.visualizer is not None else []
    out, used = [], 0
    for d in decoded:
      n = len(d.visual_tokens)
      out.append(Generation(self._text(d.token_ids), d.token_ids, list(d.visual_tokens),
                            pictures[used:used + n], d.finish_reason))
      used += n
    return out

  # --- public
  def generate(self, prompts: Sequence[str], images: Sequence[Sequence] | None = None, *,
               max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, guidance: float = 1.0, max_images: int = 4, seed: int = 0,
               system: str | None = None, render_steps: int = 25, render_guidance: float = 3.0) -> list[Generation]:
    """One user turn per prompt, answered in one batch.

    ``images[i]``: the images of prompt i; without ``<image>`` placeholders in the prompt
    they are placed before its text. ``temperature`` 0 is greedy; ``guidance`` is
    classifier-free guidance on produced visual tokens (1 = none; see
    ``metamorph.generate``); ``render_steps`` / ``render_guidance`` drive the visualizer.
    """
    if isinstance(prompts, str):
      raise TypeError("prompts must be a list of strings")
    images = [[] for _ in prompts] if images is None else [list(x) for x in images]
    if len(images) != len(prompts):
      raise ValueError(f"got {len(prompts)} prompts but {len(images)} image lists")
    conversations = []
    for text, imgs in zip(prompts, images):
      turns = [("system", system)] if system else []
      conversations.append((turns + [("user", _with_placeholders(text, len(imgs)))], imgs))
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
    turns, collected = [], []
    for i, message in enumerate(messages):
      role, content = message.get("role"), message.get("content", "")
      if role not in ROLES or not isinstance(content, str):
        raise ValueError(f"message {i}: needs a role in {ROLES} and a string content, got {dict(message)}")
      own = list(message.get("images") or [])
      if own and images is not None:
        raise ValueError("give images either in the messages or as images=, not both")
      turns.append((role, _with_placeholders(content, len(own)) if own else content))
      collected += own
    collected = list(images) if images is not None else collected
    placeholders = sum(c.count(IMAGE_PLACEHOLDER) for _, c in turns)
    if placeholders != len(collected):
      raise ValueError(f"the messages have {placeholders} {IMAGE_PLACEHOLDER} placeholders but "
                       f"{len(collected)} images")
    if not turns or turns[-1][0] == "assistant":
      raise ValueError("the conversation must end with a user (or system) message")
    [out] = self._run([(turns, collected)], **kwargs)
    return out


def _with_placeholders(text: str, n: int) -> str:
  """``text`` with ``n`` image placeholders: as written, or prepended when it has none."""
  have = text.count(IMAGE_PLACEHOLDER)
  if have == n:
    return text
  if have == 0:
    return "\n".join([IMAGE_PLACEHOLDER] * n + [text])
  raise ValueError(f"{text!r} has {have} {IMAGE_PLACEHOLDER} placeholders but {n} images")


def _images_only(text: str) -> str:
  """A user turn of the unconditional prompt: its placeholders, no text."""
  return "\n".join([IMAGE_PLACEHOLDER] * text.count(IMAGE_PLACEHOLDER))


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


__all__ = ["Generation", "MetaMorphModel", "load", "load_visualizer", "load_visualizer_model"]
