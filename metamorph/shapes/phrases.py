"""The words of the shapes world: phrase tables, the paraphrase templates, the world's facts.

Every text a record holds is a ``TEMPLATES`` paraphrase filled with values of these tables
(``phrase``), so ``world_texts()`` lists every word a record can contain: the word-level
tokenizer's vocabulary (``metamorph.shapes.tokenizer``).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from metamorph.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Shape, pick
from metamorph.tokens import IMAGE_PLACEHOLDER

# --- phrase tables ----------------------------------------------------------------

NUMBER_WORDS: tuple[str, ...] = (
  "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
ORDINALS: tuple[str, ...] = ("first", "second")
YES_NO: tuple[str, ...] = ("yes", "no")
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
  # a which-verdict restates the question's target next to the words it is compared with:
  # the toy LLM learns that, not a bare ordinal (docs/findings.md, section 15)
  "multi_verdict": ("{target} is the {ordinal}",),
  "multi_target_shape": ("the {shape}",),
  "multi_target_color": ("the {color} one",),
  "multi_target_larger": ("the larger one",),
  "multi_told": ("The first image shows {desc}, the second {desc2}. {question}",),
  "fact_corners": ("How many corners does a {shape} have?",),
  "fact_opposite": ("What is the opposite of {word}?",),
  "fact_answer_shape": ("the {shape}",),
}

# --- facts: language-only (question paraphrases, answer) pairs ---------------------------


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


def _fact_pool() -> list[tuple[str, tuple[str, ...], str]]:
  """(kind, question paraphrases, answer) of every language-only fact."""
  pool = [("fact", qs, a) for qs, a in FACTS]
  pool += [("corners", (TEMPLATES["fact_corners"][0].format(shape=s),), n) for s, n in CORNERS.items()]
  pool += [("opposite", (TEMPLATES["fact_opposite"][0].format(word=w),), o) for w, o in OPPOSITES.items()]
  return pool


FACT_POOL = _fact_pool()

# --- filling the templates -------------------------------------------------------------


def world_texts() -> list[str]:
  """Every template (fields removed) and every fill value: all words records can hold."""
  texts = [re.sub(r"\{[a-z0-9_]*\}", " ", t) for ts in TEMPLATES.values() for t in ts]
  texts += [IMAGE_PLACEHOLDER, *COLORS, *SHAPES, *SIZES, *POSITIONS, *WHERE.values(), *DESTINATION.values()]
  texts += [*DIRECTIONS, *CORNERS.values(), *OPPOSITES, *NUMBER_WORDS, *ORDINALS, *YES_NO]
  texts += [*OBJECT_NOUNS]
  for questions, answer in FACTS:
    texts += [*questions, answer]
  return texts


def phrase(rng: np.random.Generator, name: str, **fields: str) -> str:
  """A random paraphrase of template ``name``, filled in."""
  return pick(rng, TEMPLATES[name]).format(**fields)


def capitalize(text: str) -> str:
  """``text`` with its first letter in upper case (the rest as it is)."""
  return text[:1].upper() + text[1:]


def describe(s: Shape) -> str:
  """"a large red circle on the left": every attribute of ``s``."""
  return TEMPLATES["desc"][0].format(size=s.size, color=s.color, shape=s.shape, where=WHERE[s.position])
