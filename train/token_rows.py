"""The new token rows: where only they train, the train state holds them alone.

A stage that trains only the rows of the tokens its model spec added (``Stage.new_rows_only``:
the connector; every stage under the frozen_llm and lora tuning modes) keeps each token table
whole in the *frozen* part of the train state and, in the trained part, at the table's path,
only its new rows: the embedding's rows ``[n_new, D]`` (an untied LM head's columns
``[D, n_new]``). The optimizer therefore holds moments for n_new rows, not for the vocabulary,
and weight decay cannot touch an old row. ``join`` writes the rows into their tables before
the model runs, so gradients reach exactly the rows (the scatter's transpose is a gather).

  split(params, frozen, ids)  the stage's (params, frozen), tables trained whole -> the state's
  join(params, frozen, ids)   the state's -> (params, frozen) that ``nnx.merge`` takes

With no new tokens a rows-only stage trains no table row: ``split`` moves the tables to
``frozen`` whole.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import nnx

# a token table's path suffix -> its token axis; the rows keep the other axis's logical name
TABLES = {("embed_tokens", "embedding"): 0, ("lm_head", "kernel"): 1}


def _axis(path: tuple) -> int | None:
  return TABLES.get(tuple(path[-2:]))


def is_table(path: tuple) -> bool:
  """Whether the parameter at ``path`` is a token table (the embedding, an untied LM head)."""
  return _axis(path) is not None


def _rows_only(names, axis: int):
  """The table's logical axis names with the token axis replicated (n_new is small)."""
  if names is None:
    return None
  names = list(names)
  names[axis] = None
  return tuple(names)


def split(params: nnx.State, frozen: nnx.State, ids: Sequence[int]) -> tuple[nnx.State, nnx.State]:
  """Each token table of ``params`` -> ``frozen`` whole; ``params`` keeps its ``ids`` rows
  (a table with no ``ids`` leaves ``params``)."""
  trained, kept = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(frozen))
  index = jnp.asarray(ids, jnp.int32)
  for path in [p for p in trained if is_table(p)]:
    table, axis = trained.pop(path), _axis(path)
    kept[path] = table
    if len(ids):
      rows = jnp.take(table[...], index, axis=axis)
      trained[path] = table.replace(rows, out_sharding=_rows_only(table.get_metadata().get("out_sharding"), axis))
  return nnx.from_flat_state(trained), nnx.from_flat_state(kept)


def join(params: nnx.State, frozen: nnx.State, ids: Sequence[int]) -> tuple[nnx.State, nnx.State]:
  """The inverse of ``split``: each table of ``frozen`` with ``params``' rows written into it,
  back in ``params`` (differentiable in the rows)."""
  if not len(ids):
    return params, frozen
  trained, kept = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(frozen))
  index = jnp.asarray(ids, jnp.int32)
  for path in [p for p in trained if is_table(p)]:
    rows, table, axis = trained[path], kept.pop(path), _axis(path)
    at = table[...].at[index] if axis == 0 else table[...].at[:, index]
    trained[path] = table.replace(at.set(rows[...].astype(table.dtype)))
  return nnx.from_flat_state(trained), nnx.from_flat_state(kept)
