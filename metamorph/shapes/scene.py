"""Scenes of the shapes world: coloured geometric shapes on a plain background.

A scene is one or two ``Shape`` objects; ``render`` turns it into a small RGB image
and ``metamorph.shapes.oracle`` reads the attributes back, so understanding and
generation are both graded by exact checks.

Geometry (unit coordinates: x to the right, y downwards, the image is [0, 1]^2):
  * every shape fills a square bounding box of side ``2 * HALF_EXTENT[size]``
    centred on the object's centre (the triangle points up: apex at the top edge
    of the box, base on the bottom edge), so the apparent size does not depend on
    the shape;
  * the centre is the ``POSITION_ANCHORS`` point of its position, moved by a
    uniform jitter of at most ``JITTER[size]`` per axis when an rng is given, or
    the explicit ``Shape.center`` (e.g. for motion across frames).
With these constants a jittered object never leaves the image and never crosses
the mid-line of its axis, so left+right and top+bottom pairs never overlap, and
the position is always the nearest anchor of the centre (``nearest_position``).

Edges are anti-aliased by exact coverage (stratified supersampling, ``SUPERSAMPLE``
samples per pixel side), colours are composited linearly over the background, and
optional Gaussian pixel noise is added. All randomness comes from the caller's
``np.random.Generator``, so a seed fixes every pixel.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterable, Sequence

import numpy as np

# --- vocabulary -------------------------------------------------------------------

BACKGROUND: tuple[int, int, int] = (235, 235, 235)  # light grey
# Six hues whose directions away from the background are far apart (the ink
# colours of the RGB cube: at best cos 0.88 between two of them, blue and cyan),
# so a rule-based oracle separates them even on blurred, faded edges.
PALETTE: dict[str, tuple[int, int, int]] = {
  "red": (220, 40, 40),
  "green": (40, 170, 60),
  "blue": (40, 70, 220),
  "yellow": (240, 200, 20),
  "cyan": (20, 190, 215),
  "purple": (170, 40, 190),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
ATTRIBUTES: tuple[str, ...] = ("color", "shape", "size", "position")
VALUES: dict[str, tuple[str, ...]] = {  # attribute -> the values it takes
  "color": COLORS, "shape": SHAPES, "size": SIZES, "position": POSITIONS}

# Half the side of the bounding box, in units of the image side. Small is 9.6 px across at
# 32 px: smaller ones were drawn as blobs by the toy encoder and visualizer (docs/findings.md,
# section 9).
HALF_EXTENT: dict[str, float] = {"small": 0.15, "large": 0.20}
# Largest per-axis displacement of a jittered centre from its anchor.
JITTER: dict[str, float] = {"small": 0.06, "large": 0.03}
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
  "left": (0.25, 0.5),
  "right": (0.75, 0.5),
  "top": (0.5, 0.25),
  "bottom": (0.5, 0.75),
  "center": (0.5, 0.5),
}
# Position pairs of two-object scenes; they never overlap, whatever the sizes.
PAIRS: tuple[tuple[str, str], ...] = (("left", "right"), ("top", "bottom"))
CROSS_ARM = 1.0 / 3.0  # half-thickness of the cross's arms / its half extent

DEFAULT_SIZE = 32
DEFAULT_NOISE = 3.0 / 255.0  # std of the Gaussian pixel noise, in [0, 1] units
SUPERSAMPLE = 4  # coverage samples per pixel side (16 per pixel)
MIN_SIZE = 16


def _check(field: str, value: object, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"{field} {value!r} is not one of {tuple(allowed)}")


@dataclasses.dataclass(frozen=True)
class Shape:
  """One object of a scene.

  ``center`` (unit coordinates, x right and y down) overrides the anchor of
  ``position`` and disables jitter; it is meant for motion across frames. Keep
  ``position`` consistent with it (``move`` does), since that is what the oracle
  reads back.
  """
  color: str
  shape: str
  size: str
  position: str
  center: tuple[float, float] | None = None

  def __post_init__(self) -> None:
    for attribute in ATTRIBUTES:
      _check(attribute, getattr(self, attribute), VALUES[attribute])
    if self.center is not None:
      try:
        cx, cy = (float(v) for v in self.center)
      except (TypeError, ValueError):
        raise ValueError(f"center must be a pair of floats, got {self.center!r}") from None
      if not (0.0 <= cx <= 1.0 and 0.0 <= cy <= 1.0):
        raise ValueError(f"center must lie in [0, 1]^2, got {self.center!r}")
      object.__setattr__(self, "center", (cx, cy))

  def attributes(self) -> dict[str, str]:
    """The discrete attributes (``ATTRIBUTES``), as the oracle returns them."""
    return {k: getattr(self, k) for k in ATTRIBUTES}


def nearest_position(center: tuple[float, float]) -> str:
  """The position whose anchor is nearest (Euclidean) to a unit-coordinate point."""
  cx, cy = center
  return min(POSITIONS, key=lambda p: (POSITION_ANCHORS[p][0] - cx) ** 2
             + (POSITION_ANCHORS[p][1] - cy) ** 2)


def move(shape: Shape, center: tuple[float, float]) -> Shape:
  """``shape`` placed at ``center``, with ``position`` set to its nearest anchor."""
  return dataclasses.replace(shape, center=tuple(center),
                             position=nearest_position(center))


def place(shape: Shape, rng: np.random.Generator | None = None) -> Shape:
  """``shape`` with an explicit centre: its own, else the anchor (+ jitter if rng)."""
  if shape.center is not None:
    return shape
  cx, cy = POSITION_ANCHORS[shape.position]
  if rng is not None:
    j = JITTER[shape.size]
    dx, dy = rng.uniform(-j, j, size=2)
    cx, cy = cx + float(dx), cy + float(dy)
  return dataclasses.replace(shape, center=(cx, cy))


# --- geometry ---------------------------------------------------------------------


def inside(kind: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Point-in-shape test for offsets from the centre in units of the half extent.

  dx, dy: broadcastable float arrays -> bool array; every shape spans [-1, 1]^2.
  """
  if kind == "circle":
    return dx * dx + dy * dy <= 1.0
  if kind == "square":
    return (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
  if kind == "triangle":  # apex (0, -1), base from (-1, 1) to (1, 1)
    return (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2.0)
  if kind == "diamond":
    return np.abs(dx) + np.abs(dy) <= 1.0
  if kind == "cross":
    ax, ay = np.abs(dx), np.abs(dy)
    return ((ax <= 1.0) & (ay <= CROSS_ARM)) | ((ax <= CROSS_ARM) & (ay <= 1.0))
  raise ValueError(f"shape {kind!r} is not one of {SHAPES}")


def coverage(kind: str, center: tuple[float, float], half: float, size: int,
             supersample: int = SUPERSAMPLE) -> np.ndarray:
  """Fraction of each pixel covered by a shape -> float32 [size, size] in [0, 1].

  center and half (half extent) are in unit coordinates; pixel (i, j) covers
  [j, j + 1) x [i, i + 1) / size. Only the shape's bounding box is sampled.
  """
  out = np.zeros((size, size), np.float32)
  cx, cy = center[0] * size, center[1] * size
  hp = half * size  # half extent in pixels
  if hp <= 0:
    return out
  x0, x1 = max(int(math.floor(cx - hp)), 0), min(int(math.ceil(cx + hp)), size)
  y0, y1 = max(int(math.floor(cy - hp)), 0), min(int(math.ceil(cy + hp)), size)
  if x0 >= x1 or y0 >= y1:
    return out
  s = supersample
  sub = (np.arange(s, dtype=np.float64) + 0.5) / s  # stratified offsets in a pixel
  xs = ((np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1) - cx) / hp  # [W*s]
  ys = ((np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1) - cy) / hp  # [H*s]
  hit = inside(kind, xs[None, :], ys[:, None])  # [H*s, W*s]
  cov = hit.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))  # [H, W]
  out[y0:y1, x0:x1] = cov
  return out


