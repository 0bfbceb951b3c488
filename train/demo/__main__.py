"""The main job (``make demo``): build the shapes world, train the five stages, grade.

``python -m train.demo [--config configs/demo.py] [--config.preset=full|fast|quick]``

Each stage trains in its own workdir under ``config.workdir`` (``siglip``,
``visualizer``, ``language``, ``connector``, ``vpit``) and is resumable; finished stages and an
up-to-date world are skipped on a rerun (``train.demo.workflow``). The report
(``report.md``, ``report.json``, PNGs) is written last, see ``train.demo.report``.
"""
from __future__ import annotations

import functools
import os
import sys
import time

from absl import app, flags, logging

from train.config_errors import define_config_file, parse_flags
from train.demo import machine, report
from train.demo.workflow import DEMO_STAGES, build_world, preset, timed, train_stage

define_config_file("config", "configs/demo.py", "demo config (configs/demo.py)")
FLAGS = flags.FLAGS


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  root = config.workdir
  start = time.perf_counter()
  timings, reused = {}, []
  try:
    world = timed("world", functools.partial(build_world, config), root, timings, reused)
    for stage in DEMO_STAGES:
      timed(stage, functools.partial(train_stage, config, stage), root, timings, reused)
    t = time.perf_counter()
    results = {"preset": config.preset,
               **report.evaluate(os.path.join(root, "vpit"), os.path.join(root, "world"), world,
                                 preset(config), root),
               "loss_plot": report.plot_losses(root, DEMO_STAGES, os.path.join(root, "losses.png"))}
    timings["evaluation"] = time.perf_counter() - t
  except (ValueError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  this_run = time.perf_counter() - start
  timings["total"] = this_run + sum(timings[name] for name in reused)  # as if nothing were reused
  host = machine.info()
  path = report.write(config, results, timings, host, reused=reused, this_run=this_run)
  print(report.summary(results))
  print(f"{timings['total']:.0f} s on {machine.line(host)}"
        + (f" ({this_run:.0f} s in this run, which reused {', '.join(reused)})" if reused else ""))
  print(f"report: {path}")
  print("try: python -m decode --checkpoint " + os.path.join(config.workdir, "vpit")
        + ' --prompt "Generate an image of a small green square on the left."')
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
