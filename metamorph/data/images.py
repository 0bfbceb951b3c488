"""Reading and preprocessing images for the SigLIP encoder.

``preprocess`` matches transformers' ``SiglipImageProcessor`` (its PIL backend):
convert to RGB compositing transparency onto white, resize to size x size with
PIL BICUBIC, rescale by 1/255, normalise with mean = std = 0.5 -> [-1, 1]. Like
transformers, EXIF orientation is not applied.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image

from metamorph.data.records import RecordError

MAX_PIXELS = 50_000_000  # an image with more pixels is dropped before it is decoded (image_too_large)


@contextlib.contextmanager
def pil_limit_follows(max_pixels: int | None) -> Iterator[None]:
  """While inside, PIL's process-wide decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)
  follows ours: PIL neither refuses an image of at most ``max_pixels`` pixels (None: any
  size) nor warns about one; restored on exit. Callers that decode with a raised limit
  (a build, a training run) enter it once around all their decoding, not per image:
  the limit is a global that threads share."""
  saved = Image.MAX_IMAGE_PIXELS
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      if max_pixels is None:
        Image.MAX_IMAGE_PIXELS = None
      elif saved is not None:
        Image.MAX_IMAGE_PIXELS = max(saved, max_pixels)
      yield
  finally:
    Image.MAX_IMAGE_PIXELS = saved


def resolve_image(root: str, path: str, where: str = "", *, allow_outside_root: bool = False) -> str:
  """``path`` (relative to the folder ``root``) as a real path inside ``root``.

  Raises ``RecordError('image_outside_root')``, touching no file, when the path
  leaves ``root``: ``..``, an absolute path, or a symlink whose target is outside
  (symlinks are resolved). ``allow_outside_root`` returns such a path instead.
  """
  real_root = os.path.realpath(root)
  target = os.path.realpath(os.path.join(real_root, path))
  if not allow_outside_root and os.path.commonpath([real_root, target]) != real_root:
    raise RecordError("image_outside_root", f"{path!r} resolves to {target}, outside the image folder "
                                            f"{real_root}; move it inside, or allow it explicitly "
                                            "(--allow-images-outside-root)", where)
  return target


def read_image_bytes(path: str, where: str = "") -> bytes:
  """The file's encoded bytes; raises ``RecordError('missing_image')`` for a path
  that does not exist (or is a folder) and ``'unreadable_image'`` for any other
  failure to read it (permissions, an I/O error, a name the system refuses)."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
    raise RecordError("missing_image", f"{path} ({e.strerror})", where) from e
  except (OSError, ValueError) as e:
    raise RecordError("unreadable_image", f"{path} ({type(e).__name__}: {e})", where) from e


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB; transparency is composited onto white (as transformers' ``convert_to_rgb``)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    background = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, image).convert("RGB")
  return image.convert("RGB")


def load_image(path_or_bytes: str | os.PathLike | bytes, where: str = "", *,
               max_pixels: int | None = MAX_PIXELS) -> Image.Image:
  """Decodes an image file (a path) or its encoded bytes to an RGB ``PIL.Image``.

  Raises ``RecordError``: ``'missing_image'`` / ``'unreadable_image'`` for a path
  that does not exist / cannot be read (``read_image_bytes``); ``'image_too_large'``
  when the header's width x height exceeds ``max_pixels`` (None: no limit of ours),
  checked before any pixel is decoded, or when PIL refuses the image as a
  decompression bomb (``PIL.Image.MAX_IMAGE_PIXELS``, a process-wide limit that
  still applies above ours); ``'corrupt_image'`` for anything that does not decode
  completely (a truncated file included).
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data, name = bytes(path_or_bytes), f"{len(path_or_bytes)} bytes"
  else:
    name = os.fspath(path_or_bytes)
    data = read_image_bytes(name, where)
  try:
    with Image.open(io.BytesIO(data)) as image:  # reads the header only
      width, height = image.size
      if max_pixels is not None and width * height > max_pixels:
        raise RecordError("image_too_large", f"{name}: {width} x {height} = {width * height} pixels > "
                                             f"max_pixels {max_pixels}; shrink it or raise the limit", where)
      image.load()
      return _to_rgb(image)
  except RecordError:
    raise
  except Image.DecompressionBombError as e:
    raise RecordError("image_too_large", f"{name}: {e}", where) from e
  except Exception as e:  # noqa: BLE001 - any decoding failure of user bytes is a corrupt image
    raise RecordError("corrupt_image", f"{name}: {type(e).__name__}: {e}", where) from e


def preprocess(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> float32 [size, size, 3] in [-1, 1] (SigLIP's preprocessing)."""
  resized = _to_rgb(image).resize((size, size), Image.Resampling.BICUBIC)
  pixels = np.asarray(resized, np.float32) * np.float32(1 / 255)  # [size, size, 3]
  return (pixels - np.float32(0.5)) / np.float32(0.5)
