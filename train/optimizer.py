"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and
weight decay on matrices only (not on norms, biases or embedding tables)."""
from __future__ import annotations

import dataclasses

import optax
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Settings:
  """The ``optim`` fields of a training config (see ``train/defaults.py``)."""
  lr: float
  warmup_frac: float
  final_lr_frac: float
  b1: float
  b2: float
  eps: float
  weight_decay: float
  clip_norm: float


def learning_rate(optim: Settings, total_steps: int) -> optax.Schedule:
  """0 -> lr over ``warmup_frac`` of the steps, then cosine to ``lr * final_lr_frac``."""
  warmup = int(round(optim.warmup_frac * total_steps))
  if warmup == 0:
    return optax.cosine_decay_schedule(optim.lr, max(total_steps, 1), alpha=optim.final_lr_frac)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=optim.lr * optim.final_lr_frac)


def decay_mask(params: nnx.State) -> nnx.State:
  """True for kernels (matrices); embedding tables, norms and biases are not decayed."""
  return nnx.map_state(lambda path, _: path[-1] == "kernel", params)


def make_optimizer(optim: Settings, total_steps: int) -> optax.GradientTransformation:
  for name in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "warmup_frac"):
    if getattr(optim, name) < 0:
      raise ValueError(f"config.optim.{name} must be >= 0, got {getattr(optim, name)}")
  if not 0 <= optim.warmup_frac < 1:
    raise ValueError(f"config.optim.warmup_frac must be in [0, 1), got {optim.warmup_frac}")
  chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  chain.append(optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
