"""The training loop: sharded state, jitted steps, checkpoints, metrics, evaluation."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from metamorph import checkpoint, sharding
from metamorph.data.conversation import TokenLayout
from metamorph.data.packing import PIPELINE_REASONS
from train import data, metrics, model_init, optimizer, stages
from train.defaults import STAGES
from train.step import TrainState, eval_step, train_step


class TrainingError(RuntimeError):
  """The run cannot go on (bad config, non-finite loss, ...)."""


@dataclasses.dataclass
class Setup:
  """Everything a run needs besides the data: built once, from the config."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  stage: stages.Stage
  spec: model_init.ModelSpec
  graphdef: Any
  abstract_state: TrainState
  shardings: Any
  tx: Any
  schedule: Any


def validate(config: ml_collections.ConfigDict) -> None:
  """Clear errors for an inconsistent config, before anything expensive runs."""
  if config.stage not in STAGES:
    raise TrainingError(f"config.stage is {config.stage!r}; use one of {STAGES}")
  t = config.train
  for name in ("steps", "batch_size", "micro_batches", "log_every", "keep_checkpoints"):
    if t[name] < 1:
      raise TrainingError(f"config.train.{name} must be >= 1, got {t[name]}")
  if t.batch_size % t.micro_batches:
    raise TrainingError(f"config.train.batch_size ({t.batch_size}) is not divisible by "
                        f"config.train.micro_batches ({t.micro_batches})")
  if config.stage == "siglip" and t.micro_batches != 1:
    raise TrainingError("the siglip stage's loss couples the whole batch: use train.micro_batches=1")
  if config.data.open_rows < 1:
    raise TrainingError(f"config.data.open_rows must be >= 1 (1: greedy packing), got {config.data.open_rows}")
  if config.mesh.cpu_devices < 0:
    raise TrainingError(f"config.mesh.cpu_devices must be >= 0 (0: JAX's default), got {config.mesh.cpu_devices}")


def make_setup(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> Setup:
  validate(config)
  sharding.use_cpu_devices(config.mesh.cpu_devices)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    raise TrainingError(f"config.mesh: {e}") from e
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % batch_shards:
    raise TrainingError(f"config.train.batch_size ({config.train.batch_size}) must be divisible by "
                        f"mesh data x fsdp = {batch_shards}")
  spec = model_init.spec(config, load_weights=load_weights)
  stage = stages.stage(config.stage, vision_coef=config.model.vision_coef,
                       new_token_ids=spec.new_token_ids)
  abstract_model = nnx.eval_shape(lambda: model_init.random_model(spec, config.seed))
  graphdef, params, frozen = nnx.split(abstract_model, stage.trainable, ...)
  schedule = optimizer.learning_rate(config.optim, config.train.steps)
  tx = optimizer.make_optimizer(config.optim, config.train.steps)
  abstract_state = jax.eval_shape(functools.partial(_new_state, tx, config.seed), params, frozen)
  return Setup(config, mesh, stage, spec, graphdef, abstract_state,
               sharding.tree_shardings(abstract_state, mesh), tx, schedule)


def _new_state(tx, seed: int, params: nnx.State, frozen: nnx.State) -> TrainState:
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen,
                    jax.random.key_data(jax.random.key(seed)))


def initial_state(s: Setup) -> TrainState:
  """A fresh state, created sharded; pretrained / init_from weights loaded first if any."""
  c = s.config
  create = jax.jit(functools.partial(_new_state, s.tx, c.seed), out_shardings=s.shardings)
  if not (c.init_from or s.spec.llm_params is not None or c.model.siglip_init):
    def fresh():
      model = model_init.random_model(s.spec, c.seed)
      _, params, frozen = nnx.split(model, s.stage.trainable, ...)
      return _new_state(s.tx, c.seed, params, frozen)
    return jax.jit(fresh, out_shardings=s.shardings)()   # no host holds the whole model
  model = model_init.random_model(s.spec, c.seed)
  model_init.load_pretrained(model, s.spec, c)
  if c.init_from:
    model_init.load_run(model, c.init_from)
  _, params, frozen = nnx.split(model, s.stage.trainable, ...)
  return create(params, frozen)


def per_device_bytes(s: Setup) -> dict[str, float]:
  """Bytes of the train state each device holds: max and mean over devices."""
  per_device = {d: 0 for d in s.mesh.devices.flat}
  for leaf, shard in zip(jax.tree.leaves(s.abstract_state), jax.tree.leaves(s.shardings)):
    nbytes = math.prod(shard.shard_shape(leaf.shape)) * leaf.dtype.itemsize
    for device in shard.addressable_devices if jax.process_count() == 1 else shard.device_set:
      per_device[device] += nbytes
  values = list(per_device.values())
  return {"max": float(max(values)), "mean": float(np.mean(values))}


def count_params(state_part) -> int:
  return sum(x.size for x in jax.tree.leaves(state_part))


# ----------------------------------------------------------------------------- the loop

