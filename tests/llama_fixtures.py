"""Tiny random transformers LLaMA models saved to disk, the reference for parity tests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

VOCAB = 97

CONFIGS = {
    "gqa": dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                initializer_range=0.05),
    "llama3_tied": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1,
                        tie_word_embeddings=True, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=16)),
    "odd_heads": dict(hidden_size=30, intermediate_size=50, num_attention_heads=3, num_key_value_heads=3,
                      head_dim=14, attention_bias=True, mlp_bias=True,
                      rope_scaling=dict(rope_type="linear", factor=2.0)),
}


def save_hf_llama(folder: str, name: str, seed: int = 0):
  """Saves a random ``LlamaForCausalLM`` of CONFIGS[name] to ``folder``; returns it."""
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM
  torch.manual_seed(seed)
  config = LlamaConfig(vocab_size=VOCAB, num_hidden_layers=2, max_position_embeddings=64,
                       rms_norm_eps=1e-5, **CONFIGS[name])
  model = LlamaForCausalLM(config).eval()
  with torch.no_grad():
    for p in model.parameters():  # well away from the init's tiny values, norms included
      p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if p.ndim == 1 else 0.0))
  model.save_pretrained(folder)
  return model


def hf_logits(model, ids: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
  import torch
  kwargs = {}
  if attention_mask is not None:
    kwargs = dict(attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(position_ids))
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long), **kwargs).logits.float().numpy()


@jax.jit
def _forward(graph_state, ids, positions, segments):
  return nnx.merge(*graph_state)(ids, positions=positions, segment_ids=segments)


def our_logits(llm, ids, positions=None, segments=None) -> np.ndarray:
  ids = jnp.asarray(ids, jnp.int32)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    segments = jnp.ones_like(ids)
  return np.asarray(_forward(nnx.split(llm), ids, jnp.asarray(positions), jnp.asarray(segments)))
