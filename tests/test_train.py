"""The training job on a tiny world: every stage learns, frozen parameters stay
bit-identical, a killed run resumes exactly, bad configs and NaNs stop clearly."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from train import trainer
from tests.train_fixtures import ROOT, config_flags, run_train, set_field, tiny_config


def _flat(state: nnx.State) -> dict:
  return {path: np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def _metrics(workdir: str) -> dict[int, dict]:
  """Last record of each step in metrics.jsonl (a resumed run appends)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        out[record["step"]] = record
  return out


@pytest.fixture(scope="module")
def siglip_run(tiny_world, tmp_path_factory):
  """A short siglip run whose exported model the connector / vpit tests start from."""
  workdir = str(tmp_path_factory.mktemp("siglip"))
  trainer.run(tiny_config("siglip", tiny_world, **{"train.batch_size": 16}), workdir)
  return workdir


def _train_on_one_batch(config, steps: int = 8):
  """(losses, state before, state after) of ``steps`` steps on one repeated batch."""
  s = trainer.make_setup(config)
  state = trainer.initial_state(s)
  before = (_flat(state.params), _flat(state.frozen))
  batch = next(trainer.batches(s, config.data.train_split, seed=0))
  step = jax.jit(lambda st, b: trainer.train_step(s.graphdef, s.stage, s.tx, s.schedule,
                                                  config.train.micro_batches, st, b))
  losses = []
  with jax.set_mesh(s.mesh):
    global_batch = trainer.data.global_batch(batch, s.mesh)
    for _ in range(steps):
      state, out = step(state, global_batch)
      losses.append(float(out["loss"]))
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
    table = ("llm", "embed_tokens", "embedding")
    changed_rows = np.flatnonzero(np.any(params0[table] != params1[table], axis=1))
    assert set(changed_rows) <= set(s.stage.new_token_ids) and len(s.stage.new_token_ids) == 2
  if stage in ("vpit", "visualizer"):
    assert {p[0] for p in frozen0} == {"vision"}


def test_micro_batches_give_the_same_step(tiny_world, siglip_run):
  config = tiny_config("vpit", tiny_world, **{"model.siglip_init": siglip_run})
  one, *_ = _train_on_one_batch(config, steps=2)
  config.train.micro_batches = 4
  four, *_ = _train_on_one_batch(config, steps=2)
  np.testing.assert_allclose(four, one, rtol=2e-5)


def test_killed_run_resumes_with_identical_metrics(tiny_world, tmp_path):
  config = tiny_config("siglip", tiny_world, **{"train.steps": 30, "train.checkpoint_every": 3,
                                               "train.batch_size": 16})
  reference = str(tmp_path / "reference")
  assert run_train(config, reference).returncode == 0

  killed = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "train", f"--config={ROOT}/configs/toy.py:siglip", f"--workdir={killed}",
         *config_flags(config)]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 240
    while not os.path.isdir(os.path.join(killed, "checkpoints", "6")) and time.time() < deadline:
      assert proc.poll() is None, "the run ended before it could be killed"
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert run_train(config, killed).returncode == 0
  want, got = _metrics(reference), _metrics(killed)
  assert sorted(got) == sorted(want)
  for step in range(7, 31):
    for key in ("loss", "grad_norm", "lr"):
      assert got[step][key] == want[step][key], (step, key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_world, tmp_path):
  config = tiny_config("siglip", tiny_world, **{"optim.lr": 1e30, "train.steps": 20,
                                               "train.checkpoint_every": 1, "train.batch_size": 16})
  with pytest.raises(trainer.TrainingError, match=r"the loss is (nan|inf) at step \d+; stopping"):
    trainer.run(config, str(tmp_path))
  steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert steps, "the good checkpoints before the NaN are kept"


@pytest.mark.parametrize("overrides, message", [
    ({"mesh.tensor": 3}, r"mesh \(data, fsdp, tensor\) = \(1, -1, 3\)|cannot be split"),
    ({"train.batch_size": 10, "train.micro_batches": 4}, "not divisible by config.train.micro_batches"),
    ({"stage": "pretrain"}, "use one of"),
    ({"tuning.mode": "lora"}, r"config.tuning.mode is 'lora'; use one of full"),
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
  cmd = [sys.executable, "-m", "train", f"--config={ROOT}/configs/toy.py:siglip", f"--workdir={workdir}",
         *config_flags(config)]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