class _StopSignal:
  """Turns SIGTERM / SIGINT into a flag checked between steps (save, then stop).

  With several processes a signal may reach only some of them; ``agreed`` asks
  every process (a collective, so all must call it at the same steps).
  """

  def __init__(self):
    self.received: int | None = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    self.received = signum

  def agreed(self, step: int, every: int) -> int | None:
    """The signal if any process received one; processes agree every ``every`` steps."""
    if jax.process_count() == 1:
      return self.received
    if step % every:
      return None
    flags = multihost_utils.process_allgather(np.int32(self.received or 0))
    return int(flags.max()) or None

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _datasets(s: Setup, split: str, seed: int, num_epochs: int | None = None):
  c = s.config
  if c.stage == "siglip":
    return data.siglip_batches(c, s.spec.tokenizer, split, seed=seed, num_epochs=num_epochs)
  if c.stage == "visualizer":
    return data.image_batches(c, split, seed=seed, num_epochs=num_epochs)
  layout = TokenLayout.from_tokenizer(s.spec.tokenizer, c.model.num_visual_tokens)
  return data.vpit_batches(c, s.spec.tokenizer, layout, split, seed=seed, num_epochs=num_epochs)


def _meta(s: Setup, workdir: str) -> dict:
  return {"stage": s.config.stage, "config": json.loads(s.config.to_json()),
          "model_config": s.spec.config.to_dict(), "workdir": os.path.abspath(workdir)}


def flops_model(s: Setup) -> tuple[float, float]:
  """(model FLOPs per trained token, per image) of a step (see ``train.metrics``)."""
  st = s.abstract_state
  n_trained = count_params(st.params)
  if s.config.stage == "visualizer":
    return 0.0, 0.0  # diffusion UNet FLOPs are not modelled: no MFU for this stage
  if s.config.stage == "siglip":
    vision = s.spec.config.vision
    n_vision = count_params(st.params["vision"])
    return 6.0 * (n_trained - n_vision), 6.0 * n_vision * vision.num_patches
  llm, vision = s.spec.config.llm, s.spec.config.vision
  n_vision = count_params(st.frozen["vision"])
  n_frozen_llm = count_params(st.frozen) - n_vision
  per_token = metrics.llm_flops_per_token(n_trained, n_frozen_llm, llm.num_layers, llm.hidden_size,
                                          s.config.data.seq_len)
  return per_token, 2.0 * n_vision * vision.num_patches


