"""Experiments on the demo's shared runs (``python -m train.demo.experiments.NAME``): each
trains its own runs beside the demo's and writes a results table.

  data_mix          does understanding data help generation? (three task mixes, the toy LLM)
  language_records  do the world's text-only records keep a pretrained LLM's language?
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import ml_collections

from train.demo import workflow


def run(config: ml_collections.ConfigDict, rows: Callable[[dict], list[dict]],
        write: Callable[[list[dict]], str]) -> int:
  """The demo's world and shared stages (each made when missing), then ``rows(world)``
  (the experiment's runs; ``world``: the shared world's info), written by ``write`` (which
  returns the results' markdown path, printed with its text); the exit status. A run's
  ValueError / RuntimeError / OSError is printed as one line, status 1."""
  try:
    world = workflow.build_world(config)
    for stage in workflow.SHARED_STAGES:
      workflow.train_stage(config, stage)
    path = write(rows(world))
  except (ValueError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  with open(path, encoding="utf-8") as f:
    print(f.read())
  print(f"results: {path}")
  return 0
