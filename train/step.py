"""The train state and the jitted train / eval steps (pure functions over nnx state)."""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import token_rows
from train.stages import Batch, Stage
from train.tuning import TuningMode, full

FULL = full()
_PREPARE_STREAM = 0x7E0  # fold_in constant: the tuning mode's keys, apart from the stage loss's


@flax.struct.dataclass
class TrainState:
  step: jax.Array           # [] int32
  params: nnx.State         # trained parameters (float32 master copy)
  opt_state: Any
  frozen: nnx.State         # everything else (vision encoder, frozen LLM parts)
  rng: jax.Array


def model_of(graphdef, stage: Stage, params: nnx.State, frozen: nnx.State, *, copy: bool = False) -> nnx.Module:
  """The model of a train state's ``params`` and ``frozen`` (new token rows written into their
  tables, ``train.token_rows``); ``copy=False`` shares the arrays (``nnx.merge``)."""
  params, frozen = token_rows.join(params, frozen, stage.new_token_ids)
  return nnx.merge(graphdef, params, frozen, copy=copy)


def _split_micro(batch: Batch, micro: int) -> Batch:
  """[B, ...] -> [micro, B / micro, ...]; micro-batch i holds rows i, i + micro, ...,
  so every micro-batch stays spread over all the devices the batch is sharded on."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // micro, micro, *x.shape[1:]).swapaxes(0, 1), batch)


def _loss_and_grads(graphdef, stage: Stage, state: TrainState, batch: Batch, micro: int,
                    tuning: TuningMode = FULL):
  """(loss, metrics, grads), accumulated over ``micro`` micro-batches in a scan.

  Each micro-batch's loss is normalised by whole-batch counts, so the sum over
  micro-batches equals the loss of the whole batch exactly. The tuning mode prepares each
  micro-batch's model (``TuningMode.prepare``, e.g. LoRA's dropout keys) with a key of its own,
  folded from the micro-batch's key (which the stage's loss receives unchanged).
  """
  normalisers = stage.normalisers(batch)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params, micro_batch, key):
    model = model_of(graphdef, stage, params, state.frozen)
    tuning.prepare(model, jax.random.fold_in(key, _PREPARE_STREAM))
    return stage.loss(model, micro_batch, normalisers, key)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro == 1:
    (loss, metrics), grads = grad_fn(state.params, batch, step_key)
    return loss, metrics, grads

  micro_batches = _split_micro(batch, micro)
  keys = jax.random.split(step_key, micro)
  shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro_batches), keys[0])
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  def accumulate(total, xs):
    micro_batch, key = xs
    return jax.tree.map(jnp.add, total, grad_fn(state.params, micro_batch, key)), None
  ((loss, metrics), grads), _ = jax.lax.scan(accumulate, zeros, (micro_batches, keys))
  return loss, metrics, grads


def train_step(graphdef, stage: Stage, tx: optax.GradientTransformation, schedule, micro: int,
               state: TrainState, batch: Batch, *, tuning: TuningMode = FULL
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a global batch; returns the new state and scalar metrics."""
  loss, metrics, grads = _loss_and_grads(graphdef, stage, state, batch, micro, tuning)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step)}
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def eval_step(graphdef, stage: Stage, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """Metrics of one eval batch (a fixed key: evaluations are comparable over steps)."""
  model = model_of(graphdef, stage, state.params, state.frozen)
  loss, metrics = stage.loss(model, batch, stage.normalisers(batch), jax.random.key(0))
  return {**metrics, "loss": loss}


def state_check(graphdef, stage: Stage, state: TrainState, batch: Batch) -> dict[str, jax.Array]:
  """What a state must pass to be saved: ``loss`` on ``batch`` (forward only, with
  ``eval_step``'s fixed key) and ``finite``, whether every float of its parameters and
  optimizer state is finite."""
  floats = [x for x in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.inexact)]
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floats]))
  return {"loss": eval_step(graphdef, stage, state, batch)["loss"], "finite": finite}
