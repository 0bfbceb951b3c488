"""The task generators of the shapes world, one per task kind of the method.

``GENERATORS[task](rng, holdout)`` draws one example's conversation turns and scenes
(an ``Example``); ``metamorph.shapes.examples`` turns it into a record and its images.

Task kinds (``TASKS``):
  qa           one image (one or two objects), 1-3 questions: colour, shape, size,
               position, count, caption.
  t2i          "Generate an image of a large red circle on the left." ->
               "Here is an image based on your request: <image>".
  edit         an image + an instruction (recolour, move, resize, reshape) -> "<image>".
  think        visual thinking: an image + "Imagine the shape ... <question> Think
               visually." -> "<image> It is ...": the answer draws the imagined image first.
  next_frame   2-3 frames of an object moving in a straight line -> the next frame.
  video_qa     the same kind of frames -> direction, end position, colour, shape.
  multi_image  two images -> same colour / shape / size / position? which one shows X?
               Answered worked: "The first is red, the second is blue: no.", "The first
               is a circle, the second is a square: the square is the second."
  text         language-only questions about the world ("Which shape has three corners?"),
               or (``TEXT_COMPARISON_PROB``) a multi_image comparison told in words.
  caption      an image and its caption only: the image-text pairs of the SigLIP stage
               (the world's ``captions`` split); not in any group or the default mix.

Contracts:
  * A generator draws everything from its rng, so a seeded rng fixes the example.
  * Held-out (colour, shape) pairs never appear in a generated image (any ``<image>``
    of a ``gpt`` turn); they do appear in prompt images (qa, video_qa, multi_image,
    and the input images of edit / think). ``metamorph.shapes.prompts`` gives the
    text-to-image prompts that measure generalisation to them.
  * Understanding examples record their question kinds and canonical answers
    (``Example.question``), one per question turn.
  * All text comes from ``metamorph.shapes.phrases``, so its ``world_texts()`` lists
    every word an example can contain.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

import numpy as np

from metamorph.shapes import scene
from metamorph.shapes.phrases import (DESTINATION, DIRECTIONS, FACT_POOL, NUMBER_WORDS, OBJECT_NOUNS, ORDINALS,
                                      TEMPLATES, WHERE, YES_NO, capitalize, describe, phrase)
from metamorph.shapes.scene import POSITIONS, VALUES, Shape, pick
from metamorph.tokens import IMAGE_PLACEHOLDER

GENERATION_TASKS: tuple[str, ...] = ("t2i", "edit", "think", "next_frame")  # answers hold images
UNDERSTANDING_TASKS: tuple[str, ...] = ("qa", "video_qa", "multi_image", "text")
VPIT_TASKS: tuple[str, ...] = ("qa", "t2i", "edit", "think", "next_frame", "video_qa", "multi_image", "text")
TASKS: tuple[str, ...] = (*VPIT_TASKS, "caption")
QA_KINDS: tuple[str, ...] = ("color", "shape", "size", "position", "count", "caption")
EDIT_KINDS: tuple[str, ...] = ("color", "position", "size", "shape")
MULTI_KINDS: tuple[str, ...] = (
  "same_color", "same_shape", "same_size", "same_position", "which_shape", "which_color", "which_larger")

TWO_OBJECT_PROB = 0.3  # qa scenes with two objects
TEXT_COMPARISON_PROB = 0.8  # text records that are a comparison told in words
MIN_TRAVEL = 0.25  # least distance (unit coordinates) from the first to the last frame

# --- the example under construction ------------------------------------------------


class Example:
  """Turns and images of one record under construction.

  images[k] is the tuple of placed shapes of the k-th ``<image>`` placeholder.
  """

  def __init__(self, task: str):
    self.task = task
    self.turns: list[tuple[str, str]] = []
    self.images: list[tuple[Shape, ...]] = []
    self.meta: dict[str, Any] = {}

  def ask(self, text: str, *images: tuple[Shape, ...]) -> None:
    self.turns.append(("human", text))
    self.images += images

  def answer(self, text: str, *images: tuple[Shape, ...]) -> None:
    self.turns.append(("gpt", text))
    self.images += images

  def question(self, kind: str, answer: str) -> None:
    self.meta.setdefault("questions", []).append(kind)
    self.meta.setdefault("answers", []).append(answer)


# --- scene edits ------------------------------------------------------------------


def _offset(s: Shape) -> tuple[float, float]:
  """Centre minus its position's anchor (the jitter) of a placed shape."""
  ax, ay = scene.POSITION_ANCHORS[s.position]
  return s.center[0] - ax, s.center[1] - ay


