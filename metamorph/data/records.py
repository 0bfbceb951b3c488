"""Conversation records in the MetaMorph / LLaVA format: parsing, validation, drop counts.

A record is one JSON object::

  {"id": "...", "image": "a.jpg" | ["a.jpg", ...],
   "conversations": [{"from": "human", "value": "<image> What is this?"},
                     {"from": "gpt", "value": "A cat."}]}

Images are consumed in the order of their ``<image>`` placeholders across all
turns; an ``<image>`` in a ``gpt`` turn is an image to generate. A bad record
raises ``RecordError`` with one of ``REASONS``; readers skip it and count it in
a ``DropCounts`` (or stop at the first one in strict mode).
"""
from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

from metamorph.tokens import IMAGE_PLACEHOLDER

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}

REASONS = {
    "malformed_json": "the line is not a JSON object",
    "malformed_record": "a field has the wrong type ('conversations' must be a list of "
                        "{'from': str, 'value': str}, 'image' a string or a list of strings)",
    "empty_conversation": "no turns, or a turn with an empty value",
    "unknown_role": f"a 'from' outside {sorted(ROLES)}",
    "non_alternating": "turns must alternate human/gpt, start with human (after an optional "
                       "system turn) and end with gpt",
    "placeholder_mismatch": "the number of <image> placeholders differs from the number of images",
    "missing_image": "an image file does not exist",
    "corrupt_image": "an image file cannot be decoded",
    "too_long": "the formatted record is longer than the sequence length",
    "too_many_images": "the record has more images than a packed row holds",
}


class RecordError(ValueError):
  """A record that cannot be used; ``reason`` is a key of ``REASONS``."""

  def __init__(self, reason: str, detail: str, where: str = ""):
    assert reason in REASONS, reason
    self.reason, self.detail, self.where = reason, detail, where
    super().__init__(f"{where + ': ' if where else ''}{reason}: {detail}")

  def at(self, where: str) -> RecordError:
    """The same error, located (e.g. 'data/train.jsonl:17')."""
    return RecordError(self.reason, self.detail, where)


@dataclasses.dataclass
class DropCounts:
  """Records dropped, by reason; printed at the end of a build and stored with the data."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  kept: int = 0

  def add(self, reason: str) -> None:
    self.counts[reason] += 1

  @property
  def dropped(self) -> int:
    return sum(self.counts.values())

  def to_dict(self) -> dict[str, Any]:
    return {"kept": self.kept, "dropped": self.dropped, "by_reason": dict(sorted(self.counts.items()))}

  def summary(self) -> str:
    if not self.dropped:
      return f"kept {self.kept} records, dropped none"
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items()))
    return f"kept {self.kept} records, dropped {self.dropped} ({parts})"


@dataclasses.dataclass(frozen=True)
class Record:
  """A validated record: (role, text) turns with roles in {system, user, assistant}."""
  id: str
  turns: tuple[tuple[str, str], ...]
  images: tuple[str, ...]
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict[str, Any]:
    back = {"user": "human", "assistant": "gpt", "system": "system"}
    return {"id": self.id, "image": list(self.images),
            "conversations": [{"from": back[r], "value": v} for r, v in self.turns], **self.extra}


def _images(obj: Mapping) -> tuple[str, ...]:
  images = obj.get("image", obj.get("images", []))
  if images is None:
    return ()
  if isinstance(images, str):
    return (images,)
  if isinstance(images, list) and all(isinstance(x, str) for x in images):
    return tuple(images)
  raise RecordError("malformed_record", f"'image' is {type(images).__name__}, not a string or list of strings")


def _turns(obj: Mapping) -> tuple[tuple[str, str], ...]:
  conversations = obj.get("conversations")
  if not isinstance(conversations, list):
    raise RecordError("malformed_record", "'conversations' is missing or not a list")
  if not conversations:
    raise RecordError("empty_conversation", "'conversations' is empty")
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, dict) or not isinstance(turn.get("from"), str) or not isinstance(turn.get("value"), str):
      raise RecordError("malformed_record", f"turn {i} is not {{'from': str, 'value': str}}")
    if turn["from"] not in ROLES:
      raise RecordError("unknown_role", f"turn {i} is from {turn['from']!r}")
    if not turn["value"].strip():
      raise RecordError("empty_conversation", f"turn {i} is empty")
    turns.append((ROLES[turn["from"]], turn["value"]))
  return tuple(turns)


def _check_alternation(turns: tuple[tuple[str, str], ...]) -> None:
  roles = [r for r, _ in turns]
  body = roles[1:] if roles[0] == "system" else roles
  expected = ["user", "assistant"] * (len(body) // 2 + 1)
  if not body or body != expected[:len(body)] or body[-1] != "assistant":
    raise RecordError("non_alternating", f"roles are {roles}")


def parse_record(obj: Any) -> Record:
  """Validates a decoded JSON record (images are not opened here)."""
  if not isinstance(obj, dict):
    raise RecordError("malformed_json", f"expected a JSON object, got {type(obj).__name__}")
  turns = _turns(obj)
  _check_alternation(turns)
  images = _images(obj)
  placeholders = sum(text.count(IMAGE_PLACEHOLDER) for _, text in turns)
  if placeholders != len(images):
    raise RecordError("placeholder_mismatch", f"{placeholders} <image> placeholders, {len(images)} images")
  extra = {k: v for k, v in obj.items() if k not in ("id", "image", "images", "conversations")}
  return Record(str(obj.get("id", "")), turns, images, extra)


def parse_line(line: str) -> Record:
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise RecordError("malformed_json", str(e)) from e
  return parse_record(obj)


def read_records(path: str, *, strict: bool = False,
                 counts: DropCounts | None = None) -> Iterator[tuple[str, Record]]:
  """Yields (``path:line``, record) from a JSONL file or a JSON list.

  Bad records are skipped and counted in ``counts``; with ``strict`` the first
  one raises ``RecordError`` naming ``path:line`` and the reason.
  """
  counts = counts if counts is not None else DropCounts()
  for where, parse in _entries(path):
    try:
      record = parse()
    except RecordError as e:
      if strict:
        raise e.at(where) from e
      counts.add(e.reason)
      continue
    yield where, record


def _entries(path: str):
  """(location, thunk that parses the entry) for each entry of a .jsonl or .json file."""
  with open(path, encoding="utf-8") as f:
    if path.endswith(".json"):
      try:
        data = json.load(f)
      except json.JSONDecodeError as e:
        raise RecordError("malformed_json", f"the file is not valid JSON ({e})", path) from e
      if not isinstance(data, list):
        raise RecordError("malformed_json", "a .json file must hold a list of records", path)
      for i, obj in enumerate(data):
        yield f"{path}[{i}]", (lambda obj=obj: parse_record(obj))
      return
    for number, line in enumerate(f, start=1):
      if line.strip():
        yield f"{path}:{number}", (lambda line=line: parse_line(line))
