"""LLaMA-family decoder: parity with transformers, KV cache, export, our checkpoints."""
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoModelForCausalLM

from metamorph.convert import load_llm
from metamorph.convert import llama as llama_convert
from metamorph.generation.prompts import left_pad
from metamorph.models.llama import Llama, LlamaConfig
from tests.llama_fixtures import CONFIGS, VOCAB, hf_logits, our_logits, save_hf_llama

TOL = 1e-4  # max abs logit difference, float32


def _ids(batch=2, length=19, seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, length))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
  folder = str(tmp_path_factory.mktemp(request.param))
  hf = save_hf_llama(folder, request.param)
  llm, tokenizer = load_llm(folder)
  return folder, hf, llm


def test_config_read_from_hf(hf_pair):
  _, hf, llm = hf_pair
  c, ref = llm.config, hf.config
  assert (c.num_heads, c.num_kv_heads, c.head_dim) == (
      ref.num_attention_heads, ref.num_key_value_heads, ref.head_dim)
  assert c.tie_word_embeddings == ref.tie_word_embeddings
  assert c.attention_bias == ref.attention_bias and c.mlp_bias == ref.mlp_bias
  assert c.initializer_range == ref.initializer_range


@pytest.mark.parametrize("std", [0.02, 0.06])
def test_initializer_range_is_the_std_of_every_kernel_and_the_embedding(std):
  config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=1, num_heads=4,
                       num_kv_heads=2, head_dim=32, initializer_range=std)
  params = nnx.to_flat_state(nnx.state(Llama(config, rngs=nnx.Rngs(0)), nnx.Param))
  weights = {path: np.asarray(x[...]) for path, x in params if "norm" not in "/".join(map(str, path))}
  assert len(weights) == 9  # embedding, q, k, v, o, gate, up, down, lm_head
  for path, w in weights.items():  # >= 8192 draws: a standard error of the std <= 0.8%
    assert abs(w.std() / std - 1) < 0.04, (path, w.std())
  with pytest.raises(ValueError, match="initializer_range must be positive, got -0.02"):
    config.replace(initializer_range=-0.02)


def test_logits_match_transformers(hf_pair):
  _, hf, llm = hf_pair
  ids = _ids()
  np.testing.assert_allclose(our_logits(llm, ids), hf_logits(hf, ids), atol=TOL, rtol=0)


def test_left_padded_batch_matches_transformers(hf_pair):
  """Segment ids 0 on the padding == transformers' attention_mask + position_ids."""
  _, hf, llm = hf_pair
  prompts = [list(range(3, 15)), list(range(20, 25)), [7]]
  ids, segments, positions = left_pad(prompts, pad_id=0)
  ours = our_logits(llm, ids, positions, segments)
  ref = hf_logits(hf, ids, attention_mask=segments, position_ids=positions)
  valid = segments.astype(bool)
  np.testing.assert_allclose(ours[valid], ref[valid], atol=TOL, rtol=0)


def test_packed_segments_equal_separate_sequences(hf_pair):
  """Two records packed in one row give the logits each gets alone."""
  _, _, llm = hf_pair
  a, b = _ids(1, 7, seed=2)[0], _ids(1, 9, seed=3)[0]
  packed = np.concatenate([a, b])[None]
  segments = np.array([[1] * 7 + [2] * 9])
  positions = np.array([list(range(7)) + list(range(9))])
  ours = our_logits(llm, packed, positions, segments)[0]
  np.testing.assert_allclose(ours[:7], our_logits(llm, a[None])[0], atol=1e-5, rtol=0)
  np.testing.assert_allclose(ours[7:], our_logits(llm, b[None])[0], atol=1e-5, rtol=0)


def test_kv_cache_prefill_then_steps_equals_full_forward(hf_pair):
  _, _, llm = hf_pair
  prompts = [list(range(3, 12)), list(range(30, 34))]
  ids, segments, positions = left_pad(prompts, pad_id=0)
  steps = _ids(2, 5, seed=4)
  full_ids = np.concatenate([ids, steps], 1)
  full_seg = np.concatenate([segments, np.ones_like(steps)], 1)
  full_pos = np.concatenate([positions, positions[:, -1:] + 1 + np.arange(5)], 1)
  full = our_logits(llm, full_ids, full_pos, full_seg)

  cache = llm.init_cache(2, full_ids.shape[1] + 3)
  hidden, cache = llm.forward(llm.embed(jnp.asarray(ids)), positions=jnp.asarray(positions),
                              segment_ids=jnp.asarray(segments), cache=cache)
  got = [np.asarray(llm.logits(hidden))]
  for i in range(steps.shape[1]):
    hidden, cache = llm.forward(llm.embed(jnp.asarray(steps[:, i:i + 1])),
                                positions=jnp.asarray(full_pos[:, ids.shape[1] + i:][:, :1]), cache=cache)
    got.append(np.asarray(llm.logits(hidden)))
  got = np.concatenate(got, 1)
  valid = full_seg.astype(bool)
  np.testing.assert_allclose(got[valid], full[valid], atol=1e-5, rtol=0)
  assert int(cache.index) == full_ids.shape[1]


def test_export_round_trip_loads_in_transformers(hf_pair, tmp_path):
  _, _, llm = hf_pair
  llama_convert.export_hf(llm, None, str(tmp_path))
  reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
  ids = _ids(seed=5)
  np.testing.assert_allclose(hf_logits(reloaded, ids), our_logits(llm, ids), atol=TOL, rtol=0)


def test_converted_checkpoint_round_trip_is_exact(hf_pair, tmp_path):
  folder, _, llm = hf_pair
  llama_convert.save_llm(llm, None, str(tmp_path))
  again, _ = load_llm(str(tmp_path))
  assert again.config == llm.config
  a, b = nnx.state(llm, nnx.Param), nnx.state(again, nnx.Param)
  for (path, x), (_, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
    np.testing.assert_array_equal(np.asarray(x[...]), np.asarray(y[...]), err_msg=str(path))


def test_dtype_override_gives_bf16_compute_f32_params(hf_pair):
  folder, _, ref = hf_pair
  llm, _ = load_llm(folder, dtype="bfloat16")
  assert llm.embed_tokens.embedding[...].dtype == jnp.float32
  ids = _ids(seed=6)
  got, want = our_logits(llm, ids), our_logits(ref, ids)
  assert got.dtype == np.float32
  # bf16 matmuls: close to f32, but not equal
  assert 0 < np.abs(got - want).max() < 0.1 * np.abs(want).max()
