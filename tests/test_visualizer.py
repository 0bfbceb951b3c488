"""The visualizer (diffusion decoder) on tiny configs: it learns, samples deterministically,
guides exactly, pads and drops conditions, trains on diffusers' targets, samples in latent mode
as diffusers' PyTorch VAE decodes, and rejects bad inputs."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metamorph.params import build_module, module_params
from metamorph.models import visualizer as V
from metamorph.models.siglip import SiglipVisionConfig
from metamorph.models.visualizer import model as model_module
from metamorph.models.visualizer.diffusers_modules import unet_field
from tests.test_diffusion_targets import reference_targets

B, M, DV, SIZE = 2, 4, 8, 16


def tiny_config(**overrides) -> V.VisualizerConfig:
  """The toy preset, small; without the draft decoder unless asked (the reference's path)."""
  overrides.setdefault("draft_width", 0)
  unet = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
              up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type=None, cross_attention_dim=32,
              attention_head_dim=2)
  return V.VisualizerConfig.toy(image_size=SIZE, num_tokens=overrides.pop("num_tokens", M), token_dim=DV,
                                block_out_channels=(32, 32),
                                unet={**unet, **overrides.pop("unet", {})}, adapter_hidden=32, **overrides)


def tiny_latent_config(**overrides) -> V.VisualizerConfig:
  vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
             latent_channels=4, norm_num_groups=4, sample_size=SIZE)
  unet = dict(sample_size=SIZE // 2, in_channels=4, out_channels=4, block_out_channels=(32,),
              down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",))
  return tiny_config(mode="latent", vae=vae, unet=unet, **overrides)


def variant(visualizer: V.Visualizer, **changes) -> V.Visualizer:
  """The same parameters under a config with ``changes`` that keep the parameter shapes."""
  config = visualizer.config.replace(**changes)
  out = nnx.eval_shape(lambda: V.Visualizer(config, rngs=nnx.Rngs(0)))
  nnx.update(out, nnx.state(visualizer))
  return out


def unit_tokens(seed: int, b: int = B) -> jax.Array:
  x = jax.random.normal(jax.random.key(seed), (b, M, DV))
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def images(seed: int, b: int = B) -> jax.Array:
  """Smooth random images in [-1, 1]."""
  base = jax.random.uniform(jax.random.key(seed), (b, 4, 4, 3), minval=-1, maxval=1)
  return jax.image.resize(base, (b, SIZE, SIZE, 3), "linear")


@pytest.fixture(scope="module")
def tiny():
  return V.Visualizer(tiny_config(), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_latent():
  return V.Visualizer(tiny_latent_config(pad_to=6), rngs=nnx.Rngs(1))


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip_and_presets():
  for config in (tiny_config(), tiny_latent_config(adapter="resampler", num_queries=3, pad_to=5),
                 V.VisualizerConfig.toy(), V.VisualizerConfig.sd15()):
    back = V.VisualizerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and hash(back) == hash(config)
  sd = V.VisualizerConfig.sd15()
  assert (sd.mode, sd.image_size, sd.sample_size, sd.channels, sd.padded_length) == ("latent", 512, 64, 4, 77)
  assert sd.unet["block_out_channels"] == (320, 640, 1280, 1280) and sd.cross_attention_dim == 768
  assert (sd.adapter, sd.adapter_hidden, sd.cond_drop_prob, sd.num_tokens, sd.token_dim) == ("mlp", 2048, 0.8, 64, 1152)


@pytest.mark.parametrize("changes, message", [
    (dict(mode="voxel"), "mode must be one of"),
    (dict(pad_to=3), r"pad_to \(3\) must be 0"),
    (dict(unet=dict(in_channels=4)), r"unet in_channels \(4\) must be 3 \(3 in pixel mode\)"),
    (dict(unet=dict(sample_size=8)), r"unet sample_size \(8\) must be 16"),
    (dict(unet=dict(bogus=1)), "unknown unet keys"),
    (dict(unet=dict(block_out_channels=(32, 48))), "multiples of 32"),
    (dict(cond_drop_prob=1.5), "cond_drop_prob"),
    (dict(prediction_type="sample"), "prediction_type"),
    (dict(mode="latent"), "latent mode needs vae"),
    (dict(draft_width=-2), "draft_width must be an even int >= 0"),
    (dict(draft_width=3), "draft_width must be an even int >= 0"),
    (dict(draft_width=4, draft_weight=-1.0), "draft_weight must be >= 0"),
    (dict(draft_width=4, unet=dict(in_channels=3)), r"unet in_channels \(3\) must be 6 \(twice 3 in pixel mode: the noisy sample and the draft\)"),
    (dict(draft_width=4, num_tokens=3), r"needs num_tokens \(3\) to be a square grid"),
    (dict(draft_width=4, draft_strength=0.0), r"draft_strength must be in \(0, 1\], got 0.0"),
    (dict(draft_width=4, draft_strength=1.5), r"draft_strength must be in \(0, 1\], got 1.5"),
    (dict(draft_strength=0.5), r"draft_strength 0.5 needs a draft decoder"),
])
def test_config_errors(changes, message):
  with pytest.raises(ValueError, match=message):
    tiny_config(**changes)


# ----------------------------------------------------------------------------- training


def test_parameter_layout(tiny):
  flat = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
  assert {"adapter/fc1/kernel", "adapter/norm/scale", "adapter/fc2/bias", "unet/conv_in/kernel",
          "unet/down_blocks_0/resnets_0/conv1/kernel",
          "unet/down_blocks_1/attentions_0/transformer_blocks_0/attn2/to_k/kernel"} <= flat
  params = tiny.unet_params()
  assert isinstance(params, dict) and params["conv_in"]["kernel"].shape == (3, 3, 3, 32)
  assert tiny.vae is None and tiny.vae_params() is None
  names = nnx.state(tiny, nnx.Param)["adapter"]["fc1"]["kernel"].get_metadata().get("out_sharding")
  assert names == ("vis_embed", "mlp")
  # a converted checkpoint (flat "unet/..." names) loads into an abstract module
  tensors = module_params(tiny)
  rebuilt = build_module(lambda: V.Visualizer(tiny.config, rngs=nnx.Rngs(7)), tensors, "test")
  np.testing.assert_array_equal(rebuilt.unet_params()["conv_in"]["kernel"], params["conv_in"]["kernel"])
  # or from diffusers' nested params dict
  other = nnx.eval_shape(lambda: V.Visualizer(tiny.config, rngs=nnx.Rngs(7)))
  other.load_unet_params(jax.tree.map(lambda x: x + 1.0, params))
  np.testing.assert_array_equal(other.unet_params()["conv_out"]["bias"], params["conv_out"]["bias"] + 1.0)
  del params["conv_out"]
  with pytest.raises(ValueError, match=r"unet params do not match the config: missing \['conv_out/bias'"):
    other.load_unet_params(params)
  with pytest.raises(ValueError, match="no VAE"):
    other.load_vae_params({})


def test_resampler_adapter(tiny):
  config = tiny.config.replace(adapter="resampler", num_queries=3, pad_to=5)
  adapter = nnx.eval_shape(lambda: V.Resampler(config, rngs=nnx.Rngs(0)))
  assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(adapter, nnx.Param))} >= {
      "queries", "proj_in/kernel", "layers/0/attn/query/kernel", "layers/1/fc2/bias", "norm_out/scale"}
  graphdef, state = nnx.split(nnx.eval_shape(lambda: V.Visualizer(config, rngs=nnx.Rngs(0))))
  cond, adapted = jax.eval_shape(lambda s: (nnx.merge(graphdef, s).condition(unit_tokens(0)),
                                             nnx.merge(graphdef, s).adapter(unit_tokens(0))), state)
  assert cond.context.shape == (B, 5, 32) and cond.draft is None and adapted.shape == (B, 3, 32)


