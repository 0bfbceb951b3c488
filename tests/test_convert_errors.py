"""Bad checkpoints fail with a ConversionError that names the file and the tensor."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from metamorph.convert import ConversionError, load_llm
from metamorph.convert.__main__ import main as convert_main
from metamorph.params import load_module_params, module_params
from metamorph.files import read_safetensors, write_safetensors
from tests.llama_fixtures import save_hf_llama


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("hf"))
  save_hf_llama(folder, "gqa")
  return folder


@pytest.fixture
def broken(hf_folder, tmp_path):
  """A fresh copy of the good folder to break."""
  dst = str(tmp_path / "broken")
  shutil.copytree(hf_folder, dst)
  return dst


def _edit_config(folder, **changes):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg.update(changes)
  with open(path, "w") as f:
    json.dump(cfg, f)


def test_missing_config(broken):
  os.remove(os.path.join(broken, "config.json"))
  with pytest.raises(ConversionError, match=r"config\.json: file not found"):
    load_llm(broken)


def test_garbled_config(broken):
  with open(os.path.join(broken, "config.json"), "w") as f:
    f.write('{"model_type": "llama", ')
  with pytest.raises(ConversionError, match=r"config\.json: not valid JSON"):
    load_llm(broken)


def test_config_missing_field(broken):
  path = os.path.join(broken, "config.json")
  cfg = json.load(open(path))
  del cfg["hidden_size"]
  json.dump(cfg, open(path, "w"))
  with pytest.raises(ConversionError, match=r"config\.json: required field 'hidden_size'"):
    load_llm(broken)


def test_other_architecture_config(broken):
  _edit_config(broken, model_type="gpt2")
  with pytest.raises(ConversionError, match="model_type 'gpt2' is not a LLaMA-family model"):
    load_llm(broken)


def test_truncated_safetensors(broken):
  path = os.path.join(broken, "model.safetensors")
  data = open(path, "rb").read()
  open(path, "wb").write(data[: len(data) // 2])
  with pytest.raises(ConversionError, match=r"model\.safetensors: not a readable safetensors file"):
    load_llm(broken)


def test_no_weights(broken):
  os.remove(os.path.join(broken, "model.safetensors"))
  with pytest.raises(ConversionError, match=r"no \*\.safetensors file"):
    load_llm(broken)


def test_missing_tensor_is_named(broken):
  path = os.path.join(broken, "model.safetensors")
  tensors = read_safetensors(broken)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  write_safetensors(path, tensors)
  with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.1\.mlp\.up_proj\.weight' is missing"):
    load_llm(broken)


def test_shape_mismatch_is_named(broken):
  _edit_config(broken, intermediate_size=40)
  with pytest.raises(ConversionError, match=r"tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                            r"\(48, 32\), the config implies \(40, 32\)"):
    load_llm(broken)


def test_sharded_index_lists_missing_shard(broken):
  index = {"weight_map": {"model.embed_tokens.weight": "model-00002.safetensors"}}
  json.dump(index, open(os.path.join(broken, "model.safetensors.index.json"), "w"))
  with pytest.raises(ConversionError, match=r"model-00002\.safetensors: file not found"):
    load_llm(broken)


def test_gguf_of_another_architecture(tmp_path):
  from gguf import GGUFWriter
  path = str(tmp_path / "gpt2.gguf")
  writer = GGUFWriter(path, "gpt2")
  writer.add_block_count(1)
  writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(ConversionError, match=r"gpt2\.gguf: GGUF architecture is 'gpt2'"):
    load_llm(path)


def test_truncated_gguf(tmp_path):
  from metamorph.convert import smollm2_gguf_path
  path = str(tmp_path / "cut.gguf")
  with open(smollm2_gguf_path(), "rb") as src, open(path, "wb") as dst:
    dst.write(src.read(4_000_000))
  with pytest.raises(ConversionError, match=r"cut\.gguf: not a readable GGUF file"):
    load_llm(path)


def test_missing_path():
  with pytest.raises(ConversionError, match="no such file or folder"):
    load_llm("/nonexistent/model")


def test_cli_converts_and_reports_errors(hf_folder, tmp_path, capsys):
  dst = str(tmp_path / "ours")
  assert convert_main(["llm", hf_folder, dst]) == 0
  assert json.load(open(os.path.join(dst, "config.json")))["format"] == "metamorph"
  assert convert_main(["export-hf", dst, str(tmp_path / "hf")]) == 0
  assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
  assert convert_main(["llm", str(tmp_path / "missing"), dst]) == 2
  assert "no such file or folder" in capsys.readouterr().err


def test_cli_help_lists_commands():
  out = subprocess.run([sys.executable, "-m", "metamorph.convert", "--help"], capture_output=True,
                       text=True, check=True).stdout
  for command in ("llm", "siglip", "export-hf"):
    assert command in out


def test_parameters_of_another_model_version_are_named():
  """A saved model whose parameter names differ from the code's (an older version of a
  module) is an error naming the file, the names and what to do."""
  from flax import nnx
  module = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tensors = module_params(module)
  old = {"kernel": tensors["kernel"], "scale": np.ones(2, np.float32)}
  with pytest.raises(ConversionError, match=r"old/model\.safetensors: parameters do not match the model: "
                                            r"missing \['bias'\], unexpected \['scale'\] .*train it again"):
    load_module_params(module, old, "old/model.safetensors")
  load_module_params(module, tensors, "new")  # the same names load


def test_our_folder_of_an_unknown_or_another_kind_is_named(hf_folder, tmp_path):
  """A folder of ours names the kind it holds: another kind than the reader wants, or one this
  version does not know, is an error naming the folder, the kind found and what to do."""
  from metamorph import model_folder
  dst = str(tmp_path / "ours")
  assert convert_main(["llm", hf_folder, dst]) == 0
  assert model_folder.kind_of(dst) == model_folder.LLM and model_folder.kind_of(hf_folder) is None
  with pytest.raises(ConversionError, match=rf"{dst}: holds a LLaMA-family LLM .*kind 'llm'; expected a MetaMorph "
                                            r"model .*kind 'metamorph': pass a folder of that kind"):
    model_folder.read_metamorph(dst)
  with pytest.raises(ConversionError, match=rf"{hf_folder}: not one of our checkpoints"):
    model_folder.read_converted(hf_folder, model_folder.LLM)
  _edit_config(dst, kind="hologram")
  with pytest.raises(ConversionError, match=rf"{dst}: a checkpoint of kind 'hologram', which this version of "
                                            r"metamorph does not read .*convert or train it again"):
    load_llm(dst)
