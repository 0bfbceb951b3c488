"""Shared fixtures. Tests run on the CPU in float32."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
  """(llm, tokenizer, gguf path) for SmolLM2-135M-Instruct, loaded once."""
  from metamorph.convert import load_llm, smollm2_gguf_path
  path = smollm2_gguf_path()
  llm, tokenizer = load_llm(path)
  return llm, tokenizer, path


@pytest.fixture(scope="session")
def smollm2_hf(smollm2):
  """transformers' LlamaForCausalLM read from the same GGUF file (the reference)."""
  import torch
  from transformers import AutoModelForCausalLM
  path = smollm2[2]
  model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                               dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
  """A 200-record shapes world with its TFDS dataset and tokenizer (built once)."""
  from tests.train_fixtures import build_tiny_world
  return build_tiny_world(str(tmp_path_factory.mktemp("world")))


@pytest.fixture(scope="session")
def siglip_run(tiny_world, tmp_path_factory):
  """A short siglip run (tests.train_fixtures.SIGLIP_RUN, checkpoints 3 and 6), trained once:
  the connector / vpit tests start from its model, tests/test_faults.py damages copies of its
  checkpoints. Read-only: copy it before changing anything."""
  from tests.train_fixtures import SIGLIP_RUN, tiny_config
  from train import trainer
  workdir = str(tmp_path_factory.mktemp("siglip"))
  trainer.run(tiny_config("siglip", tiny_world, **SIGLIP_RUN), workdir)
  return workdir
