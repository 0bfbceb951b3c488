"""The trainer's input pipelines: grain pipelines over TFDS datasets of conversation records.

Three pipelines, chosen by the stage (``train.stages``): ``vpit_batches`` (packed conversations),
``caption_pairs`` (image-caption pairs for SigLIP) and ``image_batches`` (every image, for the
visualizer). They read ``DataSettings``, the config's ``data`` fields and the global batch size.

The records are split into ``data.virtual_shards`` shards (default: one per
process), each packed into ``batch_size / virtual_shards`` rows per batch by
its own pipeline; a process runs the pipelines of its shards and concatenates
their rows. The global batch is thus the same for any number of processes that
divides ``virtual_shards``. The data-iterator state is saved per process, so a run
resumes with the process count it was saved with (``set_state`` says so otherwise).
``global_batch`` assembles the global, sharded arrays.
"""
from __future__ import annotations

import dataclasses
import json

import grain
import jax
import numpy as np

from metamorph.data import tfds_builder
from metamorph.data.conversation import TokenLayout
from metamorph.data.images import load_image, preprocess
from metamorph.data.pipeline import examples, make_dataset
from metamorph.sharding import logical_to_spec
from metamorph.tokens import IMAGE_PLACEHOLDER

HOST_ONLY = ("dropped",)  # batch fields that stay on the host (drop counts)


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """The ``data`` fields of a training config (see ``train/defaults.py``) and the global
  batch size (``train.batch_size``)."""
  data_dir: str
  name: str
  weights: str
  train_split: str
  eval_split: str
  tokenizer: str
  image_size: int
  seq_len: int
  images_per_row: int
  open_rows: int
  text_len: int
  num_threads: int
  virtual_shards: int
  strict: bool
  batch_size: int


def sources(d: DataSettings, split: str):
  """One source, or (source, weight) pairs when ``data.name`` lists several datasets."""
  names = [n.strip() for n in d.name.split(",") if n.strip()]
  if not names or not d.data_dir:
    raise ValueError("config.data.name and config.data.data_dir must name a TFDS dataset")
  opened = [tfds_builder.open_source(d.data_dir, name, split) for name in names]
  if len(opened) == 1:
    return opened[0]
  weights = [float(w) for w in d.weights.split(",")] if d.weights else [1.0] * len(opened)
  if len(weights) != len(opened):
    raise ValueError(f"config.data.weights has {len(weights)} entries for {len(opened)} datasets")
  return list(zip(opened, weights))


def pixel_limit(d: DataSettings) -> int | None:
  """The largest image the datasets hold: the loosest of their build-time limits (None: no
  limit). Stored images were checked at build time; readers decode them under this
  limit, inside ``images.pil_limit_follows`` (the trainer enters it for the run)."""
  limits = [tfds_builder.read_max_pixels(d.data_dir, n.strip()) for n in d.name.split(",") if n.strip()]
  return None if None in limits else max(limits)


def virtual_shards(d: DataSettings) -> tuple[range, int, int]:
  """(this process's virtual shards, their count, rows per shard and batch)."""
  b, n = d.batch_size, jax.process_count()
  k = d.virtual_shards or n
  if k % n or b % k:
    raise ValueError(f"config.data.virtual_shards ({k}) must be a multiple of the {n} processes "
                     f"and divide config.train.batch_size ({b})")
  per_process = k // n
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process), k, b // k


class ShardedBatches:
  """Concatenates the batches of several pipelines (this process's virtual shards).

  Checkpointable by grain's orbax handler: ``get_state`` returns JSON bytes.
  """

  def __init__(self, datasets: list[grain.IterDataset]):
    self.iterators = [iter(ds) for ds in datasets]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self.iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> bytes:
    return json.dumps([it.get_state() for it in self.iterators]).encode()

  def set_state(self, state: bytes) -> None:
    states = json.loads(state)
    if len(states) != len(self.iterators):
      raise ValueError(f"the saved data state has {len(states)} shards, this run {len(self.iterators)}: "
                       "config.data.virtual_shards or the number of processes changed")
    for it, s in zip(self.iterators, states):
      it.set_state(s)

  def start_prefetch(self) -> None:
    """Called by grain's checkpoint handler after a restore; nothing to start."""


