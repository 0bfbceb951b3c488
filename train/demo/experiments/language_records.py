"""MultiModal-GPT's finding on a pretrained LLM: do the world's text-only records keep its language?

``python -m train.demo.experiments.language_records --config.preset=smollm2 [--config configs/demo.py]
[--steps 100] [--questions 200]`` (a preset with a pretrained ``llm_config``)

Two VPiT runs of ``--steps`` steps (the preset's ``llm_config``, e.g. SmolLM2-135M-Instruct
with LoRA) from the same connector, the preset's (``PRESET_WORKDIR/connector``, trained first
when missing): one on the world's task mix with its text-only ("text" task) records, one on
the same mix without them (a world of its own, the other tasks' weights renormalised, so both
runs see as many records). Each is asked the general questions of
``train.demo.general_questions`` (its LLM's answers before VPiT beside them) and the first
``--questions`` understanding questions of the shared world's validation split.
Writes ``PRESET_WORKDIR/language_records/results.md`` and ``results.json``; each run lives in
``PRESET_WORKDIR/language_records/{with,without}`` and resumes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

import ml_collections
from absl import app, flags, logging

from train.config_errors import define_config_file, parse_flags
from train.demo import experiments, general_questions, report, workflow
from train.demo.report import percent

define_config_file("config", "configs/demo.py", "demo config (configs/demo.py)")
flags.DEFINE_integer("steps", 100, "VPiT steps of each run")
flags.DEFINE_integer("questions", 200, "understanding questions graded per run (0: all of the validation split)")
FLAGS = flags.FLAGS

ARMS = {"with": "with the text-only records", "without": "without them"}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One run of the experiment: its demo config (the preset's, ``steps`` VPiT steps, with or
  without the text-only records), its task mix (``workflow.llm_tasks``), the folder its world
  is under, its vpit workdir."""
  name: str
  config: ml_collections.ConfigDict
  tasks: str
  world_root: str
  workdir: str


def plan(config: ml_collections.ConfigDict, name: str, steps: int) -> Arm:
  c = ml_collections.ConfigDict(config.to_dict())
  p = workflow.preset(c)
  p.vpit_steps = steps
  p.language_records = name == "with"
  out = os.path.join(workflow.own_root(c), "language_records", name)
  tasks = workflow.llm_tasks(c)
  return Arm(name, c, tasks, c.workdir if tasks == c.tasks else out, os.path.join(out, "vpit"))


def run_arm(config: ml_collections.ConfigDict, name: str, steps: int, questions: int, before: dict) -> dict:
  """Trains (or reuses) the arm's world and vpit run (from the preset's connector); its
  language grades (against ``before``: ``general_questions.ask`` of the pretrained LLM) and
  understanding grades."""
  import metamorph  # slow import (jax), only to grade
  arm = plan(config, name, steps)
  c, own, root = arm.config, workflow.own_root(arm.config), arm.config.workdir
  if arm.world_root != root:
    workflow.build_world(c, arm.world_root, arm.tasks, shared_splits=False)
  done = workflow.train_stage(c, "vpit", own, shared=root, world=arm.world_root, workdir=arm.workdir)
  mm = metamorph.load(arm.workdir)
  kept = general_questions.compare(before, general_questions.ask(mm), workflow.pretrained_llm(c), arm.workdir)
  validation = report.read_jsonl(os.path.join(root, "world", "validation.jsonl"))
  understood = report.understanding(mm, os.path.join(root, "world"), validation, questions)
  result = {"arm": name, "label": ARMS[name], "steps": steps, "tasks": arm.tasks or "(the default mix)",
            "seconds": done.get("seconds"), "last": done.get("last", {}),
            "language_kept": kept, "understanding": understood}
  with open(os.path.join(os.path.dirname(arm.workdir), "results.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  return result


def write(rows: list[dict], out_dir: str) -> str:
  """``results.md`` and ``results.json`` in ``out_dir``; returns the markdown's path."""
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  before = rows[0]["language_kept"]["before"]
  lines = ["# Language kept, with and without the world's text-only records", "",
           f"VPiT {rows[0]['steps']} steps from the same connector; general questions answered right before "
           f"VPiT: {percent(before['accuracy'])} of {before['n']}.", "",
           "| run | general questions right after | kept (of those right before) | understanding | "
           "final loss (text / vision) |", "|---|---|---|---|---|"]
  for r in rows:
    k, last = r["language_kept"], r["last"]
    losses = " / ".join(f"{last[key]:.3f}" if key in last else "n/a" for key in ("loss_text", "loss_vision"))
    lines.append(f"| {r['label']} | {percent(k['after']['accuracy'])} | {percent(k['kept'])} | "
                 f"{percent(r['understanding']['accuracy'])} of {r['understanding']['n']} | {losses} |")
  lines += ["", "| question | before | " + " | ".join(r["arm"] for r in rows) + " |",
            "|---|---|" + "---|" * len(rows)]
  for i, b in enumerate(before["answers"]):
    cells = [general_questions.cell(b)] + [general_questions.cell(r["language_kept"]["after"]["answers"][i])
                                            for r in rows]
    lines.append(f"| {b['question']} | " + " | ".join(cells) + " |")
  path = os.path.join(out_dir, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  if not workflow.preset(config).llm_config:
    print(f"error: config.presets.{config.preset} trains the toy LLM from scratch: it has no language to keep; "
          "use --config.preset=smollm2", file=sys.stderr)
    return 1
  if FLAGS.steps < 1:
    print(f"error: --steps must be >= 1, got {FLAGS.steps}", file=sys.stderr)
    return 1
  own, root = workflow.own_root(config), config.workdir

  def rows(world: dict) -> list[dict]:
    del world
    import metamorph  # slow import (jax), only to grade
    workflow.train_stage(config, "connector", own, shared=root, world=workflow.llm_world_root(config))
    before = general_questions.ask(metamorph.load(workflow.pretrained_llm(config)))  # once, for both runs
    return [run_arm(config, arm, FLAGS.steps, FLAGS.questions, before) for arm in ARMS]
  return experiments.run(config, rows, lambda rows: write(rows, os.path.join(own, "language_records")))


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
