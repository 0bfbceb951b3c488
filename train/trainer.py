"""The training loop: sharded state, jitted steps, checkpoints, metrics, evaluation.

``make_setup`` resolves the config once: the stage (``train.stages``), the tuning mode
(``train.tuning``), the model spec (``train.model_init``), the data and optimizer settings.
Everything below it receives those pieces, not the config.
"""
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
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from metamorph import checkpoint, sharding
from metamorph.data import images
from metamorph.data.packing import PIPELINE_REASONS
from metamorph.model_folder import MODEL_DIR
from train import data, metrics, model_init, optimizer, stages, step, token_rows, tuning
from train.step import TrainState, eval_step, state_check, train_step


DTYPES = ("float32", "bfloat16", "float16")  # what config.model.dtype / param_dtype may name


class TrainingError(RuntimeError):
  """The run cannot go on (bad config, non-finite loss, ...)."""


@dataclasses.dataclass
class Setup:
  """Everything a run needs besides the data: built once, from the config."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  stage: stages.Stage
  tuning: tuning.TuningMode
  spec: model_init.ModelSpec
  data: data.DataSettings
  trainable: Any                # nnx filter of the trained parameters (stage, then tuning mode)
  graphdef: Any
  abstract_state: TrainState
  shardings: Any
  tx: Any
  schedule: Any


def validate(config: ml_collections.ConfigDict) -> tuple[stages.Stage, tuning.TuningMode]:
  """Clear errors for an inconsistent config, before anything expensive runs; its stage
  and tuning mode."""
  try:
    stage = stages.get(config.stage)
  except ValueError as e:
    raise TrainingError(f"config.stage: {e}") from e
  try:
    mode = tuning.from_config(config.tuning)
  except ValueError as e:
    raise TrainingError(str(e)) from e
  t = config.train
  for name in ("steps", "batch_size", "micro_batches", "log_every", "keep_checkpoints"):
    if t[name] < 1:
      raise TrainingError(f"config.train.{name} must be >= 1, got {t[name]}")
  if t.batch_size % t.micro_batches:
    raise TrainingError(f"config.train.batch_size ({t.batch_size}) is not divisible by "
                        f"config.train.micro_batches ({t.micro_batches})")
  if not stage.supports_micro_batches and t.micro_batches != 1:
    raise TrainingError(f"the {stage.name} stage's loss couples the whole batch: use train.micro_batches=1")
  if config.data.open_rows < 1:
    raise TrainingError(f"config.data.open_rows must be >= 1 (1: greedy packing), got {config.data.open_rows}")
  if config.mesh.cpu_devices < 0:
    raise TrainingError(f"config.mesh.cpu_devices must be >= 0 (0: JAX's default), got {config.mesh.cpu_devices}")
  for name in ("dtype", "param_dtype"):
    if config.model[name] not in DTYPES:
      raise TrainingError(f"config.model.{name} is {config.model[name]!r}; use one of {', '.join(DTYPES)}")
  return stage, mode


def make_setup(config: ml_collections.ConfigDict, *, load_weights: bool = True) -> Setup:
  """Resolves ``config`` into the run's pieces and the abstract (sharded) train state;
  ``load_weights=False`` reads no weights (architectures only: memory planning, tests)."""
  stage, mode = validate(config)
  sharding.use_cpu_devices(config.mesh.cpu_devices)
  try:
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  except ValueError as e:
    raise TrainingError(f"config.mesh: {e}") from e
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % batch_shards:
    raise TrainingError(f"config.train.batch_size ({config.train.batch_size}) must be divisible by "
                        f"mesh data x fsdp = {batch_shards}")
  spec = stage.model(config, vision_loss=stage.vision_loss, load_weights=load_weights)
  stage = stage.with_new_tokens(spec, rows_only=mode.new_rows_only)
  trainable = mode.trainable(stage.trainable)
  try:
    abstract_model = nnx.eval_shape(lambda: mode.transform(model_init.random_model(spec, config.seed), config.seed))
  except ValueError as e:  # a mode that does not fit this stage's model
    raise TrainingError(f"the {stage.name} stage: {e}") from e
  graphdef, params, frozen = nnx.split(abstract_model, trainable, ...)
  optim = optimizer.Settings(**config.optim.to_dict())
  schedule = optimizer.learning_rate(optim, config.train.steps)
  tx = optimizer.make_optimizer(optim, config.train.steps)
  abstract_state = jax.eval_shape(functools.partial(_new_state, tx, config.seed, stage), params, frozen)
  settings = data.DataSettings(**config.data.to_dict(), batch_size=config.train.batch_size)
  return Setup(config, mesh, stage, mode, spec, settings, trainable, graphdef, abstract_state,
               sharding.tree_shardings(abstract_state, mesh), tx, schedule)


def _new_state(tx, seed: int, stage: stages.Stage, params: nnx.State, frozen: nnx.State) -> TrainState:
  """The state at step 0 of the model split into ``params`` (what the stage trains) and
  ``frozen``; where only the new token rows train, ``params`` keeps just them
  (``train.token_rows``)."""
  if stage.new_rows_only:
    params, frozen = token_rows.split(params, frozen, stage.new_token_ids)
  return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), frozen,
                    jax.random.key_data(jax.random.key(seed)))


def initial_state(s: Setup) -> TrainState:
  """A fresh state, created sharded; pretrained / init_from weights loaded first if any."""
  c = s.config
  create = jax.jit(functools.partial(_new_state, s.tx, c.seed, s.stage), out_shardings=s.shardings)
  if not (c.init_from or s.spec.load_pretrained):
    def fresh():
      model = s.tuning.transform(model_init.random_model(s.spec, c.seed), c.seed)
      _, params, frozen = nnx.split(model, s.trainable, ...)
      return _new_state(s.tx, c.seed, s.stage, params, frozen)
    return jax.jit(fresh, out_shardings=s.shardings)()   # no host holds the whole model
  model = model_init.random_model(s.spec, c.seed)
  if s.spec.load_pretrained:
    s.spec.load_pretrained(model)
  if c.init_from:
    model_init.load_run(model, c.init_from)
  _, params, frozen = nnx.split(s.tuning.transform(model, c.seed), s.trainable, ...)
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


def batches(s: Setup, split: str, *, seed: int, num_epochs: int | None = None) -> data.ShardedBatches:
  """The stage's batches of ``split`` (process-local rows)."""
  return s.stage.batches(s.data, s.spec, split, seed=seed, num_epochs=num_epochs)


