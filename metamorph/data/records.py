"""Conversation records in the MetaMorph / LLaVA format: parsing, validation, drop counts.

A record is one JSON object::

  {"id": "...", "image": "a.jpg" | ["a.jpg", ...],
   "conversations": [{"from": "human", "value": "<image> What is this?"},
                     {"from": "gpt", "value": "A cat."}]}

Images are consumed in the order of their ``<image>`` placeholders across all
turns; an ``<image>`` in a ``gpt`` turn is an image to generate. A bad record
raises ``RecordError`` with one of ``REASONS``; readers skip it and count it in
a ``DropCounts`` (or stop at the first one in strict mode).

Reading never raises on a line's content: every line of a ``.jsonl`` file (every
element of a ``.json`` list) is either yielded or counted under one reason, so
``kept + dropped`` equals the lines read. Lines are read as bytes and decoded one
by one (a byte that is not UTF-8 costs only its line: ``not_utf8``); a leading
UTF-8 byte-order mark is ignored; a line longer than ``max_line_bytes`` is skipped
without being held in memory (``line_too_long``).
"""
from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from metamorph.tokens import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START

MAX_LINE_BYTES = 1 << 24  # 16 MiB: a line longer than this is dropped unread (line_too_long)
_BOM = b"\xef\xbb\xbf"

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
         "system": "system"}

