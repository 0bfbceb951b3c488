"""Timing shared by the benchmark scripts."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_it(fn: Callable[[], object], repeats: int) -> float:
  """Median seconds of ``fn()`` over ``repeats`` runs, after one warm-up run."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)
