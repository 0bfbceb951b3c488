"""Rule-based reader of shapes-world images: the exact grader of the toy world.

No learned parts. It relies on how ``shapes.render`` forms an image: every pixel
is ``background + alpha * (color - background)`` (+ noise), and blur (of a camera
or of a diffusion decoder) keeps it so, since it only mixes pixels linearly.

  1. Normalise: any size, resized to ``CANVAS`` x ``CANVAS`` (box filter down,
     bilinear up; both linear, so the mixing model holds).
  2. Background: the median colour of the outer ring, so a generated image whose
     background drifted a little still reads.
  3. Object: the connected component (8-neighbours) of pixels farther than
     ``FG_DISTANCE`` from the background with the most contrast mass.
  4. Colour: the palette entry whose segment background->color explains the
     component's pixels with the least squared residual (alpha fitted per pixel).
  5. Alpha: each pixel's projection on that segment, in a small neighbourhood
     of the component. Its mass is the area, its centroid the centre of mass;
     both are unchanged by a symmetric blur.
  6. Shape: for each shape, the square box implied by the area (through the
     shape's fill ratio) and the centroid (through the shape's centroid offset)
     gives a template; blurred at a few levels, the template closest to alpha
     (least squares) wins. Size and position come from the winner's box:
     ``size`` by comparing its side with ``SIZE_THRESHOLD``, ``position`` as the
     nearest anchor of its centre.
When no pixel stands out from the background the reading is all ``None``.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage

from metamorph.data import shapes

CANVAS = 64  # working resolution, pixels
RING = 2  # width of the border ring that estimates the background, pixels
FG_DISTANCE = 0.2  # RGB distance from the background (in [0, 1] units) of object pixels
MIN_AREA = 6.0  # least alpha mass (pixels at CANVAS) of an object
DILATE = 3  # pixels around the object kept to collect its blurred edge
ALPHA_LO = 0.0
BLUR_SIGMAS = (0.0, 1.0, 2.0, 3.0)  # template blurs tried, pixels at CANVAS
# Side of the bounding box (unit coordinates) separating small from large.
SIZE_THRESHOLD = math.sqrt(4 * shapes.HALF_EXTENT["small"] * shapes.HALF_EXTENT["large"])

ATTRIBUTES = ("color", "shape", "size", "position")


@dataclasses.dataclass(frozen=True)
class Reading:
  """What the oracle sees in one object.

  center: bounding-box centre, unit coordinates (x right, y down).
  extent: bounding-box side, unit coordinates.
  residual: squared error of the best template / alpha mass (0 = perfect fit; a
    large value flags an image that is not a clean shape).
  The fields are None when no object was found.
  """
  color: str | None = None
  shape: str | None = None
  size: str | None = None
  position: str | None = None
  center: tuple[float, float] | None = None
  extent: float | None = None
  residual: float | None = None

  def attributes(self) -> dict[str, str | None]:
    return {k: getattr(self, k) for k in ATTRIBUTES}


# --- input normalisation ----------------------------------------------------------


def to_rgb(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
  """PIL image or array -> float32 [H, W, 3] in [0, 1].

  Arrays are HWC (or HW, grey); an alpha channel is dropped. Value ranges:
  uint8 is [0, 255]; a float array is [-1, 1] when it holds a negative value and
  [0, 1] otherwise, unless ``value_range=(lo, hi)`` says so explicitly (do that
  for [-1, 1] images that could be all non-negative).
  """
  if isinstance(image, Image.Image):
    image = np.asarray(image.convert("RGB"))
  x = np.asarray(image)
  if x.ndim == 2:
    x = np.repeat(x[..., None], 3, axis=-1)
  if x.ndim != 3 or x.shape[-1] not in (3, 4):
    raise ValueError(f"expected an HxWx3 image, got shape {x.shape}")
  x = x[..., :3]
  if value_range is None:
    if x.dtype == np.uint8:
      value_range = (0.0, 255.0)
    elif np.issubdtype(x.dtype, np.floating):
      value_range = (-1.0, 1.0) if float(x.min()) < 0.0 else (0.0, 1.0)
    else:
      raise ValueError(f"unsupported dtype {x.dtype}; give value_range")
  lo, hi = value_range
  return ((x.astype(np.float32) - lo) / (hi - lo)).clip(0.0, 1.0)


def _resize(x: np.ndarray, n: int) -> np.ndarray:
  """[H, W, 3] float -> [n, n, 3], box filter when shrinking, bilinear otherwise."""
  if x.shape[:2] == (n, n):
    return x
  shrink = min(x.shape[:2]) >= n
  method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c])).resize((n, n), method))
           for c in range(3)]
  return np.stack(chans, axis=-1).astype(np.float32)


def _background(x: np.ndarray) -> np.ndarray:
  """Median colour of the outer ``RING`` pixels: [H, W, 3] -> [3]."""
  ring = np.ones(x.shape[:2], bool)
  ring[RING:-RING, RING:-RING] = False
  return np.median(x[ring], axis=0)


# --- shape statistics -------------------------------------------------------------


@functools.cache
def _shape_stats(kind: str) -> tuple[float, float]:
  """(fill ratio of the box, centroid y offset in half extents), measured once."""
  n, half = 512, 0.45
  cov = shapes.coverage(kind, (0.5, 0.5), half, n, supersample=2).astype(np.float64)
  ys = (np.arange(n) + 0.5) / n
  area = cov.sum()
  fill = area / (2 * half * n) ** 2
  dy = ((cov.sum(axis=1) * ys).sum() / area - 0.5) / half
  return float(fill), float(dy)


# --- reading ----------------------------------------------------------------------


def _palette_deltas(bg: np.ndarray) -> np.ndarray:
  """Palette colours minus the background: [3] -> [C, 3]."""
  return np.asarray([shapes.PALETTE[c] for c in shapes.COLORS], np.float32) / 255.0 - bg


def _pick_color(pix: np.ndarray, deltas: np.ndarray) -> int:
  """Palette index whose bg->color segment best explains pixels [P, 3] (minus bg)."""
  a = (pix @ deltas.T) / (deltas * deltas).sum(-1)  # [P, C]
  a = a.clip(0.0, 1.0)
  res = ((pix[:, None, :] - a[..., None] * deltas[None]) ** 2).sum(-1)  # [P, C]
  return int(res.sum(0).argmin())


def _fit_shape(alpha: np.ndarray) -> tuple[str, tuple[float, float], float, float]:
  """Best template for an alpha map [N, N] -> (shape, centre, half extent, residual).

  Centre and half extent are in unit coordinates.
  """
  n = alpha.shape[0]
  area = float(alpha.sum())
  pos = (np.arange(n) + 0.5) / n  # pixel centres, unit coordinates
  mx = float((alpha.sum(0) * pos).sum() / area)
  my = float((alpha.sum(1) * pos).sum() / area)
  best = ("", (0.0, 0.0), 0.0, math.inf)
  for kind in shapes.SHAPES:
    fill, dy = _shape_stats(kind)
    half = math.sqrt(area / fill) / (2 * n)
    center = (mx, my - dy * half)
    tmpl = shapes.coverage(kind, center, half, n)
    for sigma in BLUR_SIGMAS:
      t = ndimage.gaussian_filter(tmpl, sigma, mode="constant") if sigma else tmpl
      err = float(((t - alpha) ** 2).sum())
      if err < best[3]:
        best = (kind, center, half, err)
  kind, center, half, err = best
  return kind, center, half, err / area


def _read_component(x: np.ndarray, bg: np.ndarray, comp: np.ndarray,
                    exclude: np.ndarray | None = None) -> Reading:
  """Read the object whose core pixels are ``comp`` ([N, N] bool) in x [N, N, 3]."""
  diff = x - bg  # [N, N, 3]
  deltas = _palette_deltas(bg)
  ci = _pick_color(diff[comp], deltas)
  d = deltas[ci]
  region = ndimage.binary_dilation(comp, iterations=DILATE)
  if exclude is not None:
    region &= ~exclude
  alpha = np.where(region, (diff @ d) / float(d @ d), 0.0).clip(ALPHA_LO, 1.0)  # [N, N]
  if alpha.sum() < MIN_AREA:
    return Reading()
  kind, center, half, residual = _fit_shape(alpha.astype(np.float32))
  return Reading(
    color=shapes.COLORS[ci],
    shape=kind,
    size="large" if 2 * half > SIZE_THRESHOLD else "small",
    position=shapes.nearest_position(center),
    center=center,
    extent=2 * half,
    residual=residual,
  )


def _components(x: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
  """Foreground components by decreasing contrast mass -> (distance map, masks)."""
  dist = np.linalg.norm(x - bg, axis=-1)  # [N, N]
  labels, count = ndimage.label(dist > FG_DISTANCE, structure=np.ones((3, 3)))
  if count == 0:
    return dist, []
  mass = ndimage.sum(dist, labels, index=np.arange(1, count + 1))
  order = np.argsort(-mass, kind="stable")
  return dist, [labels == (i + 1) for i in order]


def prepare(image, value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Any supported image -> float32 [CANVAS, CANVAS, 3] in [0, 1]."""
  return _resize(to_rgb(image, value_range), CANVAS)


