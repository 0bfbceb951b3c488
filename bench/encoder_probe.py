"""How readable the shapes-world attributes are from a SigLIP encoder's visual tokens.

  python -m bench.encoder_probe --siglip runs/demo/siglip [--m 16] [--train 4000]
                                [--test 1000] [--steps 3000]

Renders fresh one-object images (seeds 0-7 for training, 999 for testing; never in
any training split), encodes them into m visual tokens (``visual_tokens``), and fits two
probes on the flattened tokens [m * Dv] with Adam (lr 1e-3, batch 64): a linear one
and an MLP (one hidden layer of 256, GELU). Prints the test accuracy of each
attribute. The linear probe says how directly an attribute is written in the tokens;
it predicts what the small LLM learns to read in a few hundred VPiT steps
(docs/findings.md, section 4). Chance: colour 17%, shape 20%, size 50%, position 20%.
"""
from __future__ import annotations

import argparse
import itertools

import numpy as np

from metamorph.shapes import scene
from metamorph.shapes.scene import ATTRIBUTES


def dataset(encode, n: int, seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [n, m, Dv], labels [n, 4]) of n fresh one-object images."""
  rng = np.random.default_rng(seed)
  scenes = [scene.sample_shape(rng) for _ in range(n)]
  images = np.stack([scene.render(s, size=size, rng=rng) for s in scenes]).astype(np.float32) / 127.5 - 1
  labels = np.array([[scene.VALUES[a].index(getattr(s, a)) for a in ATTRIBUTES] for s in scenes], np.int32)
  tokens = np.concatenate([np.asarray(encode(images[i:i + 250])) for i in range(0, n, 250)])
  return tokens, labels


def probe(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, classes: list[int],
          hidden: int, steps: int) -> list[float]:
  """Test accuracy per attribute of a probe (linear when hidden == 0) on flattened tokens."""
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  class Probe(nnx.Module):
    def __init__(self, d: int, rngs: nnx.Rngs):
      self.hidden = nnx.Linear(d, hidden, rngs=rngs) if hidden else None
      self.out = nnx.Linear(hidden or d, sum(classes), rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:  # [B, m, Dv] -> [B, sum(classes)]
      h = t.reshape(t.shape[0], -1)
      return self.out(jax.nn.gelu(self.hidden(h)) if self.hidden else h)

  graphdef, params = nnx.split(Probe(x.shape[1] * x.shape[2], nnx.Rngs(0)), nnx.Param)
  bounds = np.cumsum([0, *classes])
  tx = optax.adam(1e-3)

  def loss(p, xb, yb):
    z = nnx.merge(graphdef, p)(xb)
    return sum(optax.softmax_cross_entropy_with_integer_labels(z[:, a:b], yb[:, i]).mean()
               for i, (a, b) in enumerate(itertools.pairwise(bounds)))

  @jax.jit
  def step(p, opt, xb, yb):
    grads = jax.grad(loss)(p, xb, yb)
    updates, opt = tx.update(grads, opt)
    return optax.apply_updates(p, updates), opt

  opt, rng = tx.init(params), np.random.default_rng(0)
  for _ in range(steps):
    idx = rng.integers(0, len(x), 64)
    params, opt = step(params, opt, x[idx], y[idx])
  z = np.asarray(nnx.merge(graphdef, params)(jnp.asarray(x_test)))
  return [float((z[:, a:b].argmax(-1) == y_test[:, i]).mean())
          for i, (a, b) in enumerate(itertools.pairwise(bounds))]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--siglip", required=True, help="a siglip run's workdir or a SigLIP folder")
  parser.add_argument("--m", type=int, default=16, help="visual tokens per image (default 16)")
  parser.add_argument("--train", type=int, default=4000, help="training images (default 4000)")
  parser.add_argument("--test", type=int, default=1000, help="test images (default 1000)")
  parser.add_argument("--steps", type=int, default=3000, help="probe steps (default 3000)")
  args = parser.parse_args()

  import jax
  from flax import nnx

  from metamorph.convert.siglip import load_siglip
  from metamorph.model_folder import exported
  from metamorph.models.siglip import visual_tokens
  tower = load_siglip(exported(args.siglip), tower="vision")
  graphdef, state = nnx.split(tower)
  encode = jax.jit(lambda images: visual_tokens(nnx.merge(graphdef, state), images, args.m))
  size = tower.config.image_size
  parts = [dataset(encode, args.train // 8, seed, size) for seed in range(8)]
  x, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
  x_test, y_test = dataset(encode, args.test, 999, size)
  classes = [len(scene.VALUES[a]) for a in ATTRIBUTES]
  print(f"{args.siglip}: {len(x)} training / {len(x_test)} test images, tokens {x.shape[1:]}")
  print("| probe | " + " | ".join(ATTRIBUTES) + " |\n|---|" + "---|" * len(ATTRIBUTES))
  for name, hidden in (("linear", 0), ("MLP 256", 256)):
    acc = probe(x, y, x_test, y_test, classes, hidden, args.steps)
    print(f"| {name} | " + " | ".join(f"{a:.1%}" for a in acc) + " |")


if __name__ == "__main__":
  main()
