"""The unified model: interleaved embedding, the VPiT loss, new image tokens."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from metamorph.models.interfaces import INTERFACES
from metamorph.models.llama import Llama, LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig, vpit_loss
from metamorph.models.vocab import add_image_tokens, resize_vocab
from metamorph.params import module_params
from metamorph.tokens import IGNORE

M, DV = 4, 6  # visual tokens per image, visual token width


def _config(tied=True, coef=0.7):
  llm = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=4, tie_word_embeddings=tied)
  return MetaMorphConfig(llm=llm, vision_dim=DV, num_visual_tokens=M, vision_coef=coef,
                         image_start_id=38, image_end_id=39)


def _batch():
  """Row 0: prompt image, text answer, response image, then padding.
  Row 1: two packed records (text QA, then text -> image)."""
  s, e, p = 38, 39, 0  # image start / end; p = id at visual slots
  ids = np.array([
      [5, s, p, p, p, p, e, 7, 8, s, p, p, p, p, e, 2, 0, 0],
      [5, 6, 7, 8, 2, 5, 9, s, p, p, p, p, e, 2, 0, 0, 0, 0]], np.int32)
  seg = np.array([[1] * 16 + [0] * 2, [1] * 5 + [2] * 9 + [0] * 4], np.int32)
  pos = np.array([list(range(16)) + [0, 0], list(range(5)) + list(range(9)) + [0] * 4], np.int32)
  vidx = -np.ones_like(ids)
  vidx[0, 2:6], vidx[0, 10:14], vidx[1, 8:12] = range(0, 4), range(4, 8), range(0, 4)
  target = np.zeros(ids.shape, bool)
  target[0, 10:14], target[1, 8:12] = True, True
  labels = np.full_like(ids, IGNORE)
  labels[0, 7:16] = ids[0, 7:16]
  labels[0, 10:14] = IGNORE  # visual slots carry the vision loss, not text
  labels[1, 3:5], labels[1, 7:14] = ids[1, 3:5], ids[1, 7:14]
  labels[1, 8:12] = IGNORE
  tokens = np.random.default_rng(0).normal(size=(2, 2, M, DV)).astype(np.float32)
  tokens /= np.linalg.norm(tokens, axis=-1, keepdims=True)
  return {"input_ids": ids, "positions": pos, "segment_ids": seg, "labels": labels,
          "visual_index": vidx, "visual_target_mask": target, "visual_tokens": tokens}


def _numpy_loss(logits, pred, batch, coef):
  nll, n_text, cos, n_vis = 0.0, 0, 0.0, 0
  flat = batch["visual_tokens"].reshape(2, -1, DV)
  for b in range(2):
    for t in range(logits.shape[1] - 1):
      seg = batch["segment_ids"][b]
      if seg[t + 1] == 0 or seg[t + 1] != seg[t]:
        continue
      label = batch["labels"][b, t + 1]
      if label != IGNORE:
        z = logits[b, t].astype(np.float64)
        nll += np.log(np.exp(z - z.max()).sum()) + z.max() - z[label]
        n_text += 1
      if batch["visual_target_mask"][b, t + 1]:
        cos += float(pred[b, t] @ flat[b, batch["visual_index"][b, t + 1]])
        n_vis += 1
  return nll / n_text + coef * (-cos / n_vis), nll / n_text, -cos / n_vis, n_text, n_vis


@pytest.fixture(scope="module")
def model():
  return MetaMorph(_config(), rngs=nnx.Rngs(0))


def test_embed_interleaves_text_and_projected_visual_tokens(model):
  b = _batch()
  embeds = np.asarray(model.embed(b["input_ids"], b["visual_index"], b["visual_tokens"]))
  text = np.asarray(model.llm.embed(b["input_ids"]))
  projected = np.asarray(model.projector(b["visual_tokens"].reshape(2, -1, DV)))
  np.testing.assert_array_equal(embeds[0, 0], text[0, 0])
  np.testing.assert_array_equal(embeds[0, 11], projected[0, 5])
  np.testing.assert_array_equal(embeds[1, 9], projected[1, 1])


def test_slot_embeddings_add_one_vector_per_slot():
  """With ``slot_embeddings`` a visual slot's embedding is the projected token plus the
  learned vector of its index in its image (visual_index mod m); text is untouched."""
  model = MetaMorph(dataclasses.replace(_config(), slot_embeddings=True), rngs=nnx.Rngs(0))
  slots = np.random.default_rng(1).normal(size=(M, 16)).astype(np.float32)
  model.projector.slots[...] = jnp.asarray(slots)
  b = _batch()
  embeds = np.asarray(model.embed(b["input_ids"], b["visual_index"], b["visual_tokens"]))
  text = np.asarray(model.llm.embed(b["input_ids"]))
  projected = np.asarray(model.projector(b["visual_tokens"].reshape(2, -1, DV)))
  np.testing.assert_array_equal(embeds[0, 0], text[0, 0])
  np.testing.assert_allclose(embeds[0, 11], projected[0, 5] + slots[1], rtol=0, atol=1e-6)  # image 2, slot 1
  np.testing.assert_allclose(embeds[1, 11], projected[1, 3] + slots[3], rtol=0, atol=1e-6)
  assert not np.allclose(embeds[0, 11], projected[0, 5], atol=1e-3)


def test_vision_head_output_is_unit_norm(model):
  pred = model.predict_visual(jnp.ones((1, 3, 16)) * jnp.arange(16.0))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pred), axis=-1), 1.0, atol=1e-6)


def _identity(x):
  return x


def test_loss_equals_numpy_formula(model):
  b = _batch()
  logits, pred = model(b)
  total, parts = vpit_loss(_identity, logits, pred, b, 0.7)  # logits as the hidden states
  want = _numpy_loss(np.asarray(logits), np.asarray(pred), b, 0.7)
  np.testing.assert_allclose(float(total), want[0], rtol=1e-6)
  np.testing.assert_allclose(float(parts["loss_text"]), want[1], rtol=1e-6)
  np.testing.assert_allclose(float(parts["loss_vision"]), want[2], rtol=1e-6)
  assert (int(parts["text_tokens"]), int(parts["visual_targets"])) == (want[3], want[4]) == (10, 8)


def test_prompt_positions_get_no_gradient(model):
  b = _batch()
  logits, pred = model(b)
  d_logits, d_pred, d_tokens = jax.grad(
      lambda l, p, v: vpit_loss(_identity, l, p, {**b, "visual_tokens": v}, 0.7)[0], argnums=(0, 1, 2))(
          logits, pred, jnp.asarray(b["visual_tokens"]))
  text_rows = np.abs(np.asarray(d_logits)).sum(-1) > 0  # [B, T]
  vis_rows = np.abs(np.asarray(d_pred)).sum(-1) > 0
  expect_text = np.zeros_like(text_rows)
  expect_text[:, :-1] = (b["labels"][:, 1:] != IGNORE)
  expect_vis = np.zeros_like(vis_rows)
  expect_vis[:, :-1] = b["visual_target_mask"][:, 1:]
  np.testing.assert_array_equal(text_rows, expect_text)
  np.testing.assert_array_equal(vis_rows, expect_vis)
  assert not np.any(np.asarray(d_tokens)), "targets must be stop-gradient"


def test_vision_coef_zero_is_text_loss_only(model):
  b = _batch()
  logits, pred = model(b)
  total, parts = vpit_loss(_identity, logits, pred, b, 0.0)
  assert float(total) == float(parts["loss_text"])


@pytest.mark.parametrize("tied", [True, False])
def test_resize_vocab_appends_mean_rows(tied):
  llm = Llama(_config(tied).llm, rngs=nnx.Rngs(1))
  bigger = resize_vocab(llm, 43)
  old, new = np.asarray(llm.embed_tokens.embedding[...]), np.asarray(bigger.embed_tokens.embedding[...])
  np.testing.assert_array_equal(new[:40], old)
  np.testing.assert_allclose(new[40:], np.repeat(old.mean(0, keepdims=True), 3, 0), rtol=1e-6)
  ids = jnp.arange(12).reshape(2, 6)
  np.testing.assert_allclose(np.asarray(bigger(ids))[..., :40], np.asarray(llm(ids)), atol=1e-6)
  if not tied:
    head = np.asarray(bigger.lm_head.kernel[...])
    np.testing.assert_allclose(head[:, 40:], np.repeat(np.asarray(llm.lm_head.kernel[...]).mean(1, keepdims=True), 3, 1), rtol=1e-6)


def test_add_image_tokens_to_smollm2_tokenizer(smollm2):
  llm, tokenizer, _ = smollm2
  import copy
  tokenizer = copy.deepcopy(tokenizer)
  resized, start, end = add_image_tokens(llm, tokenizer)
  assert (start, end) == (49152, 49153) and resized.config.vocab_size == 49154
  assert tokenizer("a<image_start>b<image_end>")["input_ids"][1::2] == [start, end]
  again, start2, _ = add_image_tokens(resized, tokenizer)  # idempotent
  assert again is resized and start2 == start


def test_config_validation():
  with pytest.raises(ValueError, match="vision_coef"):
    MetaMorphConfig(llm=_config().llm, vision_dim=4, vision_coef=-1)
  with pytest.raises(ValueError, match="unknown MetaMorphConfig fields"):
    MetaMorphConfig.from_dict({"llm": _config().llm.to_dict(), "vision_dim": 4, "bogus": 1})
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3,
                num_kv_heads=2, head_dim=4)


def test_image_interface_is_chosen_by_name():
  """The projector comes from the interface registry; the default is mlp2x_gelu (under
  ``projector/``), a config.json written before the field existed still loads, and an
  unknown name is an error that lists the known ones."""
  config = _config()
  assert config.image_interface == "mlp2x_gelu"
  older = config.to_dict()
  del older["image_interface"]
  assert MetaMorphConfig.from_dict(older) == config
  model = MetaMorph(config, rngs=nnx.Rngs(0))
  assert isinstance(model.projector, INTERFACES["mlp2x_gelu"]) and model.projector.tokenwise
  assert model.projector.tokens_per_item(M) == M
  assert {k for k in module_params(model) if k.startswith("projector/")} == {
      "projector/fc1/kernel", "projector/fc1/bias", "projector/fc2/kernel", "projector/fc2/bias"}
  tokens = jnp.ones((2, 3, M, DV))  # [B, I, m, Dv] -> [B, I, m, H]
  assert model.projector(tokens).shape == (2, 3, M, 16)
  with pytest.raises(ValueError, match=r"unknown input interface 'qformer'; known interfaces: \['mlp2x_gelu'\]"):
    dataclasses.replace(config, image_interface="qformer")
