"""Checkpoint faults at length: kill -9 at random moments, every damage on every file, a full disk.

  python -m bench.faults [--kills 10] [--steps 60] [--every 5] [--seed 0] [--keep DIR]

A toy siglip run (tests/train_fixtures.py's tiny world and config, asynchronous saves as in
a real run, ``python -m train`` in subprocesses) trains ``--steps`` steps, saving every
``--every``; an uninterrupted run is the reference. Then:

1. kills: ``--kills`` runs are killed with SIGKILL, half at a random moment of their training
   (once step k is logged, k random, plus up to one step's time), half while a checkpoint is
   being written (the k-th save's temporary folder seen, k random, then 0-30 ms). Each is
   rerun to the end. A run is "resumed" if the rerun says ``resumed from .../N``, "identical"
   if every record before the kill and every record of the rerun (steps N+1.. once each)
   equals the reference's loss / grad_norm / lr and the exported model is byte-identical.
2. damages: each kind of tests/checkpoint_faults.py (truncate to a fifth, zero, flip one bit,
   remove) on each file of the reference's latest step, in a copy; restored as the trainer
   does (``metamorph.checkpoint.Checkpoints``): "detected" if a warning names the step and
   the file, "fallback" if the step before it was restored exactly. The same damage restored
   by orbax alone (no manifest check) is tallied too: an error, the same arrays, or other
   arrays (a silent corruption).
3. full disk: the run's workdir on a tmpfs (root) that holds its first checkpoint but not
   the second; without root, ENOSPC is injected into the second save. The run must stop with
   one ``error: the disk holding ...`` line, the first checkpoint intact; after the disk is
   grown, the rerun must end identical to the reference.

Prints the tables; every number is counted, nothing is stopped at.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import warnings

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from metamorph import checkpoint
from tests.checkpoint_faults import DAMAGES, TMP_SUFFIX, fault_command, step_files
from tests.train_fixtures import ROOT, build_tiny_world, tiny_config, train_command, train_flags
from train import trainer

KEYS = ("loss", "grad_norm", "lr")


# ----------------------------------------------------------------------------- runs

def _train(config, workdir: str, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run(train_command(config, workdir), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _records(workdir: str) -> list[dict | None]:
  """metrics.jsonl's training records in order; None for a line that does not parse."""
  out = []
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        out.append(None)
        continue
      if "loss" in record:
        out.append(record)
  return out


def _model_hashes(workdir: str) -> dict[str, str]:
  folder = os.path.join(workdir, "model")
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = hashlib.file_digest(f, "sha256").hexdigest()
  return out


def _matches(records: list, want: dict[int, dict]) -> bool:
  return all(r is not None and all(r[k] == want[r["step"]][k] for k in KEYS) for r in records)


def _saving(workdir: str) -> bool:
  folder = os.path.join(workdir, "checkpoints")
  return os.path.isdir(folder) and any(n.endswith(TMP_SUFFIX) for n in os.listdir(folder))


def _kill_run(config, workdir: str, rng: np.random.Generator, mode: str, step_s: float,
              saves: int) -> tuple[bool, bool]:
  """Starts ``python -m train`` and kills it (mode "random": at a random moment of its training,
  once step k is logged (k random) plus up to one step's time; "saving": while its k-th save is
  under way); (a save was under way at the kill, the run had already ended)."""
  proc = subprocess.Popen(train_command(config, workdir), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  try:
    start = time.time()
    if mode == "random":
      k = int(rng.integers(1, config.train.steps))
      while proc.poll() is None and len(_records(workdir)) < k and time.time() - start < 900:
        time.sleep(0.002)
      time.sleep(float(rng.uniform(0, step_s)))
    else:
      k, seen, last = int(rng.integers(1, saves + 1)), 0, False
      while proc.poll() is None and time.time() - start < 900:
        now = _saving(workdir)
        seen += now and not last
        last = now
        if seen >= k:
          time.sleep(float(rng.uniform(0, 0.03)))
          break
        time.sleep(0.002)
  finally:
    ended = proc.poll() is not None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  return _saving(workdir), ended


def kills(config, reference: str, n: int, seed: int, root: str, step_s: float) -> dict:
  want = {r["step"]: r for r in _records(reference)}
  model = _model_hashes(reference)
  rng = np.random.default_rng(seed)
  tally = collections.Counter()
  saves = config.train.steps // config.train.checkpoint_every
  for i in range(n):
    workdir = os.path.join(root, f"kill{i}")
    mode = "random" if i % 2 == 0 else "saving"
    mid_save, ended = _kill_run(config, workdir, rng, mode, step_s, saves)
    before = _records(workdir)
    rerun = _train(config, workdir)
    after = _records(workdir)[len(before):]
    resumed = re.search(r"resumed from .*/checkpoints/(\d+)", rerun.stdout)
    start = int(resumed.group(1)) if resumed else 0
    once = [r and r["step"] for r in after] == list(range(start + 1, config.train.steps + 1))
    identical = (rerun.returncode == 0 and once and _matches(before, want) and _matches(after, want)
                 and _model_hashes(workdir) == model)
    tally.update(killed=not ended, ended_first=ended, mid_save=mid_save, resumed=bool(resumed), started_over=not resumed,
                 identical=identical, torn_lines=sum(r is None for r in before + after))
    print(f"  kill {i + 1}/{n} ({mode}): {'during a save, ' if mid_save else ''}"
          f"{'resumed from ' + str(start) if resumed else 'started over'}, "
          f"{'identical' if identical else 'DIFFERENT: ' + rerun.stderr[-300:]}", flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
  return tally


# ----------------------------------------------------------------------------- damages

def _leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state)]