def bbox(shape: Shape) -> tuple[float, float, float, float]:
  """(x0, y0, x1, y1) of a placed shape (explicit centre) in unit coordinates."""
  if shape.center is None:
    raise ValueError("bbox needs a placed shape (see `place`)")
  cx, cy = shape.center
  h = HALF_EXTENT[shape.size]
  return cx - h, cy - h, cx + h, cy + h


def _overlap(a: Shape, b: Shape) -> bool:
  ax0, ay0, ax1, ay1 = bbox(a)
  bx0, by0, bx1, by1 = bbox(b)
  return ax0 < bx1 and bx0 < ax1 and ay0 < by1 and by0 < ay1


# --- rendering --------------------------------------------------------------------


def render(objects: Shape | Sequence[Shape], size: int = DEFAULT_SIZE,
           noise: float = DEFAULT_NOISE, rng: np.random.Generator | None = None,
           *, jitter: bool = True) -> np.ndarray:
  """Draw a scene -> uint8 [size, size, 3].

  objects: one ``Shape`` or a sequence of them, drawn in order; their bounding
    boxes must not overlap (ValueError otherwise).
  rng: source of the position jitter (objects without an explicit ``center``,
    when ``jitter``) and of the pixel noise (std ``noise`` in [0, 1] units). With
    ``rng=None`` the image is the canonical one: anchors, no jitter, no noise.
  """
  objs = (objects,) if isinstance(objects, Shape) else tuple(objects)
  if not objs:
    raise ValueError("render needs at least one object")
  for o in objs:
    if not isinstance(o, Shape):
      raise ValueError(f"objects must be Shape instances, got {type(o).__name__}")
  if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
    raise ValueError(f"size must be an int >= {MIN_SIZE}, got {size!r}")
  if not noise >= 0.0:
    raise ValueError(f"noise must be >= 0, got {noise!r}")
  placed = [place(o, rng if jitter else None) for o in objs]
  for i, a in enumerate(placed):
    for b in placed[i + 1:]:
      if _overlap(a, b):
        raise ValueError(f"objects overlap: {a} and {b}")

  img = np.empty((size, size, 3), np.float32)
  img[:] = np.asarray(BACKGROUND, np.float32) / 255.0
  for o in placed:
    alpha = coverage(o.shape, o.center, HALF_EXTENT[o.size], size)[..., None]  # [S,S,1]
    color = np.asarray(PALETTE[o.color], np.float32) / 255.0  # [3]
    img = img * (1.0 - alpha) + color * alpha
  if rng is not None and noise > 0:
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
  return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


