"""Training data from the config: grain pipelines over TFDS datasets.

The records are split into ``data.virtual_shards`` shards (default: one per
process), each packed into ``batch_size / virtual_shards`` rows per batch by
its own pipeline; a process runs the pipelines of its shards and concatenates
their rows. The global batch is thus the same for any number of processes that
divides ``virtual_shards``. The data-iterator state is saved per process, so a run
resumes with the process count it was saved with (``set_state`` says so otherwise).
``global_batch`` assembles the global, sharded arrays.
"""
from __future__ import annotations

import json

import grain
import jax
import ml_collections
import numpy as np

from metamorph.data import tfds_builder
from metamorph.data.conversation import TokenLayout
from metamorph.data.images import load_image, preprocess
from metamorph.data.pipeline import examples, make_dataset
from metamorph.sharding import logical_to_spec

HOST_ONLY = ("dropped",)  # batch fields that stay on the host (drop counts)


def sources(config: ml_collections.ConfigDict, split: str):
  """One source, or (source, weight) pairs when ``data.name`` lists several datasets."""
  names = [n.strip() for n in config.data.name.split(",") if n.strip()]
  if not names or not config.data.data_dir:
    raise ValueError("config.data.name and config.data.data_dir must name a TFDS dataset")
  opened = [tfds_builder.open_source(config.data.data_dir, name, split) for name in names]
  if len(opened) == 1:
    return opened[0]
  weights = [float(w) for w in config.data.weights.split(",")] if config.data.weights else [1.0] * len(opened)
  if len(weights) != len(opened):
    raise ValueError(f"config.data.weights has {len(weights)} entries for {len(opened)} datasets")
  return list(zip(opened, weights))


def virtual_shards(config: ml_collections.ConfigDict) -> tuple[range, int]:
  """(this process's virtual shards, rows per shard and batch)."""
  b, n = config.train.batch_size, jax.process_count()
  k = config.data.virtual_shards or n
  if k % n or b % k:
    raise ValueError(f"config.data.virtual_shards ({k}) must be a multiple of the {n} processes "
                     f"and divide config.train.batch_size ({b})")
  per_process = k // n
  return range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process), b // k


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


def vpit_batches(config: ml_collections.ConfigDict, tokenizer, layout: TokenLayout, split: str,
                 *, seed: int, num_epochs: int | None = None) -> ShardedBatches:
  shards, rows = virtual_shards(config)
  k = config.data.virtual_shards or jax.process_count()
  return ShardedBatches([
      make_dataset(sources(config, split), tokenizer=tokenizer, layout=layout,
                   image_size=config.data.image_size, seq_len=config.data.seq_len,
                   images_per_row=config.data.images_per_row, batch_size=rows, seed=seed,
                   num_epochs=num_epochs, shard_index=v, shard_count=k, strict=config.data.strict,
                   read_threads=config.data.num_threads, open_rows=config.data.open_rows) for v in shards])


class _CaptionPair:
  """Stored example -> {"images" [H, W, 3], "text_ids" [L]} for single-image caption
  records (``meta.questions[0] == "caption"``), else None (not a caption pair)."""

  def __init__(self, tokenizer, image_size: int, text_len: int):
    self.tokenizer, self.image_size, self.text_len = tokenizer, image_size, text_len

  def __call__(self, example):
    extra = json.loads(_text(example.get("extra", "{}")) or "{}")
    questions = extra.get("meta", {}).get("questions", [])
    if len(example["images"]) != 1 or not questions or questions[0] != "caption":
      return None
    turns = json.loads(_text(example["conversations"]))
    caption = next(text for role, text in turns if role == "assistant")
    ids = self.tokenizer.encode(caption, add_special_tokens=False)[: self.text_len]
    ids = ids + [self.tokenizer.pad_token_id] * (self.text_len - len(ids))
    image = preprocess(load_image(example["images"][0]), self.image_size)
    return {"images": image, "text_ids": np.asarray(ids, np.int32)}


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def siglip_batches(config: ml_collections.ConfigDict, tokenizer, split: str, *, seed: int,
                   num_epochs: int | None = None) -> ShardedBatches:
  shards, rows = virtual_shards(config)
  k = config.data.virtual_shards or jax.process_count()
  def one(v: int) -> grain.IterDataset:
    pairs = examples(sources(config, split), seed=seed, num_epochs=num_epochs, shard_index=v,
                     shard_count=k).map(_CaptionPair(tokenizer, config.data.image_size, config.data.text_len))
    ds = pairs.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads)).filter(
        lambda x: x is not None)
    # Most records are not caption pairs; skipping them is intended.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None))
    return ds.batch(rows, drop_remainder=True)
  return ShardedBatches([one(v) for v in shards])


class _Images:
  """Stored example -> its images, preprocessed: float32 [n, H, W, 3] in [-1, 1]."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def __call__(self, example) -> list[np.ndarray]:
    return [preprocess(load_image(data), self.image_size) for data in example["images"]]


class _EachImage(grain.experimental.FlatMapTransform):
  max_fan_out = 64

  def flat_map(self, images: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    return [{"images": image} for image in images]


def image_batches(config: ml_collections.ConfigDict, split: str, *, seed: int,
                  num_epochs: int | None = None) -> ShardedBatches:
  """Every image of the records (prompts and responses), in batches of ``images`` [B, H, W, 3]."""
  shards, rows = virtual_shards(config)
  k = config.data.virtual_shards or jax.process_count()
  def one(v: int) -> grain.IterDataset:
    images = examples(sources(config, split), seed=seed, num_epochs=num_epochs, shard_index=v,
                      shard_count=k).map(_Images(config.data.image_size))
    ds = images.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads))
    return grain.experimental.FlatMapIterDataset(ds, _EachImage()).batch(rows, drop_remainder=True)
  return ShardedBatches([one(v) for v in shards])


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axis (host-only fields dropped)."""
  spec = logical_to_spec(("batch",))
  def one(x):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0], *(None,) * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: one(v) for k, v in local.items() if k not in HOST_ONLY}
