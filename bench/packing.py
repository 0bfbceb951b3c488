"""Packing: records per row and pipeline speed, first fit over N open rows vs greedy (1 row).

  python -m bench.packing [--config configs/toy.py:vpit] [--rows 1 2 4 8] [--batches 60]

Builds the stage's training pipeline (``train.trainer.batches``: read, decode, format,
pack, batch; the world of ``make demo`` by default) once per ``data.open_rows`` value and
reads ``--batches`` batches from the start (same seed, so the same records arrive in the
same order). Prints per value: the share of token and image slots that hold a record, records
per row with its ratio to the baseline, greedy packing (``open_rows=1``), and rows and
records per second through the whole pipeline (after the first batch; the grain threads
that decode also pack). Records per row is what a train step's cost buys: the step costs
the same for any packing of [B, T] rows.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from train import trainer
from train.demo import machine, workflow


def measure(config, batches: int) -> dict[str, float]:
  """Slot fills, records per row and rows/s of ``batches`` batches of ``config``'s pipeline."""
  setup = trainer.make_setup(config, load_weights=False)
  it = trainer.batches(setup, config.data.train_split, seed=config.seed)
  first = next(it)
  start = time.perf_counter()
  rows = [first] + [next(it) for _ in range(batches - 1)]
  seconds = time.perf_counter() - start
  segments = np.concatenate([b["segment_ids"] for b in rows])  # [N, T]
  images = np.concatenate([b["image_mask"] for b in rows])      # [N, I]
  return {"tokens": float((segments > 0).mean()), "images": float(images.mean()),
          "records": float(segments.max(axis=1).mean()),
          "rows_per_s": (len(segments) - len(first["segment_ids"])) / seconds}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/toy.py:vpit", help="a training config file:ARG")
  parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8], help="data.open_rows values")
  parser.add_argument("--batches", type=int, default=60)
  args = parser.parse_args()

  path, _, arg = args.config.partition(":")
  config = workflow.load_config_file(path, arg)
  print(f"machine: {machine.line(machine.info())}")
  print(f"{args.config}: rows of {config.data.seq_len} tokens and {config.data.images_per_row} images, "
        f"batch {config.train.batch_size}, {args.batches} batches")
  baseline = None
  for open_rows in sorted(set(args.rows) | {1}):
    config.data.open_rows = open_rows
    m = measure(config, args.batches)
    baseline = baseline or m["records"]
    print(f"  open_rows {open_rows}{' (greedy, the baseline)' if open_rows == 1 else ''}: "
          f"token slots {m['tokens']:.1%}, image slots {m['images']:.1%}, {m['records']:.2f} records per row "
          f"({m['records'] / baseline:.2f}x), {m['rows_per_s']:.0f} rows/s = "
          f"{m['rows_per_s'] * m['records']:.0f} records/s")


if __name__ == "__main__":
  main()
