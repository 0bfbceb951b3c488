"""The task mix of a shapes world: which task kinds its records are drawn from, and how often.

``resolve_mix`` reads every form a caller gives (None, a mapping, a list of names, the
CLI's "qa:3,t2i:1" string) into weights over ``tasks.TASKS`` that sum to 1.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from metamorph.shapes.tasks import GENERATION_TASKS, TASKS, UNDERSTANDING_TASKS, VPIT_TASKS

TASK_GROUPS: dict[str, tuple[str, ...]] = {
  "all": VPIT_TASKS, "generation": GENERATION_TASKS, "understanding": UNDERSTANDING_TASKS}
# Comparisons are a fifth of the records (two-image 9%, and 80% of text's 14%, told in words):
# VPiT then teaches the toy LLM to compare, given initializer_range 0.04 (docs/findings.md, section 11)
DEFAULT_MIX: dict[str, float] = {
  "qa": 0.25, "t2i": 0.23, "edit": 0.09, "think": 0.08,
  "next_frame": 0.07, "video_qa": 0.05, "multi_image": 0.09, "text": 0.14}


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