def analyze(image, value_range: tuple[float, float] | None = None) -> Reading:
  """Full reading of a single-object image (see the module docstring)."""
  x = prepare(image, value_range)
  bg = _background(x)
  _, comps = _components(x, bg)
  if not comps:
    return Reading()
  return _read_component(x, bg, comps[0])


def read_image(image, value_range: tuple[float, float] | None = None
               ) -> dict[str, str | None]:
  """Attributes of the single object in an image.

  image: PIL image, or array HxWx3 (uint8 in [0, 255]; float in [0, 1], or
    [-1, 1] if it has negative values; see ``to_rgb``), of any size.
  Returns {"color", "shape", "size", "position"} as in ``shapes``; all None when
  no object is found. With several objects, the most salient one is read.
  """
  return analyze(image, value_range).attributes()


def read_objects(image, value_range: tuple[float, float] | None = None,
                 max_objects: int = 2) -> list[dict[str, str | None]]:
  """Attributes of up to ``max_objects`` separate objects.

  Ordered left to right, or top to bottom when they are stacked vertically
  (the order of ``shapes.PAIRS``). Empty list when no object is found. Objects
  must not touch (they are separated as connected components).
  """
  x = prepare(image, value_range)
  bg = _background(x)
  _, comps = _components(x, bg)
  comps = comps[:max_objects]
  readings = []
  for i, comp in enumerate(comps):
    others = np.zeros_like(comp)
    for j, c in enumerate(comps):
      if j != i:
        others |= c
    r = _read_component(x, bg, comp, exclude=others)
    if r.center is not None:
      readings.append(r)
  if len(readings) > 1:
    xs = [r.center[0] for r in readings]
    ys = [r.center[1] for r in readings]
    axis = 0 if np.ptp(xs) >= np.ptp(ys) else 1
    readings.sort(key=lambda r: r.center[axis])
  return [r.attributes() for r in readings]
