"""The training job on a tiny world: every stage learns, frozen parameters stay
bit-identical, a killed run resumes exactly, bad configs and NaNs stop clearly."""
import functools
import json
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import nnx

from metamorph import checkpoint
from train import trainer
from train.step import state_check
from tests.train_fixtures import ROOT, kill_when, run_train, set_field, tiny_config, train_command, train_steps


def _flat(state: nnx.State) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _records(workdir: str) -> list[dict]:
  """Every record of metrics.jsonl, in order (a resumed run appends)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _metrics(workdir: str) -> dict[int, dict]:
  """The training record of each step of an uninterrupted run."""
  return {r["step"]: r for r in _records(workdir) if "loss" in r}


def _train_on_one_batch(config, steps: int = 8):
  """(losses, state before, state after) of ``steps`` steps on one repeated batch."""
  s = trainer.make_setup(config)
  state = trainer.initial_state(s)
  before = (_flat(state.params), _flat(state.frozen))
  losses, state = train_steps(s, state, steps)
  return losses, before, (_flat(state.params), _flat(state.frozen)), s


@pytest.mark.parametrize("stage", ["siglip", "language", "connector", "vpit", "visualizer"])
def test_stage_learns_and_frozen_params_do_not_move(stage, tiny_world, siglip_run):
  overrides = {} if stage == "siglip" else {"model.siglip_init": siglip_run}
  if stage == "connector":  # only the projector and two embedding rows train: a projector's lr
    overrides["optim.lr"] = 1e-2
  if stage == "visualizer":  # noise and timesteps are drawn anew each step: average them out
    overrides.update({"model.visualizer": {"preset": "toy", "block_out_channels": (32, 32, 32)},
                      "train.batch_size": 32})
  losses, (params0, frozen0), (params1, frozen1), s = _train_on_one_batch(
      tiny_config(stage, tiny_world, **overrides), steps=12 if stage == "visualizer" else 8)
  assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05, losses
  assert all(np.isfinite(losses))
  for path, value in frozen0.items():
    np.testing.assert_array_equal(frozen1[path], value, err_msg=str(path))
  moved = [p for p in params0 if not np.array_equal(params0[p], params1[p])]
  assert moved, "nothing trained"
  if stage == "language":
    assert {p[0] for p in params0} == {"llm"}
    assert {p[0] for p in frozen0} == {"projector", "vision", "vision_head"}
  if stage == "connector":
    assert {p[0] for p in params0} == {"llm", "projector"}
    assert {p[0] for p in frozen0} == {"llm", "vision", "vision_head"}
    table = ("llm", "embed_tokens", "embedding")  # its two new rows train, the table stays frozen
    assert len(s.stage.new_token_ids) == 2 and params0[table].shape == (2, frozen0[table].shape[1])
    assert not np.array_equal(params0[table], params1[table])
  if stage in ("vpit", "visualizer"):
    assert {p[0] for p in frozen0} == {"vision"}


def test_micro_batches_give_the_same_step(tiny_world, siglip_run):
  config = tiny_config("vpit", tiny_world, **{"model.siglip_init": siglip_run})
  one, *_ = _train_on_one_batch(config, steps=2)
  config.train.micro_batches = 4
  four, *_ = _train_on_one_batch(config, steps=2)
  np.testing.assert_allclose(four, one, rtol=2e-5)


def test_killed_run_resumes_with_identical_metrics(tiny_world, tmp_path):
  """kill -9 after checkpoint 6 exists: the rerun says which step it resumed from, logs each
  later step exactly once, with the metrics of an uninterrupted run."""
  config = tiny_config("siglip", tiny_world, **{"train.steps": 30, "train.checkpoint_every": 3,
                                               "train.batch_size": 16})
  reference = str(tmp_path / "reference")
  assert run_train(config, reference).returncode == 0

  killed = str(tmp_path / "killed")
  kill_when(train_command(config, killed), lambda: os.path.isdir(os.path.join(killed, "checkpoints", "6")),
            "checkpoint 6 appeared")
  before = len(_records(killed))
  rerun = run_train(config, killed)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  resumed = re.search(rf"resumed from {re.escape(killed)}/checkpoints/(\d+)", rerun.stdout)
  assert resumed, rerun.stdout[-2000:]
  start = int(resumed.group(1))
  assert 6 <= start < 30
  logged = [r for r in _records(killed)[before:] if "loss" in r]
  assert [r["step"] for r in logged] == list(range(start + 1, 31)), "each later step once, by the rerun"
  want = _metrics(reference)
  for record in logged:
    for key in ("loss", "grad_norm", "lr"):
      assert record[key] == want[record["step"]][key], (record["step"], key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_world, tmp_path):
  """lr 0 at step 1 (warmup), then 5e29: the state after step 2 overflows. It is caught before
  it is saved (the loss logged at step 2 is still that of the good weights before the update),
  and the checkpoint kept has finite parameters and a finite loss on the batch it trained on."""
  config = tiny_config("siglip", tiny_world, **{"optim.lr": 1e30, "optim.warmup_frac": 0.1, "train.steps": 20,
                                               "train.checkpoint_every": 1, "train.batch_size": 16})
  with pytest.raises(trainer.TrainingError,
                     match=r"(the loss is (nan|inf)|not finite) (at|after) step 2\b.*stopping without saving"):
    trainer.run(config, str(tmp_path))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [1]
  assert _metrics(str(tmp_path))[2]["loss"] < 20, "step 2 logged the loss of the good state before it"

  s = trainer.make_setup(config)
  with checkpoint.Checkpoints(str(tmp_path), async_save=False) as ckpt:
    state, _, step = ckpt.restore(checkpoint.abstract_like(s.abstract_state, s.shardings))
  assert step == 1
  for path, value in {**_flat(state.params), **_flat(state.frozen)}.items():
    assert np.all(np.isfinite(value)), path
  batch = next(trainer.batches(s, config.data.train_split, seed=config.seed))  # the batch step 1 trained on
  with jax.set_mesh(s.mesh):
    check = jax.jit(functools.partial(state_check, s.graphdef, s.stage))(state, trainer.data.global_batch(batch, s.mesh))
  assert bool(check["finite"]) and np.isfinite(float(check["loss"])), check


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.tensor": 3}, r"mesh \(data, fsdp, tensor\) = \(1, -1, 3\)|cannot be split"),
    ({"train.batch_size": 10, "train.micro_batches": 4}, "not divisible by config.train.micro_batches"),
    ({"stage": "pretrain"}, "use one of"),
    ({"tuning.mode": "qlora"}, r"config.tuning.mode is 'qlora'; use one of full, frozen_llm, lora"),
    ({"optim.lr": -1.0}, r"config.optim.lr must be >= 0"),
    ({"mesh.cpu_devices": -2}, r"config.mesh.cpu_devices must be >= 0"),
    ({"data.open_rows": 0}, r"config.data.open_rows must be >= 1"),
])
def test_bad_config_errors(overrides, message, tiny_world):
  config = tiny_config("siglip", tiny_world)
  for key, value in overrides.items():
    set_field(config, key, value)
  with pytest.raises((trainer.TrainingError, ValueError), match=message):
    trainer.make_setup(config)


def test_missing_init_checkpoint_is_named(tiny_world, tmp_path):
  config = tiny_config("vpit", tiny_world, **{"model.siglip_init": str(tmp_path / "nowhere")})
  from metamorph.convert import ConversionError
  with pytest.raises(ConversionError, match="nowhere"):
    trainer.make_setup(config)


def test_sigterm_saves_a_checkpoint_and_stops(tiny_world, tmp_path):
  config = tiny_config("siglip", tiny_world, **{"train.steps": 500, "train.checkpoint_every": 3,
                                               "train.batch_size": 16})
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(train_command(config, workdir), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(workdir, "checkpoints", "3")) and time.time() < deadline:
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, output[-2000:]
  stopped = int(output.split("stopping on signal")[1].split("checkpoint ")[1].split()[0])
  assert 3 <= stopped < 500
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))


def test_image_caption_pairs_by_the_record_format():
  """One image, in the first user turn, and a text-only first answer: an image-caption pair."""
  from train.data import caption_of
  assert caption_of([b"png"], [("user", "<image>\nDescribe the image."), ("assistant", "A red circle.")]) == "A red circle."
  assert caption_of([b"png"], [("system", "Be brief."), ("user", "<image>"), ("assistant", "A cat."),
                               ("user", "Colour?"), ("assistant", "black")]) == "A cat."
  assert caption_of([], [("user", "Hi"), ("assistant", "Hello")]) is None                       # no image
  assert caption_of([b"a", b"b"], [("user", "<image><image>"), ("assistant", "Two.")]) is None  # two images
  assert caption_of([b"png"], [("user", "Draw a cat."), ("assistant", "Here: <image>")]) is None  # generated
  assert caption_of([b"png"], [("user", "Hi"), ("assistant", "Hello"), ("user", "<image>"),
                               ("assistant", "A dog.")]) is None                                # not the first turn


def test_a_dtype_and_a_data_dir_that_do_not_exist_are_named(tiny_world, tmp_path):
  config = tiny_config("siglip", tiny_world, **{"model.dtype": "float99"})
  with pytest.raises(trainer.TrainingError, match=r"config.model.dtype is 'float99'; use one of float32"):
    trainer.make_setup(config)
  config = tiny_config("siglip", tiny_world, **{"data.data_dir": str(tmp_path / "nowhere")})
  with pytest.raises(trainer.TrainingError, match=r"config.data.data_dir: .*nowhere is not a folder"):
    trainer.run(config, str(tmp_path / "run"))
