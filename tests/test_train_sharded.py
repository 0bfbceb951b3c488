"""Sharded training on the CPU, in subprocesses (XLA_FLAGS must be set before jax starts).

* 3 vpit steps on a (data=1, fsdp=4, tensor=2) mesh of 8 host devices log the same
  losses as the same config on one device, and the row fill of the batches packed;
* on that mesh each device holds about 1/8 of the train state;
* two processes of 4 devices each (``jax.distributed`` on localhost, gloo collectives)
  log the same losses, and export the same model, as one process with 8 devices;
* a run checkpointed on one device resumes on the 8-device mesh with the losses of an
  uninterrupted one-device run;
* two processes find their latest checkpoint damaged (one bit flipped), agree on it, set it
  aside and resume from the one before, logging the metrics of the undamaged run.

``data.virtual_shards`` is fixed, so every run sees the same global batches. The runs
start together (a module fixture) and each test waits for the ones it reads.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from tests.train_fixtures import ROOT, config_flags, run_train, tiny_config

STEPS = 3
LOSSES = ("loss", "loss_text", "loss_vision")
RTOL = 1e-5
MESH = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
ONE_DEVICE = {"mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1}
TIMEOUT = 300  # seconds, per run


def _config(world: str, mesh: dict):
  return tiny_config("vpit", world, **{"train.steps": STEPS, "train.batch_size": 8, "train.checkpoint_every": 0,
                                       "data.virtual_shards": 2, "model.dtype": "float32",
                                       "model.param_dtype": "float32", **mesh})


def _env(devices: int) -> dict:
  return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
          "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _run_processes(config, workdir: str, processes: int, devices_each: int,
                   timeout: int = TIMEOUT) -> tuple[list[int | None], list[str]]:
  """``python -m train`` as ``processes`` processes of one jax.distributed job on localhost;
  (return codes, outputs). As soon as one fails the others are killed (they would wait in
  a collective), and all are killed at the timeout or on any error."""
  port = _free_port()
  cmd = [sys.executable, "-m", "train", f"--config={ROOT}/configs/toy.py:{config.stage}",
         f"--workdir={workdir}", *config_flags(config), f"--coordinator=localhost:{port}",
         f"--num_processes={processes}"]
  procs, logs = [], []
  try:
    for i in range(processes):
      logs.append(tempfile.TemporaryFile("w+"))
      procs.append(subprocess.Popen([*cmd, f"--process_id={i}"], cwd=ROOT, stdout=logs[-1],
                                    stderr=subprocess.STDOUT, env={**os.environ, **_env(devices_each)}))
    deadline = time.monotonic() + timeout
    while (any(p.poll() is None for p in procs) and not any(p.poll() for p in procs)
           and time.monotonic() < deadline):
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
    for p in procs:
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return [p.returncode for p in procs], outputs


_BYTES_SCRIPT = """
import json, jax
from tests.train_fixtures import tiny_config
from train import trainer
out = {}
for name, llm in {"trained": {}, "wide": dict(hidden_size=64, intermediate_size=256, head_dim=16)}.items():
  c = tiny_config("vpit", WORLD, **MESH)
  c.model.llm.update(llm)
  s = trainer.make_setup(c)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
  out[name] = {**trainer.per_device_bytes(s), "total": total, "devices": len(s.mesh.devices.flat)}
print(json.dumps(out))
"""


def _per_device_bytes(world: str) -> subprocess.CompletedProcess:
  script = f"WORLD = {world!r}\nMESH = {MESH!r}\n{_BYTES_SCRIPT}"
  return subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**os.environ, **_env(8)},
                        capture_output=True, text=True, timeout=TIMEOUT)


@pytest.fixture(scope="module")
def runs(tiny_world, tmp_path_factory):
  """Futures of every run of this module, started together."""
  root = tmp_path_factory.mktemp("sharded")
  dirs = {name: str(root / name) for name in ("one", "mesh", "two", "resumed", "straight", "damaged")}
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1))  # more oversubscribes
  futures = {
      "two": pool.submit(_run_processes, _config(tiny_world, MESH), dirs["two"], 2, 4),
      "mesh": pool.submit(run_train, _config(tiny_world, MESH), dirs["mesh"], env=_env(8), timeout=TIMEOUT),
      "one": pool.submit(run_train, _config(tiny_world, ONE_DEVICE), dirs["one"], env=_env(1), timeout=TIMEOUT),
      "bytes": pool.submit(_per_device_bytes, tiny_world),
      "straight": pool.submit(run_train, _constant_lr(tiny_world, ONE_DEVICE, 2 * STEPS), dirs["straight"],
                              env=_env(1), timeout=TIMEOUT),
      "resumed": pool.submit(_resume_on_mesh, tiny_world, dirs["resumed"]),
      "damaged": pool.submit(_resume_two_processes_past_damage, tiny_world, dirs["damaged"]),
  }
  yield futures, dirs
  pool.shutdown(wait=True)  # the runs time out by themselves


def _constant_lr(world: str, mesh: dict, steps: int):
  """A config whose learning rate does not depend on train.steps (so a run can be extended)."""
  config = _config(world, mesh)
  config.train.steps = steps
  config.optim.update(warmup_frac=0.0, final_lr_frac=1.0)
  return config


def _resume_on_mesh(world: str, workdir: str) -> subprocess.CompletedProcess:
  """STEPS steps on one device, then the same run extended to 2 * STEPS on the 8-device mesh."""
  first = run_train(_constant_lr(world, ONE_DEVICE, STEPS), workdir, env=_env(1), timeout=TIMEOUT)
  if first.returncode:
    return first
  return run_train(_constant_lr(world, MESH, 2 * STEPS), workdir, env=_env(8), timeout=TIMEOUT)


def _resume_two_processes_past_damage(world: str, workdir: str):
  """2 * STEPS steps as two processes (checkpoints STEPS and 2 * STEPS), one bit of the last
  checkpoint's largest array file flipped, then the same command again: (codes, outputs) of
  both runs."""
  from tests.checkpoint_faults import flip_bit, step_files
  config = _constant_lr(world, MESH, 2 * STEPS)
  config.train.checkpoint_every = STEPS
  first = _run_processes(config, workdir, 2, 4)
  if first[0] != [0, 0]:
    return first, None
  last = os.path.join(workdir, "checkpoints", str(2 * STEPS))
  flip_bit(os.path.join(last, step_files(last)["array_data"][0]), np.random.default_rng(0))
  return first, _run_processes(config, workdir, 2, 4)


def _ok(result: subprocess.CompletedProcess) -> None:
  assert result.returncode == 0, result.stderr[-5000:]


def _losses(workdir: str, steps: int = STEPS) -> np.ndarray:
  """[steps, len(LOSSES)] from the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in rows] == list(range(1, steps + 1))
  return np.array([[r[k] for k in LOSSES] for r in rows], np.float64)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), np.abs(b))))


