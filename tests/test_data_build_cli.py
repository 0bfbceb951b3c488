"""`python -m metamorph.data.build`: users' JSONL + images -> a TFDS dataset."""
import json

from PIL import Image

from metamorph.data import build, tfds_builder


def _records(tmp_path):
  Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "a.png")
  good = {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "<image> What is it?"},
                                                          {"from": "gpt", "value": "A red square."}]}
  missing = {**good, "id": "2", "image": "missing.png"}
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join([json.dumps(good), json.dumps(missing), "not json", json.dumps(good)]) + "\n")
  return str(path)


def test_build_counts_bad_records(tmp_path, capsys):
  path = _records(tmp_path)
  out = str(tmp_path / "out")
  assert build.main(["--name", "mine", "--images", str(tmp_path), "--out", out, "--split", f"train={path}"]) == 0
  assert len(tfds_builder.open_source(out, "mine", "train")) == 2
  counts = tfds_builder.read_drop_counts(out, "mine")["train"]
  assert counts["by_reason"] == {"malformed_json": 1, "missing_image": 1}
  assert "dropped 2 (1 malformed_json, 1 missing_image)" in capsys.readouterr().out


def test_strict_names_the_line(tmp_path, capsys):
  path = _records(tmp_path)
  out = str(tmp_path / "out")
  assert build.main(["--name", "mine", "--images", str(tmp_path), "--out", out, "--strict",
                     "--split", f"train={path}"]) == 2
  assert "train.jsonl:2: missing_image" in capsys.readouterr().err
