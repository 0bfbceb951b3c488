"""The tuning modes lora and frozen_llm (train/tuning.py) on the tiny world: LoRA changes nothing
at initialisation, trains only its adapters and the stage's own trainables, merges into plain
weights with the same logits, exports a model metamorph.load reads (plus a PEFT folder), resumes
exactly after kill -9, accumulates micro-batches, matches one device on a (fsdp, tensor) mesh
and trains under bf16 compute with remat; a frozen LLM stays bit-identical but for the new
token rows; bad LoRA settings are named."""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import metamorph
from metamorph import checkpoint
from metamorph.layers import lora
from tests.train_fixtures import kill_when, run_train, set_field, tiny_config, train_command, train_steps
from train import model_init, step, trainer, tuning

ALL_PROJECTIONS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
LORA = {"tuning.mode": "lora", "tuning.lora.rank": 4, "tuning.lora.alpha": 8.0,
        "tuning.lora.targets": ALL_PROJECTIONS, "model.visualizer_from": ""}
STEPS, EVERY = 6, 3  # the shared run: checkpoints 3 and 6


def _flat(state: nnx.State) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _metrics(workdir: str) -> dict[int, dict]:
  return {r["step"]: r for r in _records(workdir) if "loss" in r}


def _restore(s: trainer.Setup, workdir: str):
  with checkpoint.Checkpoints(workdir, async_save=False) as ckpt:
    state, _, step = ckpt.restore(checkpoint.abstract_like(s.abstract_state, s.shardings))
  return state, step


@functools.partial(jax.jit, static_argnums=0)
def _jitted_logits(graphdef, state, batch, dropout_key=None):
  model = nnx.merge(graphdef, state)
  if dropout_key is not None:
    lora.set_dropout_key(model, dropout_key)
  logits, _ = model({**batch, "visual_tokens": model.encode_images(batch["images"])})
  return logits


def _logits(model: nnx.Module, batch: dict, dropout_key=None) -> np.ndarray:
  """The text logits [B, T, V] (f32) of a MetaMorph model on a local batch (LoRA dropout on
  with a ``dropout_key``, as in training)."""
  return np.asarray(_jitted_logits(*nnx.split(model), batch, dropout_key))


def _param_paths(model: nnx.Module) -> set[tuple]:
  return {path for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _model(s: trainer.Setup, state) -> nnx.Module:
  return step.model_of(s.graphdef, s.stage, state.params, state.frozen, copy=True)


def _float_count(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact) and x.ndim)


@dataclasses.dataclass
class Run:
  config: object
  workdir: str
  setup: trainer.Setup
  initial: trainer.TrainState
  final: trainer.TrainState
  batch: dict  # a local eval batch (jnp arrays)


@pytest.fixture(scope="module")
def lora_run(tiny_world, tmp_path_factory) -> Run:
  """A 6-step vpit LoRA run (rank 4, alpha 8, every projection, dropout 0.05), trained once."""
  config = tiny_config("vpit", tiny_world, **LORA)
  workdir = str(tmp_path_factory.mktemp("lora"))
  trainer.run(config, workdir)
  s = trainer.make_setup(config)
  final, step = _restore(s, workdir)
  assert step == STEPS
  batch = next(trainer.batches(s, config.data.eval_split, seed=0, num_epochs=1))
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  return Run(config, workdir, s, trainer.initial_state(s), final, batch)


def test_lora_at_init_is_the_base_model_exactly(lora_run):
  """The trainer's initial LoRA model (b = 0) against its base: the same model with each adapter
  taken off (its plain projection, the kernel untouched), logits bit-identical."""
  s = lora_run.setup
  model = _model(s, lora_run.initial)
  layers = list(lora.lora_layers(model))
  assert len(layers) == 2 * 7 and all(path[0] == "llm" for path, _ in layers)
  assert all(not np.any(np.asarray(layer.b[...])) for _, layer in layers)
  base = _model(s, lora_run.initial)
  for path, _ in list(lora.lora_layers(base)):
    parent = functools.reduce(lambda m, k: m[k] if isinstance(k, int) else getattr(m, k), path[:-1], base)
    setattr(parent, path[-1], getattr(parent, path[-1]).base)
  assert not list(lora.lora_layers(base))
  assert _param_paths(base) == _param_paths(nnx.eval_shape(lambda: model_init.random_model(s.spec, 0)))
  want = _logits(base, lora_run.batch)
  np.testing.assert_array_equal(_logits(model, lora_run.batch), want)
  # training-time dropout (the train step's key): b = 0 still adds nothing
  np.testing.assert_array_equal(_logits(model, lora_run.batch, jax.random.key(3)), want)


