"""Building a TFDS (array_record) dataset from JSONL + images, and reading it without TF."""
import collections
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from metamorph.data import tfds_builder
from metamorph.data.records import RecordError
from metamorph.data.tfds_builder import build_dataset, open_source, read_drop_counts
from tests.image_faults import IMAGES, KEPT, image_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _conv(*turns):
  return [{"from": f, "value": v} for f, v in turns]


GOOD = [
    {"id": "q1", "image": "red.png", "conversations": _conv(("human", "<image> what is this"), ("gpt", "a cat")),
     "task": "qa", "meta": {"source": "hand"}},
    {"id": "t2i", "conversations": _conv(("human", "draw a dog"), ("gpt", "here <image>")), "image": ["blue.jpg"]},
    {"id": "chat", "conversations": _conv(("system", "be brief"), ("human", "what is it"), ("gpt", "a dog"))},
    {"id": "edit", "image": ["red.png", "sub/green.png"],
     "conversations": _conv(("human", "<image> what"), ("gpt", "it <image>"))},
]
def _with_image(id_, image):
  return json.dumps({"id": id_, "image": image, "conversations": _conv(("human", "<image> x"), ("gpt", "y"))})


BAD = {  # reason -> a bad line
    "malformed_json": '{"id": "broken", "conversations": [',
    "missing_image": _with_image("m", "nope.png"),
    "corrupt_image": _with_image("c", "bad.png"),
    "placeholder_mismatch": _with_image("p", ["red.png", "red.png"]),
    "empty_conversation": json.dumps({"id": "e", "conversations": []}),
    "non_alternating": json.dumps({"id": "n", "conversations": _conv(("human", "x"), ("human", "y"))}),
    "unknown_role": json.dumps({"id": "u", "conversations": _conv(("robot", "x"), ("gpt", "y"))}),
}


