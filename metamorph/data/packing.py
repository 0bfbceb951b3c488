"""First-fit packing of formatted records into fixed-size rows, with drop counts.

Hand-written rather than grain's ``FirstFitPackIterDataset`` /
``BestFitPackIterDataset`` (grain 0.2.18): those pack every feature as a
sequence with its own length, so they cannot (a) offset ``visual_index`` by the
visual tokens of the images already in the row (a value change, not a
concatenation), (b) count records that can never fit (they raise
``ValueError``), nor carry drops reported by upstream markers; they also shuffle
the rows they emit, where this packer emits them oldest first.

Input elements are either a formatted record::

  {"input_ids", "labels", "visual_index", "visual_target_mask": [L],
   "images": float32 [n, H, W, 3]}

or a drop marker ``{"drop": reason}`` (``drop_marker``) for a record that could
not be used upstream; the count travels with the data, so summing ``dropped``
over every batch counts each drop exactly once, with any number of workers.

Up to ``open_rows`` rows are filled at once: a record goes to the oldest open
row with room for its tokens and images; when none has room and ``open_rows``
are open, the oldest is emitted and the record opens a new one. A drop counts
in the oldest open row. ``open_rows=1`` is greedy packing in order.

Iterator state: ``{"parent": <parent state>, "rows": [int, ...]}``. ``parent`` is
the parent's state before the first element still held in an open row;
``rows`` says, for each element read since, which open row holds it (0 =
oldest) or -1 (already emitted). A restore re-reads those elements into the
same rows, so it resumes exactly.
"""
from __future__ import annotations

from typing import Any

import grain
import numpy as np

from metamorph.data.records import REASONS
from metamorph.tokens import IGNORE

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


def _put(row: _Row, element: dict[str, Any], reason: str | None) -> None:
  """Adds a usable record to ``row``, or counts its drop ``reason`` there."""
  if reason:
    row.drop(reason)
  else:
    row.add(element)


class _PackIterator(grain.DatasetIterator):
  """First fit over the open rows (module docstring)."""

  def __init__(self, parent: grain.DatasetIterator, packer: PackIterDataset):
    super().__init__(parent)
    self._packer = packer
    self._rows: list[_Row] = []   # open rows, oldest first
    self._first = 0               # serial number of self._rows[0]
    # per element read since the oldest open row's first: (parent state before it, row serial)
    self._log: list[tuple[Any, int]] = []
    self._exhausted = False

  def _unusable(self, element: dict[str, Any]) -> str | None:
    """The drop reason of a drop marker or of a record no row can hold; None for the rest."""
    if "drop" in element:
      return element["drop"]
    p, record = self._packer, element
    if len(record["input_ids"]) > p.seq_len:
      return "too_long"
    if len(record["images"]) > p.images_per_row:
      return "too_many_images"
    return None

  def _place(self, element: dict[str, Any]) -> tuple[int, _Row | None]:
    """Puts ``element`` in a row -> (that row's serial, the row to emit or None)."""
    reason = self._unusable(element)
    if reason and self._rows:
      self._rows[0].drop(reason)
      return self._first, None
    if not reason:
      for i, row in enumerate(self._rows):
        if row.fits(element):
          row.add(element)
          return self._first + i, None
    emitted = None
    if len(self._rows) == self._packer.open_rows:
      emitted = self._rows.pop(0)
      self._first += 1
    self._rows.append(self._packer.new_row())
    _put(self._rows[-1], element, reason)
    return self._first + len(self._rows) - 1, emitted

  def _forget_emitted(self) -> None:
    """Drops the log's leading entries of emitted rows."""
    while self._log and self._log[0][1] < self._first:
      self._log.pop(0)

  def __next__(self) -> dict[str, np.ndarray]:
    while not self._exhausted:
      state = self._parent.get_state()
      try:
        element = next(self._parent)
      except StopIteration:
        self._exhausted = True
        break
      serial, emitted = self._place(element)
      self._log.append((state, serial))
      if emitted is not None:
        self._forget_emitted()
        return emitted.arrays
    if not self._rows:
      raise StopIteration
    self._first += 1
    self._forget_emitted()
    return self._rows.pop(0).arrays

  def get_state(self) -> dict[str, Any]:
    if not self._log:
      return {"parent": self._parent.get_state(), "rows": []}
    return {"parent": self._log[0][0], "rows": [max(serial - self._first, -1) for _, serial in self._log]}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._rows, self._first, self._log, self._exhausted = [], 0, [], False
    for index in state.get("rows", []):  # states saved before open rows had no "rows"
      before = self._parent.get_state()
      element = next(self._parent)
      self._log.append((before, max(index, -1)))
      if index < 0:
        continue
      while len(self._rows) <= index:
        self._rows.append(self._packer.new_row())
      _put(self._rows[index], element, self._unusable(element))
    self._forget_emitted()


class PackIterDataset(grain.IterDataset):
  """Packs formatted records (or drop markers) into rows, filling up to ``open_rows``
  at once; see the module docstring.

  Each row: input_ids, labels, visual_index, segment_ids (1, 2, ... per record,
  0 = padding), positions (from 0 per record): int32 [T]; visual_target_mask
  bool [T]; images float32 [I, H, W, 3] (zeros in unused slots); image_mask
  bool [I]; dropped int32 [len(PIPELINE_REASONS)] = drops while filling it.
  ``visual_index`` points into the row's flattened image tokens [I * m].
  A final row holding only drops is emitted so that no drop goes uncounted.
  """

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, images_per_row: int,
               image_size: int, num_visual_tokens: int, pad_id: int = 0, open_rows: int = 4):
    super().__init__(parent)
    if open_rows < 1:
      raise ValueError(f"open_rows must be >= 1, got {open_rows}")
    self.open_rows = open_rows
    self.seq_len, self.images_per_row = seq_len, images_per_row
    self.image_size, self.num_visual_tokens, self.pad_id = image_size, num_visual_tokens, pad_id

  def new_row(self) -> _Row:
    return _Row(self.seq_len, self.images_per_row, self.image_size, self.num_visual_tokens, self.pad_id)

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self)

  def __str__(self) -> str:
    return (f"PackIterDataset(seq_len={self.seq_len}, images_per_row={self.images_per_row}, "
            f"open_rows={self.open_rows})")
