"""Training data from the config: grain pipelines over TFDS datasets.

Each process reads its own shard and builds ``batch_size / process_count`` rows;
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


def local_batch_size(config: ml_collections.ConfigDict) -> int:
  b, n = config.train.batch_size, jax.process_count()
  if b % n or (b // n) % config.train.micro_batches:
    raise ValueError(f"config.train.batch_size ({b}) must be divisible by the {n} processes and each "
                     f"process's share by config.train.micro_batches ({config.train.micro_batches})")
  return b // n


def vpit_dataset(config: ml_collections.ConfigDict, tokenizer, layout: TokenLayout, split: str,
                 *, seed: int, num_epochs: int | None = None) -> grain.IterDataset:
  return make_dataset(sources(config, split), tokenizer=tokenizer, layout=layout,
                      image_size=config.data.image_size, seq_len=config.data.seq_len,
                      images_per_row=config.data.images_per_row, batch_size=local_batch_size(config),
                      seed=seed, num_epochs=num_epochs, strict=config.data.strict,
                      read_threads=config.data.num_threads)


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


def siglip_dataset(config: ml_collections.ConfigDict, tokenizer, split: str, *, seed: int,
                   num_epochs: int | None = None) -> grain.IterDataset:
  pairs = examples(sources(config, split), seed=seed, num_epochs=num_epochs).map(
      _CaptionPair(tokenizer, config.data.image_size, config.data.text_len))
  ds = pairs.to_iter_dataset(grain.ReadOptions(num_threads=config.data.num_threads)).filter(
      lambda x: x is not None)
  # Most records are not caption pairs; skipping them is intended.
  ds = grain.experimental.WithOptionsIterDataset(
      ds, grain.experimental.DatasetOptions(filter_warn_threshold_ratio=None))
  return ds.batch(local_batch_size(config), drop_remainder=True)


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Process-local rows -> global arrays sharded over the batch axis (host-only fields dropped)."""
  spec = logical_to_spec(("batch",))
  def one(x):
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(spec[0], *(None,) * (x.ndim - 1)))
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: one(v) for k, v in local.items() if k not in HOST_ONLY}
