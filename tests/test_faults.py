"""Checkpoint faults on purpose (fast cases; ``python -m bench.faults`` runs the long ones):
every kind of damage to a saved step is detected, named and the previous step restored,
nothing damaged is restored; a full disk stops a save clearly; kill -9 in the middle of a
checkpoint write leaves the previous step intact and the rerun resumes exactly."""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from metamorph import checkpoint
from tests.checkpoint_faults import DAMAGES, TMP_SUFFIX, fault_command, injected, step_files
from tests.train_fixtures import SIGLIP_RUN, kill_when, tiny_config, train_flags
from train import trainer

STEPS, EVERY = 6, 3   # checkpoints 3 and 6


@dataclasses.dataclass
class Trained:
  workdir: str
  config: object
  setup: trainer.Setup
  saved: dict           # step -> (state leaves, iterator state) as restored from the intact run
  metrics: dict         # step -> logged record


def _records(workdir: str, skip: int = 0) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f.readlines()[skip:]]


def _restore(t: Trained, workdir: str, **kw) -> tuple[int, list[np.ndarray], bytes]:
  """(step, state leaves, iterator state) of what ``Checkpoints.restore`` picks."""
  iterator = trainer.batches(t.setup, t.config.data.train_split, seed=t.config.seed)
  with checkpoint.Checkpoints(workdir, async_save=False, **kw) as ckpt:
    state, _, step = ckpt.restore(checkpoint.abstract_like(t.setup.abstract_state, t.setup.shardings), iterator)
  return step, [np.asarray(x) for x in jax.tree.leaves(state)], iterator.get_state()


def _same(got, want) -> bool:
  (_, leaves, it), (want_leaves, want_it) = got, want
  return it == want_it and len(leaves) == len(want_leaves) and all(
      a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(leaves, want_leaves))


@pytest.fixture(scope="module")
def trained(siglip_run, tiny_world, tmp_path_factory) -> Trained:
  """conftest's siglip run, with the states its two checkpoints restore to."""
  config, workdir = tiny_config("siglip", tiny_world, **SIGLIP_RUN), siglip_run
  assert (config.train.steps, config.train.checkpoint_every) == (STEPS, EVERY)
  t = Trained(workdir, config, trainer.make_setup(config), {}, {r["step"]: r for r in _records(workdir)})
  only3 = str(tmp_path_factory.mktemp("only3"))
  shutil.copytree(workdir, only3, dirs_exist_ok=True)
  shutil.rmtree(os.path.join(only3, "checkpoints", str(STEPS)))
  for step, folder in ((STEPS, workdir), (EVERY, only3)):
    got = _restore(t, folder)
    assert got[0] == step
    t.saved[step] = got[1:]
  return t


def _copy(t: Trained, tmp_path) -> str:
  folder = str(tmp_path / "run")
  shutil.copytree(t.workdir, folder)
  return folder


def _cases():
  """(damage, file): each damage on the largest array data file and on the pytree metadata;
  a few on the other kinds of metadata and on the manifest itself (bench/faults.py: all)."""
  for kind in DAMAGES:
    yield kind, "array_data"
    yield kind, "state/_METADATA"
  yield from [("flip_bit", "state/manifest.ocdbt"), ("zero", "data/process_0-of-1.json"),
              ("truncate", "meta/metadata"), ("flip_bit", checkpoint.MANIFEST), ("remove", checkpoint.MANIFEST)]


@pytest.mark.parametrize("kind, target", list(_cases()), ids=lambda x: x)
def test_damage_is_named_and_the_previous_step_restored(kind, target, trained, tmp_path):
  folder = _copy(trained, tmp_path)
  step_dir = os.path.join(folder, "checkpoints", str(STEPS))
  rel = step_files(step_dir)["array_data"][0] if target == "array_data" else target
  DAMAGES[kind](os.path.join(step_dir, rel), np.random.default_rng(0))
  with pytest.warns(checkpoint.CheckpointWarning) as caught:
    got = _restore(trained, folder)
  damaged, moved = (str(w.message) for w in caught)
  assert re.search(rf"checkpoints/{STEPS} is damaged: {re.escape(rel)} .*; trying step {EVERY}$", damaged), damaged
  assert moved.endswith(f"checkpoints/{STEPS} to {folder}/{checkpoint.DAMAGED}/{STEPS}; delete it when done with it")
  assert got[0] == EVERY and _same(got, trained.saved[EVERY]), "the intact step before it, exactly"
  assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == [str(EVERY)]
  assert os.path.isdir(os.path.join(folder, checkpoint.DAMAGED, str(STEPS), "state")), "set aside, for a look"


