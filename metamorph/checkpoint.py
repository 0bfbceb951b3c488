"""Training checkpoints: an orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``, each step
sealed by an integrity manifest and verified before it is restored.

Each step saved holds ``state`` (the train state pytree, restored onto whatever shardings the
caller asks for, so a run can resume on another mesh), ``data`` (each process's grain iterator
state), ``meta`` (JSON: the config and what a reader needs to rebuild the model) and
``integrity.json`` (the size and checksum of every file of the step: XXH3-128, a
non-cryptographic hash that finds accidental damage at memory speed, about 14x sha256's on
one core; manifests of format 1, with sha256, still verify).

What survives what (tests/test_faults.py, ``python -m bench.faults``):

* kill -9 at any moment, during a save included: orbax writes a step into
  ``STEP.orbax-checkpoint-tmp`` and renames it into place when it is complete; the manifest
  is written into that folder before the rename (orbax's post-finalization callback), so a
  folder with a step's name always has its manifest. The next run deletes unfinished folders.
* damage to a step folder (truncation, zeroing, bit flips in array data or metadata, a
  missing file): the manifest no longer matches; the step is named, moved to
  ``WORKDIR/checkpoints_damaged/`` and the run resumes from the newest intact step, with a
  warning (``strict``: it stops instead). Without the manifest orbax restores a flipped bit of
  array data silently (tensorstore's zstd chunks carry no checksum), and a damaged file it
  never reads (superseded OCDBT nodes) restores bit-identical arrays.
* a full disk during a save: the save fails, ``DiskFullError`` names the folder and what to
  do; earlier steps are never written to.

Two files orbax writes after the manifest are not covered: the step's ``_CHECKPOINT_METADATA``
(timestamps, rewritten at the rename) and ``commit_success.txt``; a restore does not depend on
them (damaged, the step still restores bit-identical).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gc
import hashlib
import json
import logging as std_logging
import os
import sys
import traceback
import warnings
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from absl import logging
from jax.experimental import multihost_utils

CHECKPOINTS = "checkpoints"
DAMAGED = "checkpoints_damaged"   # damaged steps set aside, next to CHECKPOINTS
MANIFEST = "integrity.json"
_FORMAT = "metamorph-checkpoint-integrity/2"   # per-file XXH3-128
_FORMATS = {"metamorph-checkpoint-integrity/1": hashlib.sha256, _FORMAT: xxhash.xxh3_128}  # format -> file hash
_CHUNK = 8 << 20
_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's atomicity_types.TMP_DIR_SUFFIX
_WRITTEN_AFTER_SEAL = ("_CHECKPOINT_METADATA", "commit_success.txt")  # top-level files orbax writes later
_whole_array_saves = False
_abandoned_hook = False


class CheckpointError(RuntimeError):
  """A checkpoint is missing, damaged or cannot be written."""


class DiskFullError(CheckpointError):
  """A save ran out of disk space; earlier checkpoints are intact."""


class CheckpointWarning(UserWarning):
  """A damaged or unverified checkpoint was skipped or used."""


# ----------------------------------------------------------------------------- integrity

def _checksum(path: str, new=xxhash.xxh3_128) -> str:
  with open(path, "rb") as f:
    digest = new()
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _files(folder: str) -> list[str]:
  """Paths (relative, '/'-separated) of the files of a step folder that the manifest covers."""
  out = []
  for root, _, names in os.walk(folder):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
      if rel != MANIFEST and rel not in _WRITTEN_AFTER_SEAL:
        out.append(rel)
  return sorted(out)


def _digests(folder: str, rels: list[str], new=xxhash.xxh3_128) -> dict[str, list]:
  """{rel: [size, checksum]}; hashed on threads (both hash libraries release the GIL)."""
  paths = [os.path.join(folder, rel) for rel in rels]
  with concurrent.futures.ThreadPoolExecutor(min(8, max(len(paths), 1))) as pool:
    hashes = list(pool.map(lambda p: _checksum(p, new), paths))
  return {rel: [os.path.getsize(p), h] for rel, p, h in zip(rels, paths, hashes)}


def _digest_of(files: dict) -> str:
  return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: str, step: int) -> None:
  """Seals a complete step folder: ``integrity.json`` with the size and checksum of each file."""
  files = _digests(folder, _files(folder))
  body = json.dumps({"format": _FORMAT, "step": step, "files": files, "digest": _digest_of(files)}, indent=0)
  tmp = os.path.join(folder, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    f.write(body)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(folder, MANIFEST))


def has_manifest(folder: str) -> bool:
  return os.path.exists(os.path.join(folder, MANIFEST))


def verify(folder: str, step: int) -> str | None:
  """None if every file of the step folder matches its manifest, else what is wrong (the
  first problem, with the count of the others)."""
  try:
    with open(os.path.join(folder, MANIFEST)) as f:
      manifest = json.load(f)
    files, saved_step = manifest["files"], manifest["step"]
    new = _FORMATS.get(manifest["format"])
    intact = new is not None and manifest["digest"] == _digest_of(files)
  except FileNotFoundError:
    return f"{MANIFEST} is missing"
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return f"{MANIFEST} is unreadable ({type(e).__name__}: {e})"
  if not intact:
    return f"{MANIFEST} is damaged (its own digest does not match)"
  if saved_step != step:
    return f"{MANIFEST} is step {saved_step}'s, not this step's"
  problems = []
  present = [rel for rel in files if os.path.isfile(os.path.join(folder, rel))]
  problems += [f"{rel} is missing" for rel in files if rel not in present]
  sized = []
  for rel in present:
    size = os.path.getsize(os.path.join(folder, rel))
    if size != files[rel][0]:
      problems.append(f"{rel} has {size} bytes, {files[rel][0]} when saved (truncated or overwritten)")
    else:
      sized.append(rel)
  if not problems:  # sizes first: cheap, and the common damage (a truncated file)
    for rel, (_, digest) in _digests(folder, sized, new).items():
      if digest != files[rel][1]:
        problems.append(f"{rel} differs from what was saved (checksum mismatch)")
  if not problems:
    return None
  return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def is_disk_full(error: BaseException) -> bool:
  """True if ``error`` or one it was raised from is ENOSPC (Python or tensorstore)."""
  seen = 0
  while error is not None and seen < 16:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error) or "ENOSPC" in str(error):
      return True
    error, seen = error.__cause__ or error.__context__, seen + 1
  return False


# ----------------------------------------------------------------------------- the manager

def _agreed(flag: bool) -> bool:
  """True if every process says so (a collective when there are several)."""
  if jax.process_count() == 1:
    return flag
  return bool(multihost_utils.process_allgather(np.int32(flag)).min())


class _OrbaxThreadTracebacks(std_logging.Filter):
  """Drops orbax's ERROR records that carry a traceback: its threads log each failed write of
  a save (a full disk: one per file, tens of lines each) and each failed read of a restore;
  ``Checkpoints`` raises that error once, saying which folder and what to do."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno >= std_logging.ERROR and record.exc_info
                and f"{os.sep}orbax{os.sep}" in record.pathname)


