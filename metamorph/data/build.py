"""Your data as a TFDS dataset: ``python -m metamorph.data.build --name NAME --images DIR
--out DATA_DIR --split train=train.jsonl --split validation=val.jsonl [--strict]``.

Each split file is JSONL (one record per line) or a JSON list, in the MetaMorph /
LLaVA format (see ``metamorph.data.records``); image paths are relative to
``--images`` and must stay inside it (``..``, absolute paths and symlinks that lead
out are dropped as image_outside_root unless --allow-images-outside-root); an image
of more than --max-pixels pixels is dropped (image_too_large) before it is decoded.
Every line is kept or dropped for one reason (a byte that is not UTF-8 costs only
its line); the counts by reason are printed at the end and stored with the dataset.
``--strict`` stops at the first bad record instead, naming FILE:LINE and the reason.
Train on it with ``--config.data.data_dir=DATA_DIR --config.data.name=NAME``.
"""
from __future__ import annotations

import argparse
import sys

from metamorph.data.images import MAX_PIXELS, pil_limit_follows
from metamorph.data.records import MAX_LINE_BYTES, RecordError


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m metamorph.data.build", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--name", required=True, help="dataset name (a folder under --out)")
  parser.add_argument("--images", required=True, help="folder the records' image paths are relative to")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--split", action="append", required=True, metavar="SPLIT=FILE",
                      help="a split and its .jsonl/.json file; repeat for several splits")
  parser.add_argument("--version", default="1.0.0", help="dataset version (default 1.0.0)")
  parser.add_argument("--strict", action="store_true", help="stop at the first bad record")
  parser.add_argument("--allow-images-outside-root", action="store_true",
                      help="open image paths that lead outside --images (.., absolute paths, symlinks)")
  parser.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                      help=f"drop images of more than N pixels, read from their header (default {MAX_PIXELS}; "
                           "0: no limit)")
  parser.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES, metavar="N",
                      help=f"drop JSONL lines longer than N bytes unread (default {MAX_LINE_BYTES})")
  args = parser.parse_args(argv)
  if args.max_pixels < 0 or args.max_line_bytes < 1:
    parser.error("--max-pixels must be >= 0 and --max-line-bytes >= 1")
  try:
    args.splits = dict(item.split("=", 1) for item in args.split)
  except ValueError:
    parser.error(f"--split takes SPLIT=FILE, got {args.split}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from metamorph.data.tfds_builder import EmptySplitError, build_dataset  # slow import: tensorflow_datasets, after --help
  try:
    with pil_limit_follows(args.max_pixels or None):
      counts = build_dataset(args.name, args.splits, args.images, args.out, strict=args.strict,
                             version=args.version, allow_images_outside_root=args.allow_images_outside_root,
                             max_pixels=args.max_pixels or None, max_line_bytes=args.max_line_bytes)
  except (RecordError, EmptySplitError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  kept = sum(c.kept for c in counts.values())
  print(f"wrote {args.name} {args.version} ({kept} records) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
