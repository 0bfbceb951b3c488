"""The generation engine on tiny random models: the cached, batched, jitted loop equals the
naive reference loop (full forward every step), text and visual steps; sampling filters;
seeds; one compilation per bucketed shape; sampled-token frequencies against softmax(logits / T)
(chi-square tests); the repetition penalty against transformers' logits processor."""
import jax
import numpy as np
import pytest
import scipy.stats
import torch
from flax import nnx
from transformers import RepetitionPenaltyLogitsProcessor

from metamorph.generation import engine as E
from metamorph.generation.engine import VISUAL_SLOT, Decoded, Engine
from metamorph.generation.prompts import Prompt, PromptTooLong
from metamorph.generation.sampling import SamplingParams, apply_repetition_penalty, choose_text, filter_logits
from metamorph.models.llama import Llama, LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from tests.reference_decoder import reference_generate

V, M, DV = 32, 4, 8           # vocabulary, visual tokens per image, their width
START, END, EOS = 30, 31, 2   # <image_start>, <image_end>, the stop token
SAMPLED = SamplingParams(temperature=1.0, top_k=24, top_p=0.95, repetition_penalty=1.3, max_images=2)


def _llm_config(**changes) -> LlamaConfig:
  return LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                     num_kv_heads=2, head_dim=8, max_position_embeddings=128, **changes)