_ORBAX_TRACEBACKS = _OrbaxThreadTracebacks()


def _warn(message: str) -> None:
  warnings.warn(message, CheckpointWarning, stacklevel=3)


class Checkpoints:
  """The run's checkpoints in ``WORKDIR/checkpoints``, keeping the last ``keep`` steps.

  ``save`` seals each step (see the module docstring); ``restore`` returns the newest intact
  step. ``async_save=False`` waits for each save to complete. Close it (or use it as a
  context manager): ``close`` waits for a save in flight.
  """

  def __init__(self, workdir: str, *, keep: int = 2, async_save: bool = True, with_data: bool = True,
               strict: bool = False):
    _save_whole_arrays_on_cpu()
    logging.get_absl_logger().addFilter(_ORBAX_TRACEBACKS)  # once: a logger keeps one copy of a filter
    _ignore_work_abandoned_by_orbax()
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINTS)
    self._async, self._with_data, self._strict = async_save, with_data, strict
    self._saving: int | None = None   # the step of the save in flight (read by _seal)
    self._failed = False              # a save failed and was reported: close quietly
    # orbax calls post_finalization_callback only on its asynchronous path; synchronous saves wait.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=True, create=True, cleanup_tmp_directories=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._seal))
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if with_data:
      handlers["data"] = grain.checkpoint.CheckpointHandler()
    self._mgr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def __enter__(self) -> Checkpoints:
    return self

  def __exit__(self, kind, value, tb) -> None:
    self.close(quiet=kind is not None)

  def all_steps(self) -> list[int]:
    return sorted(self._mgr.all_steps())

  def latest_step(self) -> int | None:
    return self._mgr.latest_step()

  def _folder(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _seal(self) -> None:
    """orbax's post-finalization callback (process 0, background thread): the manifest of
    the step in flight, written into its temporary folder before orbax renames it."""
    step = self._saving
    tmp = self._folder(step) + _TMP_SUFFIX
    write_manifest(tmp if os.path.isdir(tmp) else self._folder(step), step)

  # --- saving

  def save(self, step: int, state: Any, meta: dict, data_iterator=None) -> bool:
    """Starts a save of ``step`` (waits for it when synchronous); True if a save started.
    Raises DiskFullError / CheckpointError when this or the previous save failed."""
    self.wait()
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._saving = step
    try:
      started = self._mgr.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 - any write error: name the folder, say what to do
      raise self._save_error(e) from e
    if not self._async:
      self.wait()
    return started

  def wait(self) -> None:
    """Waits for the save in flight; raises its error as DiskFullError / CheckpointError."""
    try:
      self._mgr.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_error(e) from e

  def _complete_steps(self) -> list[int]:
    return sorted(int(n) for n in os.listdir(self.directory) if n.isdigit())  # an unfinished save has no step name

  def _last_complete(self) -> str:
    steps = self._complete_steps()
    return f"the last complete checkpoint, step {steps[-1]}, is intact" if steps else "no checkpoint was completed"

  def full_disk_error(self, what: str) -> DiskFullError:
    """The error to stop a run with when ``what`` failed for want of disk space."""
    steps = self._complete_steps()
    return DiskFullError(
        f"the disk holding {self.workdir} is full: {what} (No space left on device); {self._last_complete()}. "
        "Free space there (or lower config.train.keep_checkpoints, or move the workdir to a larger disk), then "
        "rerun the same command to resume" + (f" from step {steps[-1]}" if steps else "")
        + f". Unfinished {CHECKPOINTS}/*{_TMP_SUFFIX} folders are deleted then.")

  def _save_error(self, error: Exception) -> CheckpointError:
    self._failed = True
    # the failed save's other writes stay unawaited: Python would warn of each as the run exits
    warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
    if is_disk_full(error):
      return self.full_disk_error(f"checkpoint {self._saving} could not be written")
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return CheckpointError(f"saving checkpoint {self._saving} in {self.directory} failed ({first}); "
                           f"{self._last_complete()}. Rerun the same command to resume from it.")

  def close(self, *, quiet: bool = False) -> None:
    """Waits for a save in flight and releases orbax's threads. ``quiet`` (an error is
    already on its way): a failed save is logged, not raised."""
    try:
      if not (quiet or self._failed):
        self.wait()
      self._mgr.close()
    except Exception as e:  # noqa: BLE001
      if not (quiet or self._failed):
        raise self._save_error(e) from e
      logging.warning("closing the checkpoint manager of %s: %s", self.directory, e)

  # --- restoring

  def restore(self, target: Any, data_iterator=None) -> tuple[Any, dict, int] | None:
    """(state on the target's shardings, meta, step) of the newest intact step, or None when
    there is none; restores ``data_iterator`` in place when given.

    Newer damaged steps are named in a CheckpointWarning and moved to WORKDIR/checkpoints_damaged/
    (so the run can save those steps again); ``strict`` raises CheckpointError instead. A folder
    with no sealed step at all (written before manifests) is restored unverified, with a warning.
    """
    steps = sorted(self._mgr.all_steps(), reverse=True)
    if not steps:
      return None
    sealed = any(has_manifest(self._folder(s)) for s in steps)
    if not sealed and self._strict:
      raise CheckpointError(f"no step in {self.directory} has a {MANIFEST} (written before checkpoints were "
                            "sealed), and config.train.strict_checkpoints is set: unset it to restore "
                            f"step {steps[0]} unverified")
    damaged: list[tuple[int, str]] = []
    for step in steps:
      problem = verify(self._folder(step), step) if sealed and jax.process_index() == 0 else None
      if _agreed(problem is None):
        try:
          restored = self._restore_step(step, target, data_iterator)
        except CheckpointError as e:
          if sealed:  # its bytes are as saved: the reader differs (another config?), not the data
            raise CheckpointError(f"checkpoint {self._folder(step)} is intact (it matches its {MANIFEST}) but "
                                  f"does not restore into this run's state: {e}. Was the config changed "
                                  "since it was saved?") from e
          problem = str(e)
        else:
          if not sealed:
            _warn(f"{self._folder(step)} has no {MANIFEST} (written before checkpoints were sealed): "
                  "restored unverified")
          self._set_aside(damaged)
          return restored
      problem = problem or "it failed to verify on process 0"
      if self._strict:
        raise CheckpointError(
            f"checkpoint {self._folder(step)} is damaged: {problem}. config.train.strict_checkpoints is set, "
            f"so the run stops; move that folder away (e.g. to {os.path.join(self.workdir, DAMAGED)}/) to "
            "resume from the step before it, or unset strict_checkpoints to do that automatically")
      older = [s for s in steps if s < step]
      _warn(f"checkpoint {self._folder(step)} is damaged: {problem}; "
            + (f"trying step {older[0]}" if older else "no older checkpoint is left"))
      damaged.append((step, problem))
    listing = "; ".join(f"step {s}: {p}" for s, p in damaged)
    raise CheckpointError(f"no intact checkpoint in {self.directory} ({listing}). Move or delete those "
                          "folders to start from step 0.")

  def _restore_step(self, step: int, target: Any, data_iterator) -> tuple[Any, dict, int]:
    items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    failure = None
    with abandoned_orbax_work_collected():
      try:
        restored = self._mgr.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many kinds
        failure = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    if failure:  # raised here, not chained: orbax's frames hold what it abandoned, collected above
      raise CheckpointError(f"orbax cannot restore it ({failure})")
    return restored.state, restored.meta, step

  def _set_aside(self, damaged: list[tuple[int, str]]) -> None:
    """Moves damaged step folders to WORKDIR/checkpoints_damaged/STEP[.N] (process 0)."""
    if not damaged:
      return
    if jax.process_index() == 0:
      aside = os.path.join(self.workdir, DAMAGED)
      os.makedirs(aside, exist_ok=True)
      for step, _ in damaged:
        dest, n = os.path.join(aside, str(step)), 0
        while os.path.exists(dest):
          n += 1
          dest = os.path.join(aside, f"{step}.{n}")
        os.rename(self._folder(step), dest)
        _warn(f"moved the damaged checkpoint {self._folder(step)} to {dest}; delete it when done with it")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("metamorph.checkpoint: damaged steps set aside")
    self._mgr.reload()


def _abandoned_by_orbax(unraisable) -> bool:
  """True for the two harmless "unraisable" errors a failed orbax restore or save leaves: orbax
  closes the call's event loop while tensorstore still completes the other reads / writes, and
  each completion reports "RuntimeError: Event loop is closed" from a tensorstore thread
  (asyncio's call_soon_threadsafe); the reads it abandoned report their own error when their
  coroutines are collected. A traceback each, printed after the clear error that says what failed."""
  error, frames = unraisable.exc_value, traceback.extract_tb(unraisable.exc_traceback)
  if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed" and frames
      and frames[0].name == "call_soon_threadsafe" and frames[0].filename.endswith("base_events.py")):
    return True
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine
  return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


