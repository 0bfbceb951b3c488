"""`python -m metamorph.data.build`: users' JSONL + images -> a TFDS dataset."""
import json
import os

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


def _faulty(tmp_path):
  """The issue's file: good lines, one with a byte that is not UTF-8, image paths that leave
  --images (.., absolute, a symlink to a valid image outside), a too-large image."""
  images = tmp_path / "images"
  images.mkdir()
  Image.new("RGB", (8, 8), (200, 10, 10)).save(images / "a.png")
  Image.new("RGB", (8, 8), (10, 200, 10)).save(tmp_path / "outside.png")
  os.symlink(tmp_path / "outside.png", images / "link.png")
  Image.new("RGB", (40, 30)).save(images / "big.png")

  def line(image):
    return json.dumps({"id": image, "image": image, "conversations": [
        {"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "A square."}]}).encode()
  lines = [line("a.png"), line("a.png").replace(b"A square", b"Un carr\xe9"), line("../outside.png"),
           line("/etc/passwd"), line("link.png"), line("big.png"), line("a.png")]
  path = tmp_path / "train.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  return str(images), str(path)


def test_a_bad_byte_and_outside_or_large_images_are_counted_not_fatal(tmp_path, capsys):
  images, path = _faulty(tmp_path)
  out = str(tmp_path / "out")
  assert build.main(["--name", "mine", "--images", images, "--out", out, "--split", f"train={path}",
                     "--max-pixels", "1000"]) == 0
  assert [e["id"] for e in tfds_builder.open_source(out, "mine", "train")] == [b"a.png", b"a.png"]
  assert tfds_builder.read_drop_counts(out, "mine")["train"]["by_reason"] == {
      "not_utf8": 1, "image_outside_root": 3, "image_too_large": 1}
  assert "kept 2 records, dropped 5 (3 image_outside_root, 1 image_too_large, 1 not_utf8)" in capsys.readouterr().out
  assert build.main(["--name", "mine", "--images", images, "--out", out, "--split", f"train={path}",
                     "--version", "2.0.0", "--allow-images-outside-root"]) == 0  # default limit: big.png is kept
  assert tfds_builder.read_drop_counts(out, "mine", "2.0.0")["train"]["by_reason"] == {
      "not_utf8": 1, "corrupt_image": 1}  # /etc/passwd was opened: it is not an image
  assert [e["id"] for e in tfds_builder.open_source(out, "mine", "train", "2.0.0")] == [
      b"a.png", b"../outside.png", b"link.png", b"big.png", b"a.png"]


def test_strict_names_the_bad_byte_and_a_missing_split_file_is_one_line(tmp_path, capsys):
  images, path = _faulty(tmp_path)
  out = str(tmp_path / "out")
  assert build.main(["--name", "mine", "--images", images, "--out", out, "--strict", "--split", f"train={path}"]) == 2
  err = capsys.readouterr().err
  assert "train.jsonl:2: not_utf8: byte 0xe9 at column" in err and "Traceback" not in err
  assert build.main(["--name", "mine", "--images", images, "--out", out, "--split",
                     f"train={tmp_path / 'nope.jsonl'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and "nope.jsonl (split 'train'): no such file" in err and err.count("\n") == 1


def test_the_build_limit_travels_to_training(tmp_path, capsys):
  """A dataset built above the default pixel limit keeps its large images in training:
  the pipelines decode stored images under the limit recorded at build time."""
  from metamorph.data.images import MAX_PIXELS
  from train import data
  side = int(MAX_PIXELS ** 0.5) + 1  # just over the default limit; 1-bit, so the file is small
  Image.new("1", (side, side), 1).save(tmp_path / "huge.png")
  record = {"id": "h", "image": "huge.png", "conversations": [
      {"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "White."}]}
  (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n")
  out = str(tmp_path / "out")
  assert build.main(["--name", "mine", "--images", str(tmp_path), "--out", out,
                     "--split", f"train={tmp_path / 'train.jsonl'}"]) == 2  # its only record dropped
  assert "split 'train' (" in capsys.readouterr().err
  Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
  small = {**record, "id": "s", "image": "small.png"}
  (tmp_path / "train.jsonl").write_text(json.dumps(record) + "\n" + json.dumps(small) + "\n")
  for version, flag in (("1.0.0", []), ("2.0.0", ["--max-pixels", "0"])):
    assert build.main(["--name", "mine", "--images", str(tmp_path), "--out", out, "--version", version,
                       "--split", f"train={tmp_path / 'train.jsonl'}", *flag]) == 0
  assert [e["id"] for e in tfds_builder.open_source(out, "mine", "train", "1.0.0")] == [b"s"]  # image_too_large
  assert tfds_builder.read_max_pixels(out, "mine", "1.0.0") == MAX_PIXELS
  assert tfds_builder.read_max_pixels(out, "mine") is None  # the newest, 2.0.0
  settings = data.DataSettings(data_dir=out, name="mine", weights="", train_split="train", eval_split="train",
                               tokenizer="", image_size=16, seq_len=32, images_per_row=1, open_rows=1,
                               text_len=8, num_threads=1, virtual_shards=1, strict=True, batch_size=1)
  assert data.pixel_limit(settings) is None
  batch = next(data.image_batches(settings, "train", seed=0, num_epochs=1))
  assert batch["images"].shape == (1, 16, 16, 3)
  white = [b for b in data.image_batches(settings, "train", seed=0, num_epochs=1) if (b["images"] == 1.0).all()]
  assert len(white) == 1  # the huge image, decoded
