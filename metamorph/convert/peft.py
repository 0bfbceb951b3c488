"""PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``) <-> our adapters.

``write_peft_adapter`` writes the ``LoraDense`` adapters of our LLaMA as the folder that
``peft.PeftModel.from_pretrained(LlamaForCausalLM, folder)`` applies; ``read_peft_adapter``
puts a PEFT LoRA folder's adapters on our plain LLaMA (``add_lora``, then the factors). No
torch or peft is needed: JSON and safetensors only.

Layout. Our factors are ``a`` [*in, r] and ``b`` [r, *out] of a kernel [*in, *out]; PEFT's are
``lora_A.weight`` [r, in] and ``lora_B.weight`` [out, r] of a torch weight [out, in]. The
multi-axis dims (o_proj's in = (H, Dh), q_proj's out = (H, Dh)) flatten exactly as the kernel
does in the transformers export (``llama.hf_layout``, row-major), so ``a . b`` maps onto
``lora_B @ lora_A``. The scale is ``lora_alpha / r`` on both sides (no rsLoRA). Tensors are
named ``base_model.model.<transformers module>.lora_{A,B}.weight`` and stored in f32.

Only plain LoRA is read: options that change the forward (DoRA, rsLoRA, bias, per-module
ranks, some layers only, modules_to_save, ...) are refused, naming the field.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from metamorph.convert.llama import _kernel, hf_layout
from metamorph.convert.tensor_map import TensorMap
from metamorph.files import ConversionError, read_json, read_safetensors_file, write_json, write_safetensors
from metamorph.layers.lora import LoraDense, add_lora, lora_layers
from metamorph.models.llama import Llama

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> LlamaForCausalLM

# Fields that change what the adapter computes; each must be falsy (bias: "none") to be read.
_REFUSED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_rslora": "rsLoRA (scale alpha / sqrt(r))",
    "modules_to_save": "fully trained copies of modules",
    "fan_in_fan_out": "Conv1D-style transposed weights",
    "rank_pattern": "per-module ranks",
    "alpha_pattern": "per-module alphas",
    "layers_to_transform": "adapters on some layers only",
    "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules",
    "lora_bias": "a bias on lora_B",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
    "target_parameters": "adapters on raw parameters",
    "trainable_token_indices": "trainable token rows",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
}


def _locate(model: nnx.Module) -> tuple[Llama, tuple[str, ...]]:
  """(the LLaMA, its path prefix in ``model``): ``model`` itself or a MetaMorph's ``model.llm``."""
  if isinstance(model, Llama):
    return model, ()
  if isinstance(getattr(model, "llm", None), Llama):
    return model.llm, ("llm",)
  raise ConversionError(f"PEFT adapters: expected our Llama or a model with one as .llm, got {type(model).__name__}")


def _projections(llm: Llama) -> dict[str, TensorMap]:
  """Our projection path ('layers/0/attention/q_proj') -> its kernel's transformers map."""
  return {m.ours.removesuffix("/kernel"): m for m in hf_layout(llm.config) if m.ours.endswith("/kernel")}


def _module(kernel_map: TensorMap) -> str:
  """The transformers module name of a kernel map: 'model.layers.0.self_attn.q_proj'."""
  return kernel_map.hf.removesuffix(".weight")


def _factor_maps(kernel_map: TensorMap, layer: LoraDense) -> tuple[TensorMap, TensorMap]:
  """Our a [*in, r] <-> lora_A.weight [r, in]; our b [r, *out] <-> lora_B.weight [out, r]."""
  ours, hf = kernel_map.ours.removesuffix("/kernel"), PREFIX + _module(kernel_map)
  n_in = len(tuple(layer.base.in_features))
  return (_kernel(f"{ours}/a", f"{hf}.lora_A.weight", tuple(layer.a[...].shape), n_in),
          _kernel(f"{ours}/b", f"{hf}.lora_B.weight", tuple(layer.b[...].shape), 1))


def _one(values: set, what: str) -> float:
  if len(values) != 1:
    raise ConversionError(f"PEFT export: the adapters have different {what}s {sorted(values)}; a PEFT "
                          f"folder of this writer holds one {what} for all (no rank_pattern/alpha_pattern)")
  return values.pop()


