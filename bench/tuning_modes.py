"""SmolLM2-135M VPiT step time and train-state bytes per tuning mode, against full tuning.

  python -m bench.tuning_modes [--modes full,lora,frozen_llm] [--batch 2] [--length 256]
                               [--images 4] [--repeats 3] [--lora-targets q_proj,k_proj,v_proj,o_proj]
                               [--cpu-devices 0] [--text-targets 0.11] [--every-position]

For each mode of ``train.tuning.MODES`` named in ``--modes`` (a mode the trainer does not
have yet is listed as missing): the ``vpit`` stage of configs/smollm2_135m.py with
``config.tuning.mode`` set to it, built as ``train.trainer`` builds it (``make_setup`` +
``initial_state``: the GGUF weights, the new image-token rows, a random toy SigLIP tower),
and ``train.step.train_step`` under ``jax.jit`` (float32, CPU) on one synthetic batch
(``bench.train_step.time_vpit_steps``: random ids, ``--images`` response images per row,
16 slots each, ``--text-targets`` of the positions labelled; the world's records hold about
4 images and 28 text targets per 256 tokens). The LM head runs on the text targets' positions
only (``metamorph.layers.target_logits``); ``--every-position`` adds each mode with the head on
every position, the loss before that. Time: median of
``--repeats`` steps after one warm-up (``bench.timing.time_it``). Bytes: the train state's
trained parameters (f32 masters), optimizer state (AdamW's two moments) and frozen
parameters, from the abstract state. Ratios are against ``full`` (with ``--every-position``:
``full, head on every position``), the named baseline (the first row when it is not run). ``--cpu-devices N`` splits the CPU into N XLA devices
and shards the batch over them (configs/toy.py's mesh; 0: JAX's one device).
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.train_step import time_vpit_steps
from train.demo import machine

VOCAB = 49152  # SmolLM2's tokenizer (the ids of the synthetic batch)
EVERY = ", head on every position"  # the row name suffix of --every-position's runs


def _bytes(tree) -> int:
  import jax  # slow import: jax (the argument parser needs none)
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _count(tree) -> int:
  import jax  # slow import: as above
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _head_on_every_position(stage):
  """The vpit stage with the LM head run on every position (``logits_chunk=0``)."""
  import dataclasses
  import functools

  from train import stages
  return dataclasses.replace(stage, loss=functools.partial(stages.vpit_objective, logits_chunk=0))


def measure(mode: str, args, ids: np.ndarray, every_position: bool = False) -> dict:
  """Seconds per step, the first step's loss and the train state's bytes of ``mode`` (the LM
  head on every position with ``every_position``, else on the text targets' only)."""
  def configure(c) -> None:
    c.tuning.mode = mode
    if mode == "lora":
      c.tuning.lora.targets = args.lora_targets
    if args.cpu_devices:
      c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = -1, 1, args.cpu_devices
    else:
      c.mesh.data, c.mesh.fsdp, c.mesh.cpu_devices = 1, -1, 0

  s, seconds, first_loss = time_vpit_steps(args, ids, configure, args.text_targets,
                                           _head_on_every_position if every_position else None)
  a = s.abstract_state
  return {"seconds": seconds, "loss": first_loss, "trained": _count(a.params),
          "params": _bytes(a.params), "opt": _bytes(a.opt_state), "frozen": _bytes(a.frozen)}


def table(rows: dict[str, dict], tokens: int) -> list[str]:
  """Markdown rows of ``measure``'s results, with ratios against full (else the first row)."""
  base = rows.get("full" + EVERY) or rows.get("full") or next(iter(rows.values()))
  mb = 2 ** 20
  lines = ["| mode | s / step | tokens / s | time vs full | trained params | params MiB | optimizer MiB | "
           "frozen MiB | state MiB | state vs full | first loss |", "|---" * 11 + "|"]
  for mode, r in rows.items():
    total, base_total = r["params"] + r["opt"] + r["frozen"], base["params"] + base["opt"] + base["frozen"]
    lines.append(f"| {mode} | {r['seconds']:.2f} | {tokens / r['seconds']:.0f} | {r['seconds'] / base['seconds']:.2f}x | "
                 f"{r['trained'] / 1e6:.2f} M | {r['params'] / mb:.0f} | {r['opt'] / mb:.0f} | {r['frozen'] / mb:.0f} | "
                 f"{total / mb:.0f} | {total / base_total:.2f}x | {r['loss']:.4f} |")
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--modes", default="full,lora,frozen_llm")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--images", type=int, default=4, help="response images per row")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj")
  parser.add_argument("--cpu-devices", type=int, default=0, help="XLA CPU devices (0: one)")
  parser.add_argument("--text-targets", type=float, default=0.11,
                      help="fraction of positions with a text label (the world's 8 x 256 batches: 0.10-0.12)")
  parser.add_argument("--every-position", action="store_true",
                      help="also each mode with the LM head on every position (the loss before target-only logits)")
  args = parser.parse_args()

  from train import tuning
  ids = np.random.default_rng(0).integers(0, VOCAB, (args.batch, args.length))
  modes = [m.strip() for m in args.modes.split(",") if m.strip()]
  missing = [m for m in modes if m not in tuning.MODES]
  rows = {}
  for m in (m for m in modes if m in tuning.MODES):
    if args.every_position:
      rows[m + EVERY] = measure(m, args, ids, every_position=True)
    rows[m] = measure(m, args, ids)
  print(f"machine: {machine.line(machine.info())}")
  print(f"SmolLM2-135M vpit train step, batch {args.batch} x {args.length}, {args.images} image(s) per row, "
        f"{args.text_targets:.0%} of positions text targets, float32, {args.cpu_devices or 1} CPU device(s), "
        f"median of {args.repeats} after 1 warm-up" + (f"; LoRA on {args.lora_targets}" if "lora" in modes else ""))
  print("\n".join(table(rows, ids.size)))
  if missing:
    print(f"not measured (not in train.tuning.MODES: {', '.join(tuning.MODES)}): {', '.join(missing)}")


if __name__ == "__main__":
  main()
