"""The command line: ``python -m metamorph.shapes --out DIR [...]`` writes a shapes world."""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from metamorph.shapes.mix import TASK_GROUPS, resolve_mix
from metamorph.shapes.scene import COLORS, DEFAULT_SIZE, MIN_SIZE, SHAPES, normalize_holdout
from metamorph.shapes.tasks import VPIT_TASKS
from metamorph.shapes.world import DATASET_NAME, WORLD_FILE, write_world


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="python -m metamorph.shapes",
    description="Write a shapes world: conversation records (JSONL) for every task kind, "
                "their PNG images, evaluation prompts, the word-level tokenizer, and the records "
                f"as the TFDS dataset '{DATASET_NAME}' under OUT/tfds.")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--n", type=int, default=20000, help="training records (default 20000)")
  parser.add_argument("--val-n", type=int, default=1000, help="validation records (default 1000; 0: none)")
  parser.add_argument("--captions-n", type=int, default=20000,
                      help="image-caption records of the 'captions' split, the SigLIP stage's data "
                           "(default 20000; 0: none)")
  parser.add_argument("--language-n", type=int, default=4000,
                      help="text-only records of the 'language' split, the language stage's data "
                           "(default 4000; 0: none)")
  parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
  parser.add_argument("--holdout", nargs="+", action="extend", default=[], metavar="COLOR:SHAPE",
                      help="(colour, shape) pairs never generated in training, e.g. red:circle "
                           f"(colours: {', '.join(COLORS)}; shapes: {', '.join(SHAPES)})")
  parser.add_argument("--image-size", type=int, default=DEFAULT_SIZE, help=f"image side in pixels "
                      f"(default {DEFAULT_SIZE}, at least {MIN_SIZE})")
  parser.add_argument("--tasks", default=None,
                      help="task kinds and optional weights, e.g. 'qa,t2i' or 'qa:3,t2i:1' or "
                           f"'understanding,t2i:0.05' (kinds: {', '.join(VPIT_TASKS)}; groups: "
                           f"{', '.join(TASK_GROUPS)}; default: the default mix)")
  parser.add_argument("--overwrite", action="store_true", help="write into a folder that holds a world")
  parser.add_argument("--quiet", action="store_true", help="no progress bars")
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """The command line; returns 0, or exits with status 2 on bad arguments."""
  parser = _parser()
  args = parser.parse_args(argv)
  if args.n < 1 or min(args.val_n, args.captions_n, args.language_n) < 0:
    parser.error(f"--n must be >= 1, --val-n, --captions-n and --language-n >= 0, got {args.n}, "
                 f"{args.val_n}, {args.captions_n} and {args.language_n}")
  if args.seed < 0:
    parser.error(f"--seed must be >= 0, got {args.seed}")
  if args.image_size < MIN_SIZE:
    parser.error(f"--image-size must be >= {MIN_SIZE}, got {args.image_size}")
  specs = [s for item in args.holdout for s in item.split(",") if s.strip()]
  try:
    holdout = normalize_holdout(specs)
    resolve_mix(args.tasks)
  except ValueError as e:
    parser.error(str(e))
  if os.path.exists(os.path.join(args.out, WORLD_FILE)) and not args.overwrite:
    parser.error(f"{args.out} already holds a world ({WORLD_FILE}); pass --overwrite to replace it")
  world = write_world(args.out, args.n, args.seed, holdout, args.image_size, args.val_n, args.tasks,
                      progress=not args.quiet, captions_n=args.captions_n, language_n=args.language_n)
  for split, counts in world["counts"].items():
    print(f"{split}: {sum(counts.values())} records " + ", ".join(f"{k} {v}" for k, v in counts.items()))
  print(f"wrote {args.out} (holdout {world['args']['holdout'] or 'none'}, "
        f"{world['eval_prompts']} eval prompts, vocab {world['vocab_size']}); TFDS dataset "
        f"'{DATASET_NAME}' in {os.path.join(args.out, 'tfds')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
