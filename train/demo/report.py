"""Grading a trained MetaMorph on the shapes world, and the demo's report.

* understanding: exact match of the answer to held-out (validation) questions about
  images, by question type;
* text-to-image: the oracle reads the generated image; colour, shape, position (and
  size), and all three of colour/shape/position, on seen and held-out pairs; plus the
  mean cosine between the generated visual tokens and the encoder's tokens of the
  target drawn at its anchor;
* editing: the oracle reads the edited image against the target;
* world knowledge (``grade_knowledge``): the probes of ``metamorph.shapes.knowledge``, which name
  colours and shapes only through knowledge or words the world never uses, beside their
  in-template controls: drawings by the oracle (colour and shape), answers by exact match.
"""
from __future__ import annotations

import json
import os
import textwrap
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

import metamorph
from metamorph.data.images import load_image
from metamorph.shapes import oracle, scene
from metamorph.shapes.knowledge import DRAWN, KINDS
from metamorph.shapes.scene import ATTRIBUTES
from metamorph.shapes.world import KNOWLEDGE_FILE, WORLD_FILE, write_eval_knowledge
from metamorph.tokens import IMAGE_PLACEHOLDER
from train.demo import machine

GRADED = ("color", "shape", "position")  # "all three"
BATCH = 32
MAX_NEW_TOKENS = 48


def _normalize(text: str) -> str:
  return " ".join(text.strip().lower().rstrip(".").split())


def read_jsonl(path: str) -> list[dict]:
  """The records of a JSONL file (blank lines skipped)."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _image_names(record: dict) -> list[str]:
  names = record.get("image") or []
  return [names] if isinstance(names, str) else names


def _images(record: dict, world: str) -> list[Image.Image]:
  return [load_image(os.path.join(world, "images", n), where=record["id"]) for n in _image_names(record)]


def _batches(items: Sequence, desc: str, size: int = BATCH):
  for i in tqdm(range(0, len(items), size), desc=desc, unit="batch", dynamic_ncols=True):
    yield items[i:i + size]


def _even(n: int) -> int:
  """The size of the fewest chunks of at most ``BATCH`` that split ``n`` items evenly: the
  engine pads a batch to a power of two, so 48 items run as 2 x 24 in its 32-row compilation
  (which the other gradings made) rather than 32 + 16 (a compilation of its own)."""
  return -(-n // -(-n // BATCH)) if n else BATCH


def _single_turn(record: dict) -> bool:
  turns = record["conversations"]
  return len(turns) == 2 and turns[0]["from"] == "human" and turns[1]["from"] == "gpt"


def looks_at(record: dict) -> str:
  """What a graded question looks at: "one object", "2 objects" (one image), "2 images",
  "3 frames" (video), from the record's images and ``meta.objects``; "" when unknown."""
  images, objects = _image_names(record), record.get("meta", {}).get("objects")
  if record.get("task") == "video_qa":
    return f"{len(images)} frames"
  if len(images) > 1:
    return f"{len(images)} images"
  if not objects:
    return ""
  return "one object" if objects[0] == 1 else f"{objects[0]} objects"


def understanding(mm, world: str, records: list[dict], limit: int) -> dict[str, Any]:
  """Exact-match accuracy of text answers, overall, by question type and by ``looks_at``, on the
  first ``limit`` questions of ``records`` (0: all of them)."""
  items = [r for r in records if _single_turn(r) and IMAGE_PLACEHOLDER not in r["conversations"][1]["value"]
           and r.get("image")][:limit or None]
  by_type: dict[str, list[bool]] = defaultdict(list)
  by_scene: dict[str, list[bool]] = defaultdict(list)
  examples = []
  for chunk in _batches(items, "understanding"):
    outs = mm.generate([r["conversations"][0]["value"] for r in chunk],
                       images=[_images(r, world) for r in chunk], max_new_tokens=MAX_NEW_TOKENS)
    for r, out in zip(chunk, outs):
      want = r["conversations"][1]["value"]
      ok = _normalize(out.text) == _normalize(want)
      kind = r["task"] + ("/" + r["meta"]["questions"][0] if r.get("meta", {}).get("questions") else "")
      by_type[kind].append(ok)
      by_scene[looks_at(r) or "unknown"].append(ok)
      if len(examples) < 12:
        examples.append({"question": r["conversations"][0]["value"], "answer": out.text, "expected": want})
  total = [ok for oks in by_type.values() for ok in oks]
  return {"accuracy": float(np.mean(total)) if total else None, "n": len(total),
          "by_type": _rates(by_type), "by_scene": _rates(by_scene), "examples": examples}


