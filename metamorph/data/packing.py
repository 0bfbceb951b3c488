"""Greedy packing of formatted records into fixed-size rows, with drop counts.

Hand-written rather than grain's ``FirstFitPackIterDataset`` /
``BestFitPackIterDataset`` (grain 0.2.18): those pack every feature as a
sequence with its own length, so they cannot (a) offset ``visual_index`` by the
visual tokens of the images already in the row (a value change, not a
concatenation), (b) count records that can never fit (they raise
``ValueError``), nor carry drops reported by upstream markers; they also keep
several bins open and shuffle them, where this packer keeps one row and
preserves order.

Input elements are either a formatted record::

  {"input_ids", "labels", "visual_index", "visual_target_mask": [L],
   "images": float32 [n, H, W, 3]}

or a drop marker ``{"drop": reason}`` (``drop_marker``) for a record that could
not be used upstream; the count travels with the data, so summing ``dropped``
over every batch counts each drop exactly once, with any number of workers.

Iterator state: ``{"parent": <parent state>}``. The only element buffered
across ``next()`` calls is the record that did not fit the last row; the state
saved is the parent's state from *before* that record, so a restore re-reads it.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from metamorph.data.records import REASONS
from metamorph.models.metamorph import IGNORE

PIPELINE_REASONS: tuple[str, ...] = tuple(REASONS)  # index of each reason in ``dropped``
_TOKEN_KEYS = ("input_ids", "labels", "visual_index", "visual_target_mask")


def drop_marker(reason: str) -> dict[str, str]:
  """The element that stands for a record dropped upstream."""
  assert reason in REASONS, reason
  return {"drop": reason}


class _Row:
  """One row being filled: token arrays [T], images [I, H, W, 3], drops [R]."""

  def __init__(self, seq_len: int, images_per_row: int, image_size: int, m: int, pad_id: int):
    self.seq_len, self.images_per_row, self.m = seq_len, images_per_row, m
    self.arrays = {
        "input_ids": np.full(seq_len, pad_id, np.int32),
        "labels": np.full(seq_len, IGNORE, np.int32),
        "visual_index": np.full(seq_len, -1, np.int32),
        "visual_target_mask": np.zeros(seq_len, bool),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "images": np.zeros((images_per_row, image_size, image_size, 3), np.float32),
        "image_mask": np.zeros(images_per_row, bool),
        "dropped": np.zeros(len(PIPELINE_REASONS), np.int32),
    }
    self.length = self.num_images = self.num_records = 0

  def fits(self, record: dict[str, np.ndarray]) -> bool:
    return (self.length + len(record["input_ids"]) <= self.seq_len
            and self.num_images + len(record["images"]) <= self.images_per_row)

  def add(self, record: dict[str, np.ndarray]) -> None:
    a, n, start, first = self.arrays, len(record["input_ids"]), self.length, self.num_images
    for key in _TOKEN_KEYS:
      a[key][start:start + n] = record[key]
    visual = record["visual_index"]
    a["visual_index"][start:start + n] = np.where(visual >= 0, visual + first * self.m, -1)
    self.num_records += 1
    a["segment_ids"][start:start + n] = self.num_records
    a["positions"][start:start + n] = np.arange(n, dtype=np.int32)
    k = len(record["images"])
    a["images"][first:first + k] = record["images"]
    a["image_mask"][first:first + k] = True
    self.length, self.num_images = start + n, first + k

  def drop(self, reason: str) -> None:
    self.arrays["dropped"][PIPELINE_REASONS.index(reason)] += 1

  @property
  def empty(self) -> bool:
    return self.num_records == 0 and not self.arrays["dropped"].any()


class _PackIterator(grain.DatasetIterator):
  """Greedy, in order: one open row, emitted when the next record does not fit."""

  def __init__(self, parent: grain.DatasetIterator, packer: PackIterDataset):
    super().__init__(parent)
    self._packer = packer
    self._pending: dict[str, np.ndarray] | None = None  # the record that did not fit
    self._pending_state: Any = None                      # parent state before it

  def _unusable(self, record: dict[str, np.ndarray]) -> str | None:
    p = self._packer
    if len(record["input_ids"]) > p.seq_len:
      return "too_long"
    if len(record["images"]) > p.images_per_row:
      return "too_many_images"
    return None

  def __next__(self) -> dict[str, np.ndarray]:
    row = self._packer.new_row()
    if self._pending is not None:
      row.add(self._pending)
      self._pending = self._pending_state = None
    while True:
      state = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        if row.empty:
          raise
        return row.arrays
      reason = element.get("drop") or self._unusable(element)
      if reason:
        row.drop(reason)
      elif row.fits(element):
        row.add(element)
      else:
        self._pending, self._pending_state = element, state
        return row.arrays

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._pending_state if self._pending is not None else self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._pending = self._pending_state = None


class PackIterDataset(grain.IterDataset):
  """Packs formatted records (or drop markers) into rows; see the module docstring.

  Each row: input_ids, labels, visual_index, segment_ids (1, 2, ... per record,
  0 = padding), positions (from 0 per record): int32 [T]; visual_target_mask
  bool [T]; images float32 [I, H, W, 3] (zeros in unused slots); image_mask
  bool [I]; dropped int32 [len(PIPELINE_REASONS)] = drops while filling it.
  ``visual_index`` points into the row's flattened image tokens [I * m].
  A final row holding only drops is emitted so that no drop goes uncounted.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, images_per_row: int,
               image_size: int, num_visual_tokens: int, pad_id: int = 0):
    super().__init__(parent)
    self.seq_len, self.images_per_row = seq_len, images_per_row
    self.image_size, self.num_visual_tokens, self.pad_id = image_size, num_visual_tokens, pad_id

  def new_row(self) -> _Row:
    return _Row(self.seq_len, self.images_per_row, self.image_size, self.num_visual_tokens, self.pad_id)

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return f"PackIterDataset(seq_len={self.seq_len}, images_per_row={self.images_per_row})"