def vpit_batches(d: DataSettings, tokenizer, layout: TokenLayout, split: str,
                 *, seed: int, num_epochs: int | None = None) -> ShardedBatches:
  """Conversations, formatted and packed into rows (``metamorph.data.pipeline``)."""
  shards, k, rows = virtual_shards(d)
  return ShardedBatches([
      make_dataset(sources(d, split), tokenizer=tokenizer, layout=layout, image_size=d.image_size,
                   seq_len=d.seq_len, images_per_row=d.images_per_row, batch_size=rows, seed=seed,
                   num_epochs=num_epochs, shard_index=v, shard_count=k, strict=d.strict,
                   read_threads=d.num_threads, open_rows=d.open_rows, max_pixels=pixel_limit(d))
      for v in shards])


def caption_of(images: list, turns: list[tuple[str, str]]) -> str | None:
  """The caption of an image-caption pair, else None.

  A record is an image-caption pair when it has exactly one image, placed in its first
  user turn, and its first answer is text only (no ``<image>``); that answer is the caption.
  ``turns`` are (role, text) pairs with roles user / assistant / system.
  """
  users = [text for role, text in turns if role == "user"]
  answers = [text for role, text in turns if role == "assistant"]
  if len(images) != 1 or not users or not answers or IMAGE_PLACEHOLDER not in users[0]:
    return None
  return None if IMAGE_PLACEHOLDER in answers[0] else answers[0]


class _CaptionPair:
  """Stored example -> {"images" [H, W, 3], "text_ids" [L]} for an image-caption pair
  (``caption_of``), else None."""

  def __init__(self, tokenizer, image_size: int, text_len: int, max_pixels: int | None):
    self.tokenizer, self.image_size, self.text_len = tokenizer, image_size, text_len
    self.max_pixels = max_pixels

  def __call__(self, example):
    caption = caption_of(example["images"], json.loads(_text(example["conversations"])))
    if caption is None:
      return None
    ids = self.tokenizer.encode(caption, add_special_tokens=False)[: self.text_len]
    ids = ids + [self.tokenizer.pad_token_id] * (self.text_len - len(ids))
    image = preprocess(load_image(example["images"][0], max_pixels=self.max_pixels), self.image_size)
    return {"images": image, "text_ids": np.asarray(ids, np.int32)}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def caption_pairs(d: DataSettings, tokenizer, split: str, *, seed: int,
                  num_epochs: int | None = None) -> ShardedBatches:
  """The split's image-caption pairs (``caption_of``): ``images`` [B, H, W, 3], ``text_ids`` [B, L]."""
  shards, k, rows = virtual_shards(d)
  def one(v: int) -> grain.IterDataset:
    pairs = examples(sources(d, split), seed=seed, num_epochs=num_epochs, shard_index=v,
                     shard_count=k).map(_CaptionPair(tokenizer, d.image_size, d.text_len, pixel_limit(d)))
    ds = pairs.to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads)).filter(
        lambda x: x is not None)
    # A mixed split holds other records too; skipping them is intended.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None))
    return ds.batch(rows, drop_remainder=True)
  return ShardedBatches([one(v) for v in shards])


class _Images:
  """Stored example -> its images, preprocessed: float32 [n, H, W, 3] in [-1, 1]."""

  def __init__(self, image_size: int, max_pixels: int | None):
    self.image_size, self.max_pixels = image_size, max_pixels

  def __call__(self, example) -> list[np.ndarray]:
    return [preprocess(load_image(data, max_pixels=self.max_pixels), self.image_size)
            for data in example["images"]]


class _EachImage(grain.experimental.FlatMapTransform):
  max_fan_out = 64

  def flat_map(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"images": image} for image in images]


def image_batches(d: DataSettings, split: str, *, seed: int, num_epochs: int | None = None) -> ShardedBatches:
  """Every image of the records (prompts and responses), in batches of ``images`` [B, H, W, 3]."""
  shards, k, rows = virtual_shards(d)
  def one(v: int) -> grain.IterDataset:
    images = examples(sources(d, split), seed=seed, num_epochs=num_epochs, shard_index=v,
                      shard_count=k).map(_Images(d.image_size, pixel_limit(d)))
    ds = images.to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads))
    return grain.experimental.FlatMapIterDataset(ds, _EachImage()).batch(rows, drop_remainder=True)
  return ShardedBatches([one(v) for v in shards])


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axis (host-only fields dropped)."""
  spec = logical_to_spec(("batch",))
  def one(x):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0], *(None,) * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: one(v) for k, v in local.items() if k not in HOST_ONLY}
