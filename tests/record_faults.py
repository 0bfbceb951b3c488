"""Faulty records on purpose: hypothesis strategies of mutated JSONL lines, each with the drop
reason it must get when the mutation determines one (their images: tests/image_faults.py), and
the check that the build's reader keeps or drops each line for exactly that one reason. Used by
tests/test_fuzz_records.py (fast) and bench/fuzz_records.py (long)."""
from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any

from hypothesis import strategies as st

from metamorph.data.records import DropCounts, RecordError, count_lines
from metamorph.data.tfds_builder import FEATURES, ImagePolicy, read_examples
from metamorph.tokens import IMAGE_END, IMAGE_PLACEHOLDER, IMAGE_START
from tests.image_faults import IMAGES, KEPT

MAX_LINE_BYTES = 4096  # the fuzzed reader's limit, so that line_too_long is cheap to reach


def _conv(*turns: tuple[str, str]) -> list[dict[str, str]]:
  return [{"from": f, "value": v} for f, v in turns]


BASE = [  # valid records, each a different shape
    {"id": "text", "conversations": _conv(("human", "Hello?"), ("gpt", "Hi."))},
    {"id": "qa", "image": "ok.png", "conversations": _conv(("human", "<image> What is it?"), ("gpt", "Red."))},
    {"id": "t2i", "image": ["ok.png"], "task": "t2i",
     "conversations": _conv(("human", "Draw it."), ("gpt", "Here: <image>"))},
    {"id": "edit", "images": ["ok.png", "sub/ok.jpg"], "meta": {"n": 1, "tags": ["a"]},
     "conversations": _conv(("system", "Be brief."), ("human", "<image> Make it blue."), ("gpt", "<image>"))},
    {"id": 7, "conversations": _conv(("user", "a"), ("assistant", "b"), ("human", "c"), ("gpt", "d"))},
]


def _containers(inner: st.SearchStrategy) -> st.SearchStrategy:
  return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)


_SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_JSON = st.recursive(_SCALARS, _containers, max_leaves=6)
_NOT_LIST = _JSON.filter(lambda v: not isinstance(v, list))
_NOT_STR = _JSON.filter(lambda v: not isinstance(v, str))
_NOT_IMAGES = _JSON.filter(lambda v: v is not None and not isinstance(v, (str, list)))
_NEVER_UTF8 = st.sampled_from([b"\xff", b"\xfe", b"\xc0", b"\xc1", b"\xf5"])  # invalid anywhere in UTF-8
_TEXT = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=40).filter(
    lambda t: t.strip() and IMAGE_PLACEHOLDER not in t and IMAGE_START not in t and IMAGE_END not in t)


def _line(record: Any) -> bytes:
  return json.dumps(record, ensure_ascii=False).encode("utf-8")


def _bytes_reason(line: bytes) -> str | None:
  """not_utf8 / empty_line when the bytes alone decide, else None (the JSON decides)."""
  try:
    text = line.decode("utf-8")
  except UnicodeDecodeError:
    return "not_utf8"
  return "empty_line" if not text.strip() else None