def tiny_vision() -> SiglipVisionConfig:
  return SiglipVisionConfig(hidden_size=DV, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                            image_size=SIZE, patch_size=4)


def test_training_reduces_loss(tiny):
  """A few adam steps on the trainable params of a VisualizerModel (frozen SigLIP tower ->
  tokens -> visualizer), jitted over nnx.split state, on a fixed batch and rng."""
  config = V.VisualizerModelConfig(vision=tiny_vision(), visualizer=tiny.config)
  model = V.VisualizerModel(config, rngs=nnx.Rngs(0), visualizer=tiny)
  graphdef, params, rest = nnx.split(model, V.VisualizerModel.TRAINABLE, ...)
  assert {p[0] for p, _ in nnx.to_flat_state(params)} == {"visualizer"}
  assert {p[0] for p, _ in nnx.to_flat_state(rest)} == {"vision"}
  opt = optax.adam(2e-3)

  @jax.jit
  def step(params, opt_state, rest, imgs, rng):
    def loss_fn(params):
      return nnx.merge(graphdef, params, rest).loss(imgs, rng)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, aux

  opt_state = opt.init(params)
  imgs, rng = images(0), jax.random.key(0)
  losses = []
  for _ in range(8):
    params, opt_state, loss, aux = step(params, opt_state, rest, imgs, rng)
    assert float(aux["loss_diffusion"]) == float(loss)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.7 * losses[0], losses


