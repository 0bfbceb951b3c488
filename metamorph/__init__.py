"""MetaMorph (Visual-Predictive Instruction Tuning) in JAX/Flax.

``metamorph.load(path)`` returns a model that answers interleaved prompts with text and
images (see ``metamorph.api``); the heavy imports happen on the first call.
"""
from __future__ import annotations

from typing import Any

__all__ = ["load"]


def load(path: str, visualizer: Any = None):
  """``metamorph.api.load``: a MetaMorph checkpoint or a plain LLM -> ``MetaMorphModel``."""
  from metamorph.api import load as _load
  return _load(path, visualizer)
