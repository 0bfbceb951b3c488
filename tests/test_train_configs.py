"""The shipped training configs build (abstract state + shardings), and decoder-layer
rematerialisation changes memory, not numbers."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from metamorph.models.llama import Llama, LlamaConfig
from tests.train_fixtures import ROOT
from train import trainer
from train.metrics import count_params
from train.stages import STAGES

_PLAN_8B = textwrap.dedent("""
    import json, math, jax
    from configs.metamorph_llama3_8b import get_config
    from train import trainer
    from train.metrics import count_params
    out = {}
    for arg in ("vpit", "vpit,tensor=2", "connector"):
      s = trainer.make_setup(get_config(arg), load_weights=False)
      st = s.abstract_state
      n_vision = count_params(st.frozen["vision"])
      n_all = count_params(st.params) + count_params(st.frozen)
      out[arg] = {
          "devices": jax.device_count(), "mesh": dict(s.mesh.shape),
          "micro_batches": s.config.train.micro_batches,
          "llm": count_params(st.params["llm"]) + count_params(st.frozen.get("llm", {})),
          "vision": n_vision, "all": n_all, "trained": count_params(st.params),
          "total_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(st)),
          "per_device": trainer.per_device_bytes(s),
          "remat": s.spec.config.llm.remat, "dtype": s.spec.config.llm.dtype,
          "patches": s.spec.config.vision.num_patches,
      }
    print("PLAN " + json.dumps(out))
""")


def _plan(script: str) -> dict:
  """Runs ``script`` on 8 simulated devices; the JSON it prints after "PLAN "."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
         "PYTHONPATH": ROOT}
  proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = next(l for l in proc.stdout.splitlines() if l.startswith("PLAN "))
  return json.loads(line[len("PLAN "):])


@pytest.fixture(scope="module")
def plan_8b():
  return _plan(_PLAN_8B)


def test_llama3_8b_builds_and_shards_over_8_devices(plan_8b):
  vpit = plan_8b["vpit"]
  print("\nLLaMA-3.1-8B + SO400M plan:", json.dumps(plan_8b, indent=1))
  assert vpit["devices"] == 8 and vpit["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert vpit["micro_batches"] == 192 and vpit["remat"] == "full" and vpit["dtype"] == "bfloat16"
  assert vpit["patches"] == 27 * 27
  # LLaMA-3.1-8B: 8.03B; SigLIP SO400M/14@384 vision tower (with its MAP head): 0.428B
  assert abs(vpit["llm"] / 8.03e9 - 1) < 0.02, vpit["llm"]
  assert abs(vpit["vision"] / 0.428e9 - 1) < 0.03, vpit["vision"]
  for arg, plan in plan_8b.items():
    # the whole train state is split over the 8 devices; a few small replicated leaves
    # (norms, biases, the 1152-wide projector sides) are the slack
    assert plan["per_device"]["max"] <= plan["total_bytes"] / 8 * 1.02 + 2**20, (arg, plan)
  # trained params in f32 + two Adam moments, frozen vision tower in f32
  n_trained = vpit["all"] - vpit["vision"]
  assert vpit["total_bytes"] == pytest.approx(12 * n_trained + 4 * vpit["vision"], rel=1e-3)
  assert plan_8b["vpit,tensor=2"]["mesh"] == {"data": 1, "fsdp": 4, "tensor": 2}
  assert plan_8b["vpit,tensor=2"]["micro_batches"] == 384
  # connector: only the projector and the two new token rows (of the embedding, of the untied LM
  # head) train and carry Adam moments; the tables stay whole in the frozen part
  connector = plan_8b["connector"]
  assert connector["trained"] < 0.01 * connector["llm"], connector
  assert connector["total_bytes"] == pytest.approx(4 * connector["all"] + 8 * connector["trained"], rel=1e-3)


def test_llama3_8b_config_arguments():
  from configs.metamorph_llama3_8b import get_config
  c = get_config("vpit,devices=256")
  assert c.train.batch_size == 1536 and c.train.micro_batches == 6 and c.mesh.fsdp == -1
  assert c.data.seq_len == 4096 and c.model.num_visual_tokens == 64 and c.optim.weight_decay == 0
  assert 4e-5 <= c.optim.lr <= 7e-5 and c.optim.warmup_frac == 0.03
  assert get_config("vpit,devices=64,rows=2").train.micro_batches == 12
  assert get_config("connector").init_from == ""
  with pytest.raises(ValueError, match="do not split"):
    get_config("vpit,devices=7")
  with pytest.raises(ValueError, match="bad argument"):
    get_config("vpit,gpus=8")


@pytest.fixture(scope="module")
def world_tokenizer_dir(tmp_path_factory):
  from metamorph.shapes.tokenizer import build_world_tokenizer
  path = str(tmp_path_factory.mktemp("tokenizer"))
  build_world_tokenizer(path)
  return path


@pytest.mark.parametrize("stage", list(STAGES))
def test_toy_config_builds(stage, world_tokenizer_dir):
  from configs.toy import get_config
  c = get_config(stage)
  c.data.tokenizer = world_tokenizer_dir
  s = trainer.make_setup(c, load_weights=False)  # connector / vpit: no runs/demo/siglip needed
  assert count_params(s.abstract_state.params) > 0
  per_token, per_image = trainer.flops_model(s)
  if stage == "visualizer":  # diffusion FLOPs are not modelled
    assert (per_token, per_image) == (0.0, 0.0)
  else:
    assert per_token > 0 and per_image > 0
  if stage in ("connector", "vpit"):
    assert s.spec.new_token_ids and s.spec.config.llm.vocab_size == 512


def test_the_vision_loss_is_a_property_of_the_stage(world_tokenizer_dir):
  """model.vision_coef weighs the vision loss only in stages that have one (vpit); the saved
  model config says which."""
  from configs.toy import get_config
  for stage, coef in (("language", 0.0), ("connector", 0.0), ("vpit", 6.0)):
    c = get_config(stage)
    c.data.tokenizer = world_tokenizer_dir
    c.model.vision_coef = 6.0
    s = trainer.make_setup(c, load_weights=False)
    assert s.stage.vision_loss == (coef > 0) and s.spec.config.vision_coef == coef, stage
    assert trainer._meta(s, "w")["vision_loss"] == s.stage.vision_loss


def test_toy_configs_name_the_runs_their_stage_starts_from():
  from configs.toy import get_config
  for name, stage in STAGES.items():
    c = get_config(name)
    for start in stage.starts_from:
      value = functools.reduce(lambda node, key: node[key], start.field.split("."), c)
      assert value == (f"runs/demo/{start.stage}" if start.required else ""), (name, start)


def test_unknown_stage_and_tuning_mode_name_the_known_ones():
  from train import stages, tuning
  with pytest.raises(ValueError, match="use one of siglip, visualizer, language, connector, vpit"):
    stages.get("pretrain")
  with pytest.raises(ValueError, match="use one of full, frozen_llm, lora"):
    tuning.get("qlora")
  with pytest.raises(ValueError, match="takes no options"):
    tuning.get("full", rank=16)


def test_smollm2_config_builds_without_weights():
  from configs.smollm2_135m import get_config
  for stage in ("connector", "vpit"):
    c = get_config(stage)
    c.tuning.mode = "full"  # the architecture alone (vpit tunes LoRA adapters, more parameters)
    s = trainer.make_setup(c, load_weights=False)
    llm = count_params(s.abstract_state.params["llm"])
    llm += count_params(s.abstract_state.frozen.get("llm", {}))
    assert abs(llm / 134.5e6 - 1) < 0.01, llm   # SmolLM2-135M (tied embeddings)
  with pytest.raises(ValueError, match="connector or vpit"):
    get_config("siglip")


def test_smollm2_config_builds_from_the_gguf(tmp_path):
  """With the files its docstring lists (a toy SigLIP export stands in for runs/demo/siglip)."""
  from configs.smollm2_135m import get_config
  from configs.toy import get_config as toy_config
  from metamorph.convert.siglip import save_siglip
  from train import model_init
  toy = toy_config("siglip")
  toy.data.tokenizer = ""
  save_siglip(model_init.random_model(model_init.siglip_spec(toy), 0), str(tmp_path / "model"))
  c = get_config("vpit")
  c.tuning.mode = "full"  # every LLM weight trains (the config's LoRA trains adapters)
  c.model.siglip_init = str(tmp_path)
  s = trainer.make_setup(c)
  assert s.spec.llm_params is not None and s.spec.tokenizer is not None
  assert s.spec.config.llm.vocab_size == 49152 + 2 and s.spec.new_token_ids == (49152, 49153)
  assert s.spec.config.vision.hidden_size == 96 and count_params(s.abstract_state.params) > 134e6


# ----------------------------------------------------------------------------- remat

_TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
             head_dim=8, max_position_embeddings=64)