def test_the_loss_regresses_the_model_output_on_diffusers_targets(tiny, monkeypatch):
  """With no condition dropout the loss is the MSE between the model's output at diffusers'
  ``add_noise`` sample and diffusers' target (tests/test_diffusion_targets.py), at the timesteps
  and noise the loss drew (read by a spy on ``diffusion_targets``). The UNet is replaced by a
  cheap stand-in of (x, t, condition) here: ``predict`` is held to diffusers' UNet elsewhere."""
  v = variant(tiny, cond_drop_prob=0.0)
  assert v.config.prediction_type == "v_prediction" and unet_field(v.config.unet, "dropout") == 0
  draws = {}
  real_targets = model_module.diffusion_targets

  def targets_spy(config, x0, noise, t):
    draws["targets"] = (x0, noise, t)
    return real_targets(config, x0, noise, t)

  def stand_in(x, t, context):
    return 0.5 * x + 1e-3 * t[:, None, None, None] + context.mean(axis=(1, 2))[:, None, None, None]

  monkeypatch.setattr(model_module, "diffusion_targets", targets_spy)
  monkeypatch.setattr(V.Visualizer, "predict", lambda self, x, t, cond, **kwargs: stand_in(x, t, cond.context))
  graphdef, state = nnx.split(v)
  imgs, tokens = images(4), unit_tokens(4)
  loss = jax.jit(lambda s: (nnx.merge(graphdef, s).loss(imgs, tokens, jax.random.key(7))[1]["loss_diffusion"],
                            draws["targets"], nnx.merge(graphdef, s).condition(tokens).context))
  loss, (x0, noise, t), context = jax.device_get(loss(state))
  np.testing.assert_array_equal(x0, np.transpose(np.asarray(imgs), (0, 3, 1, 2)))  # pixel mode: x0 is the image
  assert noise.shape == (B, 3, SIZE, SIZE) and 0.5 < noise.std() < 1.5 and np.unique(t).size == B
  x_t, target = reference_targets(v.config, x0, noise, t)
  want = np.mean(np.square(stand_in(x_t, t, context) - target))
  np.testing.assert_allclose(loss, want, rtol=1e-5)


# ----------------------------------------------------------------------------- conditions


def test_condition_is_zero_padded(tiny):
  padded = variant(tiny, pad_to=7)
  tokens = unit_tokens(1)
  cond, plain = padded.condition(tokens).context, tiny.condition(tokens).context
  assert plain.shape == (B, M, 32) and cond.shape == (B, 7, 32)
  np.testing.assert_array_equal(cond[:, :M], plain)
  np.testing.assert_array_equal(cond[:, M:], 0.0)
  np.testing.assert_array_equal(padded.unconditional(3).context, np.zeros((3, 7, 32)))


