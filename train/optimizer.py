"""The optimizer: AdamW with linear warmup + cosine decay, global-norm clipping and
weight decay on matrices only (not on norms, biases or embedding tables)."""
from __future__ import annotations

import ml_collections
import optax
from flax import nnx


def learning_rate(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
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


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  for name in ("lr", "b1", "b2", "eps", "weight_decay", "clip_norm", "warmup_frac"):
    if optim[name] < 0:
      raise ValueError(f"config.optim.{name} must be >= 0, got {optim[name]}")
  if not 0 <= optim.warmup_frac < 1:
    raise ValueError(f"config.optim.warmup_frac must be in [0, 1), got {optim.warmup_frac}")
  chain = [optax.clip_by_global_norm(optim.clip_norm)] if optim.clip_norm > 0 else []
  chain.append(optax.adamw(learning_rate(optim, total_steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                           weight_decay=optim.weight_decay, mask=decay_mask))
  return optax.chain(*chain)
