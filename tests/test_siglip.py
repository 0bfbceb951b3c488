"""SigLIP towers and converter against transformers (PyTorch, CPU, float32)."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from metamorph import sharding
from metamorph.convert import siglip as convert
from metamorph.files import ConversionError
from metamorph.models import siglip as S

IMAGE, PATCH = 24, 4  # a 6 x 6 patch grid
ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
TEXT = dict(vocab_size=50, max_position_embeddings=10, projection_size=32, bos_token_id=None,
            eos_token_id=None, pad_token_id=0)


def _vision_config(use_head: bool) -> transformers.SiglipVisionConfig:
  return transformers.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH,
                                         vision_use_head=use_head)


def _randomize(model: torch.nn.Module) -> torch.nn.Module:
  """Perturbs every parameter, so zero biases and unit norm scales are not trivial."""
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def _save(model: torch.nn.Module, folder) -> str:
  model.save_pretrained(str(folder))
  return str(folder)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
  """{name: (torch model, saved folder)} for tiny random SigLIP models."""
  torch.manual_seed(0)
  root = tmp_path_factory.mktemp("hf")
  models = {
      "vision_head": transformers.SiglipVisionModel(_vision_config(True)),
      "vision_nohead": transformers.SiglipVisionModel(_vision_config(False)),
      "text": transformers.SiglipTextModel(transformers.SiglipTextConfig(**ENCODER, **TEXT)),
      "full": transformers.SiglipModel(transformers.SiglipConfig(
          vision_config=_vision_config(True).to_dict(),
          text_config=transformers.SiglipTextConfig(**ENCODER, **TEXT).to_dict())),
  }
  return {name: (_randomize(m), _save(m, root / name)) for name, m in models.items()}


@pytest.fixture(scope="module")
def images():
  """(torch NCHW, numpy NHWC) images in [-1, 1]."""
  x = torch.rand(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(1)) * 2 - 1
  return x, x.permute(0, 2, 3, 1).numpy()


def _max_diff(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours, np.float32) - ref.detach().numpy())))


def _hf_features(hf_models, images) -> torch.Tensor:
  with torch.no_grad():
    return hf_models["vision_head"][0](images[0], output_hidden_states=True).hidden_states[-1]


# ----------------------------------------------------------------------------- towers vs transformers


@pytest.mark.parametrize("name", ["vision_head", "vision_nohead"])
def test_vision_tower_matches_transformers(hf_models, images, name, tmp_path):
  model, folder = hf_models[name]
  with torch.no_grad():
    ref = model(images[0], output_hidden_states=True)
  convert.convert_siglip(folder, str(tmp_path / "ours"))
  for source in (folder, str(tmp_path / "ours")):
    tower = convert.load_siglip(source)
    assert isinstance(tower, S.SiglipVisionTower)
    out = tower(jnp.asarray(images[1]), return_hidden_states=True)
    assert _max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert _max_diff(out.encoder_output, ref.hidden_states[-1]) < 1e-4
    assert len(out.hidden_states) == len(ref.hidden_states) == 3
    for ours, theirs in zip(out.hidden_states, ref.hidden_states):
      assert _max_diff(ours, theirs) < 1e-4
    if name == "vision_head":
      assert out.pooled.shape == (2, 32) and _max_diff(out.pooled, ref.pooler_output) < 1e-4
    else:
      assert out.pooled is None and ref.pooler_output is None


def test_text_tower_matches_transformers(hf_models, tmp_path):
  model, folder = hf_models["text"]
  ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(2))
  mask = torch.ones_like(ids)
  mask[1, 4:] = 0  # padded keys in the second row
  with torch.no_grad():
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
  convert.convert_siglip(folder, str(tmp_path / "ours"))
  for source in (folder, str(tmp_path / "ours")):
    tower = convert.load_siglip(source)
    out = tower(jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()), return_hidden_states=True)
    assert _max_diff(out.last_hidden_state, ref.last_hidden_state) < 1e-4
    assert _max_diff(out.pooled, ref.pooler_output) < 1e-4
    for ours, theirs in zip(out.hidden_states, ref.hidden_states, strict=True):
      assert _max_diff(ours, theirs) < 1e-4


def test_full_model_matches_transformers(hf_models, images, tmp_path):
  model, folder = hf_models["full"]
  ids = torch.randint(1, 50, (2, 10), generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    ref = model(input_ids=ids, pixel_values=images[0], return_loss=True)
  dst = str(tmp_path / "ours")
  convert.convert_siglip(folder, dst)
  meta = json.load(open(os.path.join(dst, "config.json")))
  assert (meta["kind"], meta["tower"]) == ("siglip", "full")

  for source in (folder, dst):
    siglip = convert.load_siglip(source)
    assert isinstance(siglip, S.Siglip)
    image_emb, text_emb = siglip(jnp.asarray(images[1]), jnp.asarray(ids.numpy()))
    assert _max_diff(image_emb, ref.image_embeds) < 1e-4
    assert _max_diff(text_emb, ref.text_embeds) < 1e-4
    logits = S.sigmoid_logits(image_emb, text_emb, siglip.logit_scale[...], siglip.logit_bias[...])
    assert _max_diff(logits, ref.logits_per_text) < 1e-4
    loss = siglip.loss(jnp.asarray(images[1]), jnp.asarray(ids.numpy()))
    assert abs(float(loss) - float(ref.loss)) < 1e-4

    vision = convert.load_siglip(source, tower="vision")  # MetaMorph's frozen encoder
    assert isinstance(vision, S.SiglipVisionTower)
    pooled = vision(jnp.asarray(images[1])).pooled
    assert _max_diff(pooled, ref.vision_model_output.pooler_output) < 1e-4
    text = convert.load_siglip(source, tower="text")
    assert _max_diff(text(jnp.asarray(ids.numpy())).pooled, ref.text_model_output.pooler_output) < 1e-4


def test_bfloat16_compute_follows_float32(hf_models, images):
  folder = hf_models["vision_head"][1]
  f32 = convert.load_siglip(folder)(jnp.asarray(images[1]))
  bf16_tower = convert.load_siglip(folder, dtype="bfloat16")
  bf16 = nnx.jit(lambda tower, x: tower(x))(bf16_tower, jnp.asarray(images[1]))
  assert bf16.last_hidden_state.dtype == jnp.bfloat16
  assert bf16_tower.encoder.layers[0].attn.query.kernel[...].dtype == jnp.float32  # param_dtype
  assert np.max(np.abs(np.asarray(bf16.pooled, np.float32) - np.asarray(f32.pooled))) < 0.1


# ----------------------------------------------------------------------------- visual tokens


def _torch_tokens(features: torch.Tensor, m: int) -> np.ndarray:
  """The reference: interpolate the [B, N, D] grid to sqrt(m)^2 and L2-normalise."""
  b, n, d = features.shape
  g, k = int(round(n ** 0.5)), int(round(m ** 0.5))
  grid = features.reshape(b, g, g, d).permute(0, 3, 1, 2)
  out = torch.nn.functional.interpolate(grid, size=(k, k), mode="bilinear", align_corners=False)
  out = out.permute(0, 2, 3, 1).reshape(b, m, d)
  return torch.nn.functional.normalize(out, dim=-1).numpy()


@pytest.mark.parametrize("m", [4, 9, 16, 64])  # 64 = 8 x 8 up-samples the 6 x 6 grid
def test_reduce_grid_matches_torch_interpolate(hf_models, images, m):
  features = _hf_features(hf_models, images)
  ours = S.l2_normalize(S.reduce_grid(jnp.asarray(features.numpy()), m))
  assert ours.shape == (2, m, 32) and ours.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(ours), _torch_tokens(features, m), atol=1e-5, rtol=0)


@pytest.mark.parametrize("m", [9, 64])
def test_visual_tokens_end_to_end(hf_models, images, m):
  tower = convert.load_siglip(hf_models["vision_head"][1])
  tokens = nnx.jit(S.visual_tokens, static_argnums=2)(tower, jnp.asarray(images[1]), m)
  np.testing.assert_allclose(np.asarray(tokens), _torch_tokens(_hf_features(hf_models, images), m),
                             atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(tokens), axis=-1), 1.0, atol=1e-6)


def test_bilinear_matrix_is_torch_on_basis_vectors():
  for in_size, out_size in [(27, 8), (6, 2), (6, 3), (3, 8), (5, 5)]:
    basis = torch.eye(in_size)[:, None, :, None].expand(in_size, 1, in_size, 1)  # each row a delta
    ref = torch.nn.functional.interpolate(basis, size=(out_size, 1), mode="bilinear",
                                          align_corners=False)[:, 0, :, 0].T.numpy()
    np.testing.assert_allclose(S.bilinear_matrix(out_size, in_size), ref, atol=1e-6)


def test_visual_token_shape_errors(hf_models, images):
  features = jnp.zeros((1, 36, 8))
  for m in (0, 8, 10):
    with pytest.raises(ValueError, match="perfect square"):
      S.reduce_grid(features, m)
  with pytest.raises(ValueError, match="perfect square"):
    S.reduce_grid(jnp.zeros((1, 35, 8)), 4)  # not a square patch grid
  tower = convert.load_siglip(hf_models["vision_head"][1])
  with pytest.raises(ValueError, match="perfect square"):
    S.visual_tokens(tower, jnp.asarray(images[1]), 12)
  with pytest.raises(ValueError, match="NHWC"):
    tower(jnp.zeros((1, 3, IMAGE, IMAGE)))


# ----------------------------------------------------------------------------- loss, configs, params


def test_sigmoid_loss_matches_numpy_formula():
  rng = np.random.default_rng(0)
  img, txt = rng.normal(size=(4, 8)), rng.normal(size=(4, 8))
  scale, bias = np.log(10.0), -3.0
  zi = img / np.linalg.norm(img, axis=-1, keepdims=True)
  zt = txt / np.linalg.norm(txt, axis=-1, keepdims=True)
  logits = zt @ zi.T * np.exp(scale) + bias
  labels = 2 * np.eye(4) - 1
  expected = -np.sum(np.log(1 / (1 + np.exp(-labels * logits)))) / 4
  loss = S.sigmoid_loss(jnp.asarray(img, jnp.float32), jnp.asarray(txt, jnp.float32),
                        jnp.asarray([scale], jnp.float32), jnp.asarray([bias], jnp.float32))
  assert abs(float(loss) - expected) < 1e-5


def test_configs_round_trip_and_validate():
  vision = S.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH, dtype="bfloat16")
  text = S.SiglipTextConfig(**ENCODER, vocab_size=50, max_position_embeddings=10)
  full = S.SiglipConfig(vision, text)
  assert S.SiglipConfig.from_dict(json.loads(json.dumps(full.to_dict()))) == full
  assert text.projection_size == 32 and vision.grid_size == 6 and vision.head_dim == 8
  with pytest.raises(ValueError, match="unknown SiglipVisionConfig fields \\['patches'\\]"):
    S.SiglipVisionConfig.from_dict({**vision.to_dict(), "patches": 3})
  with pytest.raises(ValueError, match="at least patch_size"):
    S.SiglipVisionConfig(image_size=3, patch_size=4)
  assert S.SiglipVisionConfig(image_size=384, patch_size=14).num_patches == 27 * 27  # SO400M@384
  with pytest.raises(ValueError, match="hidden_act"):
    S.SiglipTextConfig(hidden_act="relu")
  hf = transformers.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH).to_dict()
  ours = S.SiglipVisionConfig.from_hf(hf)  # HF extras (dtype, architectures, ...) are ignored
  assert ours == S.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH)


def test_window_attention_keeps_each_token_to_its_block(hf_models, images):
  """attention_window=3 on the 6 x 6 grid: changing the top-left 3 x 3 patches (12 x 12 px)
  moves exactly the tokens of that block; a window of the whole grid is global attention."""
  config = S.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH, attention_window=3)
  windowed = S.SiglipVisionTower(config, rngs=nnx.Rngs(0))
  x = jnp.asarray(images[1])
  y = x.at[:, :12, :12].multiply(-1.0)
  moved = np.abs(np.asarray(windowed.features(x) - windowed.features(y))).max(axis=(0, 2))  # [N]
  block = (np.arange(36) // 6 < 3) & (np.arange(36) % 6 < 3)
  assert np.all(moved[block] > 1e-2) and np.all(moved[~block] == 0.0)

  whole = S.SiglipVisionTower(config.replace(attention_window=6), rngs=nnx.Rngs(0))
  plain = S.SiglipVisionTower(config.replace(attention_window=0), rngs=nnx.Rngs(0))
  assert np.array_equal(whole(x).pooled, plain(x).pooled)
  assert whole.config.attention_mask().all() and plain.config.attention_mask() is None
  for bad in (4, -1):
    with pytest.raises(ValueError, match="attention_window must be 0 .global. or divide the 6"):
      config.replace(attention_window=bad)


def test_jit_under_a_mesh_with_the_axis_rules():
  """The sharding annotations fit every activation's rank inside a (1, 1, 1) mesh."""
  config = S.SiglipConfig(S.SiglipVisionConfig(**ENCODER, image_size=IMAGE, patch_size=PATCH),
                          S.SiglipTextConfig(**ENCODER, vocab_size=50, max_position_embeddings=10))
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, IMAGE, IMAGE, 3)), jnp.float32)
  ids = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
  step = nnx.jit(lambda model: (model.loss(images, ids), S.visual_tokens(model.vision, images, 4)))
  with jax.set_mesh(mesh):
    loss, tokens = step(S.Siglip(config, rngs=nnx.Rngs(0)))
  assert np.isfinite(float(loss)) and tokens.shape == (2, 4, 32)