@pytest.mark.parametrize("draft", [0, 4])
def test_condition_dropout_zeroes_whole_conditions(tiny, draft):
  if draft:
    tiny = V.Visualizer(tiny_config(draft_width=draft), rngs=nnx.Rngs(0))
  tokens = unit_tokens(2, b=64)
  full = tiny.condition(tokens)
  never = variant(tiny, cond_drop_prob=0.0).training_condition(tokens, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, never, full)
  always = variant(tiny, cond_drop_prob=1.0)
  jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), always.training_condition(tokens, jax.random.key(0)))
  some = variant(tiny, cond_drop_prob=0.5).training_condition(tokens, jax.random.key(0))
  per_example = lambda f: np.all([np.all(f(a, b), axis=tuple(range(1, a.ndim)))
                                  for a, b in zip(jax.tree.leaves(some), jax.tree.leaves(full))], axis=0)
  dropped = per_example(lambda a, _: np.asarray(a) == 0.0)
  kept = per_example(lambda a, b: np.asarray(a) == np.asarray(b))
  assert np.all(dropped ^ kept) and 10 < dropped.sum() < 54  # each condition whole: dropped or kept
  # in the loss path: with p = 1 the diffusion loss does not see the tokens
  graphdef, state = nnx.split(always)
  imgs, rng = images(1), jax.random.key(3)
  loss = jax.jit(lambda s, t: nnx.merge(graphdef, s).loss(imgs, t, rng)[1]["loss_diffusion"])
  assert float(loss(state, unit_tokens(4))) == float(loss(state, unit_tokens(5)))


# ----------------------------------------------------------------------------- sampling


def test_guidance_one_is_the_conditional_prediction(tiny):
  graphdef, state = nnx.split(tiny)
  x = jax.random.normal(jax.random.key(0), (B, 3, SIZE, SIZE))

  @jax.jit
  def both(state, tokens, guidance):
    v = nnx.merge(graphdef, state)
    cond = v.condition(tokens)
    t = jnp.int32(500)
    plain = v.predict(x, jnp.full((B,), t), cond)
    return plain, v.guided_prediction(x, t, cond, guidance), v.guided_prediction(x, t, cond, 1.0, use_cfg=False)

  plain, guided, skipped = both(state, unit_tokens(0), jnp.float32(1.0))
  np.testing.assert_allclose(guided, plain, atol=1e-6, rtol=0)
  np.testing.assert_array_equal(skipped, plain)
  _, strong, _ = both(state, unit_tokens(0), jnp.float32(4.0))
  assert float(jnp.abs(strong - plain).max()) > 1e-4  # the unconditional half matters for g != 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_recover_the_image_from_the_true_noise(prediction_type):
  """The loop and schedulers with an oracle model output (for a known x0) land on x0."""
  config = tiny_config(prediction_type=prediction_type)
  x0 = jnp.transpose(images(0), (0, 3, 1, 2)) * 0.9
  alphas = V.scheduler("ddim", config.schedule).create_state().common.alphas_cumprod

  def oracle(x, t):
    a = alphas[t]
    eps = (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a)
    return eps if prediction_type == "epsilon" else jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0

  for sampler, steps, tol in (("ddim", 1, 1e-5), ("ddim", 7, 1e-5), ("dpm", 7, 0.05)):
    out = V.denoise(config, oracle, x0.shape, steps=steps, rng=jax.random.key(0), sampler=sampler)
    assert float(jnp.abs(out - x0).max()) < tol, (sampler, steps)
  # clip_sample holds the implied x0 in [-1, 1] for both samplers, even for a useless model
  useless = lambda x, t: jnp.zeros_like(x)
  for sampler in V.SAMPLERS:
    out = V.denoise(config, useless, x0.shape, steps=7, rng=jax.random.key(0), sampler=sampler)
    assert float(jnp.abs(out).max()) < 1.1, sampler
    wild = V.denoise(config.replace(clip_sample=False), useless, x0.shape, steps=7, rng=jax.random.key(0),
                     sampler=sampler)
    if prediction_type == "epsilon":  # x0 = (x - sigma * 0) / alpha: ~100x the noise without clipping
      assert float(jnp.abs(wild).max()) > 10, sampler


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_sampling_is_deterministic_per_seed(tiny, sampler):
  tokens = unit_tokens(0)
  a = V.render(tiny, tokens, steps=3, seed=0, sampler=sampler)
  b = V.render(tiny, tokens, steps=3, seed=0, sampler=sampler)
  c = V.render(tiny, tokens, steps=3, seed=1, sampler=sampler)
  assert a.shape == (B, SIZE, SIZE, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, b)
  assert np.any(a != c)


