"""Answer prompts with a MetaMorph checkpoint: text, images (PNG) and one JSON record per prompt.

  python -m decode --checkpoint runs/toy --prompt "Generate an image of a red circle."
  python -m decode --checkpoint runs/toy --prompt "What colour is the shape?" --image shape.png
  python -m decode --checkpoint runs/toy --prompts-file prompts.jsonl --out samples

CHECKPOINT: a training workdir, an exported or converted model folder, a .gguf file, a
transformers folder or "smollm2" (text only). Images are rendered by the visualizer the
checkpoint names (``model.visualizer_from`` at training time), which must have been trained on
the checkpoint's SigLIP encoder (an error otherwise); without one, produced images are saved as
their visual tokens (.npy) only.

A prompts file holds one JSON object per line: {"prompt": "...", "images": ["a.png", ...],
"id": "..."}; "images" (paths relative to the file's folder) and "id" are optional. Prompts
are answered in batches of 8; the batch starting at line j samples with seed S + j.

Writes OUT/records.jsonl (one record per prompt: id, prompt, input images, text, token_ids,
finish_reason, images, visual_tokens) and OUT/ID-K.png / OUT/ID-K.npy per produced image.
Errors (missing checkpoint, unreadable image, prompt longer than the context) exit with code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings

import numpy as np
from tqdm import tqdm

import metamorph
from metamorph.data.images import load_image
from metamorph.data.records import RecordError
from metamorph.files import ConversionError
from metamorph.generation.prompts import PromptTooLong

BATCH = 8  # prompts per generation call


class UsageError(Exception):
  """A problem with the command line or its inputs (exit code 2)."""


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m decode", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="training workdir or model folder (or a .gguf file, a transformers folder, 'smollm2')")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", metavar="TEXT", help="one user message")
  source.add_argument("--prompts-file", metavar="F.jsonl", help="one JSON object per line (see above)")
  parser.add_argument("--image", metavar="PATH", nargs="+", action="extend", default=[],
                      help="input image(s) of --prompt, in <image> placeholder order (else before the text)")
  parser.add_argument("--out", metavar="DIR", default="decode_out",
                      help="where records.jsonl and the images go (default: decode_out)")
  parser.add_argument("--max-new-tokens", type=int, default=256, metavar="N",
                      help="steps per answer, visual tokens included (default: 256)")
  parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default: 0)")
  parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="nucleus sampling (default: 1, off)")
  parser.add_argument("--guidance", type=float, default=1.0, metavar="G",
                      help="classifier-free guidance on visual tokens (default: 1, off)")
  parser.add_argument("--seed", type=int, default=0, metavar="S", help="sampling and rendering seed (default: 0)")
  parser.add_argument("--json", action="store_true", help="print each record as a JSON line instead of text")
  args = parser.parse_args(argv)
  if args.image and args.prompts_file:
    parser.error("--image goes with --prompt; a prompts file lists its images per line")
  if args.max_new_tokens < 1:
    parser.error("--max-new-tokens must be >= 1")
  return args


def read_prompts(args: argparse.Namespace) -> list[dict]:
  """[{id, prompt, images: [paths]}] from --prompt/--image or --prompts-file."""
  if args.prompt is not None:
    return [{"id": "0", "prompt": args.prompt, "images": list(args.image)}]
  path = args.prompts_file
  if not os.path.isfile(path):
    raise UsageError(f"{path}: prompts file not found")
  base, records = os.path.dirname(path), []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      try:
        line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        item = json.loads(line) if line.strip() else None
      except UnicodeDecodeError as e:
        raise UsageError(f"{path}:{line_no}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from e
      except (ValueError, RecursionError) as e:
        raise UsageError(f"{path}:{line_no}: not JSON ({e})") from e
      if item is None:
        continue
      images = item.get("images", []) if isinstance(item, dict) else None
      if (not isinstance(item, dict) or not isinstance(item.get("prompt"), str) or not isinstance(images, list)
          or not all(isinstance(p, str) and p for p in images)):
        raise UsageError(f"{path}:{line_no}: expected {{\"prompt\": str, \"images\": [paths], \"id\": ...}}")
      records.append({"id": str(item.get("id", len(records))), "prompt": item["prompt"],
                      "images": [p if os.path.isabs(p) else os.path.join(base, p) for p in images]})
  if not records:
    raise UsageError(f"{path}: no prompts")
  return records


def read_images(records: list[dict]) -> list[list]:
  out = []
  for record in records:
    try:
      out.append([load_image(p) for p in record["images"]])
    except RecordError as e:
      raise UsageError(f"cannot read image: {e.detail}") from e
  return out


def _name(record_id: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]", "_", record_id)[:80] or "prompt"


def save(record: dict, generation, out_dir: str) -> dict:
  """Writes the answer's images (PNG) and visual tokens (.npy); -> its JSON record."""
  stem = _name(record["id"])
  pngs, npys = [], []
  for k, tokens in enumerate(generation.visual_tokens):
    npys.append(os.path.join(out_dir, f"{stem}-{k}.npy"))
    np.save(npys[-1], np.asarray(tokens, np.float32), allow_pickle=False)
    if k < len(generation.images):
      pngs.append(os.path.join(out_dir, f"{stem}-{k}.png"))
      generation.images[k].save(pngs[-1])
  return {"id": record["id"], "prompt": record["prompt"], "input_images": record["images"],
          "text": generation.text, "token_ids": generation.token_ids, "finish_reason": generation.finish_reason,
          "images": pngs, "visual_tokens": npys}


def run(args: argparse.Namespace) -> int:
  records = read_prompts(args)
  images = read_images(records)  # before the (slow) model load: fail fast on a bad path
  checkpoint = args.checkpoint
  if checkpoint != "smollm2" and not os.path.exists(checkpoint):
    raise UsageError(f"{checkpoint}: checkpoint not found")
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      mm = metamorph.load(checkpoint)
    for w in caught:
      print(f"warning: {w.message}", file=sys.stderr)
  except (ConversionError, OSError) as e:
    raise UsageError(str(e)) from e
  if any(images) and not mm.is_metamorph:
    raise UsageError(f"{checkpoint} is a text-only model; it takes no images")
  print(f"loaded {mm}", file=sys.stderr)
  os.makedirs(args.out, exist_ok=True)
  log_path = os.path.join(args.out, "records.jsonl")
  with open(log_path, "w") as log, tqdm(total=len(records), desc="prompts", unit="prompt", file=sys.stderr,
                                        disable=args.prompts_file is None) as bar:
    for start in range(0, len(records), BATCH):
      batch = records[start:start + BATCH]
      try:
        generations = mm.generate([r["prompt"] for r in batch], images=images[start:start + BATCH],
                                  max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, guidance=args.guidance, seed=args.seed + start)
      except PromptTooLong as e:  # e.index counts the batch's prompts, then their unconditional twins
        raise UsageError(f"prompt {batch[e.index % len(batch)]['id']!r} is longer than the context: {e}") from e
      for record, generation in zip(batch, generations):
        entry = save(record, generation, args.out)
        log.write(json.dumps(entry) + "\n")
        if args.json:
          bar.write(json.dumps(entry), file=sys.stdout)
        else:
          lines = [f"prompt: {record['prompt']}", f"answer: {generation.text}"]
          lines += [f"image: {p}" for p in entry["images"] or entry["visual_tokens"]]
          bar.write("\n".join(lines), file=sys.stdout)
        bar.update(1)
  if not args.json:
    print(f"records: {log_path}", file=sys.stderr)
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    return run(args)
  except UsageError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever a library wrote
    return 2


if __name__ == "__main__":
  sys.exit(main())