def test_only_adapters_and_the_stages_own_trainables_change(lora_run):
  s, before, after = lora_run.setup, lora_run.initial, lora_run.final
  params0, params1 = _flat(before.params), _flat(after.params)
  frozen0, frozen1 = _flat(before.frozen), _flat(after.frozen)
  table = ("llm", "embed_tokens", "embedding")   # tied: the LM head is this table
  llm_params = {p for p in params0 if p[0] == "llm"}
  assert llm_params - {table} and all(p[-1] in ("a", "b") for p in llm_params - {table})
  assert {p[0] for p in params0} == {"llm", "projector", "vision_head"}
  assert any(p[-2:] == ("q_proj", "kernel") or p[-3:] == ("q_proj", "base", "kernel") for p in frozen0)
  for path, value in frozen0.items():               # every other LLM weight, the vision tower
    np.testing.assert_array_equal(frozen1[path], value, err_msg=str(path))
  # the train state holds the table's new rows alone; the table itself is frozen (checked above)
  assert params0[table].shape == (len(s.stage.new_token_ids), frozen0[table].shape[1]) == (2, 32)
  assert not np.array_equal(params0[table], params1[table])
  for path in params0:
    if path[-1] == "b" or path[0] in ("projector", "vision_head"):
      assert not np.array_equal(params0[path], params1[path]), f"{path} did not train"
  # the adapters shard with their kernels: its logical axis names on in / out, lora_rank on r
  names = {p[3:]: v.get_metadata()["out_sharding"] for p, v in nnx.to_flat_state(s.abstract_state.params)
           if p[:3] == ("llm", "layers", 0)}
  assert names[("attention", "q_proj", "a")] == ("embed", "lora_rank")
  assert names[("attention", "q_proj", "b")] == ("lora_rank", "heads", "head_dim")
  assert names[("attention", "o_proj", "a")] == ("heads", "head_dim", "lora_rank")
  assert names[("mlp", "down_proj", "a")] == ("mlp", "lora_rank")
  # the optimizer holds Adam's two moments for what trains, nothing for the frozen LLM
  assert _float_count(after.opt_state) == 2 * _float_count(after.params)


def test_lora_logits_equal_the_merged_models(lora_run):
  s = lora_run.setup
  unmerged = _logits(_model(s, lora_run.final), lora_run.batch)
  merged_model = s.tuning.merge(_model(s, lora_run.final))
  assert not list(lora.lora_layers(merged_model))
  assert _param_paths(merged_model) == _param_paths(nnx.eval_shape(lambda: model_init.random_model(s.spec, 0)))
  np.testing.assert_allclose(_logits(merged_model, lora_run.batch), unmerged, rtol=0, atol=1e-5)
  assert np.abs(unmerged - _logits(_model(s, lora_run.initial), lora_run.batch)).max() > 1e-3  # it trained


def test_the_export_is_plain_merged_weights_and_a_peft_folder(lora_run):
  exported = metamorph.load(lora_run.workdir).model
  assert not list(lora.lora_layers(exported))
  np.testing.assert_allclose(_logits(exported, lora_run.batch),
                             _logits(_model(lora_run.setup, lora_run.final), lora_run.batch), rtol=0, atol=1e-5)
  folder = os.path.join(lora_run.workdir, "model", "lora")
  with open(os.path.join(folder, "adapter_config.json")) as f:
    adapter = json.load(f)
  assert (adapter["r"], adapter["lora_alpha"]) == (4, 8.0)
  assert sorted(adapter["target_modules"]) == sorted(ALL_PROJECTIONS.split(","))
  assert os.path.isfile(os.path.join(folder, "adapter_model.safetensors"))


