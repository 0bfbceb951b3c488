"""layers.target_logits: the LM head run on target positions only equals the full cross-entropy
(value and gradients, f32), skips the chunks no row needs, and never skips a target."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metamorph.layers.target_logits import target_nll

B, T, H, V = 3, 19, 8, 11  # T not a multiple of the chunk: the last chunk is padded


def _inputs(seed: int = 0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(H, V)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, V, size=(B, T)), jnp.int32)
  mask = np.zeros((B, T), bool)
  mask[0, [2, 3, 9, 17]] = True      # scattered targets
  mask[1] = True                     # every position a target
  # row 2: none
  labels = jnp.where(jnp.asarray(mask), labels, -100)  # ignored labels may be anything
  return hidden, head, labels, jnp.asarray(mask)


def _full(hidden, head, labels, mask):
  logp = jax.nn.log_softmax(hidden @ head, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.maximum(labels, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(mask, nll, 0.0).sum()


@pytest.mark.parametrize("chunk", [0, 1, 4, 64])
def test_equals_the_full_cross_entropy_and_its_gradients(chunk):
  hidden, head, labels, mask = _inputs()
  ours = jax.jit(jax.value_and_grad(lambda h, w: target_nll(lambda x: x @ w, h, labels, mask, chunk), (0, 1)))
  want = jax.value_and_grad(lambda h, w: _full(h, w, labels, mask), (0, 1))
  (value, grads), (value_want, grads_want) = ours(hidden, head), want(hidden, head)
  np.testing.assert_allclose(float(value), float(value_want), rtol=1e-6)
  for got, expected in zip(grads, grads_want):
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)
  # a position without a target gets no gradient
  d_hidden = np.abs(np.asarray(grads[0])).sum(-1)
  np.testing.assert_array_equal(d_hidden > 0, np.asarray(mask))


def test_the_head_runs_only_on_the_chunks_a_row_needs():
  """Rows with at most 5 targets in chunks of 4: 2 of the 5 chunks run, forward and backward."""
  hidden, head, labels, _ = _inputs()
  mask = np.zeros((B, T), bool)
  mask[0, [1, 7, 8, 15, 18]] = True
  mask[1, [4]] = True
  calls = []

  def head_fn(x):
    jax.debug.callback(lambda: calls.append(1))
    return x @ head

  grad = jax.jit(jax.grad(lambda h: target_nll(head_fn, h, labels, jnp.asarray(mask), 4)))
  jax.block_until_ready(grad(hidden))
  assert len(calls) == 2 * 2, len(calls)  # 2 chunks, each run forward and again in the backward pass
  calls.clear()
  jax.block_until_ready(grad(hidden))
  assert len(calls) == 4


def test_no_target_is_zero():
  hidden, head, labels, _ = _inputs()
  assert float(target_nll(lambda x: x @ head, hidden, labels, jnp.zeros((B, T), bool), 4)) == 0.0
