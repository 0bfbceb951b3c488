"""Output routes: what becomes of the non-text part of an answer.

A route turns each row's generated output (its ``Decoded``: token ids, visual tokens; and
its decoded text) into artifacts, today images. The facade picks one route by name when it
is built (``make_route``) and then only calls it. One entry today:

- ``vpit`` (VPiT, MetaMorph): each produced image's visual tokens -> the visualizer -> an
  image; without a visualizer, no artifacts (the answer keeps its visual tokens).

The contract (``Route.artifacts``) is per batch so that a route can serve every row at once
(the visualizer renders all images of a batch in one call); it returns one list of artifacts
per row, in the order the row produced them. A route's constructor takes what it needs as
keywords (``vpit``: ``visualizer``).

The next routes call a tool (SwitchGPT: the LLM writes a request for an off-the-shelf
generator). Such a route will also need to stop text generation at its request tag (the
engine stops only at the end-of-turn tokens today) and to read the request from the row's
text; that part of the contract is not built yet.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from metamorph.generation.engine import Decoded
from metamorph.generation.prompts import pad_to_bucket


class Route(Protocol):
  def artifacts(self, rows: Sequence[Decoded], texts: Sequence[str], *, seed: int, steps: int,
                guidance: float) -> list[list[Image.Image]]:
    """For each row of a batch, the artifacts its output produced (``steps``, ``guidance``:
    the renderer's sampling steps and guidance scale; ``seed``: its seed)."""


def render(visualizer, tokens: np.ndarray, *, steps: int, guidance: float, seed: int) -> list[Image.Image]:
  """Visual tokens [n, m, Dv] -> n images through ``visualizer``; the batch is padded to a
  power of two, so that batches of similar size share one compilation."""
  from metamorph.models.visualizer.rendering import render as draw  # slow import: diffusers
  if len(tokens) == 0:
    return []
  pixels = draw(visualizer, pad_to_bucket(tokens), guidance=guidance, steps=steps, seed=seed)[:len(tokens)]
  return [Image.fromarray(p) for p in pixels]


class VpitRoute:
  """VPiT: the visual tokens of each produced image -> the visualizer -> an image."""

  def __init__(self, *, visualizer=None):
    self.visualizer = visualizer

  def artifacts(self, rows: Sequence[Decoded], texts: Sequence[str], *, seed: int, steps: int,
                guidance: float) -> list[list[Image.Image]]:
    produced = [t for d in rows for t in d.visual_tokens]
    if not produced or self.visualizer is None:
      return [[] for _ in rows]
    pictures = render(self.visualizer, np.stack(produced).astype(np.float32), steps=steps, guidance=guidance,
                      seed=seed)
    out, used = [], 0
    for d in rows:
      out.append(pictures[used:used + len(d.visual_tokens)])
      used += len(d.visual_tokens)
    return out


ROUTES: dict[str, Callable[..., Route]] = {"vpit": VpitRoute}


def make_route(name: str, **resources: Any) -> Route:
  """The route ``name`` built with ``resources`` (e.g. ``visualizer=``)."""
  if name not in ROUTES:
    raise ValueError(f"unknown output route {name!r}; the known routes are {sorted(ROUTES)}")
  return ROUTES[name](**resources)
