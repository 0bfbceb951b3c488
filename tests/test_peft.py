"""PEFT interop: our LoRA adapters <-> PEFT LoRA folders, against peft + transformers (test-only).

Both ways, on tiny random LLaMAs (GQA; odd heads with o_proj's 2-axis input != width) and on
SmolLM2-135M; and the errors for an adapter that does not fit.
"""
import copy
import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

from metamorph.convert import load_llm
from metamorph.convert.peft import CONFIG_FILE, WEIGHTS_FILE, read_peft_adapter, write_peft_adapter
from metamorph.files import ConversionError
from metamorph.layers.lora import add_lora, lora_layers, merge_lora
from metamorph.models.llama import Llama, LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
from tests.llama_fixtures import VOCAB, hf_logits, our_logits, save_hf_llama

TOL = 1e-4  # max abs logit difference, float32 (tiny models)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
IDS = np.random.default_rng(1).integers(0, VOCAB, (2, 13))


def _randomise_b(model, seed: int, std: float) -> None:
  """Non-zero b on every adapter (a fresh one is zero and would hide a layout bug)."""
  for i, (_, layer) in enumerate(lora_layers(model)):
    b = layer.b[...]
    layer.b[...] = std * jax.random.normal(jax.random.key(seed + i), b.shape, b.dtype)


def _randomise_lora_b(peft_model, seed: int, std: float) -> None:
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in peft_model.named_parameters():
      if "lora_B" in name:
        p.copy_(torch.randn_like(p) * std)


@pytest.fixture(scope="module", params=["gqa", "odd_heads"])
def tiny(request, tmp_path_factory):
  """(transformers folder, its config name) of a tiny random LLaMA."""
  folder = str(tmp_path_factory.mktemp(request.param))
  save_hf_llama(folder, request.param)
  return folder


def test_ours_to_peft_tiny(tiny, tmp_path):
  llm, _ = load_llm(tiny)
  base = our_logits(llm, IDS)
  add_lora(llm, ALL, rank=4, alpha=8.0, dropout=0.05, seed=3)
  _randomise_b(llm, seed=5, std=0.5)
  ours = our_logits(llm, IDS)
  assert np.abs(ours - base).max() > 100 * TOL  # the adapters matter
  names = write_peft_adapter(llm, str(tmp_path), base_model_name_or_path="tiny-llama")
  assert len(names) == 2 * len(ALL) * llm.config.num_layers
  config = json.load(open(tmp_path / CONFIG_FILE))
  assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8.0, 0.05)
  assert sorted(config["target_modules"]) == sorted(ALL) and config["base_model_name_or_path"] == "tiny-llama"
  tensors = load_file(str(tmp_path / WEIGHTS_FILE))
  c = llm.config
  assert tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"].shape == (4, c.num_heads * c.head_dim)
  assert tensors["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"].shape == (
      c.num_kv_heads * c.head_dim, 4)
  assert all(v.dtype == np.float32 for v in tensors.values())
  peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tiny), str(tmp_path)).eval()
  np.testing.assert_allclose(hf_logits(peft_model, IDS), ours, atol=TOL, rtol=0)


def test_peft_to_ours_tiny_and_inside_a_metamorph(tiny, tmp_path):
  peft_model = get_peft_model(LlamaForCausalLM.from_pretrained(tiny),
                              LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=ALL))
  _randomise_lora_b(peft_model, seed=0, std=0.3)
  peft_model.eval()
  ref = hf_logits(peft_model, IDS)
  peft_model.save_pretrained(str(tmp_path))
  llm, _ = load_llm(tiny)
  base = our_logits(llm, IDS)
  assert np.abs(ref - base).max() > 100 * TOL  # the adapters matter
  paths = read_peft_adapter(llm, str(tmp_path))
  assert len(paths) == len(ALL) * llm.config.num_layers
  assert all((l.rank, l.alpha, l.dropout) == (8, 16.0, 0.1) for _, l in lora_layers(llm))
  np.testing.assert_allclose(our_logits(llm, IDS), ref, atol=TOL, rtol=0)
  np.testing.assert_allclose(our_logits(merge_lora(llm), IDS), ref, atol=TOL, rtol=0)

  plain, _ = load_llm(tiny)  # the LLM inside a MetaMorph: adapters under llm/, nothing else touched
  morph = MetaMorph(MetaMorphConfig(plain.config, vision_dim=8, num_visual_tokens=4), rngs=nnx.Rngs(0), llm=plain)
  paths = read_peft_adapter(morph, str(tmp_path))
  assert paths and all(p[0] == "llm" for p in paths)
  np.testing.assert_allclose(our_logits(morph.llm, IDS), ref, atol=TOL, rtol=0)
  write_peft_adapter(morph, str(tmp_path / "again"))
  again, written = load_file(str(tmp_path / "again" / WEIGHTS_FILE)), load_file(str(tmp_path / WEIGHTS_FILE))
  assert sorted(again) == sorted(written)
  for name, value in written.items():  # f32 both ways: the round trip is exact
    np.testing.assert_array_equal(again[name], value, err_msg=name)


