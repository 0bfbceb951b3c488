"""The world-knowledge probes of a shapes world (``eval_knowledge.jsonl``).

The paper's claim at toy scale: a model whose LLM was pretrained on language draws and reads
the world's attributes when a prompt names them only through knowledge of the real world or
through words the world never uses ("a shape with three sides in the colour of a ripe
banana": a yellow triangle). A fixed probe set, written once here; ground truth per probe:

  t2i/knowledge    ``DRAW`` prompts naming colour and shape through knowledge (banana, three sides)
  t2i/paraphrase   ``DRAW`` prompts in synonyms outside the world's templates ("a crimson ball")
  qa/knowledge     ``ASK`` yes/no questions about a rendered image, the named value through
                   knowledge ("Is the object round like a coin?")
  qa/paraphrase    ``ASK`` questions in words the world never uses: open ("What hue is the
                   object?" -> "blue") or yes/no with a synonym ("Is the object crimson?")

Each probe carries its in-template control: the world's own phrasing of the same target (a
``TEMPLATES["t2i"]`` prompt of the same colour and shape; the world's colour or shape question
about the same image), so a report puts the two side by side. A prompt holds no colour, shape,
size or position word of the world (no word that starts with one: "blueberry", "diamonds"), and
at least one word outside the world's vocabulary (tests/test_knowledge.py checks both).
Generated images are graded on the probe's colour and shape (``oracle.read_image``), answers
by exact match. No target is one of the demo's held-out pairs; ``heldout`` says so per world.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from metamorph.shapes.examples import image_name, split_key
from metamorph.shapes.phrases import YES_NO, describe, phrase
from metamorph.shapes.scene import DEFAULT_SIZE, POSITIONS, SIZES, Shape, normalize_holdout, render
from metamorph.tokens import IMAGE_PLACEHOLDER

KNOWLEDGE_SPLIT = "knowledge"  # the probe images: images/knowledge/*.png
KINDS: tuple[str, ...] = ("t2i/knowledge", "t2i/paraphrase", "qa/knowledge", "qa/paraphrase")
DRAWN: tuple[str, ...] = ("color", "shape")  # what a drawing probe is graded on


@dataclasses.dataclass(frozen=True)
class Draw:
  """A text-to-image probe: ``prompt`` asks for a ``color`` ``shape``."""
  kind: str  # "knowledge" | "paraphrase"
  prompt: str
  color: str
  shape: str


@dataclasses.dataclass(frozen=True)
class Ask:
  """An understanding probe about one rendered object of ``color`` and ``shape``.

  ``asks``: the attribute the question is about. ``named``: the value a yes/no question
  names (its answer: "yes" when the object has it, else "no"); None for an open question,
  whose answer is the object's ``asks`` value.
  """
  kind: str  # "knowledge" | "paraphrase"
  question: str
  asks: str  # "color" | "shape"
  named: str | None
  color: str
  shape: str

  @property
  def answer(self) -> str:
    value = getattr(self, self.asks)
    return value if self.named is None else YES_NO[0] if value == self.named else YES_NO[1]


DRAW: tuple[Draw, ...] = (
  Draw("knowledge", "Draw a shape with three sides in the colour of a ripe banana.", "yellow", "triangle"),
  Draw("knowledge", "Draw something round like a coin in the colour of a ripe tomato.", "red", "circle"),
  Draw("knowledge", "Draw a shape with four equal sides and four corners of ninety degrees in the colour "
       "of fresh grass.", "green", "square"),
  Draw("knowledge", "Draw a shape like a baseball infield in the colour of an amethyst.", "purple", "diamond"),
  Draw("knowledge", "Draw the symbol on the Swiss flag in the colour of the C ink in a CMYK printer.",
       "cyan", "cross"),
  Draw("knowledge", "Draw a shape like a slice of pizza in the colour of a sapphire.", "blue", "triangle"),
  Draw("knowledge", "Draw something shaped like a full moon in the colour of a lemon.", "yellow", "circle"),
  Draw("knowledge", "Draw a shape like a kite in the colour of an emerald.", "green", "diamond"),
  Draw("knowledge", "Draw a shape like a chessboard in the colour of a fire engine.", "red", "square"),
  Draw("knowledge", "Draw the sign used for addition in the colour of an aubergine.", "purple", "cross"),
  Draw("knowledge", "Draw a shape like a mountain peak in the colour of a turquoise gemstone.", "cyan",
       "triangle"),
  Draw("knowledge", "Draw a shape like one face of a dice in the colour of denim jeans.", "blue", "square"),
  Draw("paraphrase", "Make a picture of a crimson ball.", "red", "circle"),
  Draw("paraphrase", "Sketch a jade three-sided polygon.", "green", "triangle"),
  Draw("paraphrase", "Paint a cobalt box.", "blue", "square"),
  Draw("paraphrase", "Render a golden rhombus.", "yellow", "diamond"),
  Draw("paraphrase", "Put an aqua disc on the canvas.", "cyan", "circle"),
  Draw("paraphrase", "Paint a violet regular quadrilateral.", "purple", "square"),
  Draw("paraphrase", "Sketch a scarlet plus symbol.", "red", "cross"),
  Draw("paraphrase", "Depict a jade disk.", "green", "circle"),
  Draw("paraphrase", "Sketch a cobalt lozenge.", "blue", "diamond"),
  Draw("paraphrase", "Paint a golden box.", "yellow", "square"),
  Draw("paraphrase", "Sketch an aqua plus symbol.", "cyan", "cross"),
  Draw("paraphrase", "Render a violet wedge.", "purple", "triangle"),
)

ASK: tuple[Ask, ...] = (
  # knowledge: each question once about an object that has the named value, once about one that has not
  Ask("knowledge", "Is the object the colour of a ripe banana?", "color", "yellow", "yellow", "diamond"),
  Ask("knowledge", "Is the object the colour of a ripe banana?", "color", "yellow", "green", "diamond"),
  Ask("knowledge", "Does the shape have the colour of a ripe tomato?", "color", "red", "red", "square"),
  Ask("knowledge", "Does the shape have the colour of a ripe tomato?", "color", "red", "purple", "square"),
  Ask("knowledge", "Is the object the colour of fresh grass?", "color", "green", "green", "cross"),
  Ask("knowledge", "Is the object the colour of fresh grass?", "color", "green", "blue", "cross"),
  Ask("knowledge", "Is the object round like a coin?", "shape", "circle", "cyan", "circle"),
  Ask("knowledge", "Is the object round like a coin?", "shape", "circle", "cyan", "square"),
  Ask("knowledge", "Does the object have exactly three sides?", "shape", "triangle", "purple", "triangle"),
  Ask("knowledge", "Does the object have exactly three sides?", "shape", "triangle", "purple", "diamond"),
  Ask("knowledge", "Does the object look like the symbol on the Swiss flag?", "shape", "cross", "yellow", "cross"),
  Ask("knowledge", "Does the object look like the symbol on the Swiss flag?", "shape", "cross", "yellow",
      "circle"),
  # paraphrase: open questions in other words, then yes/no questions with a synonym
  Ask("paraphrase", "What hue is the object?", "color", None, "blue", "triangle"),
  Ask("paraphrase", "Which hue does the object have?", "color", None, "purple", "circle"),
  Ask("paraphrase", "Name the hue of the object.", "color", None, "cyan", "square"),
  Ask("paraphrase", "What form does the object have?", "shape", None, "red", "diamond"),
  Ask("paraphrase", "What geometric figure is this?", "shape", None, "green", "cross"),
  Ask("paraphrase", "Which figure is drawn in the picture?", "shape", None, "yellow", "triangle"),
  Ask("paraphrase", "Is the object crimson?", "color", "red", "red", "diamond"),
  Ask("paraphrase", "Is the object crimson?", "color", "red", "blue", "diamond"),
  Ask("paraphrase", "Is this a rhombus?", "shape", "diamond", "yellow", "diamond"),
  Ask("paraphrase", "Is this a rhombus?", "shape", "diamond", "yellow", "square"),
  Ask("paraphrase", "Is the object a disc?", "shape", "circle", "green", "circle"),
  Ask("paraphrase", "Is the object a disc?", "shape", "circle", "green", "triangle"),
)


def _rng(index: int) -> np.random.Generator:
  """The fixed generator of probe ``index``: its control's paraphrase and its image."""
  return np.random.default_rng([index, split_key(KNOWLEDGE_SPLIT)])


