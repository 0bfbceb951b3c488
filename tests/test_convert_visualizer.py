"""Stable Diffusion (visualizer) conversion: diffusers PyTorch folders -> diffusers Flax trees.

The reference is a tiny random diffusers PyTorch UNet / VAE saved as a Stable
Diffusion folder; the converted parameters must make diffusers' Flax classes
compute the same outputs.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from metamorph.convert import ConversionError
from metamorph.convert import visualizer as V
from metamorph.convert.__main__ import main as convert_main
from metamorph.files import read_safetensors_file, write_json, write_safetensors
from metamorph.models.visualizer.diffusers_modules import quiet_diffusers

UNET_KW = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "block_out_channels": (32, 64),
           "layers_per_block": 1, "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
           "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"), "cross_attention_dim": 32,
           "attention_head_dim": 8,
           "norm_num_groups": 32}  # the Flax UNet hard-codes 32 groups (its GroupNorms ignore the config)
VAE_KW = {"block_out_channels": (32, 64), "down_block_types": ("DownEncoderBlock2D",) * 2,
          "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 8,
          "sample_size": 32}
UNET_FILE = os.path.join("unet", "diffusion_pytorch_model.safetensors")
VAE_FILE = os.path.join("vae", "diffusion_pytorch_model.safetensors")


def _perturb(model, seed):
  """Every tensor away from its init (norm scales 1, biases 0), so each one matters."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim > 1:
        p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
      else:
        p.copy_(0.3 * noise + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
  return model.eval()


@pytest.fixture(autouse=True)
def _quiet():
  """No 'Flax classes are deprecated' warning from each diffusers Flax module's setup()."""
  quiet_diffusers()
  yield


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
  """(folder, torch UNet, torch VAE): a tiny Stable-Diffusion-like diffusers folder."""
  import torch
  from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
  torch.manual_seed(0)
  folder = str(tmp_path_factory.mktemp("sd"))
  unet = _perturb(UNet2DConditionModel(**UNET_KW), 1)
  vae = _perturb(AutoencoderKL(**VAE_KW), 2)
  unet.save_pretrained(os.path.join(folder, "unet"))
  vae.save_pretrained(os.path.join(folder, "vae"))
  DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(
      os.path.join(folder, "scheduler"))
  write_json(os.path.join(folder, "model_index.json"),
             {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
              "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"]})
  return folder, unet, vae


@pytest.fixture(scope="module")
def converted(sd):
  return V.read_stable_diffusion(sd[0])


@pytest.fixture
def broken(sd, tmp_path):
  """A fresh copy of the good folder to break."""
  dst = str(tmp_path / "broken")
  shutil.copytree(sd[0], dst)
  return dst


def _load_json(path):
  with open(path) as f:
    return json.load(f)


def _flat(tree):
  return {"/".join(k): v for k, v in flatten_dict(dict(tree)).items()}


def _assert_same_params(a, b):
  a, b = _flat(a), _flat(b)
  assert sorted(a) == sorted(b)
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ----------------------------------------------------------------------------- parity


def test_configs_are_flax_kwargs(converted):
  unet, vae, scheduler = (converted["config"][k] for k in ("unet", "vae", "scheduler"))
  assert unet["block_out_channels"] == (32, 64) and unet["cross_attention_dim"] == 32
  assert unet["down_block_types"] == ("CrossAttnDownBlock2D", "DownBlock2D")
  assert not any(k.startswith("_") or k in ("norm_num_groups", "act_fn") for k in unet)
  assert vae["norm_num_groups"] == 8 and vae["latent_channels"] == 4 and "force_upcast" not in vae
  assert scheduler["_class_name"] == "DDPMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
  assert scheduler["num_train_timesteps"] == 1000 and "_diffusers_version" not in scheduler
  params = _flat(converted["params"]["unet"])
  assert params["down_blocks_0/resnets_0/conv1/kernel"].shape == (3, 3, 32, 32)
  assert params["down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"].shape == (32, 32)
  assert _flat(converted["params"]["vae"])["encoder/mid_block/attentions_0/query/kernel"].shape == (64, 64)


