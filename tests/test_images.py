"""Image loading errors and SigLIP preprocessing against transformers' processor."""
import io

import numpy as np
import pytest
from PIL import Image

from metamorph.data.images import load_image, preprocess
from metamorph.data.records import RecordError


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
