"""One example of the shapes world: a conversation record and its rendered images.

Every record is a LLaVA/MetaMorph conversation (``metamorph.data.records``)::

  {"id": "train-000123", "task": "edit", "image": ["train/000123_0.png", "train/000123_1.png"],
   "conversations": [{"from": "human", "value": "<image>\\nMake the shape blue."},
                     {"from": "gpt", "value": "<image>"}],
   "meta": {"edits": ["color"], "objects": [1, 1], "targets": [{"color": "blue", ...}]}}

Contracts:
  * Example ``index`` of a split draws everything from ``example_rng(seed, split,
    index)`` (``scene.scene_rng(seed, index)`` for "train"), so records and pixels are
    reproducible one by one.
  * ``meta["objects"]``: the number of objects of each image, in placeholder order.
  * A record with generated images has ``meta["targets"]``: the attributes of the
    single object of each generated image, in order, as ``oracle.read_image`` reads
    them back (``check_targets``). Understanding records have ``meta["questions"]``
    (question kinds) and ``meta["answers"]`` (canonical values), one per question turn.
"""
from __future__ import annotations

import zlib
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from metamorph.data.records import parse_record
from metamorph.shapes import scene
from metamorph.shapes.mix import resolve_mix
from metamorph.shapes.scene import Shape, normalize_holdout
from metamorph.shapes.tasks import GENERATORS
from metamorph.tokens import IMAGE_PLACEHOLDER


def split_key(split: str) -> int:
  """The number that seeds a split's own stream (the CRC-32 of its name)."""
  return zlib.crc32(split.encode())


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
  """The generator of example ``index``: ``scene.scene_rng(seed, index)`` for "train",
  an independent stream per other split (seeded by the split's name)."""
  if split == "train":
    return scene.scene_rng(seed, index)
  return np.random.default_rng([seed, index, split_key(split)])


def image_name(split: str, index: int, k: int) -> str:
  """Path of the k-th image of example ``index``, relative to the image root."""
  return f"{split}/{index:06d}_{k}.png"


def _generated(turns: Sequence[tuple[str, str]]) -> list[bool]:
  """For each placeholder of the turns, in order: whether it is in a gpt turn (generated)."""
  return [who == "gpt" for who, text in turns for _ in range(text.count(IMAGE_PLACEHOLDER))]


def _targets(turns: Sequence[tuple[str, str]], images: Sequence[tuple[Shape, ...]]) -> list[dict[str, str]]:
  """Attributes of the object of every image placed in a gpt turn, in order."""
  targets = []
  for generated, objs in zip(_generated(turns), images):
    if generated:
      [obj] = objs
      targets.append(obj.attributes())
  return targets


def check_targets(record: Mapping[str, Any]) -> None:
  """Raises ValueError unless ``meta["targets"]`` holds one entry per generated image
  (an ``<image>`` of a gpt turn): what the oracle grades a generated image against."""
  generated = sum(_generated([(t["from"], t["value"]) for t in record["conversations"]]))
  targets = len(record.get("meta", {}).get("targets", []))
  if targets != generated:
    raise ValueError(f"{record.get('id')}: {targets} meta targets for {generated} generated images")


def make_example(seed: int, index: int, *, holdout: Collection[tuple[str, str]] = (),
                 tasks: Mapping[str, float] | Sequence[str] | str | None = None, split: str = "train",
                 image_size: int = scene.DEFAULT_SIZE) -> tuple[dict[str, Any], list[np.ndarray]]:
  """One record and its images (uint8 [image_size, image_size, 3], in placeholder order).

  Deterministic in (seed, split, index, holdout, tasks, image_size). The record passes
  ``records.parse_record`` and ``check_targets`` (ValueError otherwise).
  """
  mix = resolve_mix(tasks)
  holdout = frozenset(normalize_holdout(holdout))
  rng = example_rng(seed, split, index)
  names = list(mix)
  task = names[int(rng.choice(len(names), p=np.asarray([mix[t] for t in names])))]
  ex = GENERATORS[task](rng, holdout)
  arrays = [scene.render(objs, size=image_size, rng=rng) for objs in ex.images]
  record: dict[str, Any] = {"id": f"{split}-{index:06d}", "task": task}
  if ex.images:
    record["image"] = [image_name(split, index, k) for k in range(len(ex.images))]
  record["conversations"] = [{"from": who, "value": text} for who, text in ex.turns]
  meta = dict(ex.meta)
  if ex.images:
    meta["objects"] = [len(objs) for objs in ex.images]  # per image, in placeholder order
  targets = _targets(ex.turns, ex.images)
  if targets:
    meta["targets"] = targets
  record["meta"] = meta
  parse_record(record)
  check_targets(record)
  return record, arrays