@pytest.fixture(scope="module")
def model() -> MetaMorph:
  config = MetaMorphConfig(llm=_llm_config(), vision_dim=DV, num_visual_tokens=M, image_start_id=START,
                           image_end_id=END)
  return MetaMorph(config, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def engine(model) -> Engine:
  return Engine(model, eos_ids=[EOS])


def _prompt(rng, text: int, images: int = 0, end_with_start: bool = False) -> Prompt:
  """``images`` prompt images (<image_start>, m slots, <image_end>) then ``text`` random tokens."""
  ids, vidx = [], []
  for i in range(images):
    ids += [START] + [0] * M + [END]
    vidx += [-1] + list(range(i * M, (i + 1) * M)) + [-1]
  ids += list(rng.integers(3, 30, text)) + ([START] if end_with_start else [])
  vidx += [-1] * (len(ids) - len(vidx))
  tokens = rng.normal(size=(images, M, DV)).astype(np.float32)
  tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
  return Prompt(np.array(ids, np.int32), np.array(vidx, np.int32), tokens if images else None)


def _prompts() -> list[Prompt]:
  rng = np.random.default_rng(0)
  return [_prompt(rng, 6), _prompt(rng, 11, 1), _prompt(rng, 4), _prompt(rng, 20, 2), _prompt(rng, 9),
          _prompt(rng, 14)]


def _assert_same(ours: Decoded, ref: Decoded) -> None:
  np.testing.assert_array_equal(ours.ids, ref.ids)
  assert ours.visual_tokens.shape == ref.visual_tokens.shape
  np.testing.assert_allclose(ours.visual_tokens, ref.visual_tokens, atol=1e-5, rtol=0)
  assert ours.finish_reason == ref.finish_reason


def _check_structure(d: Decoded, max_images: int) -> None:
  """Each image is <image_start>, m visual steps, <image_end>; unit-norm visual tokens."""
  ids = d.ids.tolist()
  starts = [i for i, t in enumerate(ids) if t == START]
  assert len(starts) == len(d.visual_tokens) <= max_images
  for s in starts:
    assert ids[s + 1:s + M + 1] == [VISUAL_SLOT] * M and ids[s + M + 1] == END
  assert ids.count(VISUAL_SLOT) == M * len(starts) and ids.count(END) == len(starts)
  np.testing.assert_allclose(np.linalg.norm(d.visual_tokens, axis=-1), 1.0, atol=1e-5)
  assert (d.finish_reason == "stop") == (ids[-1] == EOS)


def test_cached_batched_engine_equals_the_naive_reference(model, engine):
  """Sampled decoding of a batch mixing text-only answers and answers with sampled
  <image_start>s (some prompts carry images): the same tokens and visual tokens as
  re-running the full forward at every step, one sequence at a time."""
  prompts = _prompts()
  out = engine.generate(prompts, max_new_tokens=48, sampling=SAMPLED, seed=3)
  images = [len(d.visual_tokens) for d in out]
  assert max(images) == 2 and images.count(0) >= 2, images  # the batch mixes both kinds
  assert {d.finish_reason for d in out} == {"stop", "length"}
  assert any(len(d.ids) >= 10 and n == 0 for d, n in zip(out, images))
  for row, (prompt, ours) in enumerate(zip(prompts, out)):
    _check_structure(ours, SAMPLED.max_images)
    ref = reference_generate(model, prompt, max_new_tokens=48, eos_ids=[EOS], sampling=SAMPLED, seed=3, row=row)
    _assert_same(ours, ref)


def test_engine_with_slot_embeddings_equals_the_naive_reference():
  """A model with per-slot visual embeddings: each fed-back visual token gets its own slot's
  vector, as the full forward gives it from visual_index."""
  config = MetaMorphConfig(llm=_llm_config(), vision_dim=DV, num_visual_tokens=M, image_start_id=START,
                           image_end_id=END, slot_embeddings=True)
  model = MetaMorph(config, rngs=nnx.Rngs(1))
  model.projector.slots[...] = jax.numpy.asarray(np.random.default_rng(2).normal(size=(M, 32)), np.float32)
  prompts = _prompts()
  out = Engine(model, eos_ids=[EOS]).generate(prompts, max_new_tokens=48, sampling=SAMPLED, seed=3)
  assert sum(len(d.visual_tokens) for d in out) >= 1  # every slot fed back at least once
  for row, (prompt, ours) in enumerate(zip(prompts, out)):
    ref = reference_generate(model, prompt, max_new_tokens=48, eos_ids=[EOS], sampling=SAMPLED, seed=3, row=row)
    _assert_same(ours, ref)


def test_guided_greedy_engine_equals_the_naive_reference(model, engine):
  """Classifier-free guidance: the unconditional prompts run as extra rows of the batch; a
  prompt that ends with <image_start> starts with visual steps."""
  rng = np.random.default_rng(1)
  prompts = [_prompt(rng, 7, end_with_start=True), _prompt(rng, 5, 1), _prompt(rng, 12, 1, end_with_start=True)]
  uncond = [Prompt.text([5, START]), _prompt(rng, 1, 1), _prompt(rng, 2, 1, end_with_start=True)]
  guided = SamplingParams(repetition_penalty=1.2, guidance=3.0)
  out = engine.generate(prompts, max_new_tokens=20, sampling=guided, seed=0, uncond=uncond)
  assert len(out[0].visual_tokens) >= 1 and len(out[2].visual_tokens) >= 1
  for row, (p, u, ours) in enumerate(zip(prompts, uncond, out)):
    ref = reference_generate(model, p, max_new_tokens=20, eos_ids=[EOS], sampling=guided, row=row, uncond=u)
    _assert_same(ours, ref)
  plain = engine.generate(prompts, max_new_tokens=20, sampling=SamplingParams(repetition_penalty=1.2))
  assert not np.allclose(plain[0].visual_tokens[0], out[0].visual_tokens[0], atol=1e-3)  # guidance acts
  with pytest.raises(ValueError, match="unconditional"):
    engine.generate(prompts, max_new_tokens=20, sampling=guided)


def test_text_only_llm_engine_equals_the_naive_reference():
  llm = Llama(_llm_config(), rngs=nnx.Rngs(1))
  rng = np.random.default_rng(2)
  prompts = [Prompt.text(rng.integers(3, V, n)) for n in (3, 17, 8)]
  out = Engine(llm, eos_ids=[EOS, 7]).generate(prompts, max_new_tokens=24, sampling=SAMPLED, seed=5)
  for row, (prompt, ours) in enumerate(zip(prompts, out)):
    _assert_same(ours, reference_generate(llm, prompt, max_new_tokens=24, eos_ids=[EOS, 7], sampling=SAMPLED,
                                            seed=5, row=row))


def test_sampling_is_reproducible_for_a_seed_and_differs_across_seeds(engine):
  prompts = _prompts()
  first = engine.generate(prompts, max_new_tokens=32, sampling=SAMPLED, seed=11)
  again = engine.generate(prompts, max_new_tokens=32, sampling=SAMPLED, seed=11)
  other = engine.generate(prompts, max_new_tokens=32, sampling=SAMPLED, seed=12)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_array_equal(a.visual_tokens, b.visual_tokens)
  assert any(len(a.ids) != len(c.ids) or (a.ids != c.ids).any() for a, c in zip(first, other))


def test_a_second_call_with_the_same_buckets_does_not_recompile(engine):
  rng = np.random.default_rng(3)
  engine.generate([_prompt(rng, 5), _prompt(rng, 9, 1), _prompt(rng, 3)], max_new_tokens=40,
                  sampling=SAMPLED, seed=0)
  traces, cached = E.TRACES["decode"], E._decode._cache_size()
  # other prompts (lengths, images, count within the batch bucket), seed, budget and sampling values
  engine.generate([_prompt(rng, 20, 1), _prompt(rng, 2), _prompt(rng, 7), _prompt(rng, 1, 1)], max_new_tokens=61,
                  sampling=SamplingParams(temperature=0.7, top_k=5, top_p=0.5, repetition_penalty=1.0,
                                            max_images=2), seed=9)
  engine.generate([_prompt(rng, 4)] * 3, max_new_tokens=33, sampling=SamplingParams(max_images=2), seed=1)
  assert (E.TRACES["decode"], E._decode._cache_size()) == (traces, cached)
  engine.generate([_prompt(rng, 4)] * 3, max_new_tokens=65, sampling=SAMPLED, seed=1)  # a new budget bucket
  assert (E.TRACES["decode"], E._decode._cache_size()) == (traces + 1, cached + 1)


def test_image_cap_and_budget(engine):
  prompts = _prompts()
  no_images = engine.generate(prompts, max_new_tokens=48, sampling=SamplingParams(
      temperature=1.0, top_k=24, top_p=0.95, repetition_penalty=1.3, max_images=0), seed=3)
  for d in no_images:
    _check_structure(d, 0)
  # an <image_start> is only sampled when the m visual steps and <image_end> still fit
  short = engine.generate(prompts, max_new_tokens=M + 1, sampling=SAMPLED, seed=3)
  assert all(START not in d.ids and len(d.visual_tokens) == 0 for d in short)
  assert all(len(d.ids) <= M + 1 for d in short)


def test_sampling_filters():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 10)).astype(np.float32) * 2
  top3 = np.asarray(filter_logits(logits, 3, 1.0))
  np.testing.assert_array_equal(np.isfinite(top3), logits >= np.sort(logits, -1)[:, -3:-2])
  for p in (0.3, 0.8):
    nucleus = np.isfinite(np.asarray(filter_logits(logits, 0, p)))
    for row, kept in zip(logits, nucleus):
      probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
      order = np.argsort(-probs)
      n = int(np.searchsorted(np.cumsum(probs[order]), p) + 1)  # fewest tokens reaching p
      assert set(np.flatnonzero(kept)) == set(order[:n])
  both = np.isfinite(np.asarray(filter_logits(logits, 2, 0.99)))
  assert (both.sum(-1) <= 2).all()
  seen = rng.random((4, 10)) < 0.5
  penalised = np.asarray(apply_repetition_penalty(logits, seen, 1.5))
  np.testing.assert_allclose(penalised, np.where(seen, np.where(logits > 0, logits / 1.5, logits * 1.5), logits))
  choose = jax.jit(choose_text)
  keys = jax.random.split(jax.random.key(0), 4)
  np.testing.assert_array_equal(choose(logits, keys, SamplingParams().traced()), logits.argmax(-1))
  sampled = SamplingParams(temperature=0.8, top_k=3).traced()
  for i in range(20):
    tokens = np.asarray(choose(logits, jax.random.split(jax.random.key(i), 4), sampled))
    assert np.isfinite(top3[np.arange(4), tokens]).all()