def test_unet_matches_pytorch(sd, converted, monkeypatch):
  import torch
  import torch.nn.functional as F
  from diffusers.models.activations import GEGLU
  unet = sd[1]
  rng = np.random.default_rng(0)
  sample = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)  # NCHW, as in PyTorch
  timesteps = np.array([10, 731], np.int32)
  context = rng.standard_normal((2, 7, 32)).astype(np.float32)
  model = V.flax_unet(converted["config"]["unet"])
  ours = np.asarray(jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c).sample)(
      converted["params"]["unet"], sample, timesteps, context))

  def reference():
    with torch.no_grad():
      return unet(torch.tensor(sample), torch.tensor(timesteps).long(), torch.tensor(context)).sample.numpy()

  ref = reference()
  assert ours.shape == ref.shape == sample.shape
  print("max abs diff vs PyTorch (exact GELU):", np.abs(ours - ref).max())
  # diffusers' Flax GEGLU uses the tanh-approximate GELU where PyTorch's is exact
  # (up to ~4e-4 here, from the model, not the conversion) ...
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-3)
  # ... with the same GELU on both sides the converted UNet matches to float32 noise.
  monkeypatch.setattr(GEGLU, "gelu", lambda self, gate: F.gelu(gate, approximate="tanh"))
  ref = reference()
  print("max abs diff vs PyTorch (tanh GELU):", np.abs(ours - ref).max())
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_vae_matches_pytorch(sd, converted):
  import torch
  vae = sd[2]
  rng = np.random.default_rng(1)
  image = rng.standard_normal((2, 3, 32, 32)).astype(np.float32)
  latents = rng.standard_normal((2, 4, 16, 16)).astype(np.float32)
  with torch.no_grad():
    ref_mean = vae.encode(torch.tensor(image)).latent_dist.mean.numpy()
    ref_image = vae.decode(torch.tensor(latents)).sample.numpy()
  model, params = V.flax_vae(converted["config"]["vae"]), {"params": converted["params"]["vae"]}
  mean = np.asarray(model.apply(params, image, method=model.encode).latent_dist.mean)
  decoded = np.asarray(model.apply(params, latents, method=model.decode).sample)
  # Flax's posterior is channels-last; decode takes NCHW latents (and returns NCHW).
  mean = mean.transpose(0, 3, 1, 2)
  print("max abs diff vs PyTorch: encode", np.abs(mean - ref_mean).max(), "decode",
        np.abs(decoded - ref_image).max())
  np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-4)
  np.testing.assert_allclose(decoded, ref_image, rtol=0, atol=1e-4)


# ----------------------------------------------------------------------------- our folder


def test_round_trip_is_exact(sd, converted, tmp_path):
  dst = str(tmp_path / "ours")
  V.convert_visualizer(sd[0], dst)
  meta = _load_json(os.path.join(dst, "config.json"))
  assert meta["format"] == "metamorph" and meta["kind"] == "stable_diffusion"
  assert sorted(meta["config"]) == ["scheduler", "unet", "vae"]
  flat = read_safetensors_file(os.path.join(dst, "model.safetensors"))
  assert "unet/down_blocks_0/resnets_0/conv1/kernel" in flat
  assert "unet/up_blocks_1/attentions_0/transformer_blocks_0/ff/net_0/proj/kernel" in flat
  assert "vae/decoder/mid_block/attentions_0/proj_attn/bias" in flat
  assert {k.split("/")[0] for k in flat} == {"unet", "vae"}
  back = V.read_converted_visualizer(dst)
  assert back["config"] == converted["config"]
  for part in ("unet", "vae"):
    _assert_same_params(back["params"][part], converted["params"][part])
  again = V.read_stable_diffusion(dst)  # our folder is accepted wherever a source is
  _assert_same_params(again["params"]["unet"], converted["params"]["unet"])


def test_converted_folder_damage_is_named(sd, tmp_path):
  dst = str(tmp_path / "ours")
  V.convert_visualizer(sd[0], dst)
  path = os.path.join(dst, "model.safetensors")
  flat = read_safetensors_file(path)
  flat["vae/quant_conv/kernel"] = flat["vae/quant_conv/kernel"][..., :4]
  write_safetensors(path, flat)
  with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'vae/quant_conv/kernel' has shape "
                                            r"\(1, 1, 8, 4\), the config implies \(1, 1, 8, 8\)"):
    V.read_converted_visualizer(dst)


