"""A tiny shapes world and tiny training configs, shared by the training tests."""
from __future__ import annotations

import os
import subprocess
import sys

from metamorph.shapes.world import write_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
                               image_size=16, patch_size=4, vision_use_head=True)
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


def set_field(config, key: str, value) -> None:
  """``set_field(c, "train.steps", 3)`` sets ``c.train.steps``."""
  *parents, leaf = key.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def config_flags(config) -> list[str]:
  """``--config.X=V`` flags reproducing ``config`` on top of configs/toy.py:STAGE."""
  flags = []
  def walk(node, prefix):
    for key, value in node.items():
      if hasattr(value, "items") and not isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      elif not isinstance(value, dict):
        flags.append(f"--config.{prefix}{key}={value}")
  walk(config, "")
  return flags


def run_train(config, workdir: str, *, env: dict | None = None, extra: list[str] = (),
              timeout: int = 300) -> subprocess.CompletedProcess:
  """``python -m train`` in a subprocess (its own XLA flags / process setup)."""
  cmd = [sys.executable, "-m", "train", f"--config={ROOT}/configs/toy.py:{config.stage}",
         f"--workdir={workdir}", *config_flags(config), *extra]
  return subprocess.run(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                        timeout=timeout)
