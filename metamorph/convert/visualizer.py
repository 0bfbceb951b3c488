"""Stable Diffusion weights (the visualizer): diffusers folders and our converted checkpoints.

Reads a local diffusers Stable Diffusion folder (``unet/``, ``vae/``,
``scheduler/``, ``model_index.json``) into the parameter trees of diffusers'
Flax classes ``FlaxUNet2DConditionModel`` and ``FlaxAutoencoderKL``, without
torch: tensors come from the safetensors files through numpy and are renamed
and transposed here. The trees' expected names and shapes come from the Flax
model's ``init_weights`` under ``jax.eval_shape`` (nothing is initialised), so
every tensor is checked: a missing, unexpected or wrongly shaped one is a
``ConversionError`` naming the file and the PyTorch tensor.

PyTorch -> Flax, per tensor:
  ``down_blocks.0.resnets.1.conv1.weight`` -> ``down_blocks_0/resnets_1/conv1/kernel``
  Conv2d weight [O, I, kh, kw] -> kernel [kh, kw, I, O]; Linear weight [O, I] -> kernel [I, O];
  GroupNorm / LayerNorm weight -> scale; bias -> bias.
  The VAE's attention projections ``to_q/to_k/to_v/to_out.0`` (or the older
  ``query/key/value/proj_attn``) -> ``query/key/value/proj_attn``.

Our converted folder (``metamorph.model_folder``, kind ``STABLE_DIFFUSION``): ``config.json``'s
``config`` = ``{"unet": ..., "vae": ..., "scheduler": ...}`` and
``model.safetensors`` with flat keys ``"unet/" + "/".join(flax path)`` and
``"vae/" + ...``, e.g. ``unet/down_blocks_0/resnets_0/conv1/kernel``.

Configs returned here are keyword arguments for the Flax classes (lists become
tuples); ``dtype`` is left to the caller (``FlaxUNet2DConditionModel(**config,
dtype=...)``). Parameters keep the checkpoint's dtype.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import jax
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from metamorph.files import ConversionError, read_json, read_safetensors_file, read_sharded
from metamorph import model_folder

PARTS = ("unet", "vae")
WEIGHTS_NAME = "diffusion_pytorch_model"

UNET_CLASS = "UNet2DConditionModel"
VAE_CLASS = "AutoencoderKL"

# ----------------------------------------------------------------------------- configs

# Keys of a diffusers config.json that are bookkeeping, not architecture.
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")

# UNet2DConditionModel fields FlaxUNet2DConditionModel takes as they are.
_UNET_PASS = ("sample_size", "in_channels", "out_channels", "down_block_types", "up_block_types",
              "mid_block_type", "only_cross_attention", "block_out_channels", "layers_per_block",
              "attention_head_dim", "cross_attention_dim", "dropout", "use_linear_projection",
              "flip_sin_to_cos", "freq_shift", "transformer_layers_per_block", "addition_embed_type",
              "addition_time_embed_dim", "addition_embed_type_num_heads",
              "projection_class_embeddings_input_dim")
# Fields the Flax UNet hard-codes: the checkpoint must have exactly these values.
_UNET_FIXED = {
    "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1,
    "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "num_class_embeds": None, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
}
# Fields that do not change a float32 forward pass (or only apply to blocks the
# Flax UNet does not have): dropped.
_UNET_IGNORED = ("upcast_attention", "mid_block_only_cross_attention", "num_attention_heads")
_UNET_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UNET_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
_UNET_MID = ("UNetMidBlock2DCrossAttn", None)
_UNET_ADDITION = (None, "text_time")
_DEFAULT_SAMPLE_SIZE = 64  # Stable Diffusion 1.x latents (512 / 8); only shapes the init

_VAE_PASS = ("in_channels", "out_channels", "down_block_types", "up_block_types",
             "block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups",
             "sample_size", "scaling_factor")
_VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True,
              "mid_block_add_attention": True, "shift_factor": None, "latents_mean": None,
              "latents_std": None}
_VAE_IGNORED = ("force_upcast",)  # a half-precision hint for pipelines
_VAE_DOWN = ("DownEncoderBlock2D",)
_VAE_UP = ("UpDecoderBlock2D",)


def _tuples(value):
  """JSON lists -> tuples, recursively (the Flax modules are hashable dataclasses)."""
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def _same(value, expected) -> bool:
  """``value == expected``, numbers compared as numbers (1 == 1.0) but never as booleans."""
  def number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)
  if number(expected):
    return number(value) and math.isclose(value, expected, rel_tol=1e-6)
  return type(value) is type(expected) and value == expected


def _check_blocks(cfg: Mapping, field: str, allowed: tuple, source: str) -> None:
  """Every entry of the list ``cfg[field]`` is one of ``allowed``."""
  values = cfg[field]
  if not isinstance(values, (list, tuple)) or not values:
    raise ConversionError(f"{source}: field {field!r} must be a non-empty list, got {values!r}")
  for v in values:
    if v not in allowed:
      raise ConversionError(
          f"{source}: field {field!r} holds {v!r}, which diffusers' Flax classes do not implement "
          f"(supported: {list(allowed)})")


def _flax_config(cfg: Mapping, source: str, expected_class: str, passed: tuple, fixed: Mapping,
                 ignored: tuple) -> dict:
  """Flax keyword arguments from a diffusers PyTorch config, rejecting what Flax lacks."""
  name = cfg.get("_class_name", expected_class)
  if name != expected_class:
    raise ConversionError(f"{source}: _class_name is {name!r}, expected {expected_class!r}")
  for key, expected in fixed.items():
    if key in cfg and not _same(cfg[key], expected):
      raise ConversionError(
          f"{source}: field {key!r} = {cfg[key]!r} is not supported by diffusers' Flax "
          f"{expected_class} (it implements only {key} = {expected!r})")
  known = set(passed) | set(fixed) | set(ignored) | set(_META_KEYS)
  unknown = sorted(k for k in cfg if k not in known and cfg[k] not in (None, False))
  if unknown:
    raise ConversionError(f"{source}: unknown {expected_class} field(s) {unknown} "
                          "(not implemented by diffusers' Flax classes)")
  return {k: _tuples(cfg[k]) for k in passed if k in cfg}


def unet_config_from_diffusers(cfg: Mapping, source: str) -> dict:
  """``FlaxUNet2DConditionModel`` kwargs from a diffusers ``unet/config.json`` dict."""
  out = _flax_config(cfg, source, UNET_CLASS, _UNET_PASS, _UNET_FIXED, _UNET_IGNORED)
  for field, allowed in (("down_block_types", _UNET_DOWN), ("up_block_types", _UNET_UP)):
    if field in cfg:
      _check_blocks(cfg, field, allowed, source)
  if cfg.get("mid_block_type", _UNET_MID[0]) not in _UNET_MID:
    raise ConversionError(f"{source}: field 'mid_block_type' holds {cfg['mid_block_type']!r}, which "
                          f"diffusers' Flax UNet does not implement (supported: {_UNET_MID[0]!r}, null)")
  if cfg.get("addition_embed_type") not in _UNET_ADDITION:
    raise ConversionError(f"{source}: field 'addition_embed_type' = {cfg['addition_embed_type']!r} is "
                          "not supported by diffusers' Flax UNet (supported: null, 'text_time')")
  # PyTorch: heads = num_attention_heads or attention_head_dim. Flax takes the same
  # number through attention_head_dim (and refuses num_attention_heads).
  if cfg.get("num_attention_heads") is not None:
    out["attention_head_dim"] = _tuples(cfg["num_attention_heads"])
  if out.get("sample_size") is None:
    out["sample_size"] = _DEFAULT_SAMPLE_SIZE
  return out


def vae_config_from_diffusers(cfg: Mapping, source: str) -> dict:
  """``FlaxAutoencoderKL`` kwargs from a diffusers ``vae/config.json`` dict."""
  out = _flax_config(cfg, source, VAE_CLASS, _VAE_PASS, _VAE_FIXED, _VAE_IGNORED)
  for field, allowed in (("down_block_types", _VAE_DOWN), ("up_block_types", _VAE_UP)):
    if field in cfg:
      _check_blocks(cfg, field, allowed, source)
  return out


# ----------------------------------------------------------------------------- Flax models

def flax_unet(config: Mapping, **kwargs):
  """``FlaxUNet2DConditionModel(**config, **kwargs)`` (e.g. ``dtype=jnp.bfloat16``)."""
  # slow import: diffusers (its glue also drops the "Flax classes are deprecated" messages)
  from metamorph.models.visualizer.diffusers_modules import FlaxUNet2DConditionModel
  return FlaxUNet2DConditionModel(**config, **kwargs)


def flax_vae(config: Mapping, **kwargs):
  """``FlaxAutoencoderKL(**config, **kwargs)``."""
  # slow import: diffusers (its glue also drops the "Flax classes are deprecated" messages)
  from metamorph.models.visualizer.diffusers_modules import FlaxAutoencoderKL
  return FlaxAutoencoderKL(**config, **kwargs)


_FLAX_MODELS = {"unet": flax_unet, "vae": flax_vae}


def param_shapes(part: str, config: Mapping, source: str = "") -> dict[tuple[str, ...], tuple[int, ...]]:
  """{flax path: shape} of every parameter of the ``part`` ('unet' / 'vae') model for ``config``.

  Runs ``init_weights`` under ``jax.eval_shape``: nothing is computed or allocated.
  """
  try:
    model = _FLAX_MODELS[part](config)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0)))
  except (TypeError, ValueError, KeyError, IndexError, ZeroDivisionError, AssertionError) as e:
    raise ConversionError(f"{source}: diffusers' Flax {part} cannot be built from this config ({e})") from e
  return {tuple(k): tuple(v.shape) for k, v in flatten_dict(shapes).items()}


# ----------------------------------------------------------------------------- names and layouts

_INDEXED = re.compile(r"(\w+)[.](\d+)")
# PyTorch module names that Flax spells differently (diffusers' VAE attention).
_ALIASES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out_0"}
_PT_LEAF = {"weight": ("kernel", "scale", "embedding"), "bias": ("bias",),
            "gamma": ("scale",), "beta": ("bias",)}
# Flax module names made from an indexed PyTorch list ("resnets.0" -> "resnets_0").
_LISTS = ("down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks",
          "downsamplers", "upsamplers", "net", "to_out")


def _canonical(modules: tuple[str, ...]) -> tuple[str, ...]:
  return tuple(_ALIASES.get(m, m) for m in modules)


def _flax_modules(pt_name: str) -> tuple[tuple[str, ...], str]:
  """('down_blocks_0', 'resnets_0', 'conv1'), 'weight' for 'down_blocks.0.resnets.0.conv1.weight'."""
  parts = _INDEXED.sub(r"\1_\2", pt_name).split(".")
  return tuple(parts[:-1]), parts[-1]


def pt_name(path: tuple[str, ...]) -> str:
  """The diffusers PyTorch tensor name of a Flax parameter path (the current names, e.g.
  ``to_q`` for the VAE's ``query``)."""
  modules = []
  for m in _canonical(path[:-1]):
    head, _, index = m.rpartition("_")
    modules.append(f"{head}.{index}" if head in _LISTS and index.isdigit() else m)
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(path[-1], path[-1])
  return ".".join([*modules, leaf])


def pt_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
  """The PyTorch shape of a Flax parameter (Conv [O, I, kh, kw], Linear [O, I])."""
  if path[-1] == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if path[-1] == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return shape


def _to_flax(path: tuple[str, ...], value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
  """The PyTorch ``value`` in Flax layout, or None if its shape does not fit ``shape``."""
  if path[-1] == "kernel" and len(shape) == 4 and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0)
  elif path[-1] == "kernel" and len(shape) == 2:
    if value.ndim == 4 and value.shape[2:] == (1, 1):  # old VAE checkpoints: 1x1 conv attention
      value = value[:, :, 0, 0]
    value = value.T if value.ndim == 2 else value
  return np.ascontiguousarray(value) if tuple(value.shape) == tuple(shape) else None


def params_from_diffusers(part: str, expected: Mapping[tuple[str, ...], tuple[int, ...]],
                          tensors: Mapping[str, np.ndarray], files: Mapping[str, str], source: str) -> dict:
  """The nested Flax parameter tree of ``part`` from PyTorch-named ``tensors``.

  ``expected``: ``param_shapes(part, config)``; ``files`` maps each tensor name to
  the file it came from (for messages); ``source`` names the folder. Every Flax
  parameter must be found with its shape, and every tensor must be used.
  """
  by_canonical = {(_canonical(k[:-1]), k[-1]): k for k in expected}
  found: dict[tuple[str, ...], tuple[str, np.ndarray]] = {}
  unexpected = []
  for name, value in tensors.items():
    modules, leaf = _flax_modules(name)
    key = next((by_canonical[(_canonical(modules), f)] for f in _PT_LEAF.get(leaf, ())
                if (_canonical(modules), f) in by_canonical), None)
    if key is None:
      unexpected.append(name)
    elif key in found:
      raise ConversionError(f"{files.get(name, source)}: tensors '{found[key][0]}' and '{name}' are "
                            f"both parameter {'/'.join(key)}")
    else:
      found[key] = (name, value)
  params = {}
  for key, shape in expected.items():
    if key not in found:
      raise ConversionError(f"{source}: tensor '{pt_name(key)}' is missing (shape {pt_shape(key, shape)}, "
                            f"diffusers' Flax {part} needs it as {'/'.join(key)})")
    name, value = found[key]
    converted = _to_flax(key, np.asarray(value), shape)
    if converted is None:
      raise ConversionError(f"{files.get(name, source)}: tensor '{name}' has shape {tuple(value.shape)}, "
                            f"the config implies {pt_shape(key, shape)}")
    params[key] = converted
  if unexpected:
    first = min(unexpected)
    raise ConversionError(
        f"{files.get(first, source)}: tensor '{first}' has no place in diffusers' Flax {part} for this "
        f"config ({len(unexpected)} such tensors: {sorted(unexpected)[:5]}); is {source}/config.json "
        "the config of these weights?")
  return unflatten_dict(params)


# ----------------------------------------------------------------------------- diffusers folders


def read_diffusers_weights(folder: str, variant: str | None = None
                           ) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors, {tensor name: file}) of a diffusers model folder, without torch.

  Reads ``diffusion_pytorch_model[.variant].safetensors`` or the shards listed in
  its ``.index.json``.
  """
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder")
  name = WEIGHTS_NAME + (f".{variant}" if variant else "") + ".safetensors"
  single, index = os.path.join(folder, name), os.path.join(folder, name + ".index.json")
  if os.path.isfile(index):
    return read_sharded(index)
  if not os.path.isfile(single):
    bins = [f for f in os.listdir(folder) if f.endswith(".bin")]
    hint = (f" (found {bins[0]}: PyTorch pickles need torch; re-save the model with "
            "safe_serialization=True)") if bins else ""
    raise ConversionError(f"{single}: file not found, and no {name}.index.json{hint}")
  tensors = read_safetensors_file(single)
  return tensors, dict.fromkeys(tensors, single)


def _subfolder(folder: str, part: str) -> str:
  """``folder/part`` when ``folder`` is a pipeline folder, else ``folder`` itself."""
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder (expected a diffusers Stable Diffusion folder)")
  sub = os.path.join(folder, part)
  return sub if os.path.isdir(sub) or not os.path.isfile(os.path.join(folder, "config.json")) else folder


def _read_part(folder: str, part: str, to_config, variant: str | None) -> tuple[dict, dict]:
  folder = _subfolder(folder, part)
  cfg_path = os.path.join(folder, "config.json")
  config = to_config(read_json(cfg_path), cfg_path)
  shapes = param_shapes(part, config, cfg_path)
  tensors, files = read_diffusers_weights(folder, variant)
  return config, params_from_diffusers(part, shapes, tensors, files, folder)


def read_unet(folder: str, variant: str | None = None) -> tuple[dict, dict]:
  """(``FlaxUNet2DConditionModel`` kwargs, nested Flax params of numpy arrays).

  ``folder``: a Stable Diffusion folder (its ``unet/`` is read) or the ``unet/`` folder.
  """
  return _read_part(folder, "unet", unet_config_from_diffusers, variant)


def read_vae(folder: str, variant: str | None = None) -> tuple[dict, dict]:
  """(``FlaxAutoencoderKL`` kwargs, nested Flax params of numpy arrays)."""
  return _read_part(folder, "vae", vae_config_from_diffusers, variant)


def read_scheduler(folder: str) -> dict:
  """``scheduler/scheduler_config.json`` (``_class_name`` kept, ``_diffusers_version`` dropped)."""
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder (expected a diffusers Stable Diffusion folder)")
  sub = os.path.join(folder, "scheduler")
  path = os.path.join(sub if os.path.isdir(sub) else folder, "scheduler_config.json")
  cfg = read_json(path)
  if "num_train_timesteps" not in cfg:
    raise ConversionError(f"{path}: required field 'num_train_timesteps' is missing")
  return {k: v for k, v in cfg.items() if k not in ("_diffusers_version", "_name_or_path")}


def read_stable_diffusion(src: str, variant: str | None = None) -> dict:
  """``{"config": {"unet", "vae", "scheduler"}, "params": {"unet", "vae"}}`` from a diffusers
  Stable Diffusion folder or from our converted folder. Params are nested dicts of numpy arrays
  (diffusers' Flax trees); configs are the Flax classes' kwargs and the scheduler config."""
  if not os.path.isdir(src):
    raise ConversionError(f"{src}: no such folder (expected a diffusers Stable Diffusion folder with "
                          "unet/, vae/ and scheduler/, or one written by "
                          "`python -m metamorph.convert visualizer`)")
  if model_folder.is_converted(src):
    return read_converted_visualizer(src)
  index = os.path.join(src, "model_index.json")
  if os.path.isfile(index):
    read_json(index)  # a garbled pipeline index is reported, not ignored
  for part in ("unet", "vae", "scheduler"):
    if not os.path.isdir(os.path.join(src, part)):
      raise ConversionError(f"{os.path.join(src, part)}: no such folder (a Stable Diffusion folder "
                            "has unet/, vae/ and scheduler/)")
  unet_config, unet = read_unet(src, variant)
  vae_config, vae = read_vae(src, variant)
  return {"config": {"unet": unet_config, "vae": vae_config, "scheduler": read_scheduler(src)},
          "params": {"unet": unet, "vae": vae}}


# ----------------------------------------------------------------------------- our folders


def flatten_params(params: Mapping[str, Mapping]) -> dict[str, np.ndarray]:
  """``{"unet": tree, "vae": tree}`` -> ``{"unet/down_blocks_0/.../kernel": array}``."""
  flat = {}
  for part in PARTS:
    for path, value in flatten_dict(dict(params[part])).items():
      flat["/".join((part, *path))] = np.asarray(value)
  return flat


def unflatten_params(flat: Mapping[str, np.ndarray], config: Mapping, source: str) -> dict:
  """``flatten_params``'s inverse, checked against the models of ``config``."""
  out, known = {}, set()
  for part in PARTS:
    tree = {}
    for path, shape in param_shapes(part, config[part], source).items():
      key = "/".join((part, *path))
      known.add(key)
      if key not in flat:
        raise ConversionError(f"{source}: tensor '{key}' is missing")
      if tuple(flat[key].shape) != shape:
        raise ConversionError(
            f"{source}: tensor '{key}' has shape {tuple(flat[key].shape)}, the config implies {shape}")
      tree[path] = flat[key]
    out[part] = unflatten_dict(tree)
  unexpected = sorted(set(flat) - known)
  if unexpected:
    raise ConversionError(f"{source}: unexpected tensors {unexpected[:5]}")
  return out


def write_converted_visualizer(dst: str, model: Mapping) -> None:
  """Writes ``dst/config.json`` and ``dst/model.safetensors`` for ``read_stable_diffusion``'s dict."""
  model_folder.write_converted(dst, model_folder.STABLE_DIFFUSION, model["config"], flatten_params(model["params"]))


def read_converted_visualizer(folder: str) -> dict:
  """``{"config": {"unet", "vae", "scheduler"}, "params": {"unet", "vae"}}`` from our folder."""
  if not os.path.isdir(folder):
    raise ConversionError(f"{folder}: no such folder (expected one written by "
                          "`python -m metamorph.convert visualizer`)")
  cfg_path = os.path.join(folder, "config.json")
  meta, flat = model_folder.read_converted(folder, model_folder.STABLE_DIFFUSION)
  config = meta["config"]
  for part in (*PARTS, "scheduler"):
    if not isinstance(config.get(part), dict):
      raise ConversionError(f"{cfg_path}: no '{part}' object in 'config'")
  config = {"unet": {k: _tuples(v) for k, v in config["unet"].items()},
            "vae": {k: _tuples(v) for k, v in config["vae"].items()},
            "scheduler": dict(config["scheduler"])}
  params = unflatten_params(flat, config, os.path.join(folder, "model.safetensors"))
  return {"config": config, "params": params}


def convert_visualizer(src: str, dst: str, variant: str | None = None) -> dict:
  """Converts a diffusers Stable Diffusion folder (or ours) into our format at ``dst``.

  Returns ``read_stable_diffusion(src)``'s dict.
  """
  model = read_stable_diffusion(src, variant)
  write_converted_visualizer(dst, model)
  return model


def count_params(tree: Mapping) -> int:
  """The number of parameters in a nested parameter tree."""
  return sum(int(np.prod(v.shape)) for v in flatten_dict(dict(tree)).values())