def test_files_orbax_writes_after_the_seal_are_never_read(trained, tmp_path):
  """_CHECKPOINT_METADATA (timestamps) and commit_success.txt: damaged, the step restores exactly."""
  folder = _copy(trained, tmp_path)
  step_dir = os.path.join(folder, "checkpoints", str(STEPS))
  assert sorted(step_files(step_dir)["unsealed"]) == ["_CHECKPOINT_METADATA", "commit_success.txt"]
  for rel in step_files(step_dir)["unsealed"]:
    DAMAGES["zero"](os.path.join(step_dir, rel), np.random.default_rng(0))
  got = _restore(trained, folder)
  assert got[0] == STEPS and _same(got, trained.saved[STEPS])


def test_an_intact_step_that_does_not_fit_the_config_is_not_called_damaged(trained, tiny_world):
  config = tiny_config("siglip", tiny_world, **{**SIGLIP_RUN, "model.siglip.vision.intermediate_size": 48})
  other = trainer.make_setup(config)
  with checkpoint.Checkpoints(trained.workdir, async_save=False) as ckpt, pytest.raises(
      checkpoint.CheckpointError, match=rf"checkpoints/{STEPS} is intact .* Was the config changed"):
    ckpt.restore(checkpoint.abstract_like(other.abstract_state, other.shardings))
  assert sorted(os.listdir(os.path.join(trained.workdir, "checkpoints"))) == [str(EVERY), str(STEPS)]


def test_strict_stops_at_a_damaged_step_and_moves_nothing(trained, tmp_path):
  folder = _copy(trained, tmp_path)
  rel = "state/_METADATA"
  DAMAGES["flip_bit"](os.path.join(folder, "checkpoints", str(STEPS), rel), np.random.default_rng(1))
  with pytest.raises(checkpoint.CheckpointError, match=rf"checkpoints/{STEPS} is damaged: {rel} .*strict_checkpoints"):
    _restore(trained, folder, strict=True)
  assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == [str(EVERY), str(STEPS)]
  assert not os.path.exists(os.path.join(folder, checkpoint.DAMAGED))


def test_no_intact_step_is_an_error_that_names_each(trained, tmp_path):
  folder = _copy(trained, tmp_path)
  for step in (EVERY, STEPS):
    DAMAGES["truncate"](os.path.join(folder, "checkpoints", str(step), "meta/metadata"), np.random.default_rng(0))
  with pytest.warns(checkpoint.CheckpointWarning), pytest.raises(
      checkpoint.CheckpointError, match=rf"no intact checkpoint .*step {STEPS}: meta/metadata .*step {EVERY}: meta"):
    _restore(trained, folder)
  assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == [str(EVERY), str(STEPS)]


def test_a_run_from_before_manifests_restores_unverified_with_a_warning(trained, tmp_path):
  folder = _copy(trained, tmp_path)
  for step in (EVERY, STEPS):
    os.remove(os.path.join(folder, "checkpoints", str(step), checkpoint.MANIFEST))
  with pytest.warns(checkpoint.CheckpointWarning, match="restored unverified"):
    got = _restore(trained, folder)
  assert got[0] == STEPS and _same(got, trained.saved[STEPS])
  with pytest.raises(checkpoint.CheckpointError, match="strict_checkpoints is set"):
    _restore(trained, folder, strict=True)


