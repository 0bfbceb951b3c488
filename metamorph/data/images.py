"""Reading and preprocessing images for the SigLIP encoder.

``preprocess`` matches transformers' ``SiglipImageProcessor`` (its PIL backend):
convert to RGB compositing transparency onto white, resize to size x size with
PIL BICUBIC, rescale by 1/255, normalise with mean = std = 0.5 -> [-1, 1]. Like
transformers, EXIF orientation is not applied.
"""
from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from metamorph.data.records import RecordError


def read_image_bytes(path: str, where: str = "") -> bytes:
  """The file's encoded bytes; raises ``RecordError('missing_image')``."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
    raise RecordError("missing_image", f"{path} ({e.strerror})", where) from e


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB; transparency is composited onto white (as transformers' ``convert_to_rgb``)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def load_image(path_or_bytes: str | os.PathLike | bytes, where: str = "") -> Image.Image:
  """Decodes an image file (a path) or its encoded bytes to an RGB ``PIL.Image``.

  Raises ``RecordError('missing_image')`` for a path that does not exist and
  ``RecordError('corrupt_image')`` for anything that does not decode completely.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data, name = bytes(path_or_bytes), f"{len(path_or_bytes)} bytes"
  else:
    name = os.fspath(path_or_bytes)
    data = read_image_bytes(name, where)
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      return _to_rgb(image)
  except Exception as e:  # noqa: BLE001 - any decoding failure of user bytes is a corrupt image
    raise RecordError("corrupt_image", f"{name}: {type(e).__name__}: {e}", where) from e


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> float32 [size, size, 3] in [-1, 1] (SigLIP's preprocessing)."""
  resized = _to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
  pixels = np.asarray(resized, np.float32) * np.float32(1 / 255)  # [size, size, 3]
  return (pixels - np.float32(0.5)) / np.float32(0.5)