def _loss_and_grads(remat: str, ids, segment_ids):
  model = Llama(LlamaConfig(**_TINY, remat=remat), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)

  def loss_fn(params):
    logits = nnx.merge(graphdef, params)(ids[:, :-1], segment_ids=segment_ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

  fn = jax.value_and_grad(loss_fn)
  return jax.jit(fn)(params), jax.make_jaxpr(fn)(params)


def test_remat_same_loss_and_grads():
  rng = np.random.default_rng(0)
  ids = jnp.asarray(rng.integers(0, 64, (2, 17)), jnp.int32)
  segment_ids = jnp.asarray(np.repeat([[1] * 10 + [2] * 5 + [0] * 2], 2, 0), jnp.int32)
  (loss, grads), plain = _loss_and_grads("none", ids, segment_ids)
  assert "checkpoint" not in str(plain) and "remat" not in str(plain)
  for remat in ("full", "dots"):
    (loss_r, grads_r), jaxpr = _loss_and_grads(remat, ids, segment_ids)
    assert str(jaxpr).count("checkpoint") + str(jaxpr).count("remat") >= _TINY["num_layers"], remat
    np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_r, grads)


def test_remat_is_validated():
  with pytest.raises(ValueError, match="remat"):
    LlamaConfig(**_TINY, remat="some")


_PLAN_SD15 = textwrap.dedent("""
    import json, math, jax
    from configs.visualizer_sd15 import get_config
    from train import trainer
    from train.metrics import count_params
    s = trainer.make_setup(get_config(), load_weights=False)
    st = s.abstract_state
    print("PLAN " + json.dumps({
        "unet": count_params(st.params["visualizer"]["unet"]),
        "vae": count_params(st.frozen["visualizer"]["vae"]),
        "total_bytes": sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(st)),
        "per_device": trainer.per_device_bytes(s)}))
""")


def test_sd15_visualizer_builds_and_shards_over_8_devices():
  """SD-1.5's UNet/VAE params carry no logical names: they are split over fsdp anyway."""
  plan = _plan(_PLAN_SD15)
  assert abs(plan["unet"] - 859_520_964) < 1000 and abs(plan["vae"] - 83_653_863) < 1000
  assert plan["per_device"]["max"] <= plan["total_bytes"] / 8 * 1.05, plan