def evaluate(s: Setup, eval_fn, state: TrainState) -> dict[str, float]:
  """Mean eval metrics over ``train.eval_batches`` batches of the eval split."""
  totals: dict[str, float] = {}
  n = 0
  for batch in _datasets(s, s.config.data.eval_split, seed=0, num_epochs=1):
    out = jax.device_get(eval_fn(state, data.global_batch(batch, s.mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
    if n >= s.config.train.eval_batches:
      break
  return {k: v / max(n, 1) for k, v in totals.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its latest checkpoint; returns the
  last logged metrics."""
  s = make_setup(config)
  c = config
  mgr = checkpoint.manager(workdir, keep=c.train.keep_checkpoints, async_save=c.train.async_checkpoints)
  train_iter = _datasets(s, c.data.train_split, seed=c.seed)
  if mgr.latest_step() is not None:
    state, _, step = checkpoint.restore(mgr, checkpoint.abstract_like(s.abstract_state, s.shardings),
                                        train_iter)
    print(f"resumed from {workdir}/checkpoints/{step}")
  else:
    state = initial_state(s)  # outside the mesh context: host-side loading sees no mesh
  step_fn = jax.jit(functools.partial(train_step, s.graphdef, s.stage, s.tx, s.schedule, c.train.micro_batches),
                    out_shardings=(s.shardings, None), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, s.graphdef, s.stage))
  with jax.set_mesh(s.mesh):  # activation constraints (sharding.constrain) read it while tracing
    return _loop(s, workdir, mgr, state, train_iter, step_fn, eval_fn)


def _loop(s: Setup, workdir, mgr, state, train_iter, step_fn, eval_fn) -> dict[str, Any]:
  c = s.config
  writer = metrics.MetricsWriter(workdir)
  stop = _StopSignal()
  peak = metrics.peak_flops(c.train.peak_flops_per_device)
  start_step = int(jax.device_get(state.step))
  dropped = np.zeros(len(PIPELINE_REASONS), np.int64)
  per_token, per_image = flops_model(s)
  last: dict[str, Any] = {}
  window = {"tokens": 0, "slots": 0, "images": 0, "flops": 0.0, "time": time.perf_counter()}
  bar = tqdm(total=c.train.steps, initial=start_step, desc=f"{c.stage}", dynamic_ncols=True,
             disable=jax.process_index() != 0)
  meta = _meta(s, workdir)
  try:
    for step in range(start_step, c.train.steps):
      local = next(train_iter)
      if "dropped" in local:
        dropped += local["dropped"].sum(0)
      tokens, slots, images = _batch_counts(local)
      state, out = step_fn(state, data.global_batch(local, s.mesh))
      window["tokens"] += tokens * jax.process_count()
      window["slots"] += slots * jax.process_count()
      window["images"] += images * jax.process_count()
      window["flops"] += (per_token * tokens + per_image * images) * jax.process_count()
      done = step + 1
      if c.train.sample_every and done % c.train.sample_every == 0:
        _write_samples(s, state, local, os.path.join(workdir, "samples", f"step_{done:07d}.png"))
      if done % c.train.log_every == 0 or done == c.train.steps:
        out = jax.device_get(out)
        _check_finite(float(out["loss"]), done, workdir, mgr)
        last = _log(writer, bar, done, out, window, peak, dropped)
      bar.update(1)
      if c.train.eval_every and done % c.train.eval_every == 0:
        writer.write(done, evaluate(s, eval_fn, state), prefix="eval_")
      due = c.train.checkpoint_every and done % c.train.checkpoint_every == 0
      stopping = stop.agreed(done, c.train.log_every)
      if due or done == c.train.steps or stopping:
        _check_finite(float(jax.device_get(out["loss"])), done, workdir, mgr)
        checkpoint.save(mgr, done, state, meta, train_iter)
      if stopping:
        print(f"\nstopping on signal {stopping}: checkpoint {done} saved in {workdir}")
        break
    mgr.wait_until_finished()
    if int(jax.device_get(state.step)) == c.train.steps:
      _export(s, state, workdir)
  finally:
    bar.close()
    writer.close()
    stop.restore()
    mgr.close()
  return last


def _batch_counts(local: dict[str, np.ndarray]) -> tuple[int, int, int]:
  """(tokens, slots, images) of a process-local batch: real (non-padding) tokens, token slots of
  packed rows (0 when unpacked), used image slots."""
  if "segment_ids" in local:
    tokens, slots = int((local["segment_ids"] > 0).sum()), int(local["segment_ids"].size)
  else:
    tokens, slots = (int(local["text_ids"].size) if "text_ids" in local else 0), 0
  images = int(local["image_mask"].sum()) if "image_mask" in local else len(local["images"])
  return tokens, slots, images


def _export(s: Setup, state: TrainState, workdir: str) -> None:
  """The trained model to WORKDIR/model (process 0 writes it)."""
  params, frozen = state.params, state.frozen
  if jax.process_count() > 1:  # a collective (every process calls it): process 0 gets whole arrays
    params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
  if jax.process_index() == 0:
    model = nnx.merge(s.graphdef, params, frozen)
    model_init.export(model, s.spec.tokenizer, os.path.join(workdir, model_init.MODEL_DIR),
                      visualizer=s.config.model.visualizer_from)


def _write_samples(s: Setup, state: TrainState, local: dict[str, np.ndarray], path: str) -> None:
  """Visualizer stage: up to 8 images of the batch (top) above their reconstructions (bottom).
  Single-process runs only (process 0 would need every shard of the model)."""
  if s.config.stage != "visualizer" or jax.process_count() > 1:
    return
  from PIL import Image

  from metamorph.models.visualizer import reconstruct, to_uint8
  model = nnx.merge(s.graphdef, state.params, state.frozen)
  originals = np.asarray(to_uint8(local["images"][:8]))
  rebuilt = reconstruct(model.visualizer, model.vision, originals)
  grid = np.concatenate([np.concatenate(list(originals), 1), np.concatenate(list(rebuilt), 1)], 0)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(grid).save(path)


def _check_finite(loss: float, step: int, workdir: str, mgr) -> None:
  if not np.isfinite(loss):
    raise TrainingError(
        f"the loss is {loss} at step {step}; stopping without saving. The last good checkpoint "
        f"(step {mgr.latest_step()}) is kept in {workdir}/checkpoints. Lower config.optim.lr or "
        "raise config.optim.warmup_frac, or check the data.")


def _log(writer, bar, step: int, out: dict, window: dict, peak, dropped) -> dict[str, Any]:
  elapsed = time.perf_counter() - window["time"]
  values = {k: float(v) for k, v in out.items()}
  if window["tokens"]:
    values["tokens_per_s"] = window["tokens"] / elapsed
  if window["slots"]:
    values["row_fill"] = window["tokens"] / window["slots"]  # packed rows: record tokens / all slots
  values["images_per_s"] = window["images"] / elapsed
  if peak and window["flops"]:
    values["mfu"] = window["flops"] / elapsed / (peak * jax.device_count())
  values["records_dropped"] = int(dropped.sum())
  values.update({f"dropped_{r}": int(n) for r, n in zip(PIPELINE_REASONS, dropped) if n})
  writer.write(step, values)
  bar.set_postfix({k: f"{values[k]:.4g}" for k in ("loss", "loss_text", "loss_vision", "loss_siglip",
                                                     "loss_diffusion", "loss_draft", "tokens_per_s") if k in values})
  window.update(tokens=0, slots=0, images=0, flops=0.0, time=time.perf_counter())
  return values