# ----------------------------------------------------------------------------- SmolLM2-135M

# Measured 0.9e-4 .. 1.3e-4 with the adapters, as the base models alone (1.3e-4: 30 layers of f32
# rounding, tests/test_smollm2.py); the adapters move the logits by 2.8 .. 4.0.
SMOL_TOL = 5e-4


def _smol_ids(tokenizer):
  messages = [{"role": "user", "content": "What is the capital of France?"}]
  return np.array([tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]])


def test_smollm2_both_ways(smollm2, smollm2_hf, tmp_path):
  llm, tokenizer, _ = smollm2
  ids = _smol_ids(tokenizer)
  ref_base = hf_logits(smollm2_hf, ids)

  ours = nnx.clone(llm)  # the session fixtures stay untouched
  add_lora(ours, ATTN, rank=8, alpha=16.0, seed=1)
  _randomise_b(ours, seed=2, std=0.02)
  ours_logits = our_logits(ours, ids)
  assert np.abs(ours_logits - ref_base).max() > 100 * SMOL_TOL
  write_peft_adapter(ours, str(tmp_path / "ours"), base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
  peft_model = PeftModel.from_pretrained(copy.deepcopy(smollm2_hf), str(tmp_path / "ours")).eval()
  np.testing.assert_allclose(hf_logits(peft_model, ids), ours_logits, atol=SMOL_TOL, rtol=0)
  del peft_model, ours

  peft_model = get_peft_model(copy.deepcopy(smollm2_hf), LoraConfig(r=8, lora_alpha=16, target_modules=ATTN))
  _randomise_lora_b(peft_model, seed=3, std=0.02)
  peft_model.eval()
  ref = hf_logits(peft_model, ids)
  assert np.abs(ref - ref_base).max() > 100 * SMOL_TOL
  peft_model.save_pretrained(str(tmp_path / "peft"))
  del peft_model
  theirs = nnx.clone(llm)
  read_peft_adapter(theirs, str(tmp_path / "peft"))
  np.testing.assert_allclose(our_logits(theirs, ids), ref, atol=SMOL_TOL, rtol=0)  # merging: the tiny tests


# ----------------------------------------------------------------------------- errors

def _llm(hidden=32, layers=2, seed=0) -> Llama:
  return Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=48, num_layers=layers,
                           num_heads=4, num_kv_heads=2, head_dim=8), rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
  """A PEFT folder written for _llm() (width 32, 2 layers), q/v targets, r=4."""
  folder = str(tmp_path_factory.mktemp("adapter"))
  llm = _llm()
  add_lora(llm, ["q_proj", "v_proj"], rank=4, alpha=4.0)
  write_peft_adapter(llm, folder)
  return folder


def _edited(adapter, tmp_path, config=None, drop=None, add=None) -> str:
  folder = str(tmp_path / "edited")
  os.makedirs(folder)
  cfg = {**json.load(open(os.path.join(adapter, CONFIG_FILE))), **(config or {})}
  json.dump(cfg, open(os.path.join(folder, CONFIG_FILE), "w"))
  tensors = load_file(os.path.join(adapter, WEIGHTS_FILE))
  tensors = {k: v for k, v in tensors.items() if k != drop} | (add or {})
  save_file(tensors, os.path.join(folder, WEIGHTS_FILE))
  return folder