def test_bad_inputs(engine):
  with pytest.raises(PromptTooLong, match="context is 128"):
    engine.generate([Prompt.text([3] * 128)], max_new_tokens=4)
  with pytest.raises(ValueError, match="max_new_tokens"):
    engine.generate([Prompt.text([3])], max_new_tokens=0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0)
  bad = Prompt(np.array([START, 0, END, 3], np.int32), np.array([-1, 0, -1, -1], np.int32),
                 np.zeros((1, M + 1, DV), np.float32))
  with pytest.raises(ValueError, match="visual_tokens must be"):
    engine.generate([bad], max_new_tokens=4)
  text_only = Engine(Llama(_llm_config(), rngs=nnx.Rngs(0)), eos_ids=[EOS])
  with pytest.raises(ValueError, match="text-only"):
    text_only.generate([_prompt(np.random.default_rng(0), 3, 1)], max_new_tokens=4)


# ----------------------------------------------------------------------------- distributions


def chisquare_p(counts: np.ndarray, probs: np.ndarray) -> float:
  """The chi-square goodness-of-fit p-value of token ``counts`` [V] against ``probs`` [V]; tokens
  expected fewer than 5 times are pooled into one bin (the test's validity condition)."""
  counts, probs = np.asarray(counts, np.float64), np.asarray(probs, np.float64)
  if np.any(counts[probs == 0] > 0):
    return 0.0  # a token drawn that cannot be
  expected = counts.sum() * probs / probs.sum()
  small = expected < 5
  f_obs = np.append(counts[~small], counts[small].sum())
  f_exp = np.append(expected[~small], expected[small].sum())
  keep = f_exp > 0
  return float(scipy.stats.chisquare(f_obs[keep], f_exp[keep] * f_obs[keep].sum() / f_exp[keep].sum()).pvalue)


