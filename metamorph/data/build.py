"""Your data as a TFDS dataset: ``python -m metamorph.data.build --name NAME --images DIR
--out DATA_DIR --split train=train.jsonl --split validation=val.jsonl [--strict]``.

Each split file is JSONL (one record per line) or a JSON list, in the MetaMorph /
LLaVA format (see ``metamorph.data.records``); image paths are relative to
``--images``. Bad records are skipped and counted by reason (printed at the end
and stored with the dataset); ``--strict`` stops at the first one instead.
Train on it with ``--config.data.data_dir=DATA_DIR --config.data.name=NAME``.
"""
from __future__ import annotations

import argparse
import sys

from metamorph.data.records import RecordError


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
  args = parser.parse_args(argv)
  try:
    args.splits = dict(item.split("=", 1) for item in args.split)
  except ValueError:
    parser.error(f"--split takes SPLIT=FILE, got {args.split}")
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  from metamorph.data.tfds_builder import build_dataset  # slow import: tensorflow_datasets, after --help
  try:
    counts = build_dataset(args.name, args.splits, args.images, args.out, strict=args.strict,
                           version=args.version)
  except (RecordError, FileExistsError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  kept = sum(c.kept for c in counts.values())
  print(f"wrote {args.name} {args.version} ({kept} records) to {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