def test_an_adapter_of_another_base_model_names_the_tensor(adapter):
  with pytest.raises(ConversionError, match=r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_proj\."
                     r"lora_A\.weight' has shape \[4, 32\], this model's q_proj takes 48 inputs: "
                     r"the adapter is for another base model"):
    read_peft_adapter(_llm(hidden=48), adapter)
  with pytest.raises(ConversionError, match=r"tensor 'base_model\.model\.model\.layers\.1\.self_attn\.q_proj"
                     r"\.lora_A\.weight' \(and 3 more\) fits no adapter of this model .*1 layers"):
    read_peft_adapter(_llm(layers=1), adapter)


def test_a_target_the_model_lacks_is_named(adapter, tmp_path):
  folder = _edited(adapter, tmp_path, config={"target_modules": ["q_proj", "c_attn"]})
  with pytest.raises(ConversionError, match=r"adapter_config.json: target module 'c_attn' is not a module of "
                     r"this model \(its projections are \['down_proj', .*'v_proj'\]\)"):
    read_peft_adapter(_llm(), folder)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("use_rslora", True), ("modules_to_save", ["lm_head"]), ("bias", "lora_only"),
    ("fan_in_fan_out", True), ("rank_pattern", {"q_proj": 2}), ("alpha_pattern", {"q_proj": 2}),
    ("layers_to_transform", [0]), ("peft_type", "IA3")])
def test_an_unsupported_option_names_the_field(adapter, tmp_path, field, value):
  folder = _edited(adapter, tmp_path, config={field: value})
  with pytest.raises(ConversionError, match=rf"adapter_config.json: {field}.* is not supported"):
    read_peft_adapter(_llm(), folder)


def test_missing_tensor_and_wrong_rank_are_named(adapter, tmp_path):
  name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
  with pytest.raises(ConversionError, match=rf"adapter_model.safetensors: tensor '{name}' is missing"):
    read_peft_adapter(_llm(), _edited(adapter, tmp_path / "a", drop=name))
  with pytest.raises(ConversionError, match=r"q_proj\.lora_A\.weight' has shape \[4, 32\], rank 4, but "
                     r"adapter_config.json says r=2"):
    read_peft_adapter(_llm(), _edited(adapter, tmp_path / "b", config={"r": 2}))
  extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": np.ones(32, np.float32)}
  with pytest.raises(ConversionError, match=r"lora_magnitude_vector' \(and 0 more\) fits no adapter"):
    read_peft_adapter(_llm(), _edited(adapter, tmp_path / "c", add=extra))


def test_export_refuses_what_peft_cannot_express():
  llm = _llm()
  with pytest.raises(ConversionError, match="the LLM has no LoRA adapters"):
    write_peft_adapter(llm, "/nonexistent")
  add_lora(llm, ["q_proj"], rank=4, alpha=4.0, under=("layers", 0))
  with pytest.raises(ConversionError, match=r"q_proj is adapted in some layers but not in \['layers/1/attention/q_proj'\]"):
    write_peft_adapter(llm, "/nonexistent")
  with pytest.raises(ConversionError, match="already has LoRA adapters"):
    read_peft_adapter(llm, "/nonexistent")


def test_target_modules_as_a_regex_follows_peft(adapter, tmp_path):
  """PEFT full-matches a string target_modules against the module names."""
  llm = _llm()
  read_peft_adapter(llm, _edited(adapter, tmp_path / "a", config={"target_modules": r".*\.(q_proj|v_proj)"}))
  written = load_file(os.path.join(adapter, WEIGHTS_FILE))
  np.testing.assert_array_equal(np.asarray(llm.layers[1].attention.v_proj.b[...]).reshape(4, -1).T,
                                written["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"])
  with pytest.raises(ConversionError, match=r"adapts q_proj in some layers only \(not in \['layers/1/attention/q_proj'\]"):
    read_peft_adapter(_llm(), _edited(adapter, tmp_path / "b", config={"target_modules": r".*0\.self_attn\.q_proj"}))