# ----------------------------------------------------------------------------- writing

def write_peft_adapter(model: nnx.Module, folder: str, *, base_model_name_or_path: str = "") -> list[str]:
  """Writes the LLM's LoRA adapters of ``model`` (our Llama, or a MetaMorph: its ``.llm``) as a
  PEFT folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (f32). Every adapter must
  share r, alpha and dropout, and a target must be adapted in every layer (what ``add_lora``
  makes). Returns the tensor names written. Raises ``ConversionError``."""
  llm, _ = _locate(model)
  maps, layers = _projections(llm), list(lora_layers(llm))
  if not layers:
    raise ConversionError("PEFT export: the LLM has no LoRA adapters (add_lora first)")
  tensors, adapted = {}, set()
  for path, layer in layers:
    key = "/".join(map(str, path))
    if key not in maps:
      raise ConversionError(f"PEFT export: LoRA on {key}, which is no projection of the transformers "
                            f"LLaMA (those are {sorted({k.rsplit('/', 1)[-1] for k in maps})})")
    a_map, b_map = _factor_maps(maps[key], layer)
    tensors[a_map.hf] = a_map.to_hf(np.asarray(layer.a[...], np.float32))
    tensors[b_map.hf] = b_map.to_hf(np.asarray(layer.b[...], np.float32))
    adapted.add(key)
  targets = sorted({key.rsplit("/", 1)[-1] for key in adapted})
  for name in targets:
    left_out = sorted(k for k in maps if k.endswith("/" + name) and k not in adapted)
    if left_out:
      raise ConversionError(f"PEFT export: {name} is adapted in some layers but not in {left_out[:3]}; "
                            "PEFT's target_modules applies to every layer")
  config = {
      "peft_type": "LORA", "task_type": "CAUSAL_LM", "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path or None, "revision": None,
      "r": int(_one({l.rank for _, l in layers}, "rank")),
      "lora_alpha": _one({l.alpha for _, l in layers}, "alpha"),
      "lora_dropout": _one({l.dropout for _, l in layers}, "dropout"),
      "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
      "use_dora": False, "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
      "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True, "inference_mode": True,
      "lora_bias": False,
  }
  os.makedirs(folder, exist_ok=True)
  write_json(os.path.join(folder, CONFIG_FILE), config)
  write_safetensors(os.path.join(folder, WEIGHTS_FILE), tensors)
  return sorted(tensors)


# ----------------------------------------------------------------------------- reading