def _shape(index: int, color: str, shape: str) -> Shape:
  """The probe's object: its colour and shape, a size and position cycled by index."""
  return Shape(color, shape, SIZES[index % len(SIZES)], POSITIONS[index % len(POSITIONS)])


def _turn(who: str, text: str) -> dict[str, str]:
  return {"from": who, "value": text}


def knowledge_records(holdout: Iterable[str | Sequence[str]] = (), image_size: int = DEFAULT_SIZE
                      ) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
  """The probe records (``DRAW`` then ``ASK`` order) and their images by name (relative to the
  world's ``images/``: uint8 [image_size, image_size, 3]). Deterministic: a fixed set, its
  images from fixed generators; ``holdout`` only sets ``meta.heldout`` of the drawing probes.

  Drawing probe: ``{"id", "task": "t2i", "conversations": [human prompt], "meta": {"probe":
  "knowledge" | "paraphrase", "targets": [{"color", "shape"}], "heldout": bool, "control":
  [human turn: the world's t2i prompt of the same colour and shape], "control_targets":
  [all four attributes]}}``. Understanding probe: ``{"id", "task": "qa", "image": [name],
  "conversations": [human "<image>\\n" + question, gpt answer], "meta": {"probe", "questions":
  [asked attribute], "answers": [answer], "named": value | None, "objects": [1], "scene":
  {the object's attributes}, "control": [the world's question about that attribute, its
  answer]}}``.
  """
  pairs = set(normalize_holdout(holdout))
  records, images = [], {}
  for i, p in enumerate(DRAW):
    control = _shape(i, p.color, p.shape)
    records.append({"id": f"knowledge-t2i-{i:02d}", "task": "t2i", "conversations": [_turn("human", p.prompt)],
                    "meta": {"probe": p.kind, "targets": [{"color": p.color, "shape": p.shape}],
                             "heldout": (p.color, p.shape) in pairs,
                             "control": [_turn("human", phrase(_rng(i), "t2i", desc=describe(control)))],
                             "control_targets": [control.attributes()]}})
  for j, p in enumerate(ASK):
    index = len(DRAW) + j
    rng = _rng(index)
    obj = _shape(index, p.color, p.shape)
    name = image_name(KNOWLEDGE_SPLIT, index, 0)
    control = phrase(rng, f"qa_{p.asks}", ref="object")
    images[name] = render(obj, size=image_size, rng=rng)
    records.append({"id": f"knowledge-qa-{j:02d}", "task": "qa", "image": [name],
                    "conversations": [_turn("human", f"{IMAGE_PLACEHOLDER}\n{p.question}"), _turn("gpt", p.answer)],
                    "meta": {"probe": p.kind, "questions": [p.asks], "answers": [p.answer], "named": p.named,
                             "objects": [1], "scene": obj.attributes(),
                             "control": [_turn("human", f"{IMAGE_PLACEHOLDER}\n{control}"),
                                         _turn("gpt", getattr(obj, p.asks))]}})
  return records, images