def _meta(s: Setup, workdir: str) -> dict:
  """What a checkpoint records besides the state: the config and what it resolved to."""
  return {"stage": s.stage.name, "vision_loss": s.stage.vision_loss, "tuning": s.tuning.name,
          "config": json.loads(s.config.to_json()), "model_config": s.spec.config.to_dict(),
          "workdir": os.path.abspath(workdir)}


def flops_model(s: Setup) -> tuple[float, float]:
  """(model FLOPs per trained token, per image) of a step: the stage's formula (``train.metrics``)."""
  return s.stage.flops(s.spec, s.abstract_state, s.data.seq_len)


def evaluate(s: Setup, eval_fn, state: TrainState) -> dict[str, float]:
  """Mean eval metrics over ``train.eval_batches`` batches of the eval split."""
  totals: dict[str, float] = {}
  n = 0
  for batch in batches(s, s.data.eval_split, seed=0, num_epochs=1):
    out = jax.device_get(eval_fn(state, data.global_batch(batch, s.mesh)))
    for k, v in out.items():
      totals[k] = totals.get(k, 0.0) + float(v)
    n += 1
    if n >= s.config.train.eval_batches:
      break
  return {k: v / max(n, 1) for k, v in totals.items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir``, resuming from its newest intact checkpoint (see
  ``metamorph.checkpoint``); returns the last logged metrics."""
  s = make_setup(config)
  c = config
  if "://" not in c.data.data_dir and not os.path.isdir(c.data.data_dir):
    raise TrainingError(f"config.data.data_dir: {c.data.data_dir or '(empty)'} is not a folder; build the "
                        "dataset with `python -m metamorph.data.build` and pass its --out folder")
  with checkpoint.Checkpoints(workdir, keep=c.train.keep_checkpoints, async_save=c.train.async_checkpoints,
                              strict=c.train.strict_checkpoints) as ckpt, \
       images.pil_limit_follows(data.pixel_limit(s.data)):  # the images passed this limit at build time
    train_iter = batches(s, s.data.train_split, seed=c.seed)
    restored = ckpt.restore(checkpoint.abstract_like(s.abstract_state, s.shardings), train_iter)
    if restored is not None:
      state, _, step = restored
      print(f"resumed from {workdir}/checkpoints/{step}")
    else:
      state = initial_state(s)  # outside the mesh context: host-side loading sees no mesh
    step_fn = jax.jit(functools.partial(train_step, s.graphdef, s.stage, s.tx, s.schedule, c.train.micro_batches,
                                        tuning=s.tuning),
                      out_shardings=(s.shardings, None), donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_step, s.graphdef, s.stage))
    check_fn = jax.jit(functools.partial(state_check, s.graphdef, s.stage))
    with jax.set_mesh(s.mesh):  # activation constraints (sharding.constrain) read it while tracing
      return _loop(s, workdir, ckpt, state, train_iter, step_fn, eval_fn, check_fn)


def _loop(s: Setup, workdir, ckpt, state, train_iter, step_fn, eval_fn, check_fn) -> dict[str, Any]:
  c = s.config
  writer = metrics.MetricsWriter(workdir)
  stop = _StopSignal()
  peak = metrics.peak_flops(c.train.peak_flops_per_device)
  start_step = int(jax.device_get(state.step))
  dropped = np.zeros(len(PIPELINE_REASONS), np.int64)
  per_token, per_image = flops_model(s)
  last: dict[str, Any] = {}
  window = {"tokens": 0, "slots": 0, "images": 0, "flops": 0.0, "time": time.perf_counter()}
  bar = tqdm(total=c.train.steps, initial=start_step, desc=s.stage.name, dynamic_ncols=True,
             disable=jax.process_index() != 0)
  meta = _meta(s, workdir)
  try:
    for step in range(start_step, c.train.steps):
      local = next(train_iter)
      if "dropped" in local:
        dropped += local["dropped"].sum(0)
      tokens, slots, images = _batch_counts(local)
      batch = data.global_batch(local, s.mesh)
      state, out = step_fn(state, batch)
      window["tokens"] += tokens * jax.process_count()
      window["slots"] += slots * jax.process_count()
      window["images"] += images * jax.process_count()
      window["flops"] += (per_token * tokens + per_image * images) * jax.process_count()
      done = step + 1
      if s.stage.sample and c.train.sample_every and done % c.train.sample_every == 0:
        _write_samples(s, state, local, os.path.join(workdir, "samples", f"step_{done:07d}.png"))
      if done % c.train.log_every == 0 or done == c.train.steps:
        out = jax.device_get(out)
        _check_finite(float(out["loss"]), done, workdir, ckpt)
        last = _log(writer, bar, done, out, window, peak, dropped)
      bar.update(1)
      if c.train.eval_every and done % c.train.eval_every == 0:
        writer.write(done, evaluate(s, eval_fn, state), prefix="eval_")
      due = c.train.checkpoint_every and done % c.train.checkpoint_every == 0
      stopping = stop.agreed(done, c.train.log_every)
      if due or done == c.train.steps or stopping:
        _check_finite(float(jax.device_get(out["loss"])), done, workdir, ckpt)
        _check_saved_state(jax.device_get(check_fn(state, batch)), done, workdir, ckpt)
        ckpt.save(done, state, meta, train_iter)
      if stopping:
        print(f"\nstopping on signal {stopping}: checkpoint {done} saved in {workdir}")
        break
    ckpt.wait()
    if int(jax.device_get(state.step)) == c.train.steps:
      _export(s, state, workdir)
  except BaseException as e:
    _close_after_error(bar.close, writer.close, stop.restore)  # the error on its way says what went wrong
    if isinstance(e, OSError) and checkpoint.is_disk_full(e):  # metrics, samples or the export: say what to do
      raise ckpt.full_disk_error(f"writing {e.filename or 'the run'} failed") from e
    raise
  bar.close()
  writer.close()
  stop.restore()
  return last


def _close_after_error(*closers) -> None:
  """Calls each of the loop's closers, logging (not raising) what fails: on a full disk the
  metrics writer cannot flush either, and its error would hide the one that stopped the run."""
  for close in closers:
    try:
      close()
    except Exception as e:  # noqa: BLE001
      logging.warning("%s after an error: %s", getattr(close, "__qualname__", close), e)


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
  """The trained model to WORKDIR/model (process 0 writes it): merged by the tuning mode
  (``TuningMode.merge``: plain weights), with what the mode writes beside it from the unmerged
  model (``TuningMode.export``: under LoRA the PEFT folder WORKDIR/model/lora)."""
  params, frozen = state.params, state.frozen
  if jax.process_count() > 1:  # a collective (every process calls it): process 0 gets whole arrays
    params, frozen = multihost_utils.process_allgather((params, frozen), tiled=True)
  if jax.process_index() == 0:
    folder = os.path.join(workdir, MODEL_DIR)
    trained = step.model_of(s.graphdef, s.stage, params, frozen, copy=True)  # copy: merge works in place
    s.tuning.export(trained, folder, s.config.model.get("llm_init", ""))
    s.stage.export(s.tuning.merge(trained), s.spec, folder)


def _write_samples(s: Setup, state: TrainState, local: dict[str, np.ndarray], path: str) -> None:
  """The stage's sample hook on the current model. Single-process runs only (process 0
  would need every shard of the model)."""
  if jax.process_count() > 1:
    return
  s.stage.sample(step.model_of(s.graphdef, s.stage, state.params, state.frozen), local, path)


def _check_finite(loss: float, step: int, workdir: str, ckpt, what: str = "") -> None:
  if not np.isfinite(loss):
    raise TrainingError(
        f"the loss is {loss} at step {step}{what}; stopping without saving. The last good checkpoint "
        f"(step {ckpt.latest_step()}) is kept in {workdir}/checkpoints. Lower config.optim.lr or "
        "raise config.optim.warmup_frac, or check the data.")


def _check_saved_state(check: dict, step: int, workdir: str, ckpt) -> None:
  """Only a known-good state is saved: the logged loss is that of the weights *before* a
  step's update, so the state after it is checked (``train.step.state_check``) before it is
  written: finite parameters and optimizer state, a finite loss on the batch just used."""
  if not bool(check["finite"]):
    raise TrainingError(
        f"the parameters or optimizer state are not finite after step {step}; stopping without saving. "
        f"The last good checkpoint (step {ckpt.latest_step()}) is kept in {workdir}/checkpoints. Lower "
        "config.optim.lr or raise config.optim.warmup_frac, or check the data.")
  _check_finite(float(check["loss"]), step, workdir, ckpt, what=" (the updated state, on the batch just used)")


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