def _replace(s: Shape, **changes: str) -> Shape:
  """``s`` (placed) with new attributes; the jitter is kept, clipped to the new size's."""
  out = Shape(**{**s.attributes(), **changes})
  j = scene.JITTER[out.size]
  dx, dy = (min(max(v, -j), j) for v in _offset(s))
  ax, ay = scene.POSITION_ANCHORS[out.position]
  return Shape(**out.attributes(), center=(ax + dx, ay + dy))


def _other(rng: np.random.Generator, values: Sequence[str], current: str) -> str:
  return pick(rng, [v for v in values if v != current])


def _allowed(s: Shape, holdout: Collection[tuple[str, str]]) -> bool:
  return (s.color, s.shape) not in holdout


# --- task generators: rng, holdout -> Example ---------------------------------------


def _qa_question(rng: np.random.Generator, kind: str, objs: tuple[Shape, ...]) -> tuple[str, str, str]:
  """(question, answer text, canonical answer) about a one- or two-object scene."""
  target = pick(rng, objs)
  noun = pick(rng, OBJECT_NOUNS)
  noun = "object" if kind == "shape" else noun  # not "What shape is the shape?"
  ref = noun if len(objs) == 1 else TEMPLATES["ref_at"][0].format(noun=noun, where=WHERE[target.position])
  if kind == "color":
    return phrase(rng, "qa_color", ref=ref), target.color, target.color
  if kind == "shape":
    return phrase(rng, "qa_shape", ref=ref), target.shape, target.shape
  if kind == "size":
    return phrase(rng, "qa_size", ref=ref), target.size, target.size
  if kind == "position":
    if len(objs) > 1 or rng.random() < 0.5:  # name the object by its colour and shape
      ref = TEMPLATES["ref_named"][0].format(color=target.color, shape=target.shape)
    return phrase(rng, "qa_position", ref=ref), WHERE[target.position], target.position
  if kind == "count":
    return phrase(rng, "qa_count"), NUMBER_WORDS[len(objs)], NUMBER_WORDS[len(objs)]
  if kind == "caption":
    descs = [describe(o) for o in objs]
    text = TEMPLATES["caption"][len(objs) - 1].format(desc=capitalize(descs[0]), desc2=descs[-1])
    return phrase(rng, "qa_caption"), text, text
  raise ValueError(kind)


def _distinct(objs: tuple[Shape, ...]) -> bool:
  return len({(o.color, o.shape) for o in objs}) == len(objs)


def _qa_scene(rng: np.random.Generator) -> tuple[Shape, ...]:
  """One object, or two with probability ``TWO_OBJECT_PROB``, placed (any pair)."""
  n_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
  return tuple(scene.place(s, rng) for s in scene.sample_scene(rng, n_objects))