@pytest.fixture
def image_root(tmp_path):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  Image.new("RGB", (6, 5), (255, 0, 0)).save(root / "red.png")
  Image.new("RGB", (7, 4), (0, 0, 255)).save(root / "blue.jpg", quality=90)
  Image.new("RGBA", (3, 3), (0, 255, 0, 128)).save(root / "sub" / "green.png")
  (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
  return root


def _write_jsonl(path, lines):
  path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
  return str(path)


def _expected(record, image_root):
  images = record.get("image", [])
  images = [images] if isinstance(images, str) else images
  roles = {"human": "user", "gpt": "assistant", "system": "system"}
  extra = {k: v for k, v in record.items() if k not in ("id", "image", "conversations")}
  return {"id": record["id"], "conversations": [[roles[t["from"]], t["value"]] for t in record["conversations"]],
          "images": [(image_root / p).read_bytes() for p in images], "extra": extra}


def _decoded(example):
  return {"id": example["id"].decode(), "conversations": json.loads(example["conversations"]),
          "images": list(example["images"]), "extra": json.loads(example["extra"])}


def test_build_and_read_back(tmp_path, image_root):
  train = _write_jsonl(tmp_path / "train.jsonl", GOOD[:3])
  (tmp_path / "val.json").write_text(json.dumps(GOOD[3:]))
  data_dir = str(tmp_path / "data")
  counts = build_dataset("hand_made", {"train": train, "validation": str(tmp_path / "val.json")},
                         str(image_root), data_dir)
  assert {s: c.to_dict() for s, c in counts.items()} == {
      "train": {"kept": 3, "dropped": 0, "by_reason": {}},
      "validation": {"kept": 1, "dropped": 0, "by_reason": {}}}
  for split, records in (("train", GOOD[:3]), ("validation", GOOD[3:])):
    source = open_source(data_dir, "hand_made", split)
    assert len(source) == len(records)
    assert [_decoded(source[i]) for i in range(len(source))] == [_expected(r, image_root) for r in records]
  with pytest.raises(ValueError, match="has no split 'captions' \\(it has train, validation\\)"):
    open_source(data_dir, "hand_made", "captions")
  version_dir = os.path.join(data_dir, "hand_made", "1.0.0")
  assert os.path.exists(os.path.join(version_dir, "hand_made-train.array_record-00000-of-00001"))
  with pytest.raises(FileExistsError):
    build_dataset("hand_made", {"train": train}, str(image_root), data_dir)


def test_every_bad_kind_is_skipped_and_counted(tmp_path, image_root, capsys):
  path = _write_jsonl(tmp_path / "mixed.jsonl", [GOOD[0], *BAD.values(), GOOD[1]])
  data_dir = str(tmp_path / "data")
  counts = build_dataset("mixed", {"train": path}, str(image_root), data_dir)["train"]
  expected = {"kept": 2, "dropped": len(BAD), "by_reason": {reason: 1 for reason in sorted(BAD)}}
  assert counts.to_dict() == expected
  assert read_drop_counts(data_dir, "mixed") == {"train": expected}
  with open(os.path.join(data_dir, "mixed", "1.0.0", "metadata.json")) as f:
    assert json.load(f) == {"drop_counts": {"train": expected}, "max_pixels": tfds_builder.MAX_PIXELS}
  assert "mixed/train: kept 2 records, dropped 7" in capsys.readouterr().out
  assert [e["id"] for e in open_source(data_dir, "mixed", "train")] == [b"q1", b"t2i"]


@pytest.mark.parametrize("reason", ["malformed_json", "missing_image", "corrupt_image", "unknown_role"])
def test_strict_names_the_line_and_the_reason(tmp_path, image_root, reason):
  path = _write_jsonl(tmp_path / "strict.jsonl", [GOOD[0], GOOD[1], BAD[reason], GOOD[2]])
  data_dir = tmp_path / "data"
  with pytest.raises(RecordError) as e:
    build_dataset("strict", {"train": path}, str(image_root), str(data_dir), strict=True)
  assert e.value.reason == reason
  assert str(e.value).startswith(f"{path}:3: {reason}")
  assert not (data_dir / "strict" / "1.0.0").exists()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # huge.png: dropped, image_too_large
@pytest.mark.parametrize("allow", [False, True])
def test_each_image_fault_is_its_reason_and_outside_paths_are_never_opened(tmp_path, monkeypatch, allow):
  root = image_folder(str(tmp_path))
  opened = []
  read = tfds_builder.read_image_bytes
  monkeypatch.setattr(tfds_builder, "read_image_bytes", lambda path, where="": opened.append(path) or read(path, where))
  paths = sorted(IMAGES)
  path = _write_jsonl(tmp_path / "images.jsonl", [_with_image(p, p) for p in paths])
  counts = build_dataset("faults", {"train": path}, root, str(tmp_path / "data"), allow_images_outside_root=allow)
  expected = {p: KEPT if allow and r == "image_outside_root" else r for p, r in IMAGES.items()}
  dropped = collections.Counter(r for r in expected.values() if r != KEPT)
  assert counts["train"].counts == dropped and counts["train"].kept == len(paths) - dropped.total()
  kept = [e["id"].decode() for e in open_source(str(tmp_path / "data"), "faults", "train")]
  assert kept == [p for p in paths if expected[p] == KEPT]
  outside = os.path.realpath(os.path.join(str(tmp_path), "outside"))
  assert any(p.startswith(outside) for p in opened) == allow


NO_TF_READER = """
import json, sys
from metamorph.data.conversation import TokenLayout
from metamorph.data.pipeline import make_dataset
from metamorph.data.tfds_builder import open_source
from tests.test_pipeline import tiny_tokenizer
source = open_source(sys.argv[1], "no_tf", "train")
tok = tiny_tokenizer()
ds = make_dataset(source, tokenizer=tok, layout=TokenLayout.from_tokenizer(tok, 2), image_size=4, seq_len=64,
                  images_per_row=4, batch_size=1, num_epochs=1, shard_index=0, shard_count=1)
rows = [b["segment_ids"].max() for b in ds]
tf = sorted(m for m in sys.modules if m == "tensorflow" or m.startswith("tensorflow."))
print(json.dumps({"records": int(sum(rows)), "tf": tf}))
"""


def test_reading_needs_no_tensorflow(tmp_path, image_root):
  path = _write_jsonl(tmp_path / "train.jsonl", GOOD)
  build_dataset("no_tf", {"train": path}, str(image_root), str(tmp_path / "data"))
  out = subprocess.run([sys.executable, "-c", NO_TF_READER, str(tmp_path / "data")], cwd=REPO, check=True,
                       capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"records": len(GOOD), "tf": []}


WITHOUT_TF_BUILDER = """
import importlib.abc, importlib.util, sys
_find_spec = importlib.util.find_spec
def find_spec(name, *args, **kwargs):  # etils and TFDS probe for TensorFlow with find_spec
  return None if name.split(".")[0] == "tensorflow" else _find_spec(name, *args, **kwargs)
importlib.util.find_spec = find_spec
class NoTensorFlow(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name.split(".")[0] == "tensorflow":
      raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, NoTensorFlow())
from metamorph.data.tfds_builder import build_dataset, open_source
counts = build_dataset("built_without_tf", {"train": sys.argv[1]}, sys.argv[2], sys.argv[3])
print(len(open_source(sys.argv[3], "built_without_tf", "train")), counts["train"].kept)
"""


def test_building_works_with_tensorflow_unimportable(tmp_path, image_root):
  path = _write_jsonl(tmp_path / "train.jsonl", [*GOOD, BAD["corrupt_image"]])
  out = subprocess.run([sys.executable, "-c", WITHOUT_TF_BUILDER, path, str(image_root), str(tmp_path / "data")],
                       cwd=REPO, check=True, capture_output=True, text=True)
  assert out.stdout.strip().splitlines()[-1] == f"{len(GOOD)} {len(GOOD)}"
