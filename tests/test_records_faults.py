"""Every way a line of a records file can be bad ends in one drop reason, never a traceback:
bytes that are not UTF-8, empty and huge lines, JSON that is not an object, wrong nested
types, NUL bytes, a byte-order mark, lone surrogates, and bad elements of a .json list."""
import collections
import json
import tracemalloc

import pytest

from metamorph.data.records import DropCounts, RecordError, count_lines, read_records

GOOD = json.dumps({"id": "ok", "image": "a.png", "conversations": [
    {"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "A cat."}]}).encode()


def _with(**fields) -> bytes:
  record = {"id": "x", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
  return json.dumps({**record, **fields}).encode()


BAD = [  # (a line, the reason it is dropped for)
    (b"\xff" + GOOD, "not_utf8"),                                   # the byte
    (GOOD.replace(b"A cat.", b"Un chat \xe9l\xe9gant."), "not_utf8"),  # latin-1 text
    (GOOD[:-3] + b"\xe2\x82", "not_utf8"),                         # a multi-byte character cut short
    (_with(id="\\ud800").replace(b"\\\\ud800", b"\\ud800"), "not_utf8"),  # an escaped lone surrogate
    (b"", "empty_line"),
    (b" \t\r", "empty_line"),
    (b"[1, 2]", "malformed_json"),
    (b'"a string"', "malformed_json"),
    (b"null", "malformed_json"),
    (GOOD[:40], "malformed_json"),                                  # truncated
    (GOOD.replace(b"A cat.", b"A\x00cat."), "malformed_json"),       # a raw NUL byte
    (b"\xef\xbb\xbf" + GOOD, "malformed_json"),                     # a byte-order mark after line 1
    (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),            # deeper than Python's recursion limit
    (b'{"id": ' + b"9" * 5000 + b"}", "malformed_json"),            # an int Python will not parse
    (_with(conversations={"from": "human"}), "malformed_record"),
    (_with(conversations=[["human", "hi"], ["gpt", "yo"]]), "malformed_record"),
    (_with(conversations=[{"from": "human", "value": ["hi"]}, {"from": "gpt", "value": "yo"}]), "malformed_record"),
    (_with(conversations=[{"from": None, "value": "hi"}, {"from": "gpt", "value": "yo"}]), "malformed_record"),
    (_with(image={"path": "a.png"}), "malformed_record"),
    (_with(image=["a.png", 3]), "malformed_record"),
    (_with(image=""), "malformed_record"),
    (_with(image="a\u0000.png"), "malformed_record"),              # a NUL in a path (open() would raise)
    (_with(conversations=[{"from": "human", "value": "<image_start> hi"}, {"from": "gpt", "value": "yo"}]),
     "reserved_token"),
]


def _write(path, lines, end=b"\n"):
  path.write_bytes(b"\n".join(lines) + end)
  return str(path)


@pytest.mark.parametrize("line,reason", BAD, ids=[f"{i}-{r}" for i, (_, r) in enumerate(BAD)])
def test_each_bad_line_is_dropped_for_its_reason_and_named_when_strict(tmp_path, line, reason):
  path = _write(tmp_path / "train.jsonl", [GOOD, line, GOOD])
  counts = DropCounts()
  assert [where for where, _ in read_records(path, counts=counts)] == [f"{path}:1", f"{path}:3"]
  assert counts.counts == {reason: 1}
  with pytest.raises(RecordError) as e:
    list(read_records(path, strict=True))
  assert e.value.reason == reason and str(e.value).startswith(f"{path}:2: {reason}: ")


def test_one_file_of_every_fault_adds_up(tmp_path):
  lines = [b"\xef\xbb\xbf" + GOOD, *[line for line, _ in BAD], GOOD + b"\r", b"x" * 5000, GOOD]
  path = _write(tmp_path / "all.jsonl", lines, end=b"")  # CRLF on one line, no newline after the last
  counts = DropCounts()
  kept = [where for where, _ in read_records(path, counts=counts, max_line_bytes=4096)]
  assert kept == [f"{path}:1", f"{path}:{len(lines) - 2}", f"{path}:{len(lines)}"]  # BOM, CRLF, last
  expected = collections.Counter("line_too_long" if len(line) > 4096 else r for line, r in [*BAD, (b"x" * 5000, "")])
  assert counts.counts == expected and expected["line_too_long"] == 3
  assert len(kept) + counts.dropped == count_lines(path) == len(lines)


def test_a_huge_line_is_skipped_without_holding_it(tmp_path):
  path = tmp_path / "huge.jsonl"
  with open(path, "wb") as f:
    f.write(GOOD + b"\n" + b'{"id": "' + b"x" * (32 << 20) + b'"}\n' + GOOD + b"\n")
  counts = DropCounts()
  tracemalloc.start()
  try:
    kept = [where for where, _ in read_records(str(path), counts=counts, max_line_bytes=1 << 20)]
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert kept == [f"{path}:1", f"{path}:3"] and counts.counts == {"line_too_long": 1}
  assert peak < 8 << 20, f"peak {peak} bytes for a 32 MiB line"
  with pytest.raises(RecordError, match=r"huge\.jsonl:2: line_too_long: longer than 1048576 bytes"):
    list(read_records(str(path), strict=True, max_line_bytes=1 << 20))


def test_json_list_elements_fail_alone(tmp_path):
  good = json.loads(GOOD)
  text = json.dumps([good, {**good, "id": "latin"}, [1], {"conversations": 3}, good], ensure_ascii=False)
  path = tmp_path / "data.json"
  path.write_bytes(b"\xef\xbb\xbf" + text.encode().replace(b'"latin"', b'"l\xe0tin"'))  # a latin-1 byte
  counts = DropCounts()
  assert [w for w, _ in read_records(str(path), counts=counts)] == [f"{path}[0]", f"{path}[4]"]
  assert counts.counts == {"not_utf8": 1, "malformed_json": 1, "malformed_record": 1}
  with pytest.raises(RecordError, match=r"data\.json\[1\]: not_utf8"):
    list(read_records(str(path), strict=True))


@pytest.mark.parametrize("content,message", [(b'{"records": []}', "must hold a list of records, not a dict"),
                                             (b"[" + GOOD + b",", "not valid JSON"), (b"\xff\xfe[]", "not valid JSON")])
def test_a_json_file_that_is_not_a_list_names_the_file(tmp_path, content, message):
  path = tmp_path / "data.json"
  path.write_bytes(content)
  with pytest.raises(RecordError, match=message) as e:
    list(read_records(str(path)))
  assert e.value.where == str(path)


def test_count_lines_counts_what_the_reader_numbers(tmp_path):
  assert count_lines(_write(tmp_path / "a.jsonl", [GOOD, b"", GOOD])) == 3
  assert count_lines(_write(tmp_path / "b.jsonl", [GOOD, GOOD], end=b"")) == 2
  (tmp_path / "c.jsonl").write_bytes(b"")
  assert count_lines(str(tmp_path / "c.jsonl")) == 0
