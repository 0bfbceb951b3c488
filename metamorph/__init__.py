"""MetaMorph (Visual-Predictive Instruction Tuning) in JAX/Flax.

``metamorph.load(path)`` returns a model that answers interleaved prompts with text and
images (see ``metamorph.api``); the heavy imports happen on the first call.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load"]


def load(path: str, visualizer: Any = None, *, route: str = "vpit"):
  """``metamorph.api.loading.load``: a MetaMorph checkpoint or a plain LLM -> ``MetaMorphModel``."""
  from metamorph.api.loading import load as _load  # slow import: jax, flax, transformers (`import metamorph` stays light)
  return _load(path, visualizer, route=route)
