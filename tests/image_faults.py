"""Bad images on purpose: a folder holding every kind (outside the folder, missing, unreadable,
corrupt, truncated, too large), each with the drop reason a build must give it."""
from __future__ import annotations

import os
import struct
import zlib

from PIL import Image

KEPT = "kept"


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_header(width: int, height: int) -> bytes:
  """A PNG whose header says width x height and whose pixel data is a few bytes: PIL
  reads its size without decoding, and decoding it fails (truncated)."""
  ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 16))
          + _chunk(b"IEND", b""))


# image path in a record -> the reason it must get (KEPT: it is read and kept)
IMAGES = {
    "ok.png": KEPT,
    "sub/ok.jpg": KEPT,
    "link_in.png": KEPT,                    # a symlink to ok.png, inside the folder
    "sub/../ok.png": KEPT,                  # '..' that stays inside
    "../outside/ok.png": "image_outside_root",
    "link_out.png": "image_outside_root",   # a symlink to a valid image outside the folder
    "link_dir/ok.png": "image_outside_root",  # through a symlinked folder outside
    "missing.png": "missing_image",
    "sub": "missing_image",                 # a folder
    "ok.png/x.png": "missing_image",        # a file used as a folder
    "a" * 300 + ".png": "unreadable_image",  # a name longer than the file system allows
    "corrupt.png": "corrupt_image",
    "truncated.png": "corrupt_image",
    "huge.png": "image_too_large",          # 10000 x 10000 in its header (PIL warns at 89 M pixels)
    "bomb.png": "image_too_large",          # 20000 x 20000 (PIL itself refuses it)
}


def image_folder(base: str) -> str:
  """BASE/images with the files ``IMAGES`` names, and BASE/outside with a valid image."""
  root, outside = os.path.join(base, "images"), os.path.join(base, "outside")
  os.makedirs(os.path.join(root, "sub"), exist_ok=True)
  os.makedirs(outside, exist_ok=True)
  Image.new("RGB", (6, 5), (255, 0, 0)).save(os.path.join(root, "ok.png"))
  Image.new("RGB", (4, 4), (0, 0, 255)).save(os.path.join(root, "sub", "ok.jpg"))
  Image.new("RGB", (6, 5), (0, 255, 0)).save(os.path.join(outside, "ok.png"))
  with open(os.path.join(root, "ok.png"), "rb") as f:
    good = f.read()
  for name, data in (("corrupt.png", b"\x89PNG\r\n\x1a\n not a png"), ("truncated.png", good[:len(good) // 2]),
                     ("huge.png", png_header(10000, 10000)), ("bomb.png", png_header(20000, 20000))):
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
  for link, target in (("link_in.png", os.path.join(root, "ok.png")), ("link_out.png", os.path.join(outside, "ok.png")),
                       ("link_dir", outside)):
    if not os.path.lexists(os.path.join(root, link)):
      os.symlink(target, os.path.join(root, link))
  return root
