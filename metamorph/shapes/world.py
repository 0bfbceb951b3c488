"""Writing a shapes world to disk: its splits, images, evaluation prompts, tokenizer and TFDS copy.

A world folder holds ``{split}.jsonl`` for each of ``SPLITS`` it has, their PNGs under
``images/{split}/``, ``eval_t2i.jsonl`` (``prompts.eval_prompts``), ``eval_knowledge.jsonl``
(``knowledge.knowledge_records``, PNGs under ``images/knowledge/``), the word-level
tokenizer under ``tokenizer/``, the records as the TFDS dataset ``DATASET_NAME`` under
``tfds/``, and ``world.json`` (what ``write_world`` returns: its arguments, counts and
files). The same arguments give byte-identical JSONL, PNG and tokenizer files.
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from metamorph.shapes import scene
from metamorph.shapes.examples import make_example
from metamorph.shapes.knowledge import knowledge_records
from metamorph.shapes.mix import resolve_mix
from metamorph.shapes.prompts import eval_prompts
from metamorph.shapes.scene import normalize_holdout
from metamorph.shapes.tasks import TASKS

WORLD_FILE = "world.json"
# captions: image-caption pairs for the SigLIP stage; language: text-only records for the toy
# LLM's language stage, which stands in for a pretrained LLM
SPLITS = ("train", "validation", "captions", "language")
SPLIT_TASKS = {"captions": {"caption": 1.0}, "language": {"text": 1.0}}  # else the world's mix
SPLIT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
DATASET_NAME = "shapes_world"  # the TFDS dataset under OUT/tfds
EVAL_FILE = "eval_t2i.jsonl"
KNOWLEDGE_FILE = "eval_knowledge.jsonl"  # the world-knowledge probes (metamorph.shapes.knowledge)


def _dumps(record: Mapping[str, Any]) -> str:
  return json.dumps(record, ensure_ascii=False)


def _save_png(array: np.ndarray, path: str) -> None:
  Image.fromarray(array).save(path, format="PNG", compress_level=6)


def write_split(out_dir: str, n: int, seed: int, holdout: Iterable[str | Sequence[str]] = (),
                image_size: int = scene.DEFAULT_SIZE,
                tasks: Mapping[str, float] | Sequence[str] | str | None = None,
                split: str = "train", progress: bool = True) -> dict[str, int]:
  """Writes ``out_dir/{split}.jsonl`` (n records) and ``out_dir/images/{split}/*.png``.

  Returns the number of records per task kind (``TASKS`` order). The same
  arguments give byte-identical files.
  """
  if not isinstance(n, (int, np.integer)) or n < 0:
    raise ValueError(f"n must be an int >= 0, got {n!r}")
  if not isinstance(image_size, (int, np.integer)) or image_size < scene.MIN_SIZE:
    raise ValueError(f"image_size must be an int >= {scene.MIN_SIZE}, got {image_size!r}")
  if not SPLIT_NAME.match(split):
    raise ValueError(f"split {split!r} must match {SPLIT_NAME.pattern}")
  pairs = normalize_holdout(holdout)
  mix = resolve_mix(tasks)
  os.makedirs(os.path.join(out_dir, "images", split), exist_ok=True)
  counts: collections.Counter = collections.Counter()
  path = os.path.join(out_dir, f"{split}.jsonl")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    for index in tqdm(range(n), desc=f"shapes world {split}", unit="rec", disable=not progress):
      record, arrays = make_example(seed, index, holdout=pairs, tasks=mix, split=split,
                                    image_size=image_size)
      for name, array in zip(record.get("image", ()), arrays):
        _save_png(array, os.path.join(out_dir, "images", name))
      f.write(_dumps(record) + "\n")
      counts[record["task"]] += 1
  os.replace(path + ".tmp", path)
  return {t: counts[t] for t in TASKS if counts[t]}


def write_eval_prompts(out_dir: str, holdout: Iterable[str | Sequence[str]] = (), seed: int = 0) -> int:
  """Writes ``eval_prompts`` to ``out_dir/EVAL_FILE``; returns the number of prompts."""
  records = eval_prompts(holdout, seed)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, EVAL_FILE), "w", encoding="utf-8") as f:
    for r in records:
      f.write(_dumps(r) + "\n")
  return len(records)


def write_eval_knowledge(out_dir: str, holdout: Iterable[str | Sequence[str]] = (),
                         image_size: int = scene.DEFAULT_SIZE) -> int:
  """Writes ``knowledge.knowledge_records`` to ``out_dir/KNOWLEDGE_FILE`` and their PNGs under
  ``out_dir/images/``; returns the number of probes. Byte-identical for the same arguments."""
  records, images = knowledge_records(holdout, image_size)
  for name, array in images.items():
    os.makedirs(os.path.dirname(os.path.join(out_dir, "images", name)), exist_ok=True)
    _save_png(array, os.path.join(out_dir, "images", name))
  with open(os.path.join(out_dir, KNOWLEDGE_FILE), "w", encoding="utf-8") as f:
    for r in records:
      f.write(_dumps(r) + "\n")
  return len(records)


def write_world(out_dir: str, n: int, seed: int = 0, holdout: Sequence[str | Sequence[str]] = (),
                image_size: int = scene.DEFAULT_SIZE, val_n: int = 1000, tasks: str | None = None,
                progress: bool = True, captions_n: int = 0, language_n: int = 0) -> dict:
  """Writes a whole world under ``out_dir`` and returns what ``world.json`` holds.

  Files: ``train.jsonl`` (n records of the ``tasks`` mix), ``validation.jsonl``
  (val_n records), ``captions.jsonl`` (captions_n image-caption records, the
  SigLIP stage's training data) and ``language.jsonl`` (language_n text-only records,
  the language stage's), each from its own seed stream (``examples.example_rng``);
  their PNGs under ``images/``, ``eval_t2i.jsonl`` (text-to-image prompts of held-out
  and seen pairs), ``eval_knowledge.jsonl`` (the world-knowledge probes, their PNGs under
  ``images/knowledge/``), the tokenizer under ``tokenizer/`` and ``world.json``.
  """
  # slow import: transformers (about 1 s), which nothing but the tokenizer needs
  from metamorph.shapes.tokenizer import build_world_tokenizer
  pairs = normalize_holdout(holdout)
  mix = resolve_mix(tasks)
  counts, files = {}, {}
  for split, size in zip(SPLITS, (n, val_n, captions_n, language_n)):
    if size > 0:
      counts[split] = write_split(out_dir, size, seed, pairs, image_size, SPLIT_TASKS.get(split, mix), split,
                                  progress)
      files[split] = f"{split}.jsonl"
  n_eval = write_eval_prompts(out_dir, pairs, seed)
  files["eval_t2i"] = EVAL_FILE
  n_knowledge = write_eval_knowledge(out_dir, pairs, image_size)
  files["eval_knowledge"] = KNOWLEDGE_FILE
  tokenizer = build_world_tokenizer(os.path.join(out_dir, "tokenizer"))
  world = {
    "args": {"n": n, "val_n": val_n, "captions_n": captions_n, "language_n": language_n, "seed": seed,
             "image_size": image_size, "holdout": [f"{c}:{s}" for c, s in pairs], "tasks": mix},
    "holdout": [list(p) for p in pairs],
    "counts": counts,
    "eval_prompts": n_eval,
    "knowledge_probes": n_knowledge,
    "files": {**files, "images": "images", "tokenizer": "tokenizer"},
    "vocab_size": len(tokenizer),
  }
  world["tfds"] = _build_tfds(out_dir, files)
  with open(os.path.join(out_dir, WORLD_FILE), "w", encoding="utf-8") as f:
    json.dump(world, f, indent=2)
    f.write("\n")
  return world


def _build_tfds(out_dir: str, files: dict[str, str]) -> dict:
  """The JSONL splits as the TFDS dataset ``DATASET_NAME`` under ``out_dir/tfds``."""
  # slow import: tensorflow_datasets (about 0.5 s), only for writing the TFDS copy
  from metamorph.data.tfds_builder import build_dataset
  data_dir = os.path.join(out_dir, "tfds")
  shutil.rmtree(os.path.join(data_dir, DATASET_NAME), ignore_errors=True)  # --overwrite
  splits = {split: os.path.join(out_dir, files[split]) for split in SPLITS if split in files}
  counts = build_dataset(DATASET_NAME, splits, os.path.join(out_dir, "images"), data_dir)
  return {"data_dir": "tfds", "name": DATASET_NAME,
          "drop_counts": {split: c.to_dict() for split, c in counts.items()}}
