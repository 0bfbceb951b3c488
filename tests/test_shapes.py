"""The shapes world: rendering, placement, sampling, validation."""
import math

import numpy as np
import pytest

from metamorph.shapes import scene
from metamorph.shapes.scene import Shape


def _bg_mask(img: np.ndarray) -> np.ndarray:
  return (img == np.asarray(scene.BACKGROUND, np.uint8)).all(-1)


def test_vocabulary():
  assert len(scene.COLORS) >= 6 and len(scene.SHAPES) >= 4
  assert set(scene.POSITIONS) == set(scene.POSITION_ANCHORS)
  assert set(scene.SIZES) == set(scene.HALF_EXTENT) == set(scene.JITTER)
  assert scene.BACKGROUND not in scene.PALETTE.values()


def test_render_is_deterministic_for_a_seed():
  def draw(seed):
    rng = np.random.default_rng(seed)
    return scene.render(scene.sample_scene(rng), rng=rng)
  np.testing.assert_array_equal(draw(3), draw(3))
  assert not np.array_equal(draw(3), draw(4))
  rng_a, rng_b = scene.scene_rng(7, 11), scene.scene_rng(7, 11)
  assert scene.sample_scene(rng_a, 2) == scene.sample_scene(rng_b, 2)


@pytest.mark.parametrize("size", [32, 64, 96])
def test_render_shape_dtype_and_extent(size):
  s = Shape("red", "square", "large", "center")
  img = scene.render(s, size=size, rng=np.random.default_rng(0))
  assert img.shape == (size, size, 3) and img.dtype == np.uint8
  clean = scene.render(s, size=size)  # canonical: anchor, no noise
  obj = ~_bg_mask(clean)
  side = 2 * scene.HALF_EXTENT["large"] * size
  assert abs(obj.sum() - side**2) <= 4 * side + 4  # edge pixels are partly covered
  assert (clean[size // 2, size // 2] == scene.PALETTE["red"]).all()


def test_canonical_render_has_no_noise_and_is_antialiased():
  img = scene.render(Shape("blue", "circle", "large", "left"), size=32)
  bg = _bg_mask(img)
  full = (img == np.asarray(scene.PALETTE["blue"], np.uint8)).all(-1)
  assert bg.sum() > 32 * 32 // 2 and full.sum() > 50
  partial = ~bg & ~full  # anti-aliased edge pixels
  assert partial.sum() >= 10
  noisy = scene.render(Shape("blue", "circle", "large", "left"), size=32,
                        rng=np.random.default_rng(0), jitter=False)
  assert 0 < np.abs(noisy.astype(int) - img).mean() < 6


@pytest.mark.parametrize("kind", scene.SHAPES)
def test_coverage_area_matches_geometry(kind):
  half, n = 0.3, 64
  expected_fill = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5,
                   "diamond": 0.5, "cross": 5 / 9}[kind]
  area = scene.coverage(kind, (0.5, 0.5), half, n).sum() / n**2
  assert area == pytest.approx(expected_fill * (2 * half) ** 2, rel=0.02)


def test_jitter_keeps_objects_inside_their_region():
  rng = np.random.default_rng(0)
  for _ in range(500):
    s = scene.place(scene.sample_shape(rng), rng)
    x0, y0, x1, y1 = scene.bbox(s)
    assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
    assert scene.nearest_position(s.center) == s.position
    ax, ay = scene.POSITION_ANCHORS[s.position]
    j = scene.JITTER[s.size]
    assert abs(s.center[0] - ax) <= j and abs(s.center[1] - ay) <= j


def test_two_object_scenes():
  rng = np.random.default_rng(1)
  for _ in range(200):
    objs = scene.sample_scene(rng, n_objects=2)
    assert tuple(o.position for o in objs) in scene.PAIRS
    img = scene.render(objs, size=32, rng=rng)  # raises if they overlap
    assert img.shape == (32, 32, 3)
  left = Shape("red", "circle", "large", "left")
  right = Shape("green", "square", "large", "right")
  img = scene.render([left, right], size=64)
  assert (img[32, 16] == scene.PALETTE["red"]).all()
  assert (img[32, 48] == scene.PALETTE["green"]).all()
  with pytest.raises(ValueError, match="overlap"):
    scene.render([left, Shape("blue", "circle", "large", "center")])


def test_explicit_center_and_move():
  s = scene.move(Shape("cyan", "diamond", "small", "left"), (0.7, 0.52))
  assert s.position == "right" and s.center == (0.7, 0.52)
  a = scene.render(s, size=32, rng=np.random.default_rng(0))
  b = scene.render(s, size=32, rng=np.random.default_rng(1))
  # same placement (no jitter with an explicit centre), different noise
  assert np.abs(a.astype(int) - b).max() < 40
  assert (_bg_mask(scene.render(s, size=32))[:, :16]).all()


def test_validation_errors():
  with pytest.raises(ValueError, match="color 'pink' is not one of"):
    Shape("pink", "circle", "small", "left")
  with pytest.raises(ValueError, match="shape 'hexagon'.*circle"):
    Shape("red", "hexagon", "small", "left")
  with pytest.raises(ValueError, match="size 'medium'"):
    Shape("red", "circle", "medium", "left")
  with pytest.raises(ValueError, match="position 'middle'"):
    Shape("red", "circle", "small", "middle")
  with pytest.raises(ValueError, match="center"):
    Shape("red", "circle", "small", "left", center=(1.5, 0.5))
  with pytest.raises(ValueError, match="center"):
    Shape("red", "circle", "small", "left", center="xy")
  s = Shape("red", "circle", "small", "left")
  with pytest.raises(ValueError, match="size"):
    scene.render(s, size=8)
  with pytest.raises(ValueError, match="noise"):
    scene.render(s, noise=-0.1)
  with pytest.raises(ValueError, match="at least one"):
    scene.render([])
  with pytest.raises(ValueError, match="n_objects"):
    scene.sample_scene(np.random.default_rng(0), n_objects=3)


def test_sampling_respects_holdout():
  holdout = {("red", "circle"), ("blue", "square"), ("yellow", "triangle")}
  rng = np.random.default_rng(0)
  seen = {(s.color, s.shape) for s in (scene.sample_shape(rng, holdout) for _ in range(2000))}
  assert not seen & holdout
  assert len(seen) == len(scene.COLORS) * len(scene.SHAPES) - len(holdout)
  everything = {(c, k) for c in scene.COLORS for k in scene.SHAPES}
  with pytest.raises(ValueError, match="holdout"):
    scene.sample_shape(rng, everything)
