"""SmolLM2-135M-Instruct from its Q4_1 GGUF file against transformers reading the same file."""
import numpy as np
import torch

from metamorph.generation.engine import greedy_generate
from tests.llama_fixtures import our_logits

POEM = [{"role": "user", "content": "Write a short poem about the sea."}]


def _prompt(tokenizer, messages):
  return tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]


def test_config_from_gguf_metadata(smollm2):
  c = smollm2[0].config
  assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
  assert c.tie_word_embeddings and c.vocab_size == 49152 and c.rope_theta == 100000.0


def test_chatml_template_comes_from_the_gguf(smollm2):
  _, tokenizer, _ = smollm2
  text = tokenizer.apply_chat_template(POEM, tokenize=False, add_generation_prompt=True)
  assert text.endswith("<|im_start|>user\nWrite a short poem about the sea.<|im_end|>\n<|im_start|>assistant\n")


def test_logits_match_transformers(smollm2, smollm2_hf):
  llm, tokenizer, _ = smollm2
  ids = np.array([_prompt(tokenizer, POEM)])
  with torch.no_grad():
    ref = smollm2_hf(torch.tensor(ids)).logits.numpy()
  ours = our_logits(llm, ids)
  # Real weights: logits reach ~30 and 30 layers accumulate f32 rounding (measured 1.3e-4).
  np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_greedy_32_tokens_equal_transformers(smollm2, smollm2_hf):
  llm, tokenizer, _ = smollm2
  prompt = _prompt(tokenizer, POEM)
  with torch.no_grad():
    ref = smollm2_hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, min_new_tokens=32, do_sample=False)
  ref = ref[0, len(prompt):].tolist()
  [ours] = greedy_generate(llm, [prompt], max_new_tokens=32, eos_ids=[tokenizer.eos_token_id])
  assert len(ref) == 32
  assert ours == ref, (tokenizer.decode(ours), tokenizer.decode(ref))


def test_capital_of_france_is_paris(smollm2):
  llm, tokenizer, _ = smollm2
  prompt = _prompt(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
  [answer] = greedy_generate(llm, [prompt], max_new_tokens=24, eos_ids=[tokenizer.eos_token_id])
  assert "Paris" in tokenizer.decode(answer, skip_special_tokens=True)


def test_batched_greedy_equals_one_by_one(smollm2):
  """Left padding must not change any sequence's greedy tokens."""
  llm, tokenizer, _ = smollm2
  prompts = [_prompt(tokenizer, [{"role": "user", "content": q}])
             for q in ("What is 2+2?", "Name a colour of the sky on a clear day, in one word.")]
  batched = greedy_generate(llm, prompts, max_new_tokens=12, eos_ids=[tokenizer.eos_token_id])
  single = [greedy_generate(llm, [p], max_new_tokens=12, eos_ids=[tokenizer.eos_token_id])[0] for p in prompts]
  assert batched == single
