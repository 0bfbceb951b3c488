"""The main job (``make demo``): build the shapes world, train the five stages, grade.

``python -m train.demo [--config configs/demo.py] [--config.preset=full|fast|quick|smollm2]``

Each stage trains in its own workdir under ``config.workdir`` (``siglip``,
``visualizer``, ``language``, ``connector``, ``vpit``) and is resumable; finished stages and an
up-to-date world are skipped on a rerun (``train.demo.workflow``). A preset with its own
``workdir`` and ``llm_config`` (``smollm2``, ``make demo-smollm2``) trains ``connector`` and
``vpit`` there, from that config (a pretrained LLM), on ``config.workdir``'s world, SigLIP and
visualizer (made first when missing), and asks the LLM general questions before and after
(``train.demo.general_questions``). The report (``report.md``, ``report.json``, PNGs) is
written last, in the preset's workdir, see ``train.demo.report``.
"""
from __future__ import annotations

import functools
import os
import sys
import time

import ml_collections
from absl import app, flags, logging

import metamorph

from train.config_errors import define_config_file, parse_flags
from train.demo import general_questions, machine, report, workflow
from train.demo.workflow import DEMO_STAGES, LLM_STAGES, build_world, preset, timed, train_stage

define_config_file("config", "configs/demo.py", "demo config (configs/demo.py)")
FLAGS = flags.FLAGS


def train_all(config: ml_collections.ConfigDict, timings: dict[str, float], reused: list[str]) -> dict:
  """The world(s) and every stage of the main job (each skipped when done); returns the info
  of ``config.workdir``'s world, the one the report grades on."""
  root = config.workdir
  world = timed("world", functools.partial(build_world, config), root, timings, reused)
  llm_world = workflow.llm_world_root(config)
  if llm_world != root:  # the LLM stages' own mix (no text-only records)
    timed("world", functools.partial(build_world, config, llm_world, workflow.llm_tasks(config), shared_splits=False),
          llm_world, timings, reused, label="world (connector, vpit)")
  for stage in DEMO_STAGES:
    where = workflow.stage_root(config, stage)
    timed(stage, functools.partial(train_stage, config, stage, where, root, llm_world if stage in LLM_STAGES else root),
          where, timings, reused)
  return world


def grade(config: ml_collections.ConfigDict, world: dict) -> dict:
  """The report's results: the world's grades of the trained vpit model and, for a pretrained
  LLM (the connector config's ``model.llm_init``), its general questions before and after and
  the world-knowledge probes of ``config.workdir``'s toy-LLM vpit model beside its own."""
  root, own, p = config.workdir, workflow.own_root(config), preset(config)
  model, world_dir = os.path.join(own, "vpit"), os.path.join(root, "world")
  base = workflow.pretrained_llm(config)
  name = os.path.basename(base).split(".")[0] if base else "toy LLM"  # SmolLM2-135M-Instruct
  results = {"preset": config.preset, **report.evaluate(model, world_dir, world, p, own, model_name=name),
             "loss_plot": report.plot_losses(own, [s for s in DEMO_STAGES if workflow.stage_root(config, s) == own],
                                             os.path.join(own, "losses.png"))}
  toy = os.path.join(root, "vpit")
  if own != root and os.path.isdir(os.path.join(toy, "model")):  # the toy LLM's column, first
    knowledge = report.grade_knowledge(metamorph.load(toy), world_dir, limit=p.get("eval_knowledge", 0),
                                       render_steps=p.render_steps, render_guidance=p.render_guidance)
    results["knowledge"] = {"toy LLM": knowledge, **results["knowledge"]}
  elif own != root:
    results["knowledge_note"] = (f"The toy LLM's column is missing: {toy} holds no trained model. `make demo` "
                                 "trains it; rerun this command afterwards (it reuses every finished stage).")
    print(f"knowledge: {results['knowledge_note']}")
  if base:
    results["language_kept"] = general_questions.language_kept(base, model)
  return results


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  start = time.perf_counter()
  timings, reused = {}, []
  try:
    world = train_all(config, timings, reused)
    t = time.perf_counter()
    results = grade(config, world)
    timings["evaluation"] = time.perf_counter() - t
  except (ValueError, RuntimeError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  this_run = time.perf_counter() - start
  timings["total"] = this_run + sum(timings[name] for name in reused)  # as if nothing were reused
  host = machine.info()
  own = workflow.own_root(config)
  report_config = ml_collections.ConfigDict(config.to_dict())  # the report goes to the preset's workdir
  report_config.workdir = own
  path = report.write(report_config, results, timings, host, reused=reused, this_run=this_run)
  if "language_kept" in results:
    general_questions.append_to_report(path, results["language_kept"])
  print(report.summary(results))
  if "language_kept" in results:
    print(general_questions.summary(results["language_kept"]))
  print(f"{timings['total']:.0f} s on {machine.line(host)}"
        + (f" ({this_run:.0f} s in this run, which reused {', '.join(reused)})" if reused else ""))
  print(f"report: {path}")
  print("try: python -m decode --checkpoint " + os.path.join(own, "vpit")
        + ' --prompt "Generate an image of a small green square on the left."')
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
