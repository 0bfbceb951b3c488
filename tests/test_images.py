"""Image loading errors, paths kept inside the image folder, the pixel limit, and SigLIP
preprocessing against transformers' processor."""
import io
import os

import numpy as np
import pytest
from PIL import Image

from metamorph.data.images import MAX_PIXELS, load_image, preprocess, read_image_bytes, resolve_image
from metamorph.data.records import RecordError
from tests.image_faults import png_header


def _reference(image: Image.Image, size: int) -> np.ndarray:
  """transformers' SigLIP processor (PIL backend), as [size, size, 3]."""
  import transformers
  cls = getattr(transformers, "SiglipImageProcessorPil", transformers.SiglipImageProcessor)
  out = cls(size={"height": size, "width": size})(image, return_tensors="np")["pixel_values"][0]
  return out.transpose(1, 2, 0) if out.shape[0] == 3 else out


def _encoded(image: Image.Image, fmt: str) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt)
  return buf.getvalue()


def _images():
  rng = np.random.default_rng(0)
  rgb = Image.fromarray(rng.integers(0, 256, (23, 37, 3), dtype=np.uint8))
  rgba = Image.fromarray(rng.integers(0, 256, (17, 11, 4), dtype=np.uint8))
  gray = Image.fromarray(rng.integers(0, 256, (30, 30), dtype=np.uint8))
  palette = rgb.convert("P")
  palette.info["transparency"] = 0
  return {"rgb_png": _encoded(rgb, "PNG"), "rgb_jpeg": _encoded(rgb, "JPEG"), "rgba_png": _encoded(rgba, "PNG"),
          "gray_png": _encoded(gray, "PNG"), "palette_png": _encoded(palette, "PNG")}


@pytest.mark.parametrize("kind", ["rgb_png", "rgb_jpeg", "rgba_png", "gray_png", "palette_png"])
@pytest.mark.parametrize("size", [16, 27])
def test_preprocess_matches_siglip_image_processor(kind, size):
  data = _images()[kind]
  ours = preprocess(load_image(data), size)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32
  assert -1 <= ours.min() and ours.max() <= 1
  with Image.open(io.BytesIO(data)) as original:
    np.testing.assert_allclose(ours, _reference(original, size), atol=1e-5, rtol=0)


def test_load_image_from_a_path_is_rgb(tmp_path):
  path = tmp_path / "a.png"
  path.write_bytes(_images()["gray_png"])
  image = load_image(str(path))
  assert image.mode == "RGB" and image.size == (30, 30)


def test_missing_and_corrupt_images_raise_record_errors(tmp_path):
  with pytest.raises(RecordError) as e:
    load_image(str(tmp_path / "nope.png"), "x.jsonl:3")
  assert e.value.reason == "missing_image" and str(e.value).startswith("x.jsonl:3: missing_image")
  truncated = _images()["rgb_png"][:-40]
  for data in (b"not an image", truncated):
    with pytest.raises(RecordError) as e:
      load_image(data, "x.jsonl:4")
    assert e.value.reason == "corrupt_image" and "x.jsonl:4" in str(e.value)


def test_paths_that_leave_the_folder_are_refused_before_any_file_is_touched(tmp_path):
  root = tmp_path / "images"
  (root / "sub").mkdir(parents=True)
  (root / "a.png").write_bytes(b"inside")
  (tmp_path / "secret.png").write_bytes(b"outside")
  os.symlink(tmp_path / "secret.png", root / "out.png")
  os.symlink(root / "a.png", root / "sub" / "in.png")
  for path in ("../secret.png", "sub/../../secret.png", str(tmp_path / "secret.png"), "/etc/passwd",
               "out.png", "../../../etc/passwd"):
    with pytest.raises(RecordError) as e:
      resolve_image(str(root), path, "x.jsonl:5")
    assert e.value.reason == "image_outside_root" and str(e.value).startswith("x.jsonl:5: image_outside_root")
    assert "--allow-images-outside-root" in str(e.value)
  assert resolve_image(str(root), "sub/in.png") == str((root / "a.png").resolve())  # a link that stays inside
  assert resolve_image(str(root), "sub/../a.png") == str((root / "a.png").resolve())
  assert resolve_image(str(root), "missing.png") == str((root / "missing.png").resolve())  # missing: open says
  outside = resolve_image(str(root), "out.png", allow_outside_root=True)
  assert read_image_bytes(outside) == b"outside"


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's, at 89 M pixels
def test_images_over_the_pixel_limit_are_dropped_before_decoding():
  # the header claims 10000 x 10000 and the data is a few bytes: a decode would fail as corrupt_image
  with pytest.raises(RecordError) as e:
    load_image(png_header(10000, 10000), "x.jsonl:6")
  assert e.value.reason == "image_too_large" and str(e.value).startswith("x.jsonl:6: image_too_large")
  assert f"10000 x 10000 = 100000000 pixels > max_pixels {MAX_PIXELS}" in str(e.value)
  small = _encoded(Image.new("RGB", (30, 30)), "PNG")
  with pytest.raises(RecordError, match="30 x 30 = 900 pixels > max_pixels 899"):
    load_image(small, max_pixels=899)
  assert load_image(small, max_pixels=900).size == (30, 30)
  with pytest.raises(RecordError) as e:  # no limit of ours: the decode is tried (and fails: no data)
    load_image(png_header(300, 300), max_pixels=None)
  assert e.value.reason == "corrupt_image"


def test_a_decompression_bomb_is_too_large_even_without_our_limit():
  with pytest.raises(RecordError) as e:  # 400 M pixels: more than twice PIL's own limit
    load_image(png_header(20000, 20000), "x.jsonl:7", max_pixels=None)
  assert e.value.reason == "image_too_large" and "decompression bomb" in str(e.value)


def test_unreadable_and_folder_paths_are_counted_reasons(tmp_path):
  with pytest.raises(RecordError) as e:
    load_image(str(tmp_path / ("a" * 300 + ".png")))  # a name the file system refuses (ENAMETOOLONG)
  assert e.value.reason == "unreadable_image"
  with pytest.raises(RecordError) as e:
    load_image(str(tmp_path))
  assert e.value.reason == "missing_image"