# --- sampling ---------------------------------------------------------------------


def pick(rng: np.random.Generator, items: Sequence):
  """A uniformly random item of ``items`` (one ``rng.integers`` draw)."""
  return items[int(rng.integers(len(items)))]


def sample_shape(rng: np.random.Generator,
                 holdout: Collection[tuple[str, str]] = (),
                 position: str | None = None) -> Shape:
  """A uniformly random shape whose (color, shape) pair is not in ``holdout``.

  position: fix the position instead of sampling it.
  """
  pairs = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in holdout]
  if not pairs:
    raise ValueError("holdout excludes every (color, shape) pair")
  if position is not None:
    _check("position", position, POSITIONS)
  color, kind = pick(rng, pairs)
  size = pick(rng, SIZES)
  if position is None:
    position = pick(rng, POSITIONS)
  return Shape(color, kind, size, position)


def sample_scene(rng: np.random.Generator, n_objects: int = 1,
                 holdout: Collection[tuple[str, str]] = ()) -> tuple[Shape, ...]:
  """One object anywhere, or two objects on a ``PAIRS`` axis (first = left/top)."""
  if n_objects == 1:
    return (sample_shape(rng, holdout),)
  if n_objects == 2:
    pair = pick(rng, PAIRS)
    return tuple(sample_shape(rng, holdout, position=p) for p in pair)
  raise ValueError(f"n_objects must be 1 or 2, got {n_objects!r}")


def scene_rng(seed: int, index: int) -> np.random.Generator:
  """Independent, reproducible generator for example ``index`` of a dataset."""
  return np.random.default_rng([seed, index])


# --- held-out pairs ---------------------------------------------------------------


def parse_pair(spec: str | Sequence[str]) -> tuple[str, str]:
  """"red:circle" (or ("red", "circle")) -> ("red", "circle"); ValueError naming the
  allowed colours and shapes otherwise."""
  parts = spec.split(":") if isinstance(spec, str) else list(spec)
  if len(parts) != 2:
    raise ValueError(f"holdout pair {spec!r} is not COLOR:SHAPE (e.g. red:circle)")
  color, kind = (p.strip().lower() for p in parts)
  if color not in COLORS:
    raise ValueError(f"holdout pair {spec!r}: colour {color!r} is not one of {', '.join(COLORS)}")
  if kind not in SHAPES:
    raise ValueError(f"holdout pair {spec!r}: shape {kind!r} is not one of {', '.join(SHAPES)}")
  return color, kind


def normalize_holdout(holdout: Iterable[str | Sequence[str]]) -> tuple[tuple[str, str], ...]:
  """Validated, de-duplicated, sorted (colour, shape) pairs; at least one pair stays seen."""
  pairs = tuple(sorted({parse_pair(p) for p in holdout}))
  if len(pairs) >= len(COLORS) * len(SHAPES):
    raise ValueError("the holdout excludes every (colour, shape) pair")
  return pairs
