"""The method's data-mix finding at toy scale: does understanding data help generation?

``python -m train.demo.experiments.data_mix [--config configs/demo.py] [--config.preset=quick]``

The same connector + VPiT runs (configs/toy.py, the preset's steps) on three worlds
that differ only in their task mix; the SigLIP encoder, the visualizer and (when the
preset has a language stage) the language-stage LLM are the demo's (``WORKDIR/siglip``,
``WORKDIR/visualizer``, ``WORKDIR/language``, trained first when missing).
Writes ``WORKDIR/data_mix/results.md``, ``results.json`` and ``results.png``:
generation accuracy (all three attributes, seen and held-out pairs) and
understanding accuracy per mix, all graded on the demo world's validation records and
prompts. Each mix lives in ``WORKDIR/data_mix/MIX`` and resumes.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from train.config_errors import define_config_file, parse_flags
from train.demo import experiments, report, workflow
from train.demo.report import percent

define_config_file("config", "configs/demo.py", "demo config (configs/demo.py)")
FLAGS = flags.FLAGS

# name -> (task mix of metamorph.shapes.mix.resolve_mix, what it stands for)
MIXES = {
  "generation_only": ("generation", "(a) generation data only"),
  "generation_understanding": ("generation,understanding", "(b) generation + understanding data"),
  "little_generation": ("understanding,t2i:0.03,edit:0.01", "(c) little generation + much understanding"),
}


def run_mix(config, name: str, tasks: str, root: str, reference: dict) -> dict:
  """Trains the mix's world, connector and vpit; grades on the ``reference`` world (the
  demo's: the same validation records and prompts for every mix)."""
  mix_root = os.path.join(root, "data_mix", name)
  world = workflow.build_world(config, mix_root, tasks, shared_splits=False)
  for stage in ("connector", "vpit"):
    workflow.train_stage(config, stage, mix_root, shared=root)
  results = report.evaluate(os.path.join(mix_root, "vpit"), os.path.join(root, "world"), reference,
                            workflow.preset(config), mix_root)
  results["tasks"] = world["args"]["tasks"]
  with open(os.path.join(mix_root, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  return results


def _row(name: str, label: str, r: dict) -> dict:
  t = r["text_to_image"]
  return {"mix": name, "label": label, "tasks": r["tasks"],
          "t2i_seen": t["seen"].get("all_three"), "t2i_heldout": t["heldout"].get("all_three"),
          "cosine_seen": t["seen"].get("token_cosine"), "cosine_heldout": t["heldout"].get("token_cosine"),
          "colour_heldout": t["heldout"].get("color"), "shape_heldout": t["heldout"].get("shape"),
          "understanding": r["understanding"]["accuracy"]}


def write(rows: list[dict], out_dir: str) -> str:
  """``results.md``, ``results.json`` and ``results.png`` of the mixes' rows in ``out_dir``;
  returns the markdown's path."""
  plt = report.pyplot()
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=2)
  lines = ["# Data mix at toy scale", "",
           ("| mix | task weights | t2i all three, seen | t2i all three, held-out | token cosine, seen | "
           "token cosine, held-out | held-out colour / shape | understanding |"),
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    weights = ", ".join(f"{k} {v:.2f}" for k, v in r["tasks"].items())
    cos = [f"{r[k]:.3f}" if r[k] is not None else "n/a" for k in ("cosine_seen", "cosine_heldout")]
    lines.append(f"| {r['label']} | {weights} | {percent(r['t2i_seen'])} | {percent(r['t2i_heldout'])} | "
                 f"{cos[0]} | {cos[1]} | {percent(r['colour_heldout'])} / {percent(r['shape_heldout'])} | "
                 f"{percent(r['understanding'])} |")
  lines += ["", "![results](results.png)"]
  path = os.path.join(out_dir, "results.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  keys = [("t2i_seen", "t2i seen"), ("t2i_heldout", "t2i held-out"), ("understanding", "understanding")]
  x = np.arange(len(rows))
  fig, ax = plt.subplots(figsize=(7, 3))
  for i, (key, label) in enumerate(keys):
    ax.bar(x + (i - 1) * 0.27, [r[key] or 0.0 for r in rows], 0.27, label=label)
  ax.set_xticks(x, [r["mix"] for r in rows], fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("accuracy")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "results.png"), dpi=120)
  plt.close(fig)
  return path


def main(argv) -> int:
  del argv
  logging.set_verbosity(logging.WARNING)
  config, root = FLAGS.config, FLAGS.config.workdir
  return experiments.run(
      config, lambda reference: [_row(name, label, run_mix(config, name, tasks, root, reference))
                                 for name, (tasks, label) in MIXES.items()],
      lambda rows: write(rows, os.path.join(root, "data_mix")))


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)