REASONS = {
    "not_utf8": "the line is not valid UTF-8 (or escapes a lone surrogate, which UTF-8 cannot encode)",
    "empty_line": "the line is empty or only whitespace",
    "line_too_long": "the line is longer than the reader's max_line_bytes",
    "malformed_json": "the line is not a JSON object",
    "malformed_record": "a field has the wrong type ('conversations' must be a list of "
                        "{'from': str, 'value': str}, 'image' a string or a list of strings)",
    "reserved_token": f"a turn contains {IMAGE_START} or {IMAGE_END}, which only the pipeline writes "
                      f"(mark an image with {IMAGE_PLACEHOLDER})",
    "empty_conversation": "no turns, or a turn with an empty value",
    "unknown_role": f"a 'from' outside {sorted(ROLES)}",
    "non_alternating": "turns must alternate human/gpt, start with human (after an optional "
                       "system turn) and end with gpt",
    "placeholder_mismatch": "the number of <image> placeholders differs from the number of images",
    "image_outside_root": "an image path leads outside the image folder (.., an absolute path, a symlink)",
    "missing_image": "an image file does not exist",
    "unreadable_image": "an image file exists but cannot be read (permissions, an I/O error)",
    "image_too_large": "an image has more pixels than the reader's max_pixels",
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
  images = [] if images is None else [images] if isinstance(images, str) else images
  if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
    raise RecordError("malformed_record", f"'image' is {type(images).__name__}, not a string or list of strings")
  for i, path in enumerate(images):
    if not path or "\x00" in path:
      raise RecordError("malformed_record", f"image {i} is {path!r}, not a file path")
  return tuple(images)


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
    for token in (IMAGE_START, IMAGE_END):
      if token in turn["value"]:
        raise RecordError("reserved_token", f"turn {i} contains {token}")
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
  _check_encodable(obj)
  extra = {k: v for k, v in obj.items() if k not in ("id", "image", "images", "conversations")}
  return Record(str(obj.get("id", "")), turns, images, extra)


def _check_encodable(obj: dict) -> None:
  """The record can be stored: it serialises to JSON and every string is UTF-8
  encodable (a JSON escape of a lone surrogate, e.g. ``"\\ud800"``, is not)."""
  try:
    json.dumps(obj, ensure_ascii=False).encode("utf-8")
  except UnicodeEncodeError as e:
    raise RecordError("not_utf8", f"a string holds {e.object[e.start:e.end]!r}, a lone surrogate that is not "
                                  "a character (an invalid \\uXXXX escape, or a .json file's non-UTF-8 byte)") from e
  except (TypeError, ValueError, RecursionError) as e:
    raise RecordError("malformed_record", f"the record cannot be stored as JSON ({type(e).__name__}: {e})") from e


def parse_line(line: str | bytes) -> Record:
  """Parses one JSONL line (bytes are decoded as UTF-8 first)."""
  if isinstance(line, (bytes, bytearray)):
    line = _decode(bytes(line))
  if not line.strip():
    raise RecordError("empty_line", "nothing but whitespace")
  try:
    obj = json.loads(line)
  except ValueError as e:  # JSONDecodeError, and integers longer than Python's int_max_str_digits
    raise RecordError("malformed_json", str(e)) from e
  except RecursionError as e:
    raise RecordError("malformed_json", "nested too deeply to parse") from e
  return parse_record(obj)


def _decode(line: bytes) -> str:
  try:
    return line.decode("utf-8")
  except UnicodeDecodeError as e:
    raise RecordError("not_utf8", f"byte 0x{line[e.start]:02x} at column {e.start + 1} is not UTF-8; "
                                  "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)") from e


def read_records(path: str, *, strict: bool = False, counts: DropCounts | None = None,
                 max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[str, Record]]:
  """Yields (``path:line`` or ``path[i]``, record) from a JSONL file or a JSON list.

  Every line (list element) is either yielded or counted in ``counts`` under one
  of ``REASONS`` (the module docstring); with ``strict`` the first bad one raises
  ``RecordError`` naming ``path:line`` and the reason instead. A ``.json`` file
  that is not a JSON list raises ``RecordError`` naming the file; a file that
  cannot be opened raises ``OSError``.
  """
  counts = counts if counts is not None else DropCounts()
  for where, parse in _entries(path, max_line_bytes):
    try:
      record = parse()
    except RecordError as e:
      if strict:
        raise e.at(where) from e
      counts.add(e.reason)
      continue
    yield where, record


def count_lines(path: str) -> int | None:
  """The lines of a .jsonl file as ``read_records`` numbers them (a progress bar's
  total); None for a .json list."""
  if path.endswith(".json"):
    return None
  lines, last = 0, b"\n"
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      lines, last = lines + chunk.count(b"\n"), chunk
  return lines + (not last.endswith(b"\n"))


def _entries(path: str, max_line_bytes: int):
  """(location, thunk that parses the entry) for each entry of a .jsonl or .json file."""
  if path.endswith(".json"):
    yield from _json_entries(path)
    return
  with open(path, "rb") as f:
    for number, line in enumerate(_lines(f, max_line_bytes), start=1):
      if number == 1 and line is not None and line.startswith(_BOM):
        line = line[len(_BOM):]
      yield f"{path}:{number}", (lambda line=line: _too_long(max_line_bytes) if line is None else parse_line(line))


def _too_long(max_line_bytes: int) -> NoReturn:
  raise RecordError("line_too_long", f"longer than {max_line_bytes} bytes (max_line_bytes); split the record "
                                     "or raise the limit")


def _lines(f, max_line_bytes: int) -> Iterator[bytes | None]:
  """Each line of a binary file (None for one longer than ``max_line_bytes``, whose
  bytes are skipped in chunks, never held at once)."""
  while line := f.readline(max_line_bytes + 1):
    if len(line) > max_line_bytes and not line.endswith(b"\n"):
      while line and not line.endswith(b"\n"):
        line = f.readline(1 << 20)
      yield None
    else:
      yield line


def _json_entries(path: str):
  """The elements of a .json list. A byte that is not UTF-8 is kept as a lone
  surrogate (``surrogateescape``) so that only the elements holding one are dropped
  (``not_utf8``, by ``parse_record``)."""
  with open(path, "rb") as f:
    text = f.read().removeprefix(_BOM).decode("utf-8", "surrogateescape")
  try:
    data = json.loads(text)
  except (ValueError, RecursionError) as e:
    raise RecordError("malformed_json", f"the file is not valid JSON ({e}); fix it, or write one record per "
                                        "line (.jsonl) so that a bad line costs only itself", path) from e
  if not isinstance(data, list):
    raise RecordError("malformed_json", f"a .json file must hold a list of records, not a {type(data).__name__}",
                      path)
  for i, obj in enumerate(data):
    yield f"{path}[{i}]", (lambda obj=obj: parse_record(obj))
