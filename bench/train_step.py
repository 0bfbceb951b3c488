"""VPiT train-step throughput on SmolLM2-135M: ours (jax.jit) vs a transformers/PyTorch step.

  python -m bench.train_step [--batch 8] [--length 256] [--repeats 3] [--images 0]
                             [--peak-flops FLOP/s per device]

What is measured (float32 on the CPU, median of ``--repeats`` steps after one warm-up):

* ours: ``train.step.train_step`` of the ``vpit`` stage, built as ``train.trainer`` builds
  it (configs/smollm2_135m.py:vpit, ``make_setup`` + ``initial_state``: the GGUF weights,
  the new image-token rows, a random toy SigLIP tower; ``jax.jit`` over the split nnx state
  with ``donate_argnums=0``) - forward, VPiT loss, backward, global-norm clipping, AdamW.
  The batch is synthetic (no dataset): random token ids, one packed record per row, every
  next token is a text target (the loss always runs the encoder: on one unused 32 px
  image per row by default, a negligible cost). With ``--images K`` the last K x 16 slots
  of each row are K response images (encoder, projector and vision loss on); the
  tokens/s then counts those slots as tokens, and the PyTorch side still sees text only.
* transformers: ``LlamaForCausalLM`` read from the same GGUF, ``torch.optim.AdamW``,
  ``clip_grad_norm_(1.0)``, cross-entropy on all next tokens of the same [batch, length]
  ids (``labels=ids``), f32.

MFU = model FLOPs (``train.trainer.flops_model``: 6 N_trained + 12 L d T per token, PaLM)
/ elapsed / peak; the peak of a CPU is unknown, so it is printed only with ``--peak-flops``.
The same FLOPs per token are charged to both sides.
"""
from __future__ import annotations

import argparse
import functools
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.timing import time_it
from train.demo import machine


def synthetic_batch(ids: np.ndarray, images: int, m: int, image_size: int, rng,
                    text_targets: float = 1.0) -> dict[str, np.ndarray]:
  """One record per row: ``ids`` as text (labels = the ids, the first position
  unlabelled; with ``text_targets`` < 1 only that fraction of the row's positions, drawn at
  random, keeps its label); with ``images`` > 0, the last ``images * m`` slots of each row are
  response visual slots of ``images`` random images."""
  b, t = ids.shape
  labels = ids.copy()
  if text_targets < 1:
    labels[rng.random((b, t)) >= text_targets] = -100
  labels[:, 0] = -100
  visual_index = np.full((b, t), -1, np.int32)
  target = np.zeros((b, t), bool)
  n_vis = images * m
  if n_vis:
    visual_index[:, t - n_vis:] = np.arange(n_vis)
    target[:, t - n_vis:] = True
    labels[:, t - n_vis:] = -100
  return {
      "input_ids": ids.astype(np.int32),
      "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
      "segment_ids": np.ones((b, t), np.int32),
      "labels": labels.astype(np.int32),
      "visual_index": visual_index,
      "visual_target_mask": target,
      "images": rng.uniform(-1, 1, (b, max(images, 1), image_size, image_size, 3)).astype(np.float32),
      "image_mask": np.full((b, max(images, 1)), images > 0),
  }