def test_bad_inputs_give_clear_errors(tiny):
  with pytest.raises(ValueError, match=r"expected 4 visual tokens per image \(num_tokens\), got 5"):
    tiny.condition(jnp.zeros((B, 5, DV)))
  with pytest.raises(ValueError, match=r"expected visual tokens of width 8 \(token_dim\), got 9"):
    V.render(tiny, jnp.zeros((B, M, DV + 1)))
  with pytest.raises(ValueError, match=r"tokens must be \[B, m, Dv\]"):
    V.render(tiny, jnp.zeros((M, DV)))
  with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, 3\].*\(2, 8, 8, 3\)"):
    tiny.loss(jnp.zeros((B, 8, 8, 3)), unit_tokens(0), jax.random.key(0))
  with pytest.raises(ValueError, match=r"images must be \[B, 16, 16, 3\].*\(2, 16, 16, 4\)"):
    tiny.loss(jnp.zeros((B, SIZE, SIZE, 4)), unit_tokens(0), jax.random.key(0))
  with pytest.raises(ValueError, match="steps must be an int >= 1"):
    V.render(tiny, unit_tokens(0), steps=0)
  with pytest.raises(ValueError, match="guidance must be >= 0"):
    V.render(tiny, unit_tokens(0), guidance=-1.0)
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    V.render(tiny, unit_tokens(0), sampler="euler")


# ----------------------------------------------------------------------------- other layouts