def _check_config(config: Mapping, source: str) -> None:
  if config.get("peft_type") != "LORA":
    raise ConversionError(f"{source}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
  if config.get("task_type") not in (None, "CAUSAL_LM"):
    raise ConversionError(f"{source}: task_type {config['task_type']!r} is not supported (only CAUSAL_LM)")
  for field in ("r", "lora_alpha", "target_modules"):
    if config.get(field) is None:
      raise ConversionError(f"{source}: required field {field!r} is missing")
  if config.get("bias", "none") != "none":
    raise ConversionError(f"{source}: bias={config['bias']!r} is not supported (only 'none': the base "
                          "projections' biases stay as they are)")
  for field, what in _REFUSED.items():
    if config.get(field):
      raise ConversionError(f"{source}: {field}={config[field]!r} ({what}) is not supported; only plain "
                            f"LoRA adapters can be read (set {field} to its default when training)")


def _targeted(config: Mapping, maps: Mapping[str, TensorMap], source: str) -> list[str]:
  """Our projection paths the config's ``target_modules`` selects (PEFT's matching rules)."""
  spec, modules = config["target_modules"], {_module(m): key for key, m in maps.items()}
  if spec == "all-linear":
    return [key for key in maps if not key.startswith("lm_head")]
  if isinstance(spec, str):
    return [key for name, key in modules.items() if re.fullmatch(spec, name)]
  names = sorted({key.rsplit("/", 1)[-1] for key in maps})
  picked = []
  for target in spec:
    hits = [key for name, key in modules.items() if name == target or name.endswith("." + target)]
    if not hits:
      raise ConversionError(f"{source}: target module {target!r} is not a module of this model (its "
                            f"projections are {names}): the adapter is for another architecture")
    picked += hits
  return sorted(set(picked))


def read_peft_adapter(model: nnx.Module, folder: str, *, seed: int = 0) -> list[tuple]:
  """Adds the PEFT LoRA adapters of ``folder`` to ``model`` (our plain Llama, or a MetaMorph:
  on its ``.llm``), in place, with the config's targets, r, lora_alpha and lora_dropout, and loads
  the factors; returns the adapted paths (as ``add_lora``). Raises ``ConversionError`` naming the
  file and the field or tensor: an unsupported option, a target the model lacks, a missing or
  extra tensor, a shape that does not fit (an adapter for another base model)."""
  llm, prefix = _locate(model)
  if any(True for _ in lora_layers(llm)):
    raise ConversionError(f"{folder}: the model already has LoRA adapters (merge_lora them or start "
                          "from the plain model)")
  config_path, weights_path = os.path.join(folder, CONFIG_FILE), os.path.join(folder, WEIGHTS_FILE)
  config = read_json(config_path)
  _check_config(config, config_path)
  maps = _projections(llm)
  targeted = _targeted(config, maps, config_path)
  targets = sorted({key.rsplit("/", 1)[-1] for key in targeted})
  for name in targets:  # add_lora adapts a name in every layer
    left_out = sorted(k for k in maps if k.endswith("/" + name) and k not in targeted)
    if left_out:
      raise ConversionError(f"{config_path}: target_modules adapts {name} in some layers only (not in "
                            f"{left_out[:3]}); only adapters on every layer are supported")
  tensors = read_safetensors_file(weights_path)
  rank, alpha = int(config["r"]), float(config["lora_alpha"])
  try:
    adapted = add_lora(model, targets, rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout") or 0.0),
                       under=prefix, seed=seed)
  except ValueError as e:
    raise ConversionError(f"{config_path}: {e}") from e
  expected = set()
  for path, layer in lora_layers(llm):
    kernel_map = maps["/".join(map(str, path))]
    name = path[-1]
    for factor_map, var in zip(_factor_maps(kernel_map, layer), (layer.a, layer.b)):
      expected.add(factor_map.hf)
      value = factor_map.from_hf(_take_factor(tensors, factor_map, name, rank, weights_path))
      var[...] = jnp.asarray(value, var[...].dtype)
  extra = sorted(set(tensors) - expected)
  if extra:
    raise ConversionError(f"{weights_path}: tensor '{extra[0]}' (and {len(extra) - 1} more) fits no adapter "
                          f"of this model (targets {targets}, {llm.config.num_layers} layers): the adapter "
                          "is for another base model or holds more than LoRA factors")
  return adapted


def _take_factor(tensors: Mapping[str, np.ndarray], m: TensorMap, name: str, rank: int, source: str) -> np.ndarray:
  """The factor ``m.hf`` ([r, in] for lora_A, [out, r] for lora_B), or an error saying what does not fit."""
  if m.hf not in tensors:
    raise ConversionError(f"{source}: tensor '{m.hf}' is missing (adapter_config.json targets {name})")
  value, is_a = tensors[m.hf], m.hf.endswith("lora_A.weight")
  shape = tuple(value.shape)
  if len(shape) != 2:
    raise ConversionError(f"{source}: tensor '{m.hf}' has shape {list(shape)}, expected {list(m.hf_shape)}")
  width, r = (shape[1], shape[0]) if is_a else (shape[0], shape[1])
  want = m.hf_shape[1] if is_a else m.hf_shape[0]
  if width != want:
    role = f"takes {want} inputs" if is_a else f"gives {want} outputs"
    raise ConversionError(f"{source}: tensor '{m.hf}' has shape {list(shape)}, this model's {name} {role}: "
                          "the adapter is for another base model")
  if r != rank:
    raise ConversionError(f"{source}: tensor '{m.hf}' has shape {list(shape)}, rank {r}, but "
                          f"adapter_config.json says r={rank}")
  return value