def _row_fills(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["row_fill"] for line in f if line.strip()]


def test_mesh_of_8_devices_matches_one_device(runs, tiny_world):
  futures, dirs = runs
  _ok(futures["one"].result())
  _ok(futures["mesh"].result())
  # row_fill: record tokens / token slots of each step's batch, as the pipeline packs it
  from train import trainer
  setup = trainer.make_setup(_config(tiny_world, ONE_DEVICE), load_weights=False)
  batches = trainer.batches(setup, setup.config.data.train_split, seed=setup.config.seed)
  fills = [tokens / slots for tokens, slots, _ in (trainer._batch_counts(next(batches)) for _ in range(STEPS))]
  assert all(0 < f < 1 for f in fills), fills
  assert _row_fills(dirs["one"]) == _row_fills(dirs["mesh"]) == pytest.approx(fills, rel=1e-12)
  one, mesh = _losses(dirs["one"]), _losses(dirs["mesh"])
  assert np.all(np.isfinite(one)) and not np.allclose(one[0], one[-1])  # it trains
  rel = _max_rel(one, mesh)
  print(f"max relative loss difference, 8 devices vs 1: {rel:.3g}")
  assert rel <= RTOL, (one, mesh)


def test_each_device_holds_an_eighth_of_the_state(runs):
  futures, _ = runs
  result = futures["bytes"].result()
  _ok(result)
  out = json.loads(result.stdout.strip().splitlines()[-1])
  for name, b in out.items():
    assert b["devices"] == 8
    assert b["max"] == b["mean"], b  # balanced
    print(f"{name}: max per-device bytes / total = {b['max'] / b['total']:.4f} (ideal 0.125)")
  # Replicated norms and biases, and matrices split over one mesh axis only (e.g. the
  # projector's vision-width side) add a little to the ideal 1/8.
  assert out["trained"]["max"] <= 0.2 * out["trained"]["total"], out
  assert out["wide"]["max"] <= 0.125 * 1.2 * out["wide"]["total"], out


def test_two_processes_match_one_process(runs):
  futures, dirs = runs
  codes, outputs = futures["two"].result()
  assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
  _ok(futures["mesh"].result())
  mesh, two = _losses(dirs["mesh"]), _losses(dirs["two"])
  rel = _max_rel(mesh, two)
  print(f"max relative loss difference, 2 processes x 4 devices vs 1 x 8: {rel:.3g}")
  assert rel <= RTOL, (mesh, two)
  # the final model is gathered from both processes and exported by process 0
  from metamorph.files import read_safetensors_file
  a, b = (read_safetensors_file(os.path.join(dirs[k], "model", "model.safetensors")) for k in ("mesh", "two"))
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_resume_on_another_mesh(runs):
  futures, dirs = runs
  _ok(futures["straight"].result())
  resumed = futures["resumed"].result()
  _ok(resumed)
  assert f"checkpoints/{STEPS}" in resumed.stdout + resumed.stderr  # it did resume
  straight, moved = _losses(dirs["straight"], 2 * STEPS), _losses(dirs["resumed"], 2 * STEPS)
  rel = _max_rel(straight, moved)
  print(f"max relative loss difference, resumed on 8 devices vs one device throughout: {rel:.3g}")
  assert rel <= RTOL, (straight, moved)


def test_two_processes_agree_on_a_damaged_checkpoint_and_resume_before_it(runs):
  futures, dirs = runs
  first, second = futures["damaged"].result()
  assert first[0] == [0, 0], "\n\n".join(o[-4000:] for o in first[1])
  codes, outputs = second
  assert codes == [0, 0], "\n\n".join(o[-4000:] for o in outputs)
  folder = os.path.join(dirs["damaged"], "checkpoints")
  assert f"checkpoint {folder}/{2 * STEPS} is damaged" in outputs[0], outputs[0][-4000:]
  assert f"resumed from {folder}/{STEPS}" in outputs[0] and f"resumed from {folder}/{STEPS}" in outputs[1]
  assert os.listdir(os.path.join(dirs["damaged"], "checkpoints_damaged")) == [str(2 * STEPS)]
  with open(os.path.join(dirs["damaged"], "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  assert [r["step"] for r in rows] == [*range(1, 2 * STEPS + 1), *range(STEPS + 1, 2 * STEPS + 1)]
  for before, again in zip(rows[STEPS:2 * STEPS], rows[2 * STEPS:]):
    for key in LOSSES:
      assert again[key] == before[key], (again["step"], key)  # the same computation, replayed