def _filtered(previous):
  return lambda unraisable: None if _abandoned_by_orbax(unraisable) else previous(unraisable)


def _ignore_work_abandoned_by_orbax() -> None:
  """Drops those errors process-wide (they may come late, from tensorstore's threads); every
  other unraisable error goes to the previous hook."""
  global _abandoned_hook
  if not _abandoned_hook:
    sys.unraisablehook, _abandoned_hook = _filtered(sys.unraisablehook), True


@contextlib.contextmanager
def abandoned_orbax_work_collected():
  """Around an orbax call that may fail: on the way out, collects what it abandoned with those
  errors dropped (a test runner may have replaced the process-wide hook), and with asyncio's
  "Task exception was never retrieved" log of the same reads silenced."""
  previous, log = sys.unraisablehook, std_logging.getLogger("asyncio")
  level = log.level
  sys.unraisablehook = _filtered(previous)
  log.setLevel(std_logging.CRITICAL)
  try:
    yield
  finally:
    with warnings.catch_warnings():
      warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited", category=RuntimeWarning)
      gc.collect()
    sys.unraisablehook = previous
    log.setLevel(level)


def _save_whole_arrays_on_cpu() -> None:
  """On a CPU backend, writes each replicated array whole from its first replica.

  Orbax's default off GPUs (replica-parallel saving) cuts every replicated array into
  per-replica slices with eager jax ops, one compile per new shape: the toy visualizer's
  first save on 2 CPU devices takes 7.4 s that way, 0.3 s whole. CPU replicas share one
  host's memory, so the slices save no I/O. Other backends keep orbax's default. The handler
  goes into orbax's process-wide registry (orbax has no per-manager one for StandardSave).
  """
  global _whole_array_saves
  if _whole_array_saves or jax.default_backend() != "cpu":
    return
  default = ocp.type_handlers.get_type_handler(jax.Array)
  store = getattr(default, "_array_metadata_store", None)  # as orbax's resolve_array_metadata_store reads it
  handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False, array_metadata_store=store)
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns on any override of a registered type
  try:
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
  finally:
    logging.set_verbosity(verbosity)
  _whole_array_saves = True


def abstract_like(state: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of ``state`` placed on ``shardings`` (the restore target)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