def _same(a, b) -> bool:
  """Two (state leaves, iterator state) are equal."""
  (la, ia), (lb, ib) = a, b
  return ia == ib and len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


def _iterator(config, setup):
  return trainer.batches(setup, config.data.train_split, seed=config.seed)


def _orbax_alone(config, setup, folder: str, step: int):
  """(state leaves, iterator state) orbax and grain restore from ``folder``'s step without any
  check, or None on an error."""
  mgr = ocp.CheckpointManager(os.path.join(folder, "checkpoints"), item_handlers={
      "state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
      "data": grain.checkpoint.CheckpointHandler()})
  iterator = _iterator(config, setup)
  try:
    target = checkpoint.abstract_like(setup.abstract_state, setup.shardings)
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                         meta=ocp.args.JsonRestore(),
                                                         data=grain.checkpoint.CheckpointRestore(iterator)))
    return _leaves(restored.state), iterator.get_state()
  except Exception:  # noqa: BLE001 - any error counts as "orbax refused it"
    return None
  finally:
    mgr.close()


def damages(config, reference: str, root: str, seed: int) -> dict:
  setup = trainer.make_setup(config)
  steps = sorted(int(n) for n in os.listdir(os.path.join(reference, "checkpoints")) if n.isdigit())
  last, previous = steps[-1], steps[-2]

  def restore(folder):
    iterator = _iterator(config, setup)
    with checkpoint.Checkpoints(folder, async_save=False) as ckpt:
      state, _, step = ckpt.restore(checkpoint.abstract_like(setup.abstract_state, setup.shardings), iterator)
    return step, (_leaves(state), iterator.get_state())

  intact = {last: restore(reference)[1]}
  only_previous = os.path.join(root, "previous")
  shutil.copytree(reference, only_previous)
  shutil.rmtree(os.path.join(only_previous, "checkpoints", str(last)))
  intact[previous] = restore(only_previous)[1]
  roles = step_files(os.path.join(reference, "checkpoints", str(last)))
  rng = np.random.default_rng(seed)
  tally = collections.defaultdict(collections.Counter)
  with checkpoint.abandoned_orbax_work_collected():  # orbax alone: what its failed reads leave
    for kind, damage in DAMAGES.items():
      for role, rels in roles.items():
        for rel in rels:
          folder = os.path.join(root, "damaged")
          shutil.rmtree(folder, ignore_errors=True)
          shutil.copytree(reference, folder)
          damage(os.path.join(folder, "checkpoints", str(last), rel), rng)
          alone = _orbax_alone(config, setup, folder, last)
          with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
              step, got = restore(folder)
            except checkpoint.CheckpointError:
              step, got = None, None
          named = any(f"checkpoints/{last} is damaged" in str(w.message) and rel in str(w.message) for w in caught)
          row = tally[(kind, "not covered" if role == "unsealed" else role)]
          row.update(tried=1, detected=named, fallback=step == previous and _same(got, intact[previous]),
                     exact=step == last and _same(got, intact[last]),
                     wrong=step is not None and not _same(got, intact[step]),
                     alone_error=alone is None, alone_same=alone is not None and _same(alone, intact[last]),
                     alone_different=alone is not None and not _same(alone, intact[last]))
  shutil.rmtree(os.path.join(root, "damaged"), ignore_errors=True)
  return tally


# ----------------------------------------------------------------------------- full disk

def _mount_tmpfs(folder: str, kib: int) -> bool:
  os.makedirs(folder, exist_ok=True)
  if os.geteuid() != 0:
    return False
  return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", folder],
                        capture_output=True).returncode == 0