def time_vpit_steps(args, ids: np.ndarray, configure: Callable[[Any], None], text_targets: float = 1.0,
                    adapt: Callable[[Any], Any] | None = None):
  """(the run's ``train.trainer.Setup``, median seconds per step, loss of the first step) of
  SmolLM2's vpit step on ``ids`` (``args``: batch, length, images, repeats; ``text_targets``:
  the fraction of positions with a text label, ``synthetic_batch``), its config
  (configs/smollm2_135m.py:vpit, no runs/ needed) changed by ``configure(config)`` first, its
  stage by ``adapt(stage)`` (e.g. another loss) when given."""
  import dataclasses

  import jax

  from configs.smollm2_135m import get_config
  from train import data, trainer
  from train.step import train_step

  c = get_config("vpit")
  c.model.siglip_init = ""   # the toy tower's architecture, random weights: no runs/ needed
  c.init_from = ""
  c.data.seq_len = args.length
  c.train.batch_size = args.batch
  c.optim.lr = 1e-5
  configure(c)
  s = trainer.make_setup(c)
  if adapt is not None:
    s = dataclasses.replace(s, stage=adapt(s.stage))
  state = trainer.initial_state(s)
  m = c.model.num_visual_tokens
  batch = data.global_batch(synthetic_batch(ids, args.images, m, c.data.image_size,
                                            np.random.default_rng(1), text_targets), s.mesh)
  step = jax.jit(functools.partial(train_step, s.graphdef, s.stage, s.tx, s.schedule, c.train.micro_batches),
                 out_shardings=(s.shardings, None), donate_argnums=0)
  box = {"state": state, "losses": []}

  def run():
    box["state"], out = step(box["state"], batch)
    box["losses"].append(float(out["loss"]))  # waits for the step

  with jax.set_mesh(s.mesh):
    seconds = time_it(run, args.repeats)
  return s, seconds, box["losses"][0]


def _one_device_full(c) -> None:
  c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = 1, -1, 0  # one device (the config's: two)
  c.tuning.mode = "full"  # like the transformers step (the config's vpit: LoRA)


def ours(args, ids: np.ndarray):
  """(seconds per step, FLOPs per token, tokens per step, loss of the first step)."""
  from train import trainer
  s, seconds, first_loss = time_vpit_steps(args, ids, _one_device_full)
  per_token, per_image = trainer.flops_model(s)
  tokens = ids.size
  flops = per_token * tokens + per_image * args.images * ids.shape[0]
  return seconds, flops / tokens, tokens, first_loss


def transformers_step(args, ids: np.ndarray):
  """(seconds per step, loss of the first step) of the PyTorch reference."""
  import torch
  from transformers import AutoModelForCausalLM

  from metamorph.convert import smollm2_gguf_path
  path = smollm2_gguf_path()
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
  ids_t = torch.tensor(ids, dtype=torch.long)
  losses = []

  def run():
    loss = model(input_ids=ids_t, labels=ids_t).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    losses.append(float(loss.detach()))

  return time_it(run, args.repeats), losses[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--images", type=int, default=0, help="response images per row (ours only)")
  parser.add_argument("--peak-flops", type=float, default=0.0,
                      help="peak FLOP/s of one device (this CPU), for MFU; default: MFU n/a")
  parser.add_argument("--skip-transformers", action="store_true")
  args = parser.parse_args()

  import jax

  from train.metrics import peak_flops
  ids = np.random.default_rng(0).integers(0, 49152, (args.batch, args.length))
  ours_s, flops_per_token, tokens, ours_loss = ours(args, ids)
  peak = peak_flops(args.peak_flops)

  def mfu(seconds: float) -> str:
    achieved = flops_per_token * tokens / seconds
    if not peak:
      return f"{achieved / 1e9:.0f} GFLOP/s, MFU n/a (pass --peak-flops)"
    return f"{achieved / 1e9:.0f} GFLOP/s, MFU {achieved / (peak * jax.device_count()):.1%}"

  print(f"machine: {machine.line(machine.info())}")
  print(f"SmolLM2-135M vpit train step, batch {args.batch} x {args.length}, float32, "
        f"{args.images} image(s) per row, median of {args.repeats}; "
        f"{flops_per_token / 1e9:.2f} GFLOP per token")
  print(f"  ours (jax.jit):         {tokens / ours_s:10.0f} tokens/s  ({ours_s * 1e3:.0f} ms, "
        f"first loss {ours_loss:.4f})  {mfu(ours_s)}")
  if args.skip_transformers:
    return
  import torch
  theirs_s, theirs_loss = transformers_step(args, ids)
  print(f"  transformers (PyTorch {torch.__version__}, {torch.get_num_threads()} threads): "
        f"{tokens / theirs_s:10.0f} tokens/s  ({theirs_s * 1e3:.0f} ms, first loss {theirs_loss:.4f})  {mfu(theirs_s)}")
  print(f"  ratio ours / transformers: {theirs_s / ours_s:.2f}x")


if __name__ == "__main__":
  main()