def test_a_killed_lora_run_resumes_with_the_uninterrupted_metrics(lora_run, tmp_path):
  """``python -m train`` killed with SIGKILL once checkpoint 3 exists: the rerun resumes from
  the newest checkpoint (adapters, moments, RNG: dropout masks) and logs each later step once,
  with the uninterrupted run's metrics exactly, ending in the same state and export."""
  killed = str(tmp_path / "killed")
  kill_when(train_command(lora_run.config, killed),
            lambda: os.path.isdir(os.path.join(killed, "checkpoints", str(EVERY))), f"checkpoint {EVERY} appeared")
  assert not os.path.isdir(os.path.join(killed, "model")), "killed after the export: nothing left to resume"
  before = len(_records(killed))
  rerun = run_train(lora_run.config, killed)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  resumed = re.search(rf"resumed from {re.escape(killed)}/checkpoints/(\d+)", rerun.stdout)
  assert resumed, rerun.stdout[-2000:]
  start = int(resumed.group(1))
  assert EVERY <= start < STEPS
  logged = [r for r in _records(killed)[before:] if "loss" in r]
  assert [r["step"] for r in logged] == list(range(start + 1, STEPS + 1)), "each later step once, by the rerun"
  want = _metrics(lora_run.workdir)
  for record in logged:
    for key in ("loss", "grad_norm", "lr"):
      assert record[key] == want[record["step"]][key], (record["step"], key)
  resumed_state, _ = _restore(lora_run.setup, killed)
  for a, b in zip(jax.tree.leaves(resumed_state), jax.tree.leaves(lora_run.final)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert os.path.isfile(os.path.join(killed, "model", "lora", "adapter_model.safetensors"))


def test_micro_batches_give_the_same_lora_step(lora_run):
  """From the shared run's initial state, without dropout (its masks depend on the split)."""
  no_dropout = tuning.get("lora", rank=4, alpha=8.0, dropout=0.0, targets=ALL_PROJECTIONS)
  one, state1 = train_steps(lora_run.setup, lora_run.initial, 2, micro=1, tuning=no_dropout)
  two, state2 = train_steps(lora_run.setup, lora_run.initial, 2, micro=2, tuning=no_dropout)
  np.testing.assert_allclose(two, one, rtol=2e-5)
  # AdamW's normalised update turns f32 rounding of the summed micro-batch gradients into
  # parameter differences where an element's two gradients nearly cancel: atol 1e-5 is 0.3% of
  # one step at lr 3e-3 (a wrong accumulation moves every element by a whole step)
  for path, value in _flat(state1.params).items():
    np.testing.assert_allclose(_flat(state2.params)[path], value, rtol=1e-4, atol=1e-5, err_msg=str(path))


def test_frozen_llm_moves_only_the_new_token_rows_of_the_llm(tiny_world):
  config = tiny_config("vpit", tiny_world, **{"tuning.mode": "frozen_llm", "optim.weight_decay": 0.1,
                                             "model.visualizer_from": ""})
  s = trainer.make_setup(config)
  initial = trainer.initial_state(s)
  params0, frozen0 = _flat(initial.params), _flat(initial.frozen)
  losses, state = train_steps(s, initial, 3)
  assert losses[-1] < losses[0], losses
  params1, frozen1 = _flat(state.params), _flat(state.frozen)
  table = ("llm", "embed_tokens", "embedding")
  assert {p for p in params0 if p[0] == "llm"} == {table}
  assert {p[0] for p in params0} == {"llm", "projector", "vision_head"}
  for path, value in frozen0.items():  # the whole table among them: weight decay cannot reach it
    np.testing.assert_array_equal(frozen1[path], value, err_msg=str(path))
  ids = list(s.stage.new_token_ids)
  np.testing.assert_array_equal(params0[table], frozen0[table][ids])  # the rows start as the table's
  assert not np.array_equal(params1[table], params0[table])
  # the model runs on the table with the trained rows written into it, the other rows as they were
  got = np.asarray(_model(s, state).llm.embed_tokens.embedding[...])
  want = frozen0[table].copy()
  want[ids] = params1[table]
  np.testing.assert_array_equal(got, want)
  # Adam's two moments for what trains: the two rows, not the vocabulary
  assert _float_count(state.opt_state) == 2 * _float_count(state.params)
  assert _float_count(state.params) < frozen0[table].size


@pytest.mark.parametrize("stage, overrides, message", [
    ("vpit", {"tuning.lora.targets": "q_proj,qkv_proj"},
     r"config.tuning.lora.targets: LoRA target modules \['qkv_proj'\] name no projection of llm; its "
     r"projections are .*'q_proj'"),
    ("vpit", {"tuning.lora.rank": 20},
     r"config.tuning.lora.rank: LoRA on llm.layers.0.attention.k_proj: LoRA rank 20 must be in 1..16"),
    ("vpit", {"tuning.lora.rank": 0}, r"config.tuning.lora.rank must be an integer >= 1, got 0"),
    ("vpit", {"tuning.lora.alpha": 0.0}, r"config.tuning.lora.alpha must be > 0"),
    ("vpit", {"tuning.lora.dropout": 1.0}, r"config.tuning.lora.dropout must be in \[0, 1\)"),
    ("vpit", {"tuning.lora.targets": " , "}, r"config.tuning.lora.targets names no module"),
    ("vpit", {"tuning.lora.scale": 2.0}, r"config.tuning.lora has no field\(s\) \['scale'\]"),
    ("siglip", {}, r"the siglip stage: config.tuning.mode 'lora' .*\(Siglip\) has none"),
    ("siglip", {"tuning.mode": "frozen_llm"}, r"the siglip stage: config.tuning.mode 'frozen_llm' .*has none"),
])
def test_bad_lora_settings_are_named(stage, overrides, message, tiny_world):
  config = tiny_config(stage, tiny_world, **LORA)
  for key, value in overrides.items():
    set_field(config, key, value)
  with pytest.raises(trainer.TrainingError, match=message):
    trainer.make_setup(config)


def test_training_continues_from_the_exported_peft_folder(lora_run, tiny_world):
  """config.tuning.lora.from_peft = the run's WORKDIR/model/lora: the new run starts with the
  trained adapters exactly; r, alpha or targets that differ from the folder's are named."""
  folder = os.path.join(lora_run.workdir, "model", "lora")
  config = tiny_config("vpit", tiny_world, **{**LORA, "tuning.lora.from_peft": folder})
  s = trainer.make_setup(config)
  start, trained = _flat(trainer.initial_state(s).params), _flat(lora_run.final.params)
  factors = [p for p in trained if p[-1] in ("a", "b")]
  assert len(factors) == 2 * 7 * lora_run.config.model.llm.num_layers
  for path in factors:
    np.testing.assert_array_equal(start[path], trained[path], err_msg=str(path))
  set_field(config, "tuning.lora.rank", 2)
  with pytest.raises(trainer.TrainingError, match=r"config.tuning.lora.rank is 2, the PEFT folder .* has 4"):
    trainer.make_setup(config)


def _lora_losses(workdir: str) -> np.ndarray:
  return np.array([[r[k] for k in ("loss", "loss_text", "loss_vision")] for r in _records(workdir) if "loss" in r])


def test_lora_on_a_mesh_matches_one_device(tiny_world, tmp_path):
  """3 LoRA steps on a (fsdp 2, tensor 2) mesh of 4 host devices log one device's losses
  (the adapters shard with their kernels' logical axes) within 1e-5."""
  runs = {}
  for name, mesh, devices in (("one", {"mesh.fsdp": -1, "mesh.tensor": 1}, 1),
                              ("mesh", {"mesh.fsdp": 2, "mesh.tensor": 2}, 4)):
    config = tiny_config("vpit", tiny_world, **LORA, **{"train.steps": 3, "train.batch_size": 8,
                                                       "train.checkpoint_every": 0, "data.virtual_shards": 2,
                                                       "model.dtype": "float32", "mesh.data": 1, **mesh})
    runs[name] = str(tmp_path / name)
    result = run_train(config, runs[name], env={"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                                                "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr[-3000:]
  one, mesh = _lora_losses(runs["one"]), _lora_losses(runs["mesh"])
  assert one.shape == (3, 3) and not np.allclose(one[0], one[-1])
  np.testing.assert_allclose(mesh, one, rtol=1e-5)


def test_lora_with_bf16_compute_and_remat(tiny_world):
  """bf16 compute over f32 masters and full remat: the adapters train in f32, remat gives the
  same first loss and later ones within bf16's rounding (XLA fuses the recomputed forward
  differently: 1.4e-4 measured, bf16 keeps 8 bits)."""
  losses = {}
  for remat in ("none", "full"):
    config = tiny_config("vpit", tiny_world, **LORA, **{"model.dtype": "bfloat16", "model.param_dtype": "float32",
                                                       "model.remat": remat, "tuning.lora.dropout": 0.0})
    s = trainer.make_setup(config)
    assert s.spec.config.llm.remat == remat and s.spec.config.llm.dtype == "bfloat16"
    losses[remat], state = train_steps(s, trainer.initial_state(s), 3)
    adapters = [v for p, v in nnx.to_flat_state(state.params) if p[-1] in ("a", "b")]
    assert adapters and all(v[...].dtype == jnp.float32 for v in adapters)
  assert losses["none"][-1] < losses["none"][0], losses
  np.testing.assert_allclose(losses["full"][0], losses["none"][0], rtol=1e-6)
  np.testing.assert_allclose(losses["full"], losses["none"], rtol=2e-3)