def _rates(groups: dict[str, list[bool]]) -> dict[str, dict[str, Any]]:
  return {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}


def _grade(reads: list[dict], targets: list[dict]) -> dict[str, Any]:
  if not targets:
    return {"n": 0}
  out = {a: float(np.mean([r.get(a) == t[a] for r, t in zip(reads, targets)])) for a in ATTRIBUTES}
  out["all_three"] = float(np.mean([all(r.get(a) == t[a] for a in GRADED) for r, t in zip(reads, targets)]))
  out["n"] = len(targets)
  return out


def _anchor_image(target: dict) -> np.ndarray:
  return scene.render(scene.Shape(**target), size=32)


def text_to_image(mm, prompts: list[dict], out_dir: str, limit: int, **render) -> dict[str, Any]:
  """Oracle grades of generated images for seen and held-out prompts."""
  groups = {"seen": [p for p in prompts if not p["meta"]["heldout"]],
            "heldout": [p for p in prompts if p["meta"]["heldout"]]}
  if limit:
    groups = {k: v[:limit] for k, v in groups.items()}
  results, gallery = {}, []
  for name, items in groups.items():
    drawn = []
    reads, targets, cosines, missing = [], [], [], 0
    for chunk in _batches(items, f"text-to-image ({name})"):
      outs = mm.generate([p["conversations"][0]["value"] for p in chunk], max_new_tokens=MAX_NEW_TOKENS,
                         **render)
      for p, out in zip(chunk, outs):
        target = p["meta"]["targets"][0]
        targets.append(target)
        if not out.images:
          reads.append({})
          missing += 1
          continue
        reads.append(oracle.read_image(np.asarray(out.images[0])))
        truth = mm.encode_image(_anchor_image(target))  # [m, Dv]
        cosines.append(float(np.mean(np.sum(out.visual_tokens[0] * truth, axis=-1))))
        drawn.append((p["conversations"][0]["value"], out.images[0], name))
    gallery += [drawn[i] for i in np.linspace(0, len(drawn) - 1, min(8, len(drawn))).round().astype(int)] if drawn else []
    results[name] = {**_grade(reads, targets), "no_image": missing,
                     "token_cosine": float(np.mean(cosines)) if cosines else None}
  results["gallery"] = _save_gallery(gallery, os.path.join(out_dir, "t2i_samples.png"))
  return results


def editing(mm, world: str, records: list[dict], limit: int, **render) -> dict[str, Any]:
  """Oracle grades of the edited images of the first ``limit`` editing records."""
  items = [r for r in records if r["task"] == "edit" and _single_turn(r)][:limit]
  reads, targets = [], []
  for chunk in _batches(items, "editing"):
    outs = mm.generate([r["conversations"][0]["value"] for r in chunk],
                       images=[_images(r, world)[:1] for r in chunk], max_new_tokens=MAX_NEW_TOKENS, **render)
    for r, out in zip(chunk, outs):
      targets.append(r["meta"]["targets"][0])
      reads.append(oracle.read_image(np.asarray(out.images[0])) if out.images else {})
  return _grade(reads, targets)


def _knowledge_records(world: str) -> list[dict]:
  """The world-knowledge probes of the world in ``world``; written first (from its ``world.json``)
  when the world predates them."""
  path = os.path.join(world, KNOWLEDGE_FILE)
  if not os.path.isfile(path):
    info = os.path.join(world, WORLD_FILE)
    if not os.path.isfile(info):
      raise ValueError(f"{world} holds neither {KNOWLEDGE_FILE} nor {WORLD_FILE}: not a shapes world")
    with open(info, encoding="utf-8") as f:
      args = json.load(f)["args"]
    n = write_eval_knowledge(world, args["holdout"], args["image_size"])
    print(f"knowledge: {world} had no {KNOWLEDGE_FILE} (an older world); wrote its {n} probes")
  return read_jsonl(path)


def _probe_kind(record: dict) -> str:
  return f"{record['task']}/{record['meta']['probe']}"


def _side(record: dict, side: str) -> list[dict]:
  """The turns a probe record grades: its own ("probe") or its in-template "control"."""
  return record["conversations"] if side == "probe" else record["meta"]["control"]


