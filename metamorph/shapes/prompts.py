"""The text-to-image evaluation prompts of a shapes world (``eval_t2i.jsonl``).

Every size and position of every held-out (colour, shape) pair, and of every seen pair:
what measures whether generation generalises to pairs training never drew.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from metamorph.shapes.examples import split_key
from metamorph.shapes.phrases import describe, phrase
from metamorph.shapes.scene import COLORS, POSITIONS, SHAPES, SIZES, Shape, normalize_holdout


def eval_prompts(holdout: Iterable[str | Sequence[str]] = (), seed: int = 0,
                 seen: bool = True) -> list[dict[str, Any]]:
  """Text-to-image evaluation prompts: every size and position of every held-out pair
  (and of every seen pair when ``seen``).

  Prompt-only records (a single human turn, no image) with ``meta = {"targets":
  [attributes], "heldout": bool}``; the answer the model generates is graded with
  ``oracle.read_image`` against the target.
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
          rng = np.random.default_rng([seed, len(out), split_key("eval")])
          out.append({"id": f"eval-{len(out):05d}", "task": "t2i",
                      "conversations": [{"from": "human", "value": phrase(rng, "t2i", desc=describe(s))}],
                      "meta": {"targets": [s.attributes()], "heldout": held}})
  return out