def test_converted_layout_of_vision_tower(hf_models, tmp_path):
  convert.convert_siglip(hf_models["vision_head"][1], str(tmp_path))
  params = load_file(str(tmp_path / "model.safetensors"))
  assert params["patch_embed/kernel"].shape == (PATCH, PATCH, 3, 32)
  assert params["pos_embed"].shape == (36, 32)
  assert params["encoder/layers/1/attn/query/kernel"].shape == (32, 4, 8)
  assert params["encoder/layers/1/attn/out/kernel"].shape == (4, 8, 32)
  assert params["head/attn/key/bias"].shape == (4, 8)
  assert params["head/probe"].shape == (1, 1, 32)


# ----------------------------------------------------------------------------- conversion errors


def _copy_hf(folder: str, dst) -> str:
  os.makedirs(dst)
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as src, open(os.path.join(dst, name), "wb") as out:
      out.write(src.read())
  return str(dst)


def test_missing_config_is_a_conversion_error(hf_models, tmp_path):
  folder = _copy_hf(hf_models["vision_head"][1], tmp_path / "hf")
  os.remove(os.path.join(folder, "config.json"))
  with pytest.raises(ConversionError, match="config.json: file not found"):
    convert.load_siglip(folder)


def test_garbled_safetensors_is_a_conversion_error(hf_models, tmp_path):
  folder = _copy_hf(hf_models["vision_head"][1], tmp_path / "hf")
  with open(os.path.join(folder, "model.safetensors"), "wb") as f:
    f.write(b"\x13\x00\x00\x00\x00\x00\x00\x00{not a header")
  with pytest.raises(ConversionError, match="model.safetensors: not a readable safetensors file"):
    convert.load_siglip(folder)