def _knowledge_rates(oks: list[bool], attrs: dict[str, list[bool]] | None = None,
                     missing: int | None = None) -> dict[str, Any]:
  out: dict[str, Any] = {"accuracy": float(np.mean(oks)) if oks else None, "n": len(oks)}
  out.update({a: float(np.mean(v)) for a, v in (attrs or {}).items()})
  return out if missing is None else {**out, "no_image": missing}


def grade_knowledge(mm, world: str, *, render_steps: int, render_guidance: float,
                    limit: int = 0) -> dict[str, Any]:
  """Grades the world-knowledge probes of the shapes world in ``world`` (``eval_knowledge.jsonl``,
  written first for an older world) beside their in-template controls.

  mm: what ``metamorph.load`` returns (its ``generate``: outputs with ``text`` and ``images``).
  limit: the first ``limit`` probes of each kind (0: all 24 + 24). A drawing is right when the
  oracle reads the probe's colour and shape (``knowledge.DRAWN``; the control is graded on the
  same two), an answer when it equals the ground truth (``_normalize``d: exact match).
  Returns ``{"kinds": {kind: {"probe": rates, "control": rates}}, "examples": [one per probe],
  "seconds": float}`` for each kind of ``knowledge.KINDS`` and "all": rates are ``{"accuracy",
  "n"}``, for drawings also each ``DRAWN`` attribute's rate and ``no_image``.
  """
  start = time.perf_counter()
  records = _knowledge_records(world)
  chosen = [r for kind in KINDS for r in [x for x in records if _probe_kind(x) == kind][:limit or None]]
  jobs = [(r, side) for r in chosen for side in ("probe", "control")]
  oks: dict[tuple[str, str], list[bool]] = defaultdict(list)
  attrs: dict[tuple[str, str], dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
  missing: dict[tuple[str, str], int] = defaultdict(int)
  seen: dict[str, dict[str, Any]] = {}  # record id -> its example, graded side by side
  draws = [j for j in jobs if j[0]["task"] == "t2i"]
  for chunk in _batches(draws, "knowledge (text-to-image)", _even(len(draws))):
    outs = mm.generate([_side(r, side)[0]["value"] for r, side in chunk], max_new_tokens=MAX_NEW_TOKENS,
                       render_steps=render_steps, render_guidance=render_guidance)
    for (r, side), out in zip(chunk, outs):
      target, key = r["meta"]["targets"][0], (_probe_kind(r), side)
      read = oracle.read_image(np.asarray(out.images[0])) if out.images else {}
      missing[key] += not out.images
      for a in DRAWN:
        attrs[key][a].append(read.get(a) == target[a])
      oks[key].append(all(read.get(a) == target[a] for a in DRAWN))
      got = " ".join(str(read.get(a)) for a in DRAWN) if out.images else "no image"
      seen.setdefault(r["id"], {"kind": key[0]})[side] = {
        "prompt": _side(r, side)[0]["value"], "expected": " ".join(target[a] for a in DRAWN), "got": got,
        "right": oks[key][-1]}
  asks = [j for j in jobs if j[0]["task"] != "t2i"]
  for chunk in _batches(asks, "knowledge (understanding)", _even(len(asks))):
    outs = mm.generate([_side(r, side)[0]["value"] for r, side in chunk], images=[_images(r, world) for r, _ in chunk],
                       max_new_tokens=MAX_NEW_TOKENS)
    for (r, side), out in zip(chunk, outs):
      want, key = _side(r, side)[1]["value"], (_probe_kind(r), side)
      oks[key].append(_normalize(out.text) == _normalize(want))
      seen.setdefault(r["id"], {"kind": key[0]})[side] = {
        "prompt": _side(r, side)[0]["value"], "expected": want, "got": out.text, "right": oks[key][-1]}
  kinds = {kind: {side: _knowledge_rates(oks[(kind, side)], attrs.get((kind, side)),
                                         missing[(kind, side)] if kind.startswith("t2i/") else None)
                  for side in ("control", "probe")}
           for kind in KINDS if oks[(kind, "probe")]}
  kinds["all"] = {side: _knowledge_rates([ok for (_, s), v in oks.items() if s == side for ok in v])
                  for side in ("control", "probe")}
  return {"kinds": kinds, "examples": list(seen.values()), "seconds": time.perf_counter() - start}


def knowledge_section(by_model: dict[str, dict[str, Any]]) -> list[str]:
  """The report's markdown lines for ``grade_knowledge`` results of several models side by
  side, e.g. ``{"toy LLM": toy, "SmolLM2": smollm2}``: per probe kind, each model's accuracy on
  the in-template controls, on the probes, and the number of probes."""
  names = list(by_model)
  lines = ["## World knowledge (probes outside the world's words)", "",
           "Prompts that name colours and shapes only through knowledge (\"the colour of a ripe banana\", "
           "\"three sides\") or words the world never uses (\"a crimson ball\", \"What hue is the object?\"), "
           "beside the same targets in the world's own phrasing (control). Drawings: the oracle reads "
           "colour and shape; answers: exact match. Most understanding probes are yes/no questions, half of "
           "them answered \"yes\" (always \"yes\" scores 50% on qa/knowledge); see metamorph/shapes/knowledge.py.", "",
           "| prompts | " + " | ".join(f"{m}: control | {m}: probe | n" for m in names) + " |",
           "|---|" + "---|---|---|" * len(names)]
  for kind in (*KINDS, "all"):
    cells = []
    for m in names:
      g = by_model[m]["kinds"].get(kind)
      cells += ([percent(g["control"]["accuracy"]), f"**{percent(g['probe']['accuracy'])}**", str(g["probe"]["n"])]
                if g else ["n/a", "n/a", "0"])
    if any(kind in by_model[m]["kinds"] for m in names):
      lines.append(f"| {kind} | " + " | ".join(cells) + " |")
  lines += ["", "Graded in " + ", ".join(f"{by_model[m]['seconds']:.0f} s ({m})" for m in names) + "."]
  return lines


def pyplot():
  """matplotlib's pyplot on the Agg backend (files only, no display)."""
  import matplotlib  # slow import: matplotlib (about 2 s), only to draw the report's PNGs
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # slow import: as above
  return plt


def _save_gallery(items: list[tuple[str, Image.Image, str]], path: str) -> str | None:
  if not items:
    return None
  plt = pyplot()
  cols = min(8, len(items))
  rows = -(-len(items) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.6 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, (prompt, image, group) in zip(axes.flat, items):
    ax.imshow(image, interpolation="nearest")
    title = ("[held-out] " if group == "heldout" else "") + prompt
    ax.set_title("\n".join(textwrap.wrap(title, 28)), fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return os.path.basename(path)


def plot_losses(root: str, stages: Sequence[str], path: str) -> str | None:
  """One panel per stage: its logged loss against the step."""
  plt = pyplot()
  curves = {}
  for stage in stages:
    file = os.path.join(root, stage, "metrics.jsonl")
    if os.path.isfile(file):
      rows = [r for r in read_jsonl(file) if "loss" in r]
      curves[stage] = ([r["step"] for r in rows], [r["loss"] for r in rows])
  if not curves:
    return None
  fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
  for ax, (stage, (steps, losses)) in zip(axes[0], curves.items()):
    ax.plot(steps, losses)
    ax.set_title(stage)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("loss")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return os.path.basename(path)


def evaluate(model_dir: str, world_dir: str, world_info: dict, p: ml_collections.ConfigDict,
             out_dir: str, model_name: str = "toy LLM") -> dict[str, Any]:
  """Loads the MetaMorph checkpoint ``model_dir`` (with the visualizer it names) and grades it
  on the world in ``world_dir`` with the preset ``p``'s sizes (``p.eval_knowledge``, when the
  preset has it: probes per kind, 0 = all); PNGs go to ``out_dir``. The knowledge grades are
  ``{"knowledge": {model_name: grade_knowledge(...)}}``, a column of ``knowledge_section``."""
  mm = metamorph.load(model_dir)
  render = {"render_steps": p.render_steps, "render_guidance": p.render_guidance}
  validation = read_jsonl(os.path.join(world_dir, "validation.jsonl"))
  prompts = read_jsonl(os.path.join(world_dir, world_info["files"]["eval_t2i"]))
  return {
    "holdout": world_info["args"]["holdout"],
    "understanding": understanding(mm, world_dir, validation, p.eval_understanding),
    "text_to_image": text_to_image(mm, prompts, out_dir, p.eval_t2i, **render),
    "editing": editing(mm, world_dir, validation, p.eval_edit, **render),
    "knowledge": {model_name: grade_knowledge(mm, world_dir, limit=p.get("eval_knowledge", 0), **render)},
  }


def _rate_rows(rates: dict[str, dict[str, Any]]) -> list[str]:
  """Markdown table rows | group | accuracy | n | of ``_rates``' output."""
  return [f"| {k} | {percent(v['accuracy'])} | {v['n']} |" for k, v in rates.items()]


def percent(x) -> str:
  """A fraction as "12.3%" ("n/a" for None)."""
  return "n/a" if x is None else f"{100 * x:.1f}%"


def summary(results: dict[str, Any]) -> str:
  u, t = results["understanding"], results["text_to_image"]
  return (f"understanding {percent(u['accuracy'])} (n={u['n']}); text-to-image all three: "
          f"seen {percent(t['seen'].get('all_three'))} (n={t['seen']['n']}), "
          f"held-out {percent(t['heldout'].get('all_three'))} (n={t['heldout']['n']}); "
          f"editing all three {percent(results['editing'].get('all_three'))}"
          + "".join(f"; knowledge probes ({m}) {percent(k['kinds']['all']['probe']['accuracy'])}, controls "
                    f"{percent(k['kinds']['all']['control']['accuracy'])}"
                    for m, k in results.get("knowledge", {}).items()))


def write(config: ml_collections.ConfigDict, results: dict[str, Any], timings: dict[str, float],
          host: dict[str, Any], reused: Sequence[str] = (), this_run: float | None = None) -> str:
  """``report.json`` and ``report.md`` in the demo's workdir; returns the markdown's path.
  ``timings``: seconds per step and their total; ``reused``: the steps an earlier run made
  (their seconds are from then); ``this_run``: this run's seconds; ``host``: ``machine.info()``,
  what this run measured on."""
  root = config.workdir
  with open(os.path.join(root, "report.json"), "w", encoding="utf-8") as f:
    json.dump({**results, "seconds": timings, "reused": list(reused), "this_run_seconds": this_run,
               "machine": host}, f, indent=2)
  u, t, e = results["understanding"], results["text_to_image"], results["editing"]
  lines = [f"# MetaMorph on the shapes world ({results['preset']} preset)", "",
           f"Held-out (colour, shape) pairs for generation: {', '.join(results['holdout']) or 'none'}.", "",
           "## Understanding (exact match, validation images)", "",
           f"Overall: **{percent(u['accuracy'])}** of {u['n']}.", "",
           "| question type | accuracy | n |", "|---|---|---|"]
  lines += _rate_rows(u["by_type"])
  if u.get("by_scene"):
    lines += ["", "| what the question looks at | accuracy | n |", "|---|---|---|", *_rate_rows(u["by_scene"])]
  lines += ["", "## Text-to-image (oracle)", "",
            "| prompts | colour | shape | size | position | all three (c, s, p) | no image | token cosine | n |",
            "|---|---|---|---|---|---|---|---|---|"]
  for name in ("seen", "heldout"):
    g = t[name]
    if g["n"]:
      lines.append(f"| {name} | " + " | ".join(percent(g[a]) for a in ATTRIBUTES)
                   + f" | **{percent(g['all_three'])}** | {g['no_image']} | "
                   + (f"{g['token_cosine']:.3f}" if g["token_cosine"] is not None else "n/a") + f" | {g['n']} |")
  lines += ["", "## Editing (oracle)", ""]
  lines += [f"colour {percent(e.get('color'))}, shape {percent(e.get('shape'))}, size {percent(e.get('size'))}, "
            f"position {percent(e.get('position'))}, all three {percent(e.get('all_three'))} (n={e['n']})."
            if e["n"] else "no editing records evaluated."]
  if results.get("knowledge"):
    lines += ["", *knowledge_section(results["knowledge"])]
    if results.get("knowledge_note"):
      lines += ["", results["knowledge_note"]]
  if t.get("gallery"):
    lines += ["", "## Samples", "", f"![text-to-image samples]({t['gallery']})"]
  if results.get("loss_plot"):
    lines += ["", "## Loss curves", "", f"![losses]({results['loss_plot']})"]
  lines += ["", "## Time (seconds)", "", f"Measured on {machine.line(host)}.", "",
            "| step | seconds |", "|---|---|"]
  lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
  if reused:
    lines += ["", (f"Made by earlier runs, with the seconds they took then (perhaps on another machine): "
                   f"{', '.join(reused)}. This run took {this_run:.0f} s.")]
  lines += ["", "## Example answers", ""]
  lines += [f"- Q: `{x['question']}` A: `{x['answer']}` (expected `{x['expected']}`)" for x in u["examples"]]
  path = os.path.join(root, "report.md")
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")
  return path