def test_kill_mid_write_then_a_full_disk_keep_the_last_checkpoint(trained, tmp_path, capfd):
  """kill -9 while the save of step 6 is under way (stalled in orbax's metadata write): step 3
  is intact and the unfinished folder is ignored. The rerun says it resumed from 3 and logs
  steps 4..6 once each with the uninterrupted run's metrics; its own save of step 6 then
  meets a full disk (ENOSPC injected) and stops with one clear error; step 3 is still intact."""
  folder, marker = str(tmp_path / "run"), str(tmp_path / "saving")
  kill_when(fault_command("stall", STEPS, marker, train_flags(trained.config, folder)),
            lambda: os.path.exists(marker), "the save of step 6 began")
  checkpoints = os.path.join(folder, "checkpoints")
  assert sorted(os.listdir(checkpoints)) == [str(EVERY), f"{STEPS}{TMP_SUFFIX}"]
  assert checkpoint.verify(os.path.join(checkpoints, str(EVERY)), EVERY) is None
  logged = len(_records(folder))

  capfd.readouterr()
  with injected("enospc", STEPS), pytest.raises(checkpoint.DiskFullError) as e:
    trainer.run(trained.config, folder)
  out, err = capfd.readouterr()
  assert f"resumed from {folder}/checkpoints/{EVERY}" in out
  rerun = [r for r in _records(folder, skip=logged) if "loss" in r]
  assert [r["step"] for r in rerun] == list(range(EVERY + 1, STEPS + 1))
  for record in rerun:
    for key in ("loss", "grad_norm", "lr"):
      assert record[key] == trained.metrics[record["step"]][key], (record["step"], key)
  message = str(e.value)
  assert f"the disk holding {folder} is full: checkpoint {STEPS} could not be written" in message
  assert f"step {EVERY}, is intact" in message and f"rerun the same command to resume from step {EVERY}" in message
  assert "Traceback" not in out + err, (out + err)[-3000:]   # orbax's per-write tracebacks are not shown
  assert sorted(os.listdir(checkpoints)) == [str(EVERY), f"{STEPS}{TMP_SUFFIX}"]
  assert not os.path.exists(os.path.join(folder, "model"))
  got = _restore(trained, folder)                        # the next run deletes the unfinished folder
  assert got[0] == EVERY and _same(got, trained.saved[EVERY])
  assert sorted(os.listdir(checkpoints)) == [str(EVERY)]
  del e  # holds the failed save's unawaited writes; the CLI silences their warnings (metamorph/checkpoint.py)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    gc.collect()


def test_a_full_disk_under_the_metrics_is_one_error_in_the_caller(tmp_path):
  """The metrics writer's TensorBoard file meets a full disk (/dev/full): ``write`` raises
  ENOSPC in the caller, ``close`` once more, and the process exits with nothing else printed
  (no background thread or exit hook retrying the flush)."""
  import subprocess
  import sys
  code = ("import errno, sys\n"
          "from train.metrics import MetricsWriter\n"
          "w = MetricsWriter(sys.argv[1])\n"
          "w._tb._py_recordio_writer._writer = open('/dev/full', 'wb')  # the disk is full from now on\n"
          "for call in (lambda: w.write(1, {'loss': 1.0}), w.close):\n"
          "  try:\n"
          "    call()\n"
          "  except OSError as e:\n"
          "    print('ENOSPC' if e.errno == errno.ENOSPC else e)\n")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert (done.returncode, done.stdout, done.stderr) == (0, "ENOSPC\nENOSPC\n", "")
  with open(tmp_path / "metrics.jsonl") as f:
    assert json.loads(f.read()) == {"loss": 1.0, "step": 1}  # the JSONL line was written before


def test_a_format_1_manifest_still_verifies_and_still_finds_damage(trained, tmp_path):
  """Steps sealed with format 1 (sha256 per file) verify; a flipped bit is still found."""
  import hashlib
  folder = _copy(trained, tmp_path)
  step_dir = os.path.join(folder, "checkpoints", str(STEPS))
  with open(os.path.join(step_dir, checkpoint.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["format"] == "metamorph-checkpoint-integrity/2"
  files = {}
  for rel, (size, _) in manifest["files"].items():
    with open(os.path.join(step_dir, rel), "rb") as f:
      files[rel] = [size, hashlib.file_digest(f, "sha256").hexdigest()]
  digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
  with open(os.path.join(step_dir, checkpoint.MANIFEST), "w") as f:
    json.dump({"format": "metamorph-checkpoint-integrity/1", "step": STEPS, "files": files, "digest": digest}, f)
  assert checkpoint.verify(step_dir, STEPS) is None
  rel = step_files(step_dir)["array_data"][0]
  DAMAGES["flip_bit"](os.path.join(step_dir, rel), np.random.default_rng(1))
  assert checkpoint.verify(step_dir, STEPS) == f"{rel} differs from what was saved (checksum mismatch)"