@st.composite
def faulty_lines(draw) -> tuple[bytes, str | None]:
  """(a JSONL line without its newline, the reason it must get: KEPT, a key of
  ``REASONS``, or None where the mutation does not determine it)."""
  record = json.loads(json.dumps(draw(st.sampled_from(BASE))))
  turns = record["conversations"]
  i = draw(st.integers(0, len(turns) - 1))
  image_key = "images" if "images" in record else "image"
  kind = draw(st.sampled_from(
      ["valid", "not_utf8", "surrogate", "empty_line", "too_long", "truncated", "not_object", "conversations_type",
       "turn_type", "field_type", "image_type", "image_element", "missing_conversations", "missing_id", "no_turns",
       "blank_value", "unknown_role", "non_alternating", "placeholder_extra", "image_extra", "reserved",
       "unicode_value", "image_path", "byte_flip", "byte_insert", "nul"]))
  if kind == "valid":
    return _line(record), KEPT
  if kind == "not_utf8":
    line = _line(record)
    at = draw(st.integers(0, len(line)))
    return line[:at] + draw(_NEVER_UTF8) + line[at:], "not_utf8"
  if kind == "surrogate":  # an escape JSON allows and UTF-8 cannot encode
    turns[i]["value"] += "\0"
    return _line(record).replace(b"\\u0000", b"\\u" + draw(st.sampled_from([b"d800", b"dfff", b"DC00"]))), "not_utf8"
  if kind == "empty_line":
    return draw(st.sampled_from([b"", b" ", b"\t", b"\r", b"  \r", b"\x0b\x0c"])), "empty_line"
  if kind == "too_long":
    turns[i]["value"] = "x" * draw(st.integers(MAX_LINE_BYTES, 3 * MAX_LINE_BYTES))
    return _line(record), "line_too_long"
  if kind == "truncated":
    line = _line(record)
    cut = line[:draw(st.integers(1, len(line) - 1))]
    return cut, _bytes_reason(cut) or "malformed_json"
  if kind == "not_object":
    return _line(draw(_JSON.filter(lambda v: not isinstance(v, dict)))), "malformed_json"
  if kind == "conversations_type":
    record["conversations"] = draw(_NOT_LIST)
    return _line(record), "malformed_record"
  if kind == "turn_type":
    turns[i] = draw(_JSON.filter(lambda v: not isinstance(v, dict)))
    return _line(record), "malformed_record"
  if kind == "field_type":
    turns[i][draw(st.sampled_from(["from", "value"]))] = draw(_NOT_STR)
    return _line(record), "malformed_record"
  if kind == "image_type":
    record[image_key] = draw(_NOT_IMAGES)
    return _line(record), "malformed_record"
  if kind == "image_element":
    record[image_key] = [draw(st.sampled_from(["", "a\0b"]) | _NOT_STR)]
    return _line(record), "malformed_record"
  if kind == "missing_conversations":
    del record["conversations"]
    return _line(record), "malformed_record"
  if kind == "missing_id":
    record.pop("id")
    return _line(record), KEPT
  if kind == "no_turns":
    record["conversations"] = []
    return _line(record), "empty_conversation"
  if kind == "blank_value":
    turns[i]["value"] = draw(st.sampled_from(["", " ", "\n\t"]))
    return _line(record), "empty_conversation"
  if kind == "unknown_role":
    turns[i]["from"] = draw(st.text(max_size=8).filter(lambda r: r not in ("human", "user", "gpt", "assistant",
                                                                            "system")))
    return _line(record), "unknown_role"
  if kind == "non_alternating":
    turns.insert(i, dict(turns[i]))
    return _line(record), "non_alternating"
  if kind == "placeholder_extra":
    turns[i]["value"] += " " + IMAGE_PLACEHOLDER * draw(st.integers(1, 3))
    return _line(record), "placeholder_mismatch"
  if kind == "image_extra":
    images = record.get(image_key) or []
    record[image_key] = ([images] if isinstance(images, str) else images) + ["ok.png"] * draw(st.integers(1, 2))
    return _line(record), "placeholder_mismatch"
  if kind == "reserved":
    turns[i]["value"] += draw(st.sampled_from([IMAGE_START, IMAGE_END]))
    return _line(record), "reserved_token"
  if kind == "unicode_value":
    turns[i]["value"] = draw(_TEXT) + turns[i]["value"].count(IMAGE_PLACEHOLDER) * IMAGE_PLACEHOLDER
    return _line(record), KEPT
  if kind == "image_path":
    path = draw(st.sampled_from(sorted(IMAGES)))
    record["conversations"] = _conv(("human", IMAGE_PLACEHOLDER + " Which?"), ("gpt", "That one."))
    record.pop("images", None)
    record["image"] = [path]
    return _line(record), IMAGES[path]
  if kind == "nul":  # a raw NUL byte: valid UTF-8, but valid JSON neither between tokens nor inside a string
    line = _line(record)
    at = draw(st.integers(0, len(line)))
    return line[:at] + b"\0" + line[at:], "malformed_json"
  line = bytearray(_line(record))  # byte_flip / byte_insert: anything may happen
  at = draw(st.integers(0, len(line) - 1))
  byte = draw(st.integers(0, 255))
  if kind == "byte_flip":
    line[at] = byte
  else:
    line.insert(at, byte)
  return bytes(line), None


def lines_file(path: str, lines: Sequence[bytes]) -> int:
  """Writes LINES as a JSONL file (a newline inside a mutated line becomes a space, so
  that each stays one line); -> the number of lines."""
  with open(path, "wb") as f:
    f.write(b"".join(line.replace(b"\n", b" ") + b"\n" for line in lines))
  return len(lines)


def outcome(path: str, images: ImagePolicy) -> str:
  """KEPT or the reason of a one-line file, read strictly on its own."""
  try:
    for _, example in read_examples(path, images, DropCounts(), strict=True, max_line_bytes=MAX_LINE_BYTES):
      FEATURES.serialize_example(example)  # what the build stores must serialise
      return KEPT
  except RecordError as e:
    return e.reason
  raise AssertionError(f"{path}: the line was neither kept nor dropped")


def check(lines: Sequence[tuple[bytes, str | None]], images: ImagePolicy, folder: str) -> collections.Counter:
  """Reads LINES as one file (as the build does) and each line on its own; asserts that
  every line is kept or dropped for exactly one reason, the same in both readings, and
  the reason its mutation determines. Returns the outcomes, counted."""
  path = os.path.join(folder, "fuzz.jsonl")
  assert lines_file(path, [line for line, _ in lines]) == count_lines(path)
  counts = DropCounts()
  kept = [where for where, example in read_examples(path, images, counts, max_line_bytes=MAX_LINE_BYTES)]
  assert counts.kept == len(kept) and counts.kept + counts.dropped == len(lines), (counts, len(lines))
  one = os.path.join(folder, "one.jsonl")
  outcomes = []
  for number, (line, expected) in enumerate(lines, start=1):
    lines_file(one, [line])
    got = outcome(one, images)
    assert expected is None or got == expected, (line[:200], expected, got)
    assert (got == KEPT) == (f"{path}:{number}" in kept), (line[:200], got)
    outcomes.append(got)
  tally = collections.Counter(outcomes)
  assert counts.counts == collections.Counter({r: n for r, n in tally.items() if r != KEPT}), (counts, tally)
  return tally
