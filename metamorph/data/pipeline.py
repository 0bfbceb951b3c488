"""The grain input pipeline: stored examples -> packed, batched training rows.

  sources (one, or (source, weight) pairs mixed with ``MapDataset.mix``)
    -> per-process shard -> shuffle (seeded, reshuffled each epoch)
    -> mix -> repeat(num_epochs)                                   [examples()]
    -> decode: JSON turns + encoded images -> format_conversation + preprocess
       (an unusable record becomes a drop marker carrying its reason)
    -> to_iter_dataset (ReadOptions: decoding runs in a few threads)
    -> PackIterDataset (first fit over open_rows rows)
    -> batch(batch_size, drop_remainder=True)                      [make_dataset()]

A source is anything with ``len`` and ``[i]`` returning stored examples
(``tfds_builder.open_source``, or a list of such dicts): {"conversations":
JSON list of [role, text], "images": list of encoded image bytes, "id": str,
...}; text fields may be ``bytes``.

Batches: the row arrays of ``packing.PackIterDataset`` with a leading [B]:
input_ids, labels, visual_index, segment_ids, positions [B, T] int32,
visual_target_mask [B, T] bool, images [B, I, H, W, 3] float32 in [-1, 1],
image_mask [B, I] bool, dropped [B, len(PIPELINE_REASONS)] int32. The
iterator's ``get_state()`` is a JSON-serialisable dict; ``set_state`` resumes
exactly.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import grain
import numpy as np

from metamorph.data.conversation import TokenLayout, format_conversation
from metamorph.data.images import MAX_PIXELS, load_image, preprocess
from metamorph.data.packing import PackIterDataset, drop_marker
from metamorph.data.records import RecordError


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _weighted(sources: Any) -> list[tuple[Any, float]]:
  """One source, or a sequence of (source, weight) pairs -> [(source, weight)]."""
  if isinstance(sources, (list, tuple)) and sources and all(
      isinstance(s, tuple) and len(s) == 2 and isinstance(s[1], (int, float)) for s in sources):
    pairs = [(s, float(w)) for s, w in sources]
  else:
    pairs = [(sources, 1.0)]
  for source, weight in pairs:
    if len(source) == 0 or weight <= 0:
      raise ValueError(f"each source needs records and a positive weight, got {len(source)} and {weight}")
  return pairs


def _shard_defaults(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # slow import: jax, only when the caller relies on the process defaults
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
  return shard_index, shard_count


def examples(sources: Any, *, seed: int = 0, num_epochs: int | None = None, shuffle: bool = True,
             shard_index: int | None = None, shard_count: int | None = None) -> grain.MapDataset:
  """Stored examples: each source sharded (``[shard_index::shard_count]``, disjoint
  across processes) and shuffled by ``seed`` (unless not ``shuffle``), mixed by
  weight, repeated.

  An epoch of a mixture ends when its first source runs out (grain's ``mix``);
  ``num_epochs=None`` repeats forever, reshuffling every epoch.
  """
  shard_index, shard_count = _shard_defaults(shard_index, shard_count)
  parts, weights = [], []
  for i, (source, weight) in enumerate(_weighted(sources)):
    ds = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(ds) == 0:
      raise ValueError(f"source {i} has {len(source)} records: none for shard {shard_index} of {shard_count}")
    parts.append(ds.shuffle(seed=(seed * 7919 + i) % 2**32) if shuffle else ds)
    weights.append(weight)
  mixed = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)
  return mixed.repeat(num_epochs)


@dataclasses.dataclass(frozen=True)
class Decode:
  """Stored example -> formatted record (see ``packing``), or a drop marker.

  ``strict``: raise ``RecordError`` (naming the record's id) instead.
  """
  tokenizer: Any
  layout: TokenLayout
  image_size: int
  seq_len: int
  images_per_row: int
  strict: bool = False
  max_pixels: int | None = MAX_PIXELS

  def __call__(self, example: dict[str, Any]) -> dict[str, Any]:
    try:
      return self._format(example)
    except RecordError as e:
      if self.strict:
        raise e.at(f"record {_text(example.get('id', ''))!r}") from e
      return drop_marker(e.reason)

  def _format(self, example: dict[str, Any]) -> dict[str, np.ndarray]:
    encoded = list(example["images"])
    if len(encoded) > self.images_per_row:
      raise RecordError("too_many_images", f"{len(encoded)} images > {self.images_per_row} per row")
    try:
      turns = [(role, text) for role, text in json.loads(_text(example["conversations"]))]
    except (ValueError, TypeError) as e:
      raise RecordError("malformed_record", f"stored conversations: {e}") from e
    f = format_conversation(turns, self.tokenizer, self.layout, max_length=self.seq_len)
    if f.num_images != len(encoded):
      raise RecordError("placeholder_mismatch", f"{f.num_images} <image> placeholders, {len(encoded)} images")
    s = self.image_size
    images = [preprocess(load_image(data, max_pixels=self.max_pixels), s) for data in encoded]
    return {"input_ids": f.input_ids, "labels": f.labels, "visual_index": f.visual_index,
            "visual_target_mask": f.visual_target_mask,
            "images": np.stack(images) if images else np.zeros((0, s, s, 3), np.float32)}  # [n, H, W, 3]


def make_dataset(sources: Any, *, tokenizer, layout: TokenLayout, image_size: int, seq_len: int,
                 images_per_row: int, batch_size: int, seed: int = 0, num_epochs: int | None = None,
                 shuffle: bool = True, shard_index: int | None = None, shard_count: int | None = None,
                 strict: bool = False, read_threads: int = 4, prefetch_buffer_size: int = 64,
                 open_rows: int = 4, max_pixels: int | None = MAX_PIXELS) -> grain.IterDataset:
  """The training pipeline (module docstring); iterate it for dicts of [B, ...] arrays.

  ``sources``: one source or a sequence of (source, weight) pairs; shards
  default to ``jax.process_index()`` / ``jax.process_count()``. Images are decoded
  under ``max_pixels`` (pass the dataset's build-time limit; above PIL's own limit,
  iterate inside ``images.pil_limit_follows``).
  """
  decode = Decode(tokenizer, layout, image_size, seq_len, images_per_row, strict, max_pixels)
  ds = examples(sources, seed=seed, num_epochs=num_epochs, shuffle=shuffle, shard_index=shard_index,
                shard_count=shard_count).map(decode)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                            prefetch_buffer_size=prefetch_buffer_size))
  ds = PackIterDataset(ds, seq_len=seq_len, images_per_row=images_per_row, image_size=image_size,
                       num_visual_tokens=layout.num_visual_tokens, pad_id=layout.slot_id,
                       open_rows=open_rows)
  return ds.batch(batch_size, drop_remainder=True)

