"""How well a trained visualizer reconstructs shapes-world images, graded by the oracle.

  python -m bench.visualizer --model runs/demo/visualizer [--n 200] [--steps 25]
                             [--guidance 1.0] [--sampler ddim] [--holdout red:circle ...]

Renders ``--n`` fresh images (seed 12345, never in any training split): half of them
with the held-out colour-shape pairs when ``--holdout`` is given. Each is encoded by
the run's frozen SigLIP tower and drawn again by the visualizer (``reconstruct``);
the oracle reads both. Prints the accuracy of colour, shape, position and all three
(reconstruction vs the rendered truth) and the sampling time per image at the batch size.
Guidance defaults to 1 (the plain conditional prediction): guidance 3 redraws these
reconstructions worse on the toy preset (docs/findings.md, section 3).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from metamorph.shapes import scene
from metamorph.shapes.oracle import read_image

ATTRIBUTES = ("color", "shape", "position")


def scenes(n: int, size: int, holdout: list[tuple[str, str]]):
  """n (image uint8 [S, S, 3], truth) pairs; half held-out pairs when ``holdout``."""
  rng = np.random.default_rng(12345)
  out = []
  for i in range(n):
    shape = scene.sample_shape(rng)
    if holdout and i % 2:
      color, kind = holdout[(i // 2) % len(holdout)]
      shape = scene.Shape(color, kind, shape.size, shape.position)
    out.append((scene.render(shape, size=size, rng=rng), shape.attributes()))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", required=True, help="a visualizer run's workdir or its model/ folder")
  parser.add_argument("--n", type=int, default=200)
  parser.add_argument("--batch", type=int, default=50)
  parser.add_argument("--steps", type=int, default=25)
  parser.add_argument("--guidance", type=float, default=1.0)
  parser.add_argument("--sampler", default="ddim")
  parser.add_argument("--holdout", nargs="*", default=["red:circle"], metavar="COLOR:SHAPE")
  args = parser.parse_args()

  from metamorph.models.visualizer import reconstruct
  from metamorph.api.loading import load_visualizer_model
  model = load_visualizer_model(args.model)
  holdout = [tuple(p.split(":")) for p in args.holdout]
  data = scenes(args.n, model.config.visualizer.image_size, holdout)
  images = np.stack([image for image, _ in data])
  kwargs = dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler)
  reconstruct(model.visualizer, model.vision, images[:args.batch], **kwargs)  # compile
  start = time.perf_counter()
  rebuilt = np.concatenate([reconstruct(model.visualizer, model.vision, images[i:i + args.batch], seed=i, **kwargs)
                            for i in range(0, len(images), args.batch)])
  per_image = (time.perf_counter() - start) / len(images)
  correct = {a: 0 for a in (*ATTRIBUTES, "all")}
  for (_, truth), image in zip(data, rebuilt):
    read = read_image(image)
    hits = [read[a] == truth[a] for a in ATTRIBUTES]
    for a, hit in zip(ATTRIBUTES, hits):
      correct[a] += hit
    correct["all"] += all(hits)
  print(f"visualizer {args.model}: {len(data)} images ({'half held-out ' + str(args.holdout) if holdout else 'seen'}), "
        f"{args.sampler} {args.steps} steps, guidance {args.guidance}")
  for name, hits in correct.items():
    print(f"  {name:9s} {hits / len(data):6.1%}")
  print(f"  sampling: {per_image * 1e3:.1f} ms per image (batch {args.batch})")


if __name__ == "__main__":
  main()
