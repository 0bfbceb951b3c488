"""Checkpoint faults on purpose: damage to the files of a saved step, a full disk or a stall
in the middle of a save. Used by tests/test_faults.py (fast) and bench/faults.py (long).

``python -m tests.checkpoint_faults {enospc,stall} STEP MARKER -- TRAIN_FLAGS...`` runs
``python -m train`` with the fault injected into the save of STEP (``stall`` touches MARKER
when the save is under way, then waits forever: the caller kills it with SIGKILL).
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import runpy
import sys
from collections.abc import Callable, Iterator

import numpy as np
from orbax.checkpoint._src.path import async_path  # where orbax writes its metadata files

TMP_SUFFIX = ".orbax-checkpoint-tmp"


# ----------------------------------------------------------------------------- damage

def truncate(path: str, rng: np.random.Generator) -> None:
  """To a fifth of its size (the issue's case)."""
  del rng
  os.truncate(path, os.path.getsize(path) // 5)


def zero(path: str, rng: np.random.Generator) -> None:
  """Every byte zeroed, size kept."""
  del rng
  size = os.path.getsize(path)
  with open(path, "r+b") as f:
    f.write(b"\0" * size)


def flip_bit(path: str, rng: np.random.Generator) -> None:
  """One bit of one byte at a random offset flipped."""
  size = os.path.getsize(path)
  offset, bit = int(rng.integers(size)), int(rng.integers(8))
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)[0]
    f.seek(offset)
    f.write(bytes([byte ^ (1 << bit)]))


def remove(path: str, rng: np.random.Generator) -> None:
  del rng
  os.remove(path)


DAMAGES: dict[str, Callable[[str, np.random.Generator], None]] = {
    "truncate": truncate, "zero": zero, "flip_bit": flip_bit, "remove": remove}


def step_files(step_dir: str) -> dict[str, list[str]]:
  """The files of a saved step by role, relative to ``step_dir``: ``array_data`` (OCDBT data
  files, largest first), ``metadata`` (what orbax, grain and the run need to read them) and
  ``unsealed`` (written by orbax after the integrity manifest; a restore never reads them)."""
  rels = sorted(os.path.relpath(os.path.join(root, n), step_dir)
                for root, _, names in os.walk(step_dir) for n in names)
  data = sorted((r for r in rels if "/ocdbt.process_" in f"/{r}" and "/d/" in r),
                key=lambda r: -os.path.getsize(os.path.join(step_dir, r)))
  unsealed = [r for r in rels if r in ("_CHECKPOINT_METADATA", "commit_success.txt")]
  return {"array_data": data, "unsealed": unsealed,
          "metadata": [r for r in rels if r not in data and r not in unsealed]}


# ----------------------------------------------------------------------------- faults in a save

@contextlib.contextmanager
def injected(kind: str, step: int, marker: str = "") -> Iterator[None]:
  """While active, orbax's metadata writes into the temporary folder of ``step``'s save fail
  with ENOSPC (``kind="enospc"``, as on a full disk) or, for ``kind="stall"``, touch ``marker``
  and never return (the save is under way: kill the process)."""
  original = async_path.write_text
  folder = f"{os.sep}{step}{TMP_SUFFIX}{os.sep}"

  async def write_text(path, text):
    if folder in str(path):
      if kind == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      with open(marker, "w") as f:
        f.write(str(path))
      await asyncio.sleep(3600)
    return await original(path, text)

  async_path.write_text = write_text
  try:
    yield
  finally:
    async_path.write_text = original


def fault_command(kind: str, step: int, marker: str, train_flags: list[str]) -> list[str]:
  """The command line of ``python -m train TRAIN_FLAGS`` with ``injected(kind, step, marker)``."""
  return [sys.executable, "-m", "tests.checkpoint_faults", kind, str(step), marker, "--", *train_flags]


def _main(argv: list[str]) -> None:
  kind, step, marker, sep, *train_flags = argv
  assert sep == "--", argv
  sys.argv = ["train", *train_flags]
  with injected(kind, int(step), marker):
    runpy.run_module("train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  _main(sys.argv[1:])
