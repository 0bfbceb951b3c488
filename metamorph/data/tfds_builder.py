"""Conversation records (JSONL or a JSON list) + an image folder -> a TFDS dataset.

The dataset is an ordinary TFDS dataset in the array_record format, one split
per input file, in the input order (``disable_shuffling``; shuffle when reading)::

  <data_dir>/<name>/<version>/
    dataset_info.json, features.json
    metadata.json                        {"drop_counts": {split: DropCounts.to_dict()},
                                          "max_pixels": the build's pixel limit (null: none)}
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

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from tqdm import tqdm

from metamorph.data.images import MAX_PIXELS, load_image, read_image_bytes, resolve_image
from metamorph.data.records import MAX_LINE_BYTES, DropCounts, Record, RecordError, count_lines, read_records

FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),
    "conversations": tfds.features.Text(),
    "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
    "extra": tfds.features.Text(),
})


@dataclasses.dataclass(frozen=True)
class ImagePolicy:
  """Where a build's images may be and how large: paths resolve inside ``root``
  (else ``image_outside_root``, unless ``allow_outside_root``); more than
  ``max_pixels`` pixels is ``image_too_large`` (None: no limit of ours)."""
  root: str
  allow_outside_root: bool = False
  max_pixels: int | None = MAX_PIXELS

  def read(self, path: str, where: str) -> bytes:
    """The encoded bytes of an image that is allowed, exists and decodes (decoded
    once, then discarded); ``RecordError`` otherwise."""
    data = read_image_bytes(resolve_image(self.root, path, where, allow_outside_root=self.allow_outside_root),
                            where)
    load_image(data, where, max_pixels=self.max_pixels)
    return data


def _example(record: Record, images: list[bytes]) -> dict[str, Any]:
  return {"id": record.id,
          "conversations": json.dumps([list(t) for t in record.turns], ensure_ascii=False),
          "images": images,
          "extra": json.dumps(dict(record.extra), ensure_ascii=False)}


def read_examples(path: str, images: ImagePolicy, counts: DropCounts, *, strict: bool = False,
                  max_line_bytes: int = MAX_LINE_BYTES,
                  progress: str | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
  """(``file:line``, example) for each record a build stores: ``read_records``, then
  each image through ``images``. Every line ends up yielded (``counts.kept``) or
  counted under one reason, so ``counts.kept + counts.dropped == count_lines(path)``;
  ``strict``: the first bad record raises ``RecordError`` naming ``file:line``.
  ``progress``: a progress bar's label (None: no bar)."""
  with tqdm(total=count_lines(path), desc=progress, unit=" records", disable=progress is None) as bar:
    for where, record in read_records(path, strict=strict, counts=counts, max_line_bytes=max_line_bytes):
      try:
        encoded = [images.read(p, where) for p in record.images]
      except RecordError as e:
        if strict:
          raise
        counts.add(e.reason)
      else:
        counts.kept += 1
        yield where, _example(record, encoded)
      _progress(bar, counts)
    _progress(bar, counts)


def _progress(bar: tqdm, counts: DropCounts) -> None:
  """Shows the records seen so far (kept + dropped) and the drops."""
  bar.set_postfix(dropped=counts.dropped, refresh=False)
  bar.update(counts.kept + counts.dropped - bar.n)


class _RecordsBuilder(tfds.dataset_builders.AdhocBuilder, skip_registration=True):
  """An ``AdhocBuilder`` whose info carries the drop counts as metadata."""

  def __init__(self, *, drop_counts: dict[str, DropCounts], max_pixels: int | None, **kwargs):
    self._drop_counts = drop_counts
    self._metadata = tfds.core.MetadataDict(max_pixels=max_pixels)
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


class EmptySplitError(ValueError):
  """Every record of a split was dropped: TFDS writes no empty split, so nothing is built."""


def build_dataset(name: str, splits: Mapping[str, str], image_root: str, data_dir: str, *,
                  strict: bool = False, version: str = "1.0.0", allow_images_outside_root: bool = False,
                  max_pixels: int | None = MAX_PIXELS,
                  max_line_bytes: int = MAX_LINE_BYTES) -> dict[str, DropCounts]:
  """Builds ``<data_dir>/<name>/<version>`` from ``splits`` (split -> .jsonl/.json path).

  Every line is kept or counted under one reason (``records.read_records``); each
  image path must resolve inside ``image_root`` (unless ``allow_images_outside_root``),
  have at most ``max_pixels`` pixels (read from its header) and decode; it is opened
  and decoded once. Bad records are skipped and counted by reason (``strict``: the
  first raises ``RecordError`` naming ``file:line`` and the reason). Prints and
  stores the counts per split. Raises ``EmptySplitError`` when a split keeps no record,
  ``FileExistsError`` if that version was
  already built, ``OSError`` for a split file that cannot be read.
  """
  if os.path.exists(os.path.join(data_dir, name, version, "dataset_info.json")):
    raise FileExistsError(f"{os.path.join(data_dir, name, version)} exists; delete it or bump the version")
  for split, path in splits.items():
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} (split {split!r}): no such file")
  counts = {split: DropCounts() for split in splits}
  images = ImagePolicy(image_root, allow_images_outside_root, max_pixels)
  generators = {split: read_examples(path, images, counts[split], strict=strict, max_line_bytes=max_line_bytes,
                                     progress=f"{split}: {os.path.basename(path)}")
                for split, path in splits.items()}
  builder = _RecordsBuilder(name=name, version=version, features=FEATURES, split_datasets=generators,
                            data_dir=data_dir, drop_counts=counts, max_pixels=max_pixels,
                            description=f"MetaMorph conversation records from {dict(splits)}")
  with tempfile.TemporaryDirectory() as downloads:  # TFDS wants one; nothing is downloaded
    try:
      builder.download_and_prepare(file_format="array_record", download_dir=downloads)
    except AssertionError as e:  # TFDS refuses a split without examples
      empty = [split for split, c in counts.items() if c.kept == 0]
      if not empty:
        raise
      raise EmptySplitError("; ".join(f"split {split!r} ({splits[split]}): no record kept, {counts[split].summary()}"
                                      for split in empty) + "; nothing was written") from e
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


def _metadata(data_dir: str, name: str, version: str | None) -> dict[str, Any]:
  with open(os.path.join(_version_dir(data_dir, name, version), "metadata.json"), encoding="utf-8") as f:
    return json.load(f)


def read_drop_counts(data_dir: str, name: str, version: str | None = None) -> dict[str, dict[str, Any]]:
  """The drop counts stored at build time: split -> ``DropCounts.to_dict()``."""
  return _metadata(data_dir, name, version)["drop_counts"]


def read_max_pixels(data_dir: str, name: str, version: str | None = None) -> int | None:
  """The pixel limit the dataset was built with (None: none): every stored image has at
  most that many pixels, so readers decode them under it. Datasets built before the
  limit was stored hold images of at most ``MAX_PIXELS``."""
  return _metadata(data_dir, name, version).get("max_pixels", MAX_PIXELS)
