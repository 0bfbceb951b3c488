"""Conversation records of the shapes world, one generator per task kind of the method.

Every record is a LLaVA/MetaMorph conversation (see ``metamorph.data.records``)::

  {"id": "train-000123", "task": "edit", "image": ["train/000123_0.png", "train/000123_1.png"],
   "conversations": [{"from": "human", "value": "<image>\\nMake the shape blue."},
                     {"from": "gpt", "value": "<image>"}],
   "meta": {"edits": ["color"], "targets": [{"color": "blue", ...}]}}

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
  * Example ``index`` of a split draws everything from ``example_rng(seed, split,
    index)`` (``shapes.scene_rng(seed, index)`` for "train"), so records and pixels
    are reproducible one by one and ``write_world`` is byte-for-byte deterministic.
  * Held-out (colour, shape) pairs never appear in a generated image (any ``<image>``
    of a ``gpt`` turn); they do appear in prompt images (qa, video_qa, multi_image,
    and the input images of edit / think). ``eval_prompts`` gives the text-to-image
    prompts that measure generalisation to them.
  * A record with generated images has ``meta["targets"]``: the attributes of the
    single object of each generated image, in order, as ``oracle.read_image`` reads
    them back. Understanding records have ``meta["questions"]`` (question kinds)
    and ``meta["answers"]`` (canonical values), one per question turn.
  * All text comes from ``TEMPLATES`` and the phrase tables below, so
    ``world_texts()`` lists every word a record can contain (the tokenizer's vocabulary).
"""
from __future__ import annotations

import collections
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from metamorph.data import shapes
from metamorph.data.shapes import COLORS, POSITIONS, SHAPES, SIZES, Shape

IMAGE = "<image>"

GENERATION_TASKS: tuple[str, ...] = ("t2i", "edit", "think", "next_frame")  # answers hold images
UNDERSTANDING_TASKS: tuple[str, ...] = ("qa", "video_qa", "multi_image", "text")
VPIT_TASKS: tuple[str, ...] = ("qa", "t2i", "edit", "think", "next_frame", "video_qa", "multi_image", "text")
TASKS: tuple[str, ...] = (*VPIT_TASKS, "caption")
TASK_GROUPS: dict[str, tuple[str, ...]] = {
  "all": VPIT_TASKS, "generation": GENERATION_TASKS, "understanding": UNDERSTANDING_TASKS}
# Comparisons are a fifth of the records (two-image 9%, and 80% of text's 14%, told in words):
# VPiT then teaches the toy LLM to compare, given initializer_range 0.04 (findings, section 11)
DEFAULT_MIX: dict[str, float] = {
  "qa": 0.25, "t2i": 0.23, "edit": 0.09, "think": 0.08,
  "next_frame": 0.07, "video_qa": 0.05, "multi_image": 0.09, "text": 0.14}
QA_KINDS: tuple[str, ...] = ("color", "shape", "size", "position", "count", "caption")
EDIT_KINDS: tuple[str, ...] = ("color", "position", "size", "shape")

SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
TWO_OBJECT_PROB = 0.3  # qa scenes with two objects
TEXT_COMPARISON_PROB = 0.8  # text records that are a comparison told in words
MIN_TRAVEL = 0.25  # least distance (unit coordinates) from the first to the last frame
NUMBER_WORDS: tuple[str, ...] = (
  "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINALS: tuple[str, ...] = ("first", "second")
YES_NO: tuple[str, ...] = ("yes", "no")

# --- phrase tables ----------------------------------------------------------------

WHERE: dict[str, str] = {  # position -> "the shape is <phrase>"
  "left": "on the left", "right": "on the right", "top": "at the top",
  "bottom": "at the bottom", "center": "in the center"}
DESTINATION: dict[str, str] = {  # position -> "move the shape <phrase>"
  "left": "to the left", "right": "to the right", "top": "to the top",
  "bottom": "to the bottom", "center": "to the center"}
# Motion direction, by 45-degree sector counter-clockwise from +x (y pointing up).
DIRECTIONS: tuple[str, ...] = (
  "to the right", "up and to the right", "up", "up and to the left",
  "to the left", "down and to the left", "down", "down and to the right")
CORNERS: dict[str, str] = {"circle": "none", "square": "four", "triangle": "three", "diamond": "four"}
OPPOSITES: dict[str, str] = {
  "left": "right", "right": "left", "top": "bottom", "bottom": "top", "small": "large", "large": "small"}
OBJECT_NOUNS: tuple[str, ...] = ("shape", "object")

TEMPLATES: dict[str, tuple[str, ...]] = {
  "desc": ("a {size} {color} {shape} {where}",),
  "ref_at": ("{noun} {where}",),  # "shape on the left" (two-object scenes)
  "ref_named": ("{color} {shape}",),
  "qa_color": ("What colour is the {ref}?", "What color is the {ref}?",
               "Which colour does the {ref} have?"),
  "qa_shape": ("What shape is the {ref}?", "What kind of shape is the {ref}?",
               "Name the shape of the {ref}."),
  "qa_size": ("What size is the {ref}?", "Is the {ref} small or large?", "How big is the {ref}?"),
  "qa_position": ("Where is the {ref}?", "Where is the {ref} in the image?",
                  "In which part of the image is the {ref}?"),
  "qa_count": ("How many shapes are there?", "How many objects are in the image?",
               "Count the shapes in the image."),
  "qa_caption": ("Describe the image.", "What is in the image?",
                 "Write a short caption for the image.", "What do you see?"),
  "caption": ("{desc}.", "{desc} and {desc2}."),
  "t2i": ("Generate an image of {desc}.", "Draw {desc}.", "Create a picture of {desc}.",
          "Show me {desc}.", "Make an image of {desc}.", "Can you draw {desc}?",
          "Please generate an image of {desc}."),
  "t2i_answer": ("Here is an image based on your request: {image}",),
  "edit_color": ("Make the shape {color}.", "Change the colour of the shape to {color}.",
                 "Paint the object {color}.", "Change the color of the object to {color}."),
  "edit_position": ("Move the shape {dest}.", "Move the object {dest}.", "Place the shape {where}."),
  "edit_size": ("Make the shape {size}.", "Make the object {size}.",
                "Resize the shape so that it is {size}."),
  "edit_shape": ("Turn the shape into a {shape}.", "Replace the {old} with a {shape}.",
                 "Change the {old} into a {shape}."),
  "think_color": ("in {color}",),
  "think_position": ("moved {dest}",),
  "think_size": ("made {size}",),
  "think_shape": ("as a {shape}",),
  "think_prompt": ("Imagine the {noun} {changes}. {question} Think visually.",),
  "think_join": ("{a} and {b}",),
  "think_q_color": ("What colour is it then?", "Which color does it have then?"),
  "think_q_shape": ("What shape is it then?",),
  "think_q_size": ("What size is it then?", "Is it small or large then?"),
  "think_q_position": ("Where is it then?", "Where does it end up?"),
  "think_answer": ("{image} It is {value}.",),
  "think_value_shape": ("a {shape}",),
  "frames": ("The shape moves in a straight line. What comes next?", "What comes next?",
             "Predict the next frame.", "Show the next frame.", "Draw the frame that comes next.",
             "These frames show a moving shape. Draw the next one."),
  "video_direction": ("In which direction is the shape moving?", "Which way does the shape move?"),
  "video_end": ("Where does the shape end up?", "Where is the shape in the last frame?"),
  "video_color": ("What colour is the moving shape?", "What color is the shape that moves?"),
  "video_shape": ("What shape is moving?", "What kind of shape moves in these frames?"),
  "multi_same_color": ("Do the two shapes have the same colour?", "Are the two shapes the same color?"),
  "multi_same_shape": ("Do the two images show the same shape?", "Are the two objects the same shape?"),
  "multi_same_size": ("Are the two shapes the same size?", "Do the two objects have the same size?"),
  "multi_same_position": ("Are the two shapes in the same position?",
                          "Are the two objects in the same place?"),
  "multi_which_shape": ("Which image shows the {shape}, the first or the second?",),
  "multi_which_color": ("Which image shows the {color} shape, the first or the second?",),
  "multi_which_larger": ("Which shape is larger, the first or the second?",
                         "Which image shows the larger shape, the first or the second?"),
  # worked answers: what each image shows, then the verdict ("yes", "no", "the square is the second")
  "multi_answer": ("The first is {a}, the second is {b}: {verdict}.",),
  # a which-verdict restates the question's target next to the words it is compared with
  # (understanding 92.8 -> 98.0%, which shape / colour 52 / 63 -> 98 / 100%; findings 15)
  "multi_verdict": ("{target} is the {ordinal}",),
  "multi_target_shape": ("the {shape}",),
  "multi_target_color": ("the {color} one",),
  "multi_target_larger": ("the larger one",),
  "multi_told": ("The first image shows {desc}, the second {desc2}. {question}",),
  "fact_corners": ("How many corners does a {shape} have?",),
  "fact_opposite": ("What is the opposite of {word}?",),
  "fact_answer_shape": ("the {shape}",),
}


def _facts() -> tuple[tuple[tuple[str, ...], str], ...]:
  """Fixed language-only (question paraphrases, answer) pairs about the world."""
  def listing(words: Sequence[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1]
  return (
    (("Which shape has three corners?",), "the triangle"),
    (("Which shape has no corners?", "Which shape is round?"), "the circle"),
    (("Which shape looks like a plus sign?",), "the cross"),
    (("Which shape looks like a square standing on a corner?",), "the diamond"),
    (("Name the colours of this world.", "Which colors are there in this world?"), listing(COLORS)),
    (("Name the shapes of this world.", "Which shapes are there in this world?"), listing(SHAPES)),
    (("What sizes can a shape have?",), listing(SIZES)),
    (("Where can a shape be?", "Name the positions of this world."),
     listing([WHERE[p] for p in POSITIONS])),
    (("How many colours are there in this world?",), NUMBER_WORDS[len(COLORS)]),
    (("How many kinds of shapes are there in this world?",), NUMBER_WORDS[len(SHAPES)]),
  )


FACTS = _facts()


def world_texts() -> list[str]:
  """Every template (fields removed) and every fill value: all words records can hold."""
  texts = [re.sub(r"\{[a-z0-9_]*\}", " ", t) for ts in TEMPLATES.values() for t in ts]
  texts += [IMAGE, *COLORS, *SHAPES, *SIZES, *POSITIONS, *WHERE.values(), *DESTINATION.values()]
  texts += [*DIRECTIONS, *CORNERS.values(), *OPPOSITES, *NUMBER_WORDS, *ORDINALS, *YES_NO]
  texts += [*OBJECT_NOUNS]
  for questions, answer in FACTS:
    texts += [*questions, answer]
  return texts


# --- small helpers ----------------------------------------------------------------


def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def _t(rng: np.random.Generator, name: str, **fields: str) -> str:
  """A random paraphrase of template ``name``, filled in."""
  return _pick(rng, TEMPLATES[name]).format(**fields)


def _cap(text: str) -> str:
  return text[:1].upper() + text[1:]


def _desc(s: Shape) -> str:
  return TEMPLATES["desc"][0].format(size=s.size, color=s.color, shape=s.shape, where=WHERE[s.position])


def _offset(s: Shape) -> tuple[float, float]:
  """Centre minus its position's anchor (the jitter) of a placed shape."""
  ax, ay = shapes.POSITION_ANCHORS[s.position]
  return s.center[0] - ax, s.center[1] - ay


def _replace(s: Shape, **changes: str) -> Shape:
  """``s`` (placed) with new attributes; the jitter is kept, clipped to the new size's."""
  out = Shape(**{**s.attributes(), **changes})
  j = shapes.JITTER[out.size]
  dx, dy = (min(max(v, -j), j) for v in _offset(s))
  ax, ay = shapes.POSITION_ANCHORS[out.position]
  return Shape(**out.attributes(), center=(ax + dx, ay + dy))


def _other(rng: np.random.Generator, values: Sequence[str], current: str) -> str:
  return _pick(rng, [v for v in values if v != current])


def _allowed(s: Shape, holdout: Collection[tuple[str, str]]) -> bool:
  return (s.color, s.shape) not in holdout


class _Example:
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


# --- task generators: rng, holdout -> _Example ---------------------------------------


def _qa_question(rng: np.random.Generator, kind: str, objs: tuple[Shape, ...]) -> tuple[str, str, str]:
  """(question, answer text, canonical answer) about a one- or two-object scene."""
  target = objs[int(rng.integers(len(objs)))]
  noun = _pick(rng, OBJECT_NOUNS)
  noun = "object" if kind == "shape" else noun  # not "What shape is the shape?"
  ref = noun if len(objs) == 1 else TEMPLATES["ref_at"][0].format(noun=noun, where=WHERE[target.position])
  if kind == "color":
    return _t(rng, "qa_color", ref=ref), target.color, target.color
  if kind == "shape":
    return _t(rng, "qa_shape", ref=ref), target.shape, target.shape
  if kind == "size":
    return _t(rng, "qa_size", ref=ref), target.size, target.size
  if kind == "position":
    if len(objs) > 1 or rng.random() < 0.5:  # name the object by its colour and shape
      ref = TEMPLATES["ref_named"][0].format(color=target.color, shape=target.shape)
    return _t(rng, "qa_position", ref=ref), WHERE[target.position], target.position
  if kind == "count":
    return _t(rng, "qa_count"), NUMBER_WORDS[len(objs)], NUMBER_WORDS[len(objs)]
  if kind == "caption":
    descs = [_desc(o) for o in objs]
    text = TEMPLATES["caption"][len(objs) - 1].format(desc=_cap(descs[0]), desc2=descs[-1])
    return _t(rng, "qa_caption"), text, text
  raise ValueError(kind)


def _distinct(objs: tuple[Shape, ...]) -> bool:
  return len({(o.color, o.shape) for o in objs}) == len(objs)


def _qa_scene(rng: np.random.Generator) -> tuple[Shape, ...]:
  """One object, or two with probability ``TWO_OBJECT_PROB``, placed (any pair)."""
  n_objects = 2 if rng.random() < TWO_OBJECT_PROB else 1
  return tuple(shapes.place(s, rng) for s in shapes.sample_scene(rng, n_objects))


def task_qa(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Image QA: 1-3 questions of distinct kinds about one image (any pair)."""
  ex = _Example("qa")
  objs = _qa_scene(rng)
  kinds = [k for k in QA_KINDS if not (k == "position" and len(objs) == 2 and not _distinct(objs))]
  n_turns = 1 + int(rng.choice(3, p=[0.5, 0.3, 0.2]))
  for i, j in enumerate(rng.permutation(len(kinds))[:n_turns]):
    question, answer, canonical = _qa_question(rng, kinds[int(j)], objs)
    if i == 0:
      ex.ask(f"{IMAGE}\n{question}", objs)
    else:
      ex.ask(question)
    ex.answer(answer)
    ex.question(kinds[int(j)], canonical)
  return ex


def task_caption(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """An image-caption pair: a qa scene with its one caption question."""
  ex = _Example("caption")
  objs = _qa_scene(rng)
  question, answer, canonical = _qa_question(rng, "caption", objs)
  ex.ask(f"{IMAGE}\n{question}", objs)
  ex.answer(answer)
  ex.question("caption", canonical)
  return ex


def task_t2i(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Text-to-image for a seen (colour, shape) pair."""
  ex = _Example("t2i")
  s = shapes.place(shapes.sample_shape(rng, holdout), rng)
  ex.ask(_t(rng, "t2i", desc=_desc(s)))
  ex.answer(_t(rng, "t2i_answer", image=IMAGE), (s,))
  return ex


def _apply(rng: np.random.Generator, s: Shape, kind: str) -> Shape:
  """``s`` with attribute ``kind`` changed to a different random value."""
  values = {"color": COLORS, "position": POSITIONS, "size": SIZES, "shape": SHAPES}[kind]
  return _replace(s, **{kind: _other(rng, values, getattr(s, kind))})


def _edited(rng: np.random.Generator, holdout: Collection[tuple[str, str]], n_edits: Sequence[int],
            tries: int = 100) -> tuple[Shape, list[str], Shape]:
  """(source (any pair), edit kinds, result (not held out)), placed."""
  for _ in range(tries):
    src = shapes.place(shapes.sample_shape(rng), rng)
    n = int(_pick(rng, n_edits))
    kinds = [EDIT_KINDS[int(i)] for i in sorted(rng.permutation(len(EDIT_KINDS))[:n])]
    out = src
    for kind in kinds:
      out = _apply(rng, out, kind)
    if _allowed(out, holdout):
      return src, kinds, out
  raise ValueError("the holdout leaves no allowed edit result")


def task_edit(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Image editing: recolour, move, resize or reshape one object."""
  ex = _Example("edit")
  src, [kind], out = _edited(rng, holdout, (1,))
  if kind == "position":
    text = _t(rng, "edit_position", dest=DESTINATION[out.position], where=WHERE[out.position])
  else:
    text = _t(rng, f"edit_{kind}", **{kind: getattr(out, kind)}, old=src.shape)
  ex.ask(f"{IMAGE}\n{text}", (src,))
  ex.answer(IMAGE, (out,))
  ex.meta["edits"] = [kind]
  return ex


def task_think(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Visual thinking: imagine an edited object, draw it, then answer from the drawing."""
  ex = _Example("think")
  src, kinds, out = _edited(rng, holdout, (1, 2))
  fill = {"color": out.color, "dest": DESTINATION[out.position], "size": out.size, "shape": out.shape}
  changes = [_t(rng, f"think_{k}", **fill) for k in kinds]
  changes_text = changes[0] if len(changes) == 1 else TEMPLATES["think_join"][0].format(a=changes[0], b=changes[1])
  kind = _pick(rng, EDIT_KINDS)
  prompt = _t(rng, "think_prompt", noun=_pick(rng, OBJECT_NOUNS), changes=changes_text,
              question=_t(rng, f"think_q_{kind}"))
  value = {"color": out.color, "size": out.size, "position": WHERE[out.position],
           "shape": TEMPLATES["think_value_shape"][0].format(shape=out.shape)}[kind]
  ex.ask(f"{IMAGE}\n{prompt}", (src,))
  ex.answer(_t(rng, "think_answer", image=IMAGE, value=value), (out,))
  ex.meta["edits"] = kinds
  ex.question(kind, getattr(out, kind))
  return ex


def motion(rng: np.random.Generator, s: Shape, n_frames: int) -> tuple[Shape, ...]:
  """``n_frames`` placements of ``s`` along a straight line at constant speed.

  The last frame sits at a jittered anchor (so its ``position`` reads back
  exactly); the first is anywhere the object fits, at least ``MIN_TRAVEL`` away.
  """
  h = shapes.HALF_EXTENT[s.size]
  j = shapes.JITTER[s.size]
  while True:
    ax, ay = shapes.POSITION_ANCHORS[_pick(rng, POSITIONS)]
    end = np.array([ax, ay]) + rng.uniform(-j, j, size=2)
    start = rng.uniform(h, 1.0 - h, size=2)
    if np.linalg.norm(end - start) >= MIN_TRAVEL:
      break
  ts = np.linspace(0.0, 1.0, n_frames)
  return tuple(shapes.move(s, tuple(float(v) for v in start + t * (end - start))) for t in ts)


def direction(frames: Sequence[Shape]) -> str:
  """The ``DIRECTIONS`` phrase of the motion from the first to the last frame."""
  dx = frames[-1].center[0] - frames[0].center[0]
  dy = frames[0].center[1] - frames[-1].center[1]  # y up
  sector = round(math.atan2(dy, dx) / (math.pi / 4)) % 8
  return DIRECTIONS[sector]


def task_next_frame(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Next-frame prediction: 2-3 frames of a moving object (seen pair) -> the next."""
  ex = _Example("next_frame")
  n_prompt = int(_pick(rng, (2, 3)))
  frames = motion(rng, shapes.sample_shape(rng, holdout), n_prompt + 1)
  ex.ask(IMAGE + "\n" + "".join(f"{IMAGE}\n" for _ in range(n_prompt - 1)) + _t(rng, "frames"),
         *((f,) for f in frames[:-1]))
  ex.answer(IMAGE, (frames[-1],))
  return ex


def task_video_qa(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Video QA: 3-4 frames of a moving object (any pair), 1-2 questions."""
  ex = _Example("video_qa")
  frames = motion(rng, shapes.sample_shape(rng), int(_pick(rng, (3, 4))))
  last = frames[-1]
  qas = {"direction": (_t(rng, "video_direction"), direction(frames), direction(frames)),
         "position": (_t(rng, "video_end"), WHERE[last.position], last.position),
         "color": (_t(rng, "video_color"), last.color, last.color),
         "shape": (_t(rng, "video_shape"), last.shape, last.shape)}
  kinds = list(qas)
  for i, j in enumerate(rng.permutation(len(kinds))[:int(_pick(rng, (1, 2)))]):
    question, answer, canonical = qas[kinds[int(j)]]
    if i == 0:
      ex.ask("".join(f"{IMAGE}\n" for _ in frames) + question, *((f,) for f in frames))
    else:
      ex.ask(question)
    ex.answer(answer)
    ex.question(kinds[int(j)], canonical)
  return ex


MULTI_KINDS: tuple[str, ...] = (
  "same_color", "same_shape", "same_size", "same_position", "which_shape", "which_color", "which_larger")


def _attribute_phrase(s: Shape, attr: str) -> str:
  """How a worked multi-image answer names ``s``'s ``attr``: "red", "a circle", "on the left"."""
  if attr == "shape":
    return TEMPLATES["think_value_shape"][0].format(shape=s.shape)
  return WHERE[s.position] if attr == "position" else getattr(s, attr)


def _comparison(rng: np.random.Generator) -> tuple[str, str, tuple[Shape, Shape], str, str]:
  """(kind, question, (a, b) placed, worked answer, verdict) of a two-object comparison
  (any pairs)."""
  kind = _pick(rng, MULTI_KINDS)
  a = shapes.sample_shape(rng)
  if kind.startswith("same_"):
    attr = kind[len("same_"):]
    b = shapes.sample_shape(rng)
    same = bool(rng.random() < 0.5)
    values = {"color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}[attr]
    value = getattr(a, attr) if same else _other(rng, values, getattr(a, attr))
    b = Shape(**{**b.attributes(), attr: value})
    question, verdict = _t(rng, f"multi_{kind}"), YES_NO[0] if same else YES_NO[1]
  else:
    attr = {"which_shape": "shape", "which_color": "color", "which_larger": "size"}[kind]
    values = {"shape": SHAPES, "color": COLORS, "size": SIZES}[attr]
    b = Shape(**{**shapes.sample_shape(rng).attributes(), attr: _other(rng, values, getattr(a, attr))})
    first = bool(rng.random() < 0.5)  # the named attribute is the first image's
    if kind == "which_larger":
      first = a.size == "large"
    named = {"shape": (a if first else b).shape, "color": (a if first else b).color}  # the answer's
    question = _t(rng, f"multi_{kind}", **named)
    target = TEMPLATES[f"multi_target_{kind[len('which_'):]}"][0].format(**named)
    verdict = TEMPLATES["multi_verdict"][0].format(target=target, ordinal=ORDINALS[0 if first else 1])
  a, b = shapes.place(a, rng), shapes.place(b, rng)
  answer = TEMPLATES["multi_answer"][0].format(
    a=_attribute_phrase(a, attr), b=_attribute_phrase(b, attr), verdict=verdict)
  return kind, question, (a, b), answer, verdict


def task_multi_image(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Two images, one object each (any pairs): a comparison question, answered worked:
  "The first is red, the second is blue: no." (the verdict alone stays at chance; findings 8)."""
  ex = _Example("multi_image")
  kind, question, (a, b), answer, verdict = _comparison(rng)
  ex.ask(f"{IMAGE}\n{IMAGE}\n{question}", (a,), (b,))
  ex.answer(answer)
  ex.question(kind, verdict)
  return ex


def _fact_pool() -> list[tuple[str, tuple[str, ...], str]]:
  """(kind, question paraphrases, answer) of every language-only fact."""
  pool = [("fact", qs, a) for qs, a in FACTS]
  pool += [("corners", (TEMPLATES["fact_corners"][0].format(shape=s),), n) for s, n in CORNERS.items()]
  pool += [("opposite", (TEMPLATES["fact_opposite"][0].format(word=w),), o) for w, o in OPPOSITES.items()]
  return pool


FACT_POOL = _fact_pool()


def task_text(rng: np.random.Generator, holdout: Collection[tuple[str, str]]) -> _Example:
  """Language-only chat about the world: 1-2 facts, or (``TEXT_COMPARISON_PROB``) a
  multi-image comparison told in words: what the language stage learns to compare from."""
  ex = _Example("text")
  if rng.random() < TEXT_COMPARISON_PROB:
    kind, question, (a, b), answer, verdict = _comparison(rng)
    ex.ask(_t(rng, "multi_told", desc=_desc(a), desc2=_desc(b), question=question))
    ex.answer(answer)
    ex.question(kind, verdict)
    return ex
  for j in rng.permutation(len(FACT_POOL))[:int(_pick(rng, (1, 2)))]:
    kind, questions, answer = FACT_POOL[int(j)]
    ex.ask(_pick(rng, questions))
    ex.answer(answer)
    ex.question(kind, answer)
  return ex


GENERATORS: dict[str, Callable[[np.random.Generator, Collection[tuple[str, str]]], _Example]] = {
  "qa": task_qa, "t2i": task_t2i, "edit": task_edit, "think": task_think,
  "next_frame": task_next_frame, "video_qa": task_video_qa, "multi_image": task_multi_image,
  "text": task_text, "caption": task_caption}


# --- arguments --------------------------------------------------------------------


def parse_pair(spec: str | Sequence[str]) -> tuple[str, str]:
  """"red:circle" (or ("red", "circle")) -> ("red", "circle"); ValueError naming the
  allowed colours and shapes otherwise."""
  parts = spec.split(":") if isinstance(spec, str) else list(spec)
  if len(parts) != 2:
    raise ValueError(f"holdout pair {spec!r} is not COLOR:SHAPE (e.g. red:circle)")
  color, kind = (p.strip().lower() for p in parts)
  if color not in COLORS:
    raise ValueError(f"holdout pair {spec!r}: colour {color!r} is not one of {', '.join(COLORS)}")
  if kind not in SHAPES:
    raise ValueError(f"holdout pair {spec!r}: shape {kind!r} is not one of {', '.join(SHAPES)}")
  return color, kind


def normalize_holdout(holdout: Iterable[str | Sequence[str]]) -> tuple[tuple[str, str], ...]:
  """Validated, de-duplicated, sorted (colour, shape) pairs; at least one pair stays seen."""
  pairs = tuple(sorted({parse_pair(p) for p in holdout}))
  if len(pairs) >= len(COLORS) * len(SHAPES):
    raise ValueError("the holdout excludes every (colour, shape) pair")
  return pairs


def _expand(name: str) -> tuple[str, ...]:
  """A task name or a ``TASK_GROUPS`` name -> task names; ValueError if unknown."""
  if name in TASK_GROUPS:
    return TASK_GROUPS[name]
  if name in TASKS:
    return (name,)
  raise ValueError(f"unknown task kind {name!r}; choose from {', '.join(TASKS)} "
                   f"or the groups {', '.join(TASK_GROUPS)}")


def resolve_mix(tasks: str | Sequence[str] | Mapping[str, float] | None = None) -> dict[str, float]:
  """Task weights, normalised to sum 1, in ``TASKS`` order, zero weights dropped.

  tasks: None (``DEFAULT_MIX``); a mapping task -> weight; a list of task or
  group names (``TASK_GROUPS``), which keep their default relative weights (1 for
  "caption", which has none); or the CLI's string form "qa,t2i" / "qa:3,t2i:1" /
  "understanding,t2i:0.1".
  """
  weights: dict[str, float] = {}
  if tasks is None:
    weights = dict(DEFAULT_MIX)
  elif isinstance(tasks, str):
    for item in filter(None, (s.strip() for s in tasks.split(","))):
      name, _, w = item.partition(":")
      try:
        value = float(w) if w else None
      except ValueError:
        raise ValueError(f"task weight {item!r} is not NAME or NAME:NUMBER") from None
      for t in _expand(name.strip()):
        weights[t] = DEFAULT_MIX.get(t, 1.0) if value is None else value
  elif isinstance(tasks, Mapping):
    for name, w in tasks.items():
      for t in _expand(name):
        weights[t] = float(w)
  else:
    for name in tasks:
      for t in _expand(name):
        weights[t] = DEFAULT_MIX.get(t, 1.0)
  if any(not (w >= 0 and math.isfinite(w)) for w in weights.values()) or not sum(weights.values()) > 0:
    raise ValueError(f"task weights must be >= 0 with a positive sum, got {weights}")
  total = sum(weights.values())
  return {t: weights[t] / total for t in TASKS if weights.get(t, 0.0) > 0}


# --- records ----------------------------------------------------------------------


def _split_key(split: str) -> int:
  return zlib.crc32(split.encode())


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example ``index``: ``shapes.scene_rng(seed, index)`` for "train",
  an independent stream per other split (seeded by the split's name)."""
  if split == "train":
    return shapes.scene_rng(seed, index)
  return np.random.default_rng([seed, index, _split_key(split)])


def image_name(split: str, index: int, k: int) -> str:
  """Path of the k-th image of example ``index``, relative to the image root."""
  return f"{split}/{index:06d}_{k}.png"


def _targets(turns: Sequence[tuple[str, str]], images: Sequence[tuple[Shape, ...]]) -> list[dict[str, str]]:
  """Attributes of the object of every image placed in a gpt turn, in order."""
  targets, k = [], 0
  for who, text in turns:
    for _ in range(text.count(IMAGE)):
      if who == "gpt":
        [obj] = images[k]
        targets.append(obj.attributes())
      k += 1
  return targets


def make_example(seed: int, index: int, *, holdout: Collection[tuple[str, str]] = (),
                 tasks: Mapping[str, float] | Sequence[str] | str | None = None, split: str = "train",
                 image_size: int = shapes.DEFAULT_SIZE) -> tuple[dict[str, Any], list[np.ndarray]]:
  """One record and its images (uint8 [image_size, image_size, 3], in placeholder order).

  Deterministic in (seed, split, index, holdout, tasks, image_size).
  """
  mix = resolve_mix(tasks)
  holdout = frozenset(normalize_holdout(holdout))
  rng = example_rng(seed, split, index)
  names = list(mix)
  task = names[int(rng.choice(len(names), p=np.asarray([mix[t] for t in names])))]
  ex = GENERATORS[task](rng, holdout)
  arrays = [shapes.render(objs, size=image_size, rng=rng) for objs in ex.images]
  record: dict[str, Any] = {"id": f"{split}-{index:06d}", "task": task}
  if ex.images:
    record["image"] = [image_name(split, index, k) for k in range(len(ex.images))]
  record["conversations"] = [{"from": who, "value": text} for who, text in ex.turns]
  meta = dict(ex.meta)
  if ex.images:
    meta["objects"] = [len(objs) for objs in ex.images]  # per image, in placeholder order
  targets = _targets(ex.turns, ex.images)
  if targets:
    meta["targets"] = targets
  record["meta"] = meta
  validate_record(record)
  return record, arrays


def validate_record(record: Mapping[str, Any], prompt_only: bool = False) -> None:
  """Raises ValueError unless: turns alternate human/gpt from human and end with gpt
  (one human turn when ``prompt_only``), placeholders == images, and one meta target
  per generated image."""
  turns = record.get("conversations")
  if not isinstance(turns, list) or not turns:
    raise ValueError(f"{record.get('id')}: no conversations")
  roles = [t["from"] for t in turns]
  expected = ["human"] if prompt_only else ["human", "gpt"] * (len(roles) // 2)
  if roles != expected:
    raise ValueError(f"{record.get('id')}: roles {roles} do not alternate human/gpt")
  if any(not isinstance(t["value"], str) or not t["value"].strip() for t in turns):
    raise ValueError(f"{record.get('id')}: empty turn")
  images = record.get("image", [])
  placeholders = sum(t["value"].count(IMAGE) for t in turns)
  if placeholders != len(images):
    raise ValueError(f"{record.get('id')}: {placeholders} placeholders, {len(images)} images")
  generated = sum(t["value"].count(IMAGE) for t in turns if t["from"] == "gpt")
  if len(record.get("meta", {}).get("targets", [])) != (1 if prompt_only else generated):
    raise ValueError(f"{record.get('id')}: meta targets do not match the {generated} generated images")


def _dumps(record: Mapping[str, Any]) -> str:
  return json.dumps(record, ensure_ascii=False)


def _save_png(array: np.ndarray, path: str) -> None:
  Image.fromarray(array).save(path, format="PNG", compress_level=6)


def write_world(out_dir: str, n: int, seed: int, holdout: Iterable[str | Sequence[str]] = (),
                image_size: int = shapes.DEFAULT_SIZE,
                tasks: Mapping[str, float] | Sequence[str] | str | None = None,
                split: str = "train", progress: bool = True) -> dict[str, int]:
  """Writes ``out_dir/{split}.jsonl`` (n records) and ``out_dir/images/{split}/*.png``.

  Returns the number of records per task kind (``TASKS`` order). The same
  arguments give byte-identical files.
  """
  from tqdm import tqdm
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be an int >= 0, got {n!r}")
  if not isinstance(image_size, (int, np.integer)) or image_size < shapes.MIN_SIZE:
    raise ValueError(f"image_size must be an int >= {shapes.MIN_SIZE}, got {image_size!r}")
  if not SPLIT_NAME.match(split):
    raise ValueError(f"split {split!r} must match {SPLIT_NAME.pattern}")
  pairs = normalize_holdout(holdout)
  mix = resolve_mix(tasks)
  os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  counts: collections.Counter = collections.Counter()
  path = os.path.join(out_dir, f"{split}.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for index in tqdm(range(n), desc=f"shapes world {split}", unit="rec", disable=not progress):
      record, arrays = make_example(seed, index, holdout=pairs, tasks=mix, split=split,
                                    image_size=image_size)
      for name, array in zip(record.get("image", ()), arrays):
        _save_png(array, os.path.join(out_dir, "images", name))
      f.write(_dumps(record) + "\n")
      counts[record["task"]] += 1
  os.replace(path + ".tmp", path)
  return {t: counts[t] for t in TASKS if counts[t]}


# --- evaluation prompts -----------------------------------------------------------


def eval_prompts(holdout: Iterable[str | Sequence[str]] = (), seed: int = 0,
                 seen: bool = True) -> list[dict[str, Any]]:
  """Text-to-image evaluation prompts: every size and position of every held-out pair
  (and of every seen pair when ``seen``).

  Prompt-only records (a single human turn, no image; ``validate_record(r,
  prompt_only=True)``) with ``meta = {"targets": [attributes], "heldout": bool}``;
  the answer the model generates is graded with ``oracle.read_image`` against the target.
  """
  pairs = set(normalize_holdout(holdout))
  out = []
  for color in COLORS:
    for kind in SHAPES:
      held = (color, kind) in pairs
      if not (held or seen):
        continue
      for size in SIZES:
        for position in POSITIONS:
          s = Shape(color, kind, size, position)
          rng = np.random.default_rng([seed, len(out), _split_key("eval")])
          out.append({"id": f"eval-{len(out):05d}", "task": "t2i",
                      "conversations": [{"from": "human", "value": _t(rng, "t2i", desc=_desc(s))}],
                      "meta": {"targets": [s.attributes()], "heldout": held}})
  return out


def write_eval_prompts(out_dir: str, holdout: Iterable[str | Sequence[str]] = (), seed: int = 0,
                       name: str = "eval_t2i.jsonl") -> tuple[str, int]:
  """Writes ``eval_prompts`` to ``out_dir/name``; returns (path, number of prompts)."""
  records = eval_prompts(holdout, seed)
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, name)
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(_dumps(r) + "\n")
  return path, len(records)