def softmax(x: np.ndarray) -> np.ndarray:
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_sampled_tokens_follow_the_softmax_of_logits_over_temperature(temperature):
  """40000 draws of ``choose_text`` (no top-k / top-p) fit softmax(logits / T) by a chi-square
  test, and reject softmax(logits) (T ignored) and softmax(logits / T^2): the test can fail."""
  logits = np.random.default_rng(4).normal(size=12).astype(np.float32) * 1.5
  n = 40000
  draw = jax.jit(lambda keys: choose_text(jax.numpy.broadcast_to(logits, (n, 12)), keys,
                                          SamplingParams(temperature=temperature).traced()))
  tokens = np.asarray(draw(jax.random.split(jax.random.key(0), n)))
  counts = np.bincount(tokens, minlength=12)
  assert chisquare_p(counts, softmax(logits / temperature)) > 1e-3
  assert chisquare_p(counts, softmax(logits)) < 1e-12
  assert chisquare_p(counts, softmax(logits / temperature ** 2)) < 1e-12


def test_the_engines_first_tokens_follow_softmax_of_penalised_logits_over_temperature():
  """The engine end to end: 2048 rows of one prompt each sample a first token with their own
  key; the frequencies fit softmax(logits / T) of the model's own forward (a chi-square test),
  with transformers' ``RepetitionPenaltyLogitsProcessor`` over the prompt when penalised."""
  llm = Llama(_llm_config(), rngs=nnx.Rngs(1))
  llm.lm_head.kernel[...] = llm.lm_head.kernel[...] * 15.0  # logits of std ~1.5: T matters
  ids = [5, 9, 17, 9, 22, 3, 17]
  hidden, _ = llm.forward(llm.embed(jax.numpy.asarray([ids])))
  logits = torch.from_numpy(np.array(llm.logits(hidden))[0, -1:])  # [1, V]
  engine, n = Engine(llm, eos_ids=[EOS]), 2048
  for temperature, penalty in ((0.7, 1.0), (1.6, 1.8)):
    sampling = SamplingParams(temperature=temperature, repetition_penalty=penalty)
    out = engine.generate([Prompt.text(ids)] * n, max_new_tokens=1, sampling=sampling, seed=0)
    counts = np.bincount([d.token_ids[0] for d in out], minlength=V)
    penalised = RepetitionPenaltyLogitsProcessor(penalty)(torch.tensor([ids]), logits.clone())[0].numpy()
    assert chisquare_p(counts, softmax(penalised / temperature)) > 1e-3, (temperature, penalty)
    assert chisquare_p(counts, softmax(penalised)) < 1e-6  # T ignored would fail
    if penalty != 1.0:
      assert chisquare_p(counts, softmax(logits[0].numpy() / temperature)) < 1e-6  # the penalty ignored too


@pytest.mark.parametrize("penalty", [0.6, 1.3, 2.5])
def test_repetition_penalty_equals_transformers_logits_processor(penalty):
  """Random logits (negative, zero and positive) and token histories with repeated ids: the seen
  mask of each history, penalised, equals transformers' processor on the history."""
  rng = np.random.default_rng(int(penalty * 10))
  b, v, length = 6, 40, 25
  logits = rng.normal(size=(b, v)).astype(np.float32) * 3
  logits[:, :3] = [-2.0, 0.0, 2.0]
  history = rng.integers(0, v, (b, length))
  history[:, :6] = [0, 1, 2, 0, 1, 2]  # the edge values, each seen twice
  history[0] = 7  # one id only, repeated
  seen = np.zeros((b, v), bool)
  seen[np.arange(b)[:, None], history] = True
  want = RepetitionPenaltyLogitsProcessor(penalty)(torch.from_numpy(history), torch.from_numpy(logits.copy())).numpy()
  ours = np.asarray(jax.jit(apply_repetition_penalty)(logits, seen, jax.numpy.float32(penalty)))
  np.testing.assert_allclose(ours, want, rtol=1e-6, atol=0)
  assert np.sum(ours != logits) >= b * 5  # the penalty acted on the seen ids
