"""A tiny shapes world and tiny training configs, shared by the training tests."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

from metamorph.shapes.world import write_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGLIP_RUN = {"train.batch_size": 16}  # tiny_config("siglip") overrides of conftest's siglip_run (6 steps,
                                       # checkpoints 3 and 6)


def build_tiny_world(out_dir: str) -> str:
  """200 train / 40 validation / 64 caption / 64 text-only records at 16 px, red circles
  held out."""
  write_world(out_dir, n=200, seed=0, holdout=["red:circle"], image_size=16, val_n=40, progress=False,
              captions_n=64, language_n=64)
  return out_dir


def tiny_config(stage: str, world: str, **overrides):
  """configs/toy.py:STAGE shrunk to seconds per run, pointed at ``world``."""
  from configs.toy import get_config
  c = get_config(stage)
  c.data.data_dir = os.path.join(world, "tfds")
  c.data.tokenizer = os.path.join(world, "tokenizer")
  c.data.image_size, c.data.seq_len, c.data.images_per_row = 16, 96, 4
  c.model.num_visual_tokens = 4
  c.model.llm.update(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
  c.model.siglip.vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=16, patch_size=4, vision_use_head=True, attention_window=0)
  c.model.siglip.text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                             vocab_size=512, max_position_embeddings=16)
  c.model.siglip_init = ""
  c.init_from = ""
  c.mesh.cpu_devices = 0  # runs in the test process, where JAX has started on one CPU device
  c.train.update(steps=6, batch_size=8, log_every=1, checkpoint_every=3, eval_every=0, async_checkpoints=False)
  c.optim.update(lr=3e-3, warmup_frac=0.0)
  for key, value in overrides.items():
    set_field(c, key, value)
  return c


def train_steps(s, state, steps: int, *, micro: int | None = None, tuning=None):
  """(losses, state after) of ``steps`` jitted train steps of setup ``s`` from ``state`` on one
  repeated batch (the first of the train split); ``micro`` / ``tuning`` default to the setup's."""
  import jax
  from train import trainer
  micro = s.config.train.micro_batches if micro is None else micro
  step = jax.jit(lambda st, b: trainer.train_step(s.graphdef, s.stage, s.tx, s.schedule, micro, st, b,
                                                  tuning=tuning or s.tuning))
  losses = []
  with jax.set_mesh(s.mesh):
    batch = trainer.data.global_batch(next(trainer.batches(s, s.config.data.train_split, seed=0)), s.mesh)
    for _ in range(steps):
      state, out = step(state, batch)
      losses.append(float(out["loss"]))
  return losses, state


def set_field(config, key: str, value) -> None:
  """``set_field(c, "train.steps", 3)`` sets ``c.train.steps``."""
  *parents, leaf = key.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def _leaves(node, prefix: str = "") -> dict[str, object]:
  """{"a.b": value} of a ConfigDict's leaves (plain dict values are leaves too)."""
  out = {}
  for key, value in node.items():
    if hasattr(value, "items") and not isinstance(value, dict):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_flags(config) -> list[str]:
  """``--config.X=V`` flags reproducing ``config`` on top of configs/toy.py:STAGE; a field
  the toy config has and ``config`` lacks cannot be removed by a flag, so it is an error
  (the command-line run would train another model than an in-process one)."""
  from configs.toy import get_config
  missing = sorted(set(_leaves(get_config(config.stage))) - set(_leaves(config)))
  if missing:
    raise ValueError(f"config_flags: configs/toy.py:{config.stage} sets {missing}, which this config lacks; "
                     "set them in it (tiny_config) so that a command-line run trains the same model")
  return [f"--config.{key}={value}" for key, value in _leaves(config).items() if not isinstance(value, dict)]


def run_train(config, workdir: str, *, env: dict | None = None, extra: list[str] = (),
              timeout: int = 300) -> subprocess.CompletedProcess:
  """``python -m train`` in a subprocess (its own XLA flags / process setup)."""
  return subprocess.run([*train_command(config, workdir), *extra], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                        timeout=timeout)


def train_flags(config, workdir: str) -> list[str]:
  """The flags of ``python -m train`` that train ``config`` (see ``config_flags``) in ``workdir``."""
  return [f"--config={ROOT}/configs/toy.py:{config.stage}", f"--workdir={workdir}", *config_flags(config)]


def train_command(config, workdir: str) -> list[str]:
  return [sys.executable, "-m", "train", *train_flags(config, workdir)]


def kill_when(cmd: list[str], ready: Callable[[], bool], what: str, timeout: float = 240) -> None:
  """Starts ``cmd`` in ROOT and kills it with SIGKILL as soon as ``ready()``; fails if it ends
  first or ``ready()`` stays false for ``timeout`` seconds (naming ``what`` it waited for)."""
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + timeout
    while not ready():
      assert proc.poll() is None, f"the run ended before {what}"
      assert time.time() < deadline, f"{what} did not happen within {timeout:.0f} s"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