def test_latent_mode_with_a_tiny_vae(tiny_latent):
  visualizer = tiny_latent
  assert visualizer.config.sample_size == SIZE // 2
  assert visualizer.vae_params()["encoder"]["conv_in"]["kernel"].shape == (3, 3, 3, 8)
  graphdef, params, rest = nnx.split(visualizer, V.Visualizer.TRAINABLE, ...)
  assert not any("vae" in p for p, _ in nnx.to_flat_state(params))
  assert any(p[0] == "vae" for p, _ in nnx.to_flat_state(rest))
  imgs, tokens = images(2), unit_tokens(2)

  @jax.jit
  def loss_grad(params, rest):
    return jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(imgs, tokens, jax.random.key(0))[0])(params)

  loss, grads = loss_grad(params, rest)
  assert np.isfinite(float(loss)) and float(loss) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["unet"]["conv_in"]["kernel"][...]).max()) > 0
  assert float(jnp.abs(grads["adapter"]["fc1"]["kernel"][...]).max()) > 0

  latents = jax.eval_shape(lambda: visualizer.encode(imgs, jax.random.key(0)))
  assert latents.shape == (B, 4, SIZE // 2, SIZE // 2)
  assert visualizer.condition(tokens).context.shape == (B, 6, 32)
  for sampler in V.SAMPLERS:
    out = jax.eval_shape(lambda s=sampler: visualizer.sample(tokens, guidance=2.0, steps=2, rng=jax.random.key(0),
                                                             sampler=s))
    assert out.shape == (B, SIZE, SIZE, 3)


def torch_vae(visualizer: V.Visualizer):
  """diffusers' PyTorch ``AutoencoderKL`` of the visualizer's VAE config, holding its weights
  (renamed and transposed here; every tensor placed: strict loading)."""
  import torch  # slow import: torch and diffusers' PyTorch models, for this reference only
  from diffusers import AutoencoderKL
  vae = AutoencoderKL(**{k: list(v) if isinstance(v, tuple) else v for k, v in visualizer.config.vae_kwargs.items()})
  attention = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
  state = {}
  for name, value in module_params(visualizer).items():
    if not name.startswith("vae/"):
      continue
    *path, leaf = name[len("vae/"):].split("/")
    path = [attention.get(p, re.sub(r"_(\d+)$", r".\1", p)) for p in path]
    value = np.array(value, np.float32)
    if leaf == "kernel":
      leaf, value = "weight", (np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T)
    state[".".join(path + ["weight" if leaf == "scale" else leaf])] = torch.from_numpy(np.ascontiguousarray(value))
  vae.load_state_dict(state, strict=True)
  return vae.eval()


def test_latent_sampling_is_a_diffusers_vae_decode_of_the_denoised_latents(tiny_latent, monkeypatch):
  """Latent mode, run for real: ``sample`` (DDIM, guided) denoises latents with the UNet and
  its images are PyTorch diffusers' ``AutoencoderKL.decode`` of those latents / scaling
  factor, clipped to [-1, 1], with the same weights."""
  import torch  # slow import: torch, for the reference decode only
  v = variant(tiny_latent, vae_scaling_factor=0.5)  # a scale that a missing division would show
  calls = {}
  real_denoise = model_module.denoise

  def denoise_spy(*args, **kwargs):
    calls["latents"] = real_denoise(*args, **kwargs)
    return calls["latents"]

  monkeypatch.setattr(model_module, "denoise", denoise_spy)
  graphdef, state = nnx.split(v)
  tokens, rng = unit_tokens(2), jax.random.key(3)
  sample = jax.jit(lambda s: (nnx.merge(graphdef, s).sample(tokens, guidance=2.0, steps=3, rng=rng),
                              calls["latents"]))
  out, latents = jax.device_get(sample(state))
  assert out.shape == (B, SIZE, SIZE, 3) and latents.shape == (B, 4, SIZE // 2, SIZE // 2)
  noise = np.asarray(jax.random.normal(rng, latents.shape))
  assert np.abs(latents - noise).max() > 0.1  # the UNet's steps moved the latents
  with torch.no_grad():
    want = torch_vae(v).decode(torch.from_numpy(latents / 0.5)).sample.clamp(-1, 1).numpy()
  want = np.transpose(want, (0, 2, 3, 1))
  assert 0.05 < np.mean(np.abs(want) < 1) and want.std() > 0.05  # not all clipped, not constant
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)  # measured: 1e-6


def test_visualizer_model_tokens_and_reconstruct(tiny):
  config = V.VisualizerModelConfig(vision=tiny_vision(), visualizer=tiny.config)
  assert V.VisualizerModelConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
  model = V.VisualizerModel(config, rngs=nnx.Rngs(0), visualizer=tiny)
  imgs = images(3)
  tokens = model.tokens(imgs)
  assert tokens.shape == (B, M, DV)
  np.testing.assert_allclose(jnp.linalg.norm(tokens, axis=-1), 1.0, atol=1e-5)

  uint8 = np.asarray(jnp.round((imgs + 1) * 127.5), np.uint8)
  out = V.reconstruct(tiny, model.vision, uint8, steps=3, seed=0)
  np.testing.assert_array_equal(out, V.render(tiny, V.encode_tokens(model.vision, uint8, M), steps=3, seed=0))
  assert out.shape == (B, SIZE, SIZE, 3) and out.dtype == np.uint8
  with pytest.raises(ValueError, match="token_dim"):
    V.VisualizerModelConfig(vision=tiny_vision().replace(hidden_size=12), visualizer=tiny.config)


def test_draft_decoder_unfolds_each_token_over_its_cell_and_feeds_the_unet():
  """The draft: fc1 features mixed across tokens by ``mix`` (identity at init), token i's fc2
  output unfolded to an r x r x F block at row i // k, column i % k of the k x k grid; three
  3x3 'SAME' convs follow. ``predict`` equals diffusers' UNet on [x, draft] (channels
  concatenated); the unconditional draft is zeros."""
  from diffusers import FlaxUNet2DConditionModel
  w, k = 4, 2
  r, f = SIZE // k, w // 2
  v = V.Visualizer(tiny_config(draft_width=w), rngs=nnx.Rngs(0))
  assert v.config.unet["in_channels"] == 6
  np.testing.assert_array_equal(v.draft.mix[...], np.eye(M))
  v.draft.mix[...] = jax.random.normal(jax.random.key(9), (M, M))  # a mixing that is not the identity
  tokens = unit_tokens(0)
  p = {n: np.asarray(a, np.float64) for n, a in module_params(v).items()}
  h = jax.nn.gelu(tokens @ p["draft/fc1/kernel"] + p["draft/fc1/bias"])
  mixed = np.stack([sum(p["draft/mix"][j, i] * h[:, j] for j in range(M)) for i in range(M)], axis=1)
  cells = mixed @ p["draft/fc2/kernel"] + p["draft/fc2/bias"]
  x = np.zeros((B, SIZE, SIZE, f))
  for i in range(M):
    x[:, (i // k) * r:(i // k + 1) * r, (i % k) * r:(i % k + 1) * r] = np.asarray(cells[:, i]).reshape(B, r, r, f)
  for n in (1, 2, 3):
    x = jax.lax.conv_general_dilated(x, p[f"draft/conv{n}/kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC")) + p[f"draft/conv{n}/bias"]
    x = jax.nn.gelu(x) if n < 3 else x
  cond = v.condition(tokens)
  np.testing.assert_allclose(cond.draft, np.transpose(x, (0, 3, 1, 2)), atol=1e-5, rtol=0)
  noisy = jax.random.normal(jax.random.key(1), (B, 3, SIZE, SIZE))
  unet = FlaxUNet2DConditionModel(**v.config.unet)
  t = jnp.full((B,), 300)
  want = unet.apply({"params": v.unet_params()}, jnp.concatenate([noisy, cond.draft], axis=1), t, cond.context).sample
  np.testing.assert_allclose(v.predict(noisy, t, cond), want, atol=1e-5, rtol=0)
  uncond = v.unconditional(3)
  assert uncond.draft.shape == (3, 3, SIZE, SIZE) and not np.any(uncond.draft)


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_only_the_draft_loss_trains_the_draft(weight):
  """The UNet sees the draft with its gradient stopped: with ``draft_weight`` 0 the draft
  decoder gets exactly zero gradient; with 1 it gets the gradient of its own MSE, which is
  reported as ``loss_draft``."""
  v = V.Visualizer(tiny_config(draft_width=4, draft_weight=weight), rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(v, nnx.Param, ...)
  imgs, tokens, rng = images(1), unit_tokens(2), jax.random.key(3)
  (loss, aux), grads = jax.value_and_grad(lambda p: nnx.merge(graphdef, p, rest).loss(imgs, tokens, rng),
                                          has_aux=True)(params)
  draft_grads = [np.abs(g).max() for g in jax.tree.leaves(grads["draft"])]
  draft = v.condition(tokens).draft
  target = jnp.transpose(imgs, (0, 3, 1, 2))
  np.testing.assert_allclose(aux["loss_draft"], np.mean(np.square(draft - target)), rtol=1e-5)
  np.testing.assert_allclose(loss, aux["loss_diffusion"] + weight * aux["loss_draft"], rtol=1e-6)
  if weight:
    assert min(draft_grads) > 0
  else:
    assert max(draft_grads) == 0.0


@pytest.mark.parametrize("positions", [False, True])
def test_token_positions_tell_the_condition_which_token_is_which(positions):
  """Without token positions the MLP adapter treats the tokens as an unordered set (a
  permutation of the tokens permutes the condition exactly); with them it does not."""
  v = V.Visualizer(tiny_config(token_positions=positions), rngs=nnx.Rngs(0))
  tokens = jax.random.normal(jax.random.key(1), (2, M, DV))
  perm = np.roll(np.arange(M), 1)
  permuted, original = np.asarray(v.condition(tokens[:, perm]).context), np.asarray(v.condition(tokens).context)[:, perm]
  if positions:
    assert module_params(v)["token_positions"].shape == (M, DV)
    assert np.abs(permuted - original).max() > 1e-3
  else:
    np.testing.assert_array_equal(permuted, original)


@pytest.mark.parametrize("strength", [0.3, 0.75])
def test_draft_strength_is_diffusers_img2img(strength):
  """With ``init`` and ``strength`` < 1, ``denoise`` is diffusers' (PyTorch) img2img loop: the
  last int(steps * strength) DDIM timesteps, starting from ``add_noise(init, noise, t_start)``."""
  import torch
  from diffusers import DDIMScheduler
  config = tiny_config(draft_width=4, draft_strength=strength)
  init = jnp.transpose(images(3), (0, 3, 1, 2)) * 0.8
  shape, steps, rng = init.shape, 10, jax.random.key(5)
  eps_fn = lambda x, t: 0.5 * x - 0.001 * t  # any deterministic model output
  ours = V.denoise(config, eps_fn, shape, steps=steps, rng=rng, init=init, strength=strength)

  ref = DDIMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                      beta_start=config.beta_start, beta_end=config.beta_end,
                      prediction_type=config.prediction_type, clip_sample=config.clip_sample,
                      set_alpha_to_one=config.set_alpha_to_one, steps_offset=config.steps_offset)
  ref.set_timesteps(steps)
  timesteps = ref.timesteps[steps - int(steps * strength):]
  noise = torch.from_numpy(np.array(jax.random.normal(rng, shape, jnp.float32)))
  x = ref.add_noise(torch.from_numpy(np.array(init)), noise, timesteps[:1])
  for t in timesteps:
    x = ref.step(0.5 * x - 0.001 * float(t), t, x).prev_sample
  np.testing.assert_allclose(ours, x.numpy(), atol=1e-5, rtol=0)
  assert V.strength_steps(steps, strength) == len(timesteps)


@pytest.mark.parametrize("sampler, tol", [("ddim", 1e-5), ("dpm", 0.05)])
def test_samplers_from_a_noised_init_land_on_it(sampler, tol):
  """Started from ``init`` noised halfway, both loops with an oracle model output land on ``init``."""
  config = tiny_config(draft_width=4, draft_strength=0.5)
  x0 = jnp.transpose(images(1), (0, 3, 1, 2)) * 0.9
  alphas = V.scheduler("ddim", config.schedule).create_state().common.alphas_cumprod

  def oracle(x, t):  # v-prediction (the toy preset's) for the known x0
    a = alphas[t]
    return jnp.sqrt(a) * (x - jnp.sqrt(a) * x0) / jnp.sqrt(1 - a) - jnp.sqrt(1 - a) * x0

  out = V.denoise(config, oracle, x0.shape, steps=8, rng=jax.random.key(0), sampler=sampler, init=x0,
                  strength=0.5)
  assert float(jnp.abs(out - x0).max()) < tol


def test_sampling_starts_from_the_noised_draft():
  """``draft_strength`` < 1: ``sample`` runs ``denoise`` from the condition's draft; 1 ignores it."""
  v = V.Visualizer(tiny_config(draft_width=4, draft_strength=1.0), rngs=nnx.Rngs(0))
  tokens, rng = unit_tokens(0), jax.random.key(2)
  half = variant(v, draft_strength=0.5)
  cond = half.condition(tokens)
  eps_fn = lambda x, t: half.guided_prediction(x, t, cond, 1.0, False)
  want = half.decode(V.denoise(half.config, eps_fn, (B, 3, SIZE, SIZE), steps=4, rng=rng, init=cond.draft,
                               strength=0.5))
  np.testing.assert_allclose(half.sample(tokens, guidance=1.0, steps=4, rng=rng), want, atol=1e-6, rtol=0)
  full = v.sample(tokens, guidance=1.0, steps=4, rng=rng)
  assert float(jnp.abs(full - want).max()) > 1e-3
  assert V.strength_steps(1, 0.5) == 1 and V.strength_steps(10, 0.3) == 3  # never no step at all
  assert half.sample(tokens, guidance=1.0, steps=1, rng=rng).shape == (B, SIZE, SIZE, 3)
