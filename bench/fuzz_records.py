"""Record fuzzing at length: mutated records through the build's reader, then one real build.

  python -m bench.fuzz_records [--examples 2000] [--seed 0]

1. hypothesis draws ``--examples`` files of 4 to 16 mutated JSONL lines each
   (tests/record_faults.py: byte flips and inserts, bytes that are not UTF-8, lone
   surrogate escapes, truncation, type swaps, missing fields, wrong placeholder and image
   counts, reserved tokens, random unicode, image paths that leave the folder, are missing,
   corrupt or too large). Each file is read as the build reads it and each line on its own;
   a line must be kept or dropped for exactly one reason (the one its mutation determines,
   where it determines one). A crash is any exception or broken invariant; crashes are
   counted, not stopped at.
2. All the lines in one file through ``build_dataset`` (TFDS array_record, stored and read
   back): its drop counts must equal the tallies of 1.

Prints a table: records fuzzed, kept, dropped by reason, crashes.
"""
from __future__ import annotations

import argparse
import collections
import os
import tempfile
import time
import warnings

from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from PIL import Image

from metamorph.data.tfds_builder import ImagePolicy, build_dataset, open_source
from tests.image_faults import KEPT, image_folder
from tests.record_faults import MAX_LINE_BYTES, check, faulty_lines, lines_file


def fuzz(examples: int, random_seed: int, folder: str, images: ImagePolicy):
  """-> (outcome tallies, every line drawn, crash count, the first crash's message)."""
  tally, drawn, crashes = collections.Counter(), [], []

  @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
  @given(st.lists(faulty_lines(), min_size=4, max_size=16))
  def run(lines):
    try:
      tally.update(check(lines, images, folder))
      drawn.extend(line for line, _ in lines)
    except Exception as e:  # noqa: BLE001 - a crash is what we count
      crashes.append(f"{type(e).__name__}: {e}"[:300])

  seed(random_seed)(run)()
  return tally, drawn, len(crashes), crashes[0] if crashes else ""


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--examples", type=int, default=2000, help="hypothesis examples (files of 4-16 lines)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # huge.png: dropped, image_too_large
  with tempfile.TemporaryDirectory() as folder:
    images = ImagePolicy(image_folder(folder))
    start = time.perf_counter()
    tally, drawn, crashes, first = fuzz(args.examples, args.seed, folder, images)
    seconds = time.perf_counter() - start
    path = os.path.join(folder, "all.jsonl")
    lines_file(path, drawn)
    built = build_dataset("fuzz", {"train": path}, images.root, os.path.join(folder, "data"),
                          max_line_bytes=MAX_LINE_BYTES)["train"]
    stored = len(open_source(os.path.join(folder, "data"), "fuzz", "train"))
  dropped = {r: n for r, n in tally.items() if r != KEPT}
  agree = built.kept == tally[KEPT] == stored and dict(built.counts) == dropped
  rows = [("records fuzzed", len(drawn)), ("kept", tally[KEPT]), ("dropped", sum(dropped.values()))]
  rows += [(f"  {reason}", n) for reason, n in sorted(dropped.items(), key=lambda kv: -kv[1])]
  rows += [("crashes", crashes), ("one build over all lines: kept / dropped", f"{built.kept} / {built.dropped}"),
           ("build agrees with the tallies", "yes" if agree else "NO"), ("seconds (fuzzing)", f"{seconds:.1f}")]
  width = max(len(name) for name, _ in rows)
  print(f"record fuzzing: {args.examples} hypothesis examples, seed {args.seed}")
  for name, value in rows:
    print(f"  {name:<{width}}  {value:>10}")
  if first:
    print(f"first crash: {first}")


if __name__ == "__main__":
  main()