def task_qa(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Image QA: 1-3 questions of distinct kinds about one image (any pair)."""
  ex = Example("qa")
  objs = _qa_scene(rng)
  kinds = [k for k in QA_KINDS if not (k == "position" and len(objs) == 2 and not _distinct(objs))]
  n_turns = 1 + int(rng.choice(3, p=[0.5, 0.3, 0.2]))
  for i, j in enumerate(rng.permutation(len(kinds))[:n_turns]):
    question, answer, canonical = _qa_question(rng, kinds[int(j)], objs)
    if i == 0:
      ex.ask(f"{IMAGE_PLACEHOLDER}\n{question}", objs)
    else:
      ex.ask(question)
    ex.answer(answer)
    ex.question(kinds[int(j)], canonical)
  return ex


def task_caption(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """An image-caption pair: a qa scene with its one caption question."""
  ex = Example("caption")
  objs = _qa_scene(rng)
  question, answer, canonical = _qa_question(rng, "caption", objs)
  ex.ask(f"{IMAGE_PLACEHOLDER}\n{question}", objs)
  ex.answer(answer)
  ex.question("caption", canonical)
  return ex


def task_t2i(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Text-to-image for a seen (colour, shape) pair."""
  ex = Example("t2i")
  s = scene.place(scene.sample_shape(rng, holdout), rng)
  ex.ask(phrase(rng, "t2i", desc=describe(s)))
  ex.answer(phrase(rng, "t2i_answer", image=IMAGE_PLACEHOLDER), (s,))
  return ex


def _apply(rng: np.random.Generator, s: Shape, kind: str) -> Shape:
  """``s`` with attribute ``kind`` changed to a different random value."""
  return _replace(s, **{kind: _other(rng, VALUES[kind], getattr(s, kind))})


def _edited(rng: np.random.Generator, holdout: Collection[tuple[str, str]], n_edits: Sequence[int],
            tries: int = 100) -> tuple[Shape, list[str], Shape]:
  """(source (any pair), edit kinds, result (not held out)), placed."""
  for _ in range(tries):
    src = scene.place(scene.sample_shape(rng), rng)
    n = int(pick(rng, n_edits))
    kinds = [EDIT_KINDS[int(i)] for i in sorted(rng.permutation(len(EDIT_KINDS))[:n])]
    out = src
    for kind in kinds:
      out = _apply(rng, out, kind)
    if _allowed(out, holdout):
      return src, kinds, out
  raise ValueError("the holdout leaves no allowed edit result")


def task_edit(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Image editing: recolour, move, resize or reshape one object."""
  ex = Example("edit")
  src, [kind], out = _edited(rng, holdout, (1,))
  if kind == "position":
    text = phrase(rng, "edit_position", dest=DESTINATION[out.position], where=WHERE[out.position])
  else:
    text = phrase(rng, f"edit_{kind}", **{kind: getattr(out, kind)}, old=src.shape)
  ex.ask(f"{IMAGE_PLACEHOLDER}\n{text}", (src,))
  ex.answer(IMAGE_PLACEHOLDER, (out,))
  ex.meta["edits"] = [kind]
  return ex


def task_think(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Visual thinking: imagine an edited object, draw it, then answer from the drawing."""
  ex = Example("think")
  src, kinds, out = _edited(rng, holdout, (1, 2))
  fill = {"color": out.color, "dest": DESTINATION[out.position], "size": out.size, "shape": out.shape}
  changes = [phrase(rng, f"think_{k}", **fill) for k in kinds]
  changes_text = changes[0] if len(changes) == 1 else TEMPLATES["think_join"][0].format(a=changes[0], b=changes[1])
  kind = pick(rng, EDIT_KINDS)
  prompt = phrase(rng, "think_prompt", noun=pick(rng, OBJECT_NOUNS), changes=changes_text,
                  question=phrase(rng, f"think_q_{kind}"))
  value = {"color": out.color, "size": out.size, "position": WHERE[out.position],
           "shape": TEMPLATES["think_value_shape"][0].format(shape=out.shape)}[kind]
  ex.ask(f"{IMAGE_PLACEHOLDER}\n{prompt}", (src,))
  ex.answer(phrase(rng, "think_answer", image=IMAGE_PLACEHOLDER, value=value), (out,))
  ex.meta["edits"] = kinds
  ex.question(kind, getattr(out, kind))
  return ex


def motion(rng: np.random.Generator, s: Shape, n_frames: int) -> tuple[Shape, ...]:
  """``n_frames`` placements of ``s`` along a straight line at constant speed.

  The last frame sits at a jittered anchor (so its ``position`` reads back
  exactly); the first is anywhere the object fits, at least ``MIN_TRAVEL`` away.
  """
  h = scene.HALF_EXTENT[s.size]
  j = scene.JITTER[s.size]
  while True:
    ax, ay = scene.POSITION_ANCHORS[pick(rng, POSITIONS)]
    end = np.array([ax, ay]) + rng.uniform(-j, j, size=2)
    start = rng.uniform(h, 1.0 - h, size=2)
    if np.linalg.norm(end - start) >= MIN_TRAVEL:
      break
  ts = np.linspace(0.0, 1.0, n_frames)
  return tuple(scene.move(s, tuple(float(v) for v in start + t * (end - start))) for t in ts)


def direction(frames: Sequence[Shape]) -> str:
  """The ``DIRECTIONS`` phrase of the motion from the first to the last frame."""
  dx = frames[-1].center[0] - frames[0].center[0]
  dy = frames[0].center[1] - frames[-1].center[1]  # y up
  sector = round(math.atan2(dy, dx) / (math.pi / 4)) % 8
  return DIRECTIONS[sector]


def task_next_frame(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Next-frame prediction: 2-3 frames of a moving object (seen pair) -> the next."""
  ex = Example("next_frame")
  n_prompt = int(pick(rng, (2, 3)))
  frames = motion(rng, scene.sample_shape(rng, holdout), n_prompt + 1)
  ex.ask("".join(f"{IMAGE_PLACEHOLDER}\n" for _ in range(n_prompt)) + phrase(rng, "frames"),
         *((f,) for f in frames[:-1]))
  ex.answer(IMAGE_PLACEHOLDER, (frames[-1],))
  return ex


def task_video_qa(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Video QA: 3-4 frames of a moving object (any pair), 1-2 questions."""
  ex = Example("video_qa")
  frames = motion(rng, scene.sample_shape(rng), int(pick(rng, (3, 4))))
  last = frames[-1]
  qas = {"direction": (phrase(rng, "video_direction"), direction(frames), direction(frames)),
         "position": (phrase(rng, "video_end"), WHERE[last.position], last.position),
         "color": (phrase(rng, "video_color"), last.color, last.color),
         "shape": (phrase(rng, "video_shape"), last.shape, last.shape)}
  kinds = list(qas)
  for i, j in enumerate(rng.permutation(len(kinds))[:int(pick(rng, (1, 2)))]):
    question, answer, canonical = qas[kinds[int(j)]]
    if i == 0:
      ex.ask("".join(f"{IMAGE_PLACEHOLDER}\n" for _ in frames) + question, *((f,) for f in frames))
    else:
      ex.ask(question)
    ex.answer(answer)
    ex.question(kinds[int(j)], canonical)
  return ex


def _attribute_phrase(s: Shape, attr: str) -> str:
  """How a worked multi-image answer names ``s``'s ``attr``: "red", "a circle", "on the left"."""
  if attr == "shape":
    return TEMPLATES["think_value_shape"][0].format(shape=s.shape)
  return WHERE[s.position] if attr == "position" else getattr(s, attr)


def _comparison(rng: np.random.Generator) -> tuple[str, str, tuple[Shape, Shape], str, str]:
  """(kind, question, (a, b) placed, worked answer, verdict) of a two-object comparison
  (any pairs)."""
  kind = pick(rng, MULTI_KINDS)
  a = scene.sample_shape(rng)
  if kind.startswith("same_"):
    attr = kind[len("same_"):]
    b = scene.sample_shape(rng)
    same = bool(rng.random() < 0.5)
    value = getattr(a, attr) if same else _other(rng, VALUES[attr], getattr(a, attr))
    b = Shape(**{**b.attributes(), attr: value})
    question, verdict = phrase(rng, f"multi_{kind}"), YES_NO[0] if same else YES_NO[1]
  else:
    attr = {"which_shape": "shape", "which_color": "color", "which_larger": "size"}[kind]
    b = Shape(**{**scene.sample_shape(rng).attributes(), attr: _other(rng, VALUES[attr], getattr(a, attr))})
    first = bool(rng.random() < 0.5)  # the named attribute is the first image's
    if kind == "which_larger":
      first = a.size == "large"
    named = {"shape": (a if first else b).shape, "color": (a if first else b).color}  # the answer's
    question = phrase(rng, f"multi_{kind}", **named)
    target = TEMPLATES[f"multi_target_{kind[len('which_'):]}"][0].format(**named)
    verdict = TEMPLATES["multi_verdict"][0].format(target=target, ordinal=ORDINALS[0 if first else 1])
  a, b = scene.place(a, rng), scene.place(b, rng)
  answer = TEMPLATES["multi_answer"][0].format(
    a=_attribute_phrase(a, attr), b=_attribute_phrase(b, attr), verdict=verdict)
  return kind, question, (a, b), answer, verdict


def task_multi_image(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Two images, one object each (any pairs): a comparison question, answered worked:
  "The first is red, the second is blue: no." (the verdict alone stays at chance; findings 8)."""
  ex = Example("multi_image")
  kind, question, (a, b), answer, verdict = _comparison(rng)
  ex.ask(f"{IMAGE_PLACEHOLDER}\n{IMAGE_PLACEHOLDER}\n{question}", (a,), (b,))
  ex.answer(answer)
  ex.question(kind, verdict)
  return ex


def task_text(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> Example:
  """Language-only chat about the world: 1-2 facts, or (``TEXT_COMPARISON_PROB``) a
  multi-image comparison told in words: what the language stage learns to compare from."""
  ex = Example("text")
  if rng.random() < TEXT_COMPARISON_PROB:
    kind, question, (a, b), answer, verdict = _comparison(rng)
    ex.ask(phrase(rng, "multi_told", desc=describe(a), desc2=describe(b), question=question))
    ex.answer(answer)
    ex.question(kind, verdict)
    return ex
  for j in rng.permutation(len(FACT_POOL))[:int(pick(rng, (1, 2)))]:
    kind, questions, answer = FACT_POOL[int(j)]
    ex.ask(pick(rng, questions))
    ex.answer(answer)
    ex.question(kind, answer)
  return ex


GENERATORS: dict[str, Callable[[np.random.Generator, Collection[tuple[str, str]]], Example]] = {
  "qa": task_qa, "t2i": task_t2i, "edit": task_edit, "think": task_think,
  "next_frame": task_next_frame, "video_qa": task_video_qa, "multi_image": task_multi_image,
  "text": task_text, "caption": task_caption}
