"""The shared building blocks (metamorph.layers) on their own: grouped-query attention, the
KV-cached path and cross-attention agree with plain multi-head attention."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.layers.attention import VIT_NAMES, Attention, KVSlots, dot_product_attention
from metamorph.layers.mlp import GatedMlp, Mlp
from metamorph.params import module_params

B, T, H, KVH, DH = 2, 5, 4, 2, 8


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_grouped_kv_heads_equal_repeated_kv_heads():
  q, k, v = _normal(0, (B, T, H, DH)), _normal(1, (B, 7, KVH, DH)), _normal(2, (B, 7, KVH, DH))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (B, T, 7)).at[..., 0].set(True)
  grouped = dot_product_attention(q, k, v, mask)
  repeated = dot_product_attention(q, jnp.repeat(k, H // KVH, 2), jnp.repeat(v, H // KVH, 2), mask)
  np.testing.assert_allclose(np.asarray(grouped), np.asarray(repeated), rtol=1e-5, atol=1e-6)
  assert np.allclose(np.asarray(dot_product_attention(q, k, v)), np.asarray(
      dot_product_attention(q, k, v, jnp.ones((T, 7), bool))), atol=0)


def test_cached_steps_equal_one_causal_pass():
  attn = Attention(16, H, DH, num_kv_heads=KVH, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  x = _normal(4, (B, T, 16))
  causal = jnp.tril(jnp.ones((T, T), bool))
  whole = attn(x, mask=causal)
  cache = KVSlots(jnp.zeros((B, 8, KVH, DH)), jnp.zeros((B, 8, KVH, DH)), jnp.int32(0))
  outs = []
  for start, stop in ((0, 3), (3, 5)):
    slots = jnp.arange(8)
    mask = slots[None, :] <= (start + jnp.arange(stop - start))[:, None]  # [t, S]
    out, cache = attn.extend(x[:, start:stop], cache, mask)
    outs.append(out)
  assert int(cache.index) == T
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1)), np.asarray(whole), rtol=1e-5, atol=1e-6)


def test_cross_attention_names_and_widths():
  attn = Attention(16, 2, 4, kv_width=12, names=VIT_NAMES, dtype="float32", param_dtype="float32",
                   rngs=nnx.Rngs(0))
  shapes = {k: v.shape for k, v in module_params(attn).items()}
  assert shapes == {"query/kernel": (16, 2, 4), "query/bias": (2, 4), "key/kernel": (12, 2, 4),
                    "key/bias": (2, 4), "value/kernel": (12, 2, 4), "value/bias": (2, 4),
                    "out/kernel": (2, 4, 16), "out/bias": (16,)}
  assert attn(_normal(5, (B, 3, 16)), _normal(6, (B, 9, 12))).shape == (B, 3, 16)


def test_mlps():
  mlp = Mlp(6, 10, 4, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  x = _normal(7, (3, 6))
  want = jax.nn.gelu(x @ mlp.fc1.kernel[...] + mlp.fc1.bias[...], approximate=False) @ mlp.fc2.kernel[...]
  np.testing.assert_allclose(np.asarray(mlp(x)), np.asarray(want + mlp.fc2.bias[...]), rtol=1e-5, atol=1e-6)
  gated = GatedMlp(6, 10, dtype="float32", param_dtype="float32", rngs=nnx.Rngs(0))
  assert sorted(module_params(gated)) == ["down_proj/kernel", "gate_proj/kernel", "up_proj/kernel"]
  assert gated(_normal(8, (2, 3, 6))).shape == (2, 3, 6)
