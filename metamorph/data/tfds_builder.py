"""Conversation records (JSONL or a JSON list) + an image folder -> a TFDS dataset.

The dataset is an ordinary TFDS dataset in the array_record format, one split
per input file, in the input order (``disable_shuffling``; shuffle when reading)::

  <data_dir>/<name>/<version>/
    dataset_info.json, features.json
    metadata.json                        {"drop_counts": {split: DropCounts.to_dict()}}
    <name>-<split>.array_record-00000-of-0000N

Features (``FEATURES``): ``id`` (Text); ``conversations`` (Text: JSON list of
validated ``[role, text]`` turns, roles in {system, user, assistant});
``images`` (Sequence of string Tensors: each image file's original encoded
bytes, PNG/JPEG/..., in placeholder order); ``extra`` (Text: JSON object of
the record's other keys, e.g. "task").

Neither building nor reading imports TensorFlow (tests check both): with these
features (no ``tfds.features.Image``, no ``tf.data`` input) TFDS serialises the
``tf.train.Example`` protos with ``protobuf``, and ``open_source`` returns TFDS's
array_record data source, which parses them with NumPy (``ExampleParserNp``;
string features come back as ``bytes``).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from metamorph.data.images import load_image, read_image_bytes
from metamorph.data.records import DropCounts, Record, RecordError, read_records

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "conversations": tfds.features.Text(),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "extra": tfds.features.Text(),
})


def _checked_image(path: str, where: str) -> bytes:
  """The encoded bytes of an image that exists and decodes (decoded once, then discarded)."""
  data = read_image_bytes(path, where)
  load_image(data, where)
  return data


def _example(record: Record, images: list[bytes]) -> dict[str, Any]:
  return {"id": record.id,
          "conversations": json.dumps([list(t) for t in record.turns], ensure_ascii=False),
          "images": images,
          "extra": json.dumps(dict(record.extra), ensure_ascii=False)}


def _count_entries(path: str) -> int | None:
  """Non-empty lines of a .jsonl file (the progress bar's total); None for .json."""
  if path.endswith(".json"):
    return None
  with open(path, encoding="utf-8") as f:
    return sum(1 for line in f if line.strip())


def _examples(split: str, path: str, image_root: str, counts: DropCounts,
              strict: bool) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, example) for each usable record; bad ones counted (or raised when strict)."""
  with tqdm(total=_count_entries(path), desc=f"{split}: {os.path.basename(path)}", unit=" records") as bar:
    for where, record in read_records(path, strict=strict, counts=counts):
      try:
        images = [_checked_image(os.path.join(image_root, p), where) for p in record.images]
      except RecordError as e:
        if strict:
          raise
        counts.add(e.reason)
      else:
        counts.kept += 1
        yield where, _example(record, images)
      _progress(bar, counts)
    _progress(bar, counts)


def _progress(bar: tqdm, counts: DropCounts) -> None:
  """Shows the records seen so far (kept + dropped) and the drops."""
  bar.set_postfix(dropped=counts.dropped, refresh=False)
  bar.update(counts.kept + counts.dropped - bar.n)


class _RecordsBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """An ``AdhocBuilder`` whose info carries the drop counts as metadata."""

  def __init__(self, *, drop_counts: dict[str, DropCounts], **kwargs):
    self._drop_counts = drop_counts
    self._metadata = tfds.core.MetadataDict()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self._description, features=FEATURES,
                                 metadata=self._metadata, disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate(split, gen) for split, gen in self._split_datasets.items()}

  def _generate(self, split: str, examples: Iterator) -> Iterator:
    yield from examples
    self._metadata.setdefault("drop_counts", {})[split] = self._drop_counts[split].to_dict()


def build_dataset(name: str, splits: Mapping[str, str], image_root: str, data_dir: str, *,
                  strict: bool = False, version: str = "1.0.0") -> dict[str, DropCounts]:
  """Builds ``<data_dir>/<name>/<version>`` from ``splits`` (split -> .jsonl/.json path).

  Every record is validated and each image opened and decoded once; bad records
  are skipped and counted by reason (``strict``: the first raises ``RecordError``
  naming ``file:line`` and the reason). Prints and stores the counts per split.
  Raises ``FileExistsError`` if that version was already built.
  """
  if os.path.exists(os.path.join(data_dir, name, version, "dataset_info.json")):
    raise FileExistsError(f"{os.path.join(data_dir, name, version)} exists; delete it or bump the version")
  counts = {split: DropCounts() for split in splits}
  generators = {split: _examples(split, path, image_root, counts[split], strict)
                for split, path in splits.items()}
  builder = _RecordsBuilder(name=name, version=version, features=FEATURES, split_datasets=generators,
                            data_dir=data_dir, drop_counts=counts,
                            description=f"MetaMorph conversation records from {dict(splits)}")
  with tempfile.TemporaryDirectory() as downloads:  # TFDS wants one; nothing is downloaded
    builder.download_and_prepare(file_format="array_record", download_dir=downloads)
  for split, c in counts.items():
    print(f"{name}/{split}: {c.summary()}")
  return counts


def _version_dir(data_dir: str, name: str, version: str | None) -> str:
  """The requested version's folder, or the newest one built."""
  root = os.path.join(data_dir, name)
  if version is None:
    built = [v for v in os.listdir(root) if os.path.exists(os.path.join(root, v, "dataset_info.json"))]
    if not built:
      raise FileNotFoundError(f"no built version of {name!r} under {root}")
    version = max(built, key=lambda v: tuple(int(x) for x in v.split(".")))
  return os.path.join(root, version)


def open_source(data_dir: str, name: str, split: str, version: str | None = None):
  """A random-access source (``len``, ``[i]``) of stored examples; needs no TensorFlow.

  Each example: {"id": bytes, "conversations": bytes (JSON), "images": list of
  encoded image bytes, "extra": bytes (JSON)}.
  """
  path = _version_dir(data_dir, name, version)
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise ValueError(f"{path} has no split {split!r} (it has {', '.join(sorted(builder.info.splits))}); "
                     "build the dataset with that split or choose another (config.data.train_split / "
                     "eval_split)")
  return builder.as_data_source(split)


def read_drop_counts(data_dir: str, name: str, version: str | None = None) -> dict[str, dict[str, Any]]:
  """The drop counts stored at build time: split -> ``DropCounts.to_dict()``."""
  with open(os.path.join(_version_dir(data_dir, name, version), "metadata.json"), encoding="utf-8") as f:
    return json.load(f)["drop_counts"]