def full_disk(config, reference: str, root: str) -> dict:
  """A run whose disk fills at its second save (a tmpfs, or injected ENOSPC without root)."""
  first = os.path.join(reference, "checkpoints")
  step_kib = max(sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(os.path.join(first, s)) for n in ns)
                 for s in os.listdir(first) if s.isdigit()) // 1024
  mount = os.path.join(root, "disk")
  tmpfs = _mount_tmpfs(mount, int(step_kib * 1.5) + 256)
  workdir = os.path.join(mount, "run")
  every = config.train.checkpoint_every
  try:
    if tmpfs:
      stopped = _train(config, workdir)
    else:
      cmd = fault_command("enospc", 2 * every, os.path.join(root, "unused"), train_flags(config, workdir))
      stopped = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    err_lines = [line for line in stopped.stderr.splitlines() if line.startswith("error: ")]
    after_error = stopped.stderr.split(err_lines[-1], 1)[1] if err_lines else ""
    folder = os.path.join(workdir, "checkpoints", str(every))
    out = {"disk": f"tmpfs of {int(step_kib * 1.5) + 256} KiB" if tmpfs else "ENOSPC injected (not root)",
           "exit status": stopped.returncode,
           "one clear error line": len(err_lines) == 1 and "the disk holding" in err_lines[0],
           "tracebacks before it": stopped.stderr.split(err_lines[-1])[0].count("Traceback") if err_lines else None,
           "tracebacks after it": after_error.count("Traceback"),
           f"checkpoint {every} intact": checkpoint.verify(folder, every) is None,
           "message": err_lines[-1][:400] if err_lines else stopped.stderr[-400:]}
    if tmpfs:
      subprocess.run(["mount", "-o", f"remount,size={8 * step_kib + 4096}k", mount], check=True)
    rerun = _train(config, workdir)
    want = {r["step"]: r for r in _records(reference)}
    out["rerun resumed"] = f"resumed from {workdir}/checkpoints/{every}" in rerun.stdout
    out["rerun identical"] = (rerun.returncode == 0 and _matches(_records(workdir), want)
                              and _model_hashes(workdir) == _model_hashes(reference))
    return out
  finally:
    if tmpfs:
      subprocess.run(["umount", mount], check=False)


# ----------------------------------------------------------------------------- main

def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kills", type=int, default=10, help="runs killed with SIGKILL")
  parser.add_argument("--steps", type=int, default=60)
  parser.add_argument("--every", type=int, default=5, help="checkpoint every N steps")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--keep", default="", help="work in this folder and keep it (default: a temporary one)")
  args = parser.parse_args()
  logging.set_verbosity(logging.ERROR)
  root = args.keep or tempfile.mkdtemp(prefix="bench-faults-")
  os.makedirs(root, exist_ok=True)
  try:
    world = build_tiny_world(os.path.join(root, "world"))
    config = tiny_config("siglip", world, **{"train.steps": args.steps, "train.checkpoint_every": args.every,
                                            "train.batch_size": 16, "train.async_checkpoints": True})
    reference = os.path.join(root, "reference")
    start = time.time()
    proc = subprocess.Popen(train_command(config, reference), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    logged = []  # (records, seconds since the start) as the reference trains
    while proc.poll() is None:
      if len(_records(reference)) > (logged[-1][0] if logged else 0):
        logged.append((len(_records(reference)), time.time() - start))
      time.sleep(0.002)
    _, err = proc.communicate()
    total = time.time() - start
    assert proc.returncode == 0, err[-2000:]
    step_s = (logged[-1][1] - logged[0][1]) / max(logged[-1][0] - logged[0][0], 1)
    print(f"reference: {args.steps} steps, a checkpoint every {args.every} (async), {total:.1f} s, "
          f"{step_s * 1e3:.0f} ms a step (saves included) from the first logged step at {logged[0][1]:.1f} s",
          flush=True)

    killed = kills(config, reference, args.kills, args.seed, root, step_s)
    damaged = damages(config, reference, root, args.seed)
    disk = full_disk(config, reference, root)
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)

  print("\nkill -9 (toy siglip run, asynchronous saves)")
  print(f"  {'runs killed':>11} {'during a save':>13} {'resumed':>7} {'started over':>12} "
        f"{'identical':>9} {'torn metrics lines':>18} {'ended before the kill':>21}")
  print(f"  {killed['killed']:>11} {killed['mid_save']:>13} {killed['resumed']:>7} {killed['started_over']:>12} "
        f"{killed['identical']:>9} {killed['torn_lines']:>18} {killed['ended_first']:>21}")
  print("\ncheckpoint damage (each file of the latest step; 'orbax alone': the same damage, no manifest check)")
  print(f"  {'damage':<9} {'files':<12} {'tried':>5} {'detected':>8} {'fallback':>8} {'restored exactly':>16} "
        f"{'wrong state':>11} | {'orbax alone: error':>18} {'same':>5} {'DIFFERENT':>9}")
  totals = collections.Counter()
  for (kind, role), row in sorted(damaged.items()):
    totals.update(row)
    print(f"  {kind:<9} {role:<12} {row['tried']:>5} {row['detected']:>8} {row['fallback']:>8} {row['exact']:>16} "
          f"{row['wrong']:>11} | {row['alone_error']:>18} {row['alone_same']:>5} {row['alone_different']:>9}")
  print(f"  {'all':<9} {'':<12} {totals['tried']:>5} {totals['detected']:>8} {totals['fallback']:>8} "
        f"{totals['exact']:>16} {totals['wrong']:>11} | {totals['alone_error']:>18} {totals['alone_same']:>5} "
        f"{totals['alone_different']:>9}")
  print("  ('not covered': _CHECKPOINT_METADATA and commit_success.txt, written by orbax after the manifest; "
        "a restore does not need them)")
  print("\nfull disk during a save")
  for key, value in disk.items():
    print(f"  {key}: {value}")


if __name__ == "__main__":
  main()