# ----------------------------------------------------------------------------- layouts


def test_without_torch(sd):
  code = ("import sys; sys.modules['torch'] = None\n"
          "from metamorph.convert import visualizer as V\n"
          f"m = V.read_stable_diffusion({sd[0]!r})\n"
          "assert sys.modules.get('torch') is None\n"
          "print(V.count_params(m['params']['unet']))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0, out.stderr[-2000:]
  assert int(out.stdout.split()[-1]) == sum(p.numel() for p in sd[1].parameters())


def test_sharded_weights(broken, converted):
  folder = os.path.join(broken, "unet")
  tensors = read_safetensors_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  os.remove(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  names = sorted(tensors)
  shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[::2],
            "diffusion_pytorch_model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    write_safetensors(os.path.join(folder, shard), {k: tensors[k] for k in keys})
  write_json(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"),
             {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}})
  _, params = V.read_unet(broken)
  _assert_same_params(params, converted["params"]["unet"])
  # a wrong shape in a shard names that shard
  second = os.path.join(folder, "diffusion_pytorch_model-00002-of-00002.safetensors")
  part = read_safetensors_file(second)
  name = next(k for k in sorted(part) if k.endswith("conv1.weight"))
  part[name] = part[name][:, :-1]
  write_safetensors(second, part)
  with pytest.raises(ConversionError, match=rf"00002-of-00002\.safetensors: tensor '{name}' has shape"):
    V.read_unet(broken)


def test_old_vae_attention_names(broken, converted):
  """VAEs saved before diffusers 0.14 name the attention query/key/value/proj_attn."""
  path = os.path.join(broken, VAE_FILE)
  old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed = {}
  for k, v in read_safetensors_file(path).items():
    for new, was in old.items():
      k = k.replace(f".{new}.", f".{was}.")
    renamed[k] = v
  assert any(".proj_attn." in k for k in renamed)
  write_safetensors(path, renamed)
  _, params = V.read_vae(broken)
  _assert_same_params(params, converted["params"]["vae"])


SD15_UNET = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
             "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
             "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], "downsample_padding": 1,
             "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
             "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
             "sample_size": 64, "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD15_VAE = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
            "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
            "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
            "out_channels": 3, "sample_size": 512, "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.mark.parametrize("part, cfg, count", [("unet", SD15_UNET, 859_520_964), ("vae", SD15_VAE, 83_653_863)])
def test_sd15_layout(part, cfg, count):
  """At Stable Diffusion 1.5 size, every Flax parameter has its PyTorch tensor (name and shape)."""
  import torch
  from diffusers import AutoencoderKL, UNet2DConditionModel
  with torch.device("meta"):
    pt = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[part].from_config(cfg)
  to_config = {"unet": V.unet_config_from_diffusers, "vae": V.vae_config_from_diffusers}[part]
  shapes = V.param_shapes(part, to_config(cfg, "config.json"))
  assert sum(int(np.prod(s)) for s in shapes.values()) == count
  assert {V.pt_name(k): V.pt_shape(k, s) for k, s in shapes.items()} == {
      k: tuple(v.shape) for k, v in pt.state_dict().items()}


# ----------------------------------------------------------------------------- errors


def test_missing_unet_config(broken):
  os.remove(os.path.join(broken, "unet", "config.json"))
  with pytest.raises(ConversionError, match=r"unet/config\.json: file not found"):
    V.read_stable_diffusion(broken)


def test_missing_scheduler(broken):
  shutil.rmtree(os.path.join(broken, "scheduler"))
  with pytest.raises(ConversionError, match=r"scheduler: no such folder"):
    V.read_stable_diffusion(broken)


def test_garbled_weights(broken):
  path = os.path.join(broken, VAE_FILE)
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  with pytest.raises(ConversionError,
                     match=r"vae/diffusion_pytorch_model\.safetensors: not a readable safetensors file"):
    V.read_stable_diffusion(broken)


def test_no_weights(broken):
  os.remove(os.path.join(broken, UNET_FILE))
  open(os.path.join(broken, "unet", "diffusion_pytorch_model.bin"), "wb").close()
  with pytest.raises(ConversionError, match=r"unet/diffusion_pytorch_model\.safetensors: file not found.*"
                                            r"need torch"):
    V.read_stable_diffusion(broken)


def test_wrong_shape_is_named(broken):
  path = os.path.join(broken, UNET_FILE)
  tensors = read_safetensors_file(path)
  name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  tensors[name] = tensors[name][:, :16]
  write_safetensors(path, tensors)
  with pytest.raises(ConversionError, match=rf"unet/diffusion_pytorch_model\.safetensors: tensor "
                                            rf"'{name}' has shape \(32, 16\), the config implies \(32, 32\)"):
    V.read_stable_diffusion(broken)


def test_missing_and_unexpected_tensors_are_named(broken):
  path = os.path.join(broken, UNET_FILE)
  tensors = read_safetensors_file(path)
  kernel = tensors.pop("up_blocks.1.resnets.1.conv_shortcut.weight")
  write_safetensors(path, tensors)
  with pytest.raises(ConversionError, match=r"tensor 'up_blocks\.1\.resnets\.1\.conv_shortcut\.weight' is "
                                            r"missing \(shape \(32, 64, 1, 1\)"):
    V.read_unet(broken)
  tensors["up_blocks.1.resnets.1.conv_shortcut.weight"] = kernel
  tensors["class_embedding.linear_1.weight"] = np.zeros((4, 4), np.float32)
  write_safetensors(path, tensors)
  with pytest.raises(ConversionError, match=r"unet/diffusion_pytorch_model\.safetensors: tensor "
                                            r"'class_embedding\.linear_1\.weight' has no place"):
    V.read_unet(broken)


@pytest.mark.parametrize("part, field, value, message", [
    ("unet", "norm_num_groups", 8, r"field 'norm_num_groups' = 8 is not supported"),
    ("unet", "down_block_types", ["AttnDownBlock2D", "DownBlock2D"], r"'AttnDownBlock2D'"),
    ("unet", "class_embed_type", "timestep", r"field 'class_embed_type'"),
    ("unet", "_class_name", "UNet2DModel", r"_class_name is 'UNet2DModel'"),
    ("vae", "use_quant_conv", False, r"field 'use_quant_conv' = False"),
    ("vae", "some_new_feature", "on", r"unknown AutoencoderKL field\(s\) \['some_new_feature'\]"),
    ("unet", "block_out_channels", [32], r"diffusers' Flax unet cannot be built from this config"),
])
def test_unsupported_architecture(broken, part, field, value, message):
  path = os.path.join(broken, part, "config.json")
  cfg = _load_json(path)
  cfg[field] = value
  write_json(path, cfg)
  with pytest.raises(ConversionError, match=rf"{part}/config\.json: .*{message}"):
    V.read_stable_diffusion(broken)


def test_num_attention_heads_becomes_attention_head_dim():
  cfg = {"_class_name": "UNet2DConditionModel", "attention_head_dim": 64, "num_attention_heads": 5,
         "block_out_channels": [320, 640], "sample_size": None, "upcast_attention": True}
  out = V.unet_config_from_diffusers(cfg, "x")
  assert out["attention_head_dim"] == 5 and "num_attention_heads" not in out
  assert out["sample_size"] == 64 and out["block_out_channels"] == (320, 640)


# ----------------------------------------------------------------------------- CLI


def test_cli(sd, tmp_path, capsys):
  dst = str(tmp_path / "ours")
  assert convert_main(["visualizer", sd[0], dst]) == 0
  assert "Stable Diffusion visualizer" in capsys.readouterr().out
  assert _load_json(os.path.join(dst, "config.json"))["kind"] == "stable_diffusion"
  assert convert_main(["visualizer", str(tmp_path / "missing"), dst]) == 2
  assert "missing: no such folder" in capsys.readouterr().err


def test_cli_help():
  out = subprocess.run([sys.executable, "-m", "metamorph.convert", "visualizer", "--help"],
                       capture_output=True, text=True, check=True).stdout
  assert "Stable Diffusion" in out
