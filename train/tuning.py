"""The tuning-mode registry: how a stage's trainable parameters train.

A stage (``train.stages``) says *which* parameters its method trains; the tuning mode, chosen
by ``config.tuning.mode``, says *how*. The trainer applies a mode in three places:

  transform(model)       the built model, pretrained weights loaded -> the model that trains
                         (a mode may add parameters, e.g. LoRA's low-rank factors);
  trainable(filter)      the stage's trainable nnx filter -> the parameters that train (a mode
                         may narrow it, e.g. a frozen LLM, or replace it, e.g. LoRA's factors only);
  merge(model)           the trained model -> the model to export, with the stage's own
                         parameter paths (e.g. LoRA folds its factors back into the kernels), so
                         an export loads like any other.

  full   the stage's trainable parameters train in full (today's only mode).

Adding a mode: write a function ``(**options) -> TuningMode`` and add it to ``MODES``; its
options are the other fields of ``config.tuning`` (add them, with their defaults, in
``train/defaults.py``), passed as keyword arguments.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from flax import nnx

Filter = Any  # an nnx filter: nnx.Param, nnx.All(...), or a callable (path, value) -> bool


def _same(x):
  return x


@dataclasses.dataclass(frozen=True)
class TuningMode:
  name: str
  transform: Callable[[nnx.Module], nnx.Module] = _same
  trainable: Callable[[Filter], Filter] = _same
  merge: Callable[[nnx.Module], nnx.Module] = _same


def full(**options) -> TuningMode:
  """The stage's trainable parameters train in full."""
  if options:
    raise ValueError(f"config.tuning: the tuning mode 'full' takes no options, got {sorted(options)}")
  return TuningMode("full")


MODES: dict[str, Callable[..., TuningMode]] = {"full": full}


def get(name: str, **options) -> TuningMode:
  """The tuning mode ``name`` with its ``options``; a clear error for an unknown one."""
  if name not in MODES:
    raise ValueError(f"config.tuning.mode is {name!r}; use one of {', '.join(MODES)}")
  return MODES[name](**options)