def test_wrong_tensor_shape_names_file_and_tensor(hf_models, tmp_path):
  folder = _copy_hf(hf_models["vision_head"][1], tmp_path / "hf")
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  tensors["encoder.layers.1.self_attn.k_proj.weight"] = np.zeros((32, 16), np.float32)
  save_file(tensors, path)
  with pytest.raises(ConversionError) as err:
    convert.load_siglip(folder)
  assert path in str(err.value) and "'encoder.layers.1.self_attn.k_proj.weight'" in str(err.value)
  assert "(32, 16)" in str(err.value) and "(32, 32)" in str(err.value)


def test_missing_tensor_and_wrong_tower_are_conversion_errors(hf_models, tmp_path):
  folder = _copy_hf(hf_models["vision_head"][1], tmp_path / "hf")
  path = os.path.join(folder, "model.safetensors")
  tensors = load_file(path)
  del tensors["head.probe"]
  save_file(tensors, path)
  with pytest.raises(ConversionError, match="'head.probe' is missing"):
    convert.load_siglip(folder)
  with pytest.raises(ConversionError, match="not a text tower"):
    convert.load_siglip(hf_models["vision_nohead"][1], tower="text")
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"model_type": "clip_vision_model"}, f)
  with pytest.raises(ConversionError, match="not a SigLIP model"):
    convert.load_siglip(folder)
