"""The world-knowledge probes (metamorph.shapes.knowledge), their files, and their grading
(train.demo.report.grade_knowledge) against stub models whose outputs are known."""
import collections
import dataclasses
import hashlib
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from metamorph.data.records import parse_record
from metamorph.shapes import knowledge, oracle, scene
from metamorph.shapes.phrases import TEMPLATES, describe, world_texts
from metamorph.shapes.tokenizer import words_of
from metamorph.shapes.world import KNOWLEDGE_FILE, WORLD_FILE, write_eval_knowledge, write_world
from metamorph.tokens import IMAGE_PLACEHOLDER
from tests.test_shapes_tasks import _files
from train.demo import report

RECORDS, IMAGES = knowledge.knowledge_records()
WORLD_WORDS = {w.lower() for w in words_of(world_texts())}
ATTRIBUTE_WORDS = tuple(v for a in scene.ATTRIBUTES for v in scene.VALUES[a])


def _probe_text(record: dict) -> str:
  return record["conversations"][0]["value"].replace(IMAGE_PLACEHOLDER, "")


def _demo_holdout() -> list[str]:
  spec = importlib.util.spec_from_file_location("demo_config", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().holdout.split(",")


def test_the_probe_set_and_its_ground_truth():
  ids = [r["id"] for r in RECORDS]
  assert len(set(ids)) == len(ids) == len(knowledge.DRAW) + len(knowledge.ASK) == 48
  kinds = collections.Counter(report._probe_kind(r) for r in RECORDS)
  assert kinds == {kind: 12 for kind in knowledge.KINDS}
  for r in RECORDS:
    meta = r["meta"]
    if r["task"] == "t2i":  # prompt-only, as eval_t2i.jsonl's: one human turn
      assert [t["from"] for t in r["conversations"]] == ["human"] and "image" not in r
      [target] = meta["targets"]
      assert set(target) == set(knowledge.DRAWN)
      assert target["color"] in scene.COLORS and target["shape"] in scene.SHAPES
      [control] = meta["control_targets"]
      assert {a: control[a] for a in knowledge.DRAWN} == target
      scene.Shape(**control)  # a valid object of the world
    else:
      parse_record(r)  # a conversation the project's reader accepts
      [asks], [answer] = meta["questions"], meta["answers"]
      assert asks in knowledge.DRAWN and r["conversations"][1]["value"] == answer
      truth = meta["scene"][asks]
      if meta["named"] is None:  # an open question: the attribute itself
        assert answer == truth
      else:
        assert meta["named"] in scene.VALUES[asks] and answer == ("yes" if truth == meta["named"] else "no")
      assert meta["control"][1]["value"] == truth
  # every yes/no question is asked once about an object that has the named value, once about one that has not
  yes_no = collections.defaultdict(set)
  for p in knowledge.ASK:
    if p.named is not None:
      yes_no[p.question].add(p.answer)
  assert yes_no and all(answers == {"yes", "no"} for answers in yes_no.values())
  # every colour and shape is drawn, and none of the demo's held-out pairs
  drawn = {(p.color, p.shape) for p in knowledge.DRAW}
  assert {c for c, _ in drawn} == set(scene.COLORS) and {s for _, s in drawn} == set(scene.SHAPES)
  assert not drawn & set(scene.normalize_holdout(_demo_holdout()))
  held, _ = knowledge.knowledge_records(["green:diamond"])
  assert [r["id"] for r in held if r["meta"].get("heldout")] == ["knowledge-t2i-07"]


def test_no_probe_names_an_attribute_with_the_worlds_words():
  """No word of a probe is (or starts with: "blueberry", "diamonds") a colour, shape, size or
  position of the world, and each holds a word the world never uses."""
  for r in RECORDS:
    text = _probe_text(r)
    words = re.findall(r"[a-z]+", text.lower())
    assert not [w for w in words if w.startswith(ATTRIBUTE_WORDS)], text
    assert [w for w in words if w not in WORLD_WORDS], f"{text}: every word is the world's"
  probe = knowledge.Draw("knowledge", "Draw a blueberry.", "blue", "circle")
  assert [w for w in re.findall(r"[a-z]+", probe.prompt.lower()) if w.startswith(ATTRIBUTE_WORDS)]


def test_controls_are_the_worlds_own_phrasing():
  for r in RECORDS:
    control = r["meta"]["control"][0]["value"]
    if r["task"] == "t2i":
      [target] = r["meta"]["control_targets"]
      desc = describe(scene.Shape(**target))
      assert control in {t.format(desc=desc) for t in TEMPLATES["t2i"]}
    else:
      asks = r["meta"]["questions"][0]
      assert control in {f"{IMAGE_PLACEHOLDER}\n" + t.format(ref="object") for t in TEMPLATES[f"qa_{asks}"]}
    words = {w.lower() for w in re.findall(r"[A-Za-z]+", control)}
    assert words <= WORLD_WORDS, control


def test_the_images_show_the_ground_truth():
  assert len(IMAGES) == len(knowledge.ASK)
  for r in RECORDS:
    if r["task"] == "qa":
      [name] = r["image"]
      assert name.startswith(knowledge.KNOWLEDGE_SPLIT + "/")
      image = IMAGES[name]
      assert image.shape == (scene.DEFAULT_SIZE, scene.DEFAULT_SIZE, 3) and image.dtype == np.uint8
      assert oracle.read_image(image) == r["meta"]["scene"]


def test_the_world_writes_the_probes_byte_identically(tmp_path):
  a, b = str(tmp_path / "a"), str(tmp_path / "b")
  assert write_eval_knowledge(a, ["red:triangle"]) == write_eval_knowledge(b, ["red:triangle"]) == len(RECORDS)
  files = _files(a)
  assert files == _files(b)
  assert sorted(files) == [KNOWLEDGE_FILE] + sorted(f"images/{n}" for n in IMAGES)
  assert [json.loads(line) for line in files[KNOWLEDGE_FILE].decode().splitlines()] == RECORDS
  world = write_world(str(tmp_path / "w"), 3, val_n=0, progress=False)
  assert world["files"]["eval_knowledge"] == KNOWLEDGE_FILE and world["knowledge_probes"] == len(RECORDS)
  assert _files(str(tmp_path / "w"))[KNOWLEDGE_FILE] == files[KNOWLEDGE_FILE]


# --- grading against stubs --------------------------------------------------------------------------


@dataclasses.dataclass
class _Out:
  text: str = ""
  images: list = dataclasses.field(default_factory=list)


def _digest(image) -> str:
  return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()


class _Stub:
  """Draws and answers from a table of the world's probes: ``right`` draws the target (at the
  anchor of a large object) and gives the ground truth; otherwise another colour and shape, and
  a wrong answer."""

  def __init__(self, world: str, right: bool):
    self.right, self.draw, self.answer = right, {}, {}
    self.calls = collections.Counter()
    for r in report.read_jsonl(os.path.join(world, KNOWLEDGE_FILE)):
      for side in ("probe", "control"):
        turns = report._side(r, side)
        if r["task"] == "t2i":
          self.draw[turns[0]["value"]] = r["meta"]["targets"][0]
        else:
          [image] = report._images(r, world)
          self.answer[(turns[0]["value"], _digest(image))] = turns[1]["value"]

  def generate(self, prompts, images=None, *, max_new_tokens, render_steps=None, render_guidance=None):
    outs = []
    for i, prompt in enumerate(prompts):
      if images is None:
        self.calls["draw"] += 1
        t = self.draw[prompt]
        c, s = (t["color"], t["shape"]) if self.right else (
          scene.COLORS[(scene.COLORS.index(t["color"]) + 1) % len(scene.COLORS)],
          scene.SHAPES[(scene.SHAPES.index(t["shape"]) + 1) % len(scene.SHAPES)])
        outs.append(_Out(images=[scene.render(scene.Shape(c, s, "large", "center"))]))
      else:
        self.calls["answer"] += 1
        want = self.answer[(prompt, _digest(images[i][0]))]
        outs.append(_Out(text=f" {want.capitalize()}." if self.right else f"not {want}"))
    return outs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("kworld"))
  write_eval_knowledge(out)
  return out


@pytest.mark.parametrize("right", [True, False])
def test_grading_a_stub_with_known_outputs(world, right):
  stub = _Stub(world, right)
  g = report.grade_knowledge(stub, world, render_steps=2, render_guidance=1.0)
  assert stub.calls == {"draw": 48, "answer": 48}  # each probe and its control once
  assert set(g["kinds"]) == {*knowledge.KINDS, "all"}
  want = 1.0 if right else 0.0
  for kind, sides in g["kinds"].items():
    for side in ("probe", "control"):
      assert sides[side]["accuracy"] == want, (kind, side)
      assert sides[side]["n"] == (48 if kind == "all" else 12)
      if kind.startswith("t2i/"):
        assert sides[side]["color"] == sides[side]["shape"] == want and sides[side]["no_image"] == 0
  assert len(g["examples"]) == 48 and all(x["probe"]["right"] is right for x in g["examples"])
  banana = g["examples"][0]
  assert banana["probe"]["expected"] == "yellow triangle" and banana["kind"] == "t2i/knowledge"
  limited = report.grade_knowledge(_Stub(world, right), world, render_steps=2, render_guidance=1.0, limit=2)
  assert {k: v["probe"]["n"] for k, v in limited["kinds"].items()} == {**{k: 2 for k in knowledge.KINDS}, "all": 8}


def test_a_world_without_the_probes_gets_them_from_its_world_json(tmp_path, world):
  with pytest.raises(ValueError, match="not a shapes world"):
    report._knowledge_records(str(tmp_path))
  (tmp_path / WORLD_FILE).write_text(json.dumps({"args": {"holdout": [], "image_size": scene.DEFAULT_SIZE}}))
  assert report._knowledge_records(str(tmp_path)) == RECORDS
  assert _files(str(tmp_path)) == {**_files(world), WORLD_FILE: (tmp_path / WORLD_FILE).read_bytes()}


def test_the_report_puts_models_side_by_side(world, tmp_path):
  toy = report.grade_knowledge(_Stub(world, True), world, render_steps=2, render_guidance=1.0)
  other = report.grade_knowledge(_Stub(world, False), world, render_steps=2, render_guidance=1.0, limit=3)
  lines = report.knowledge_section({"toy LLM": toy, "SmolLM2": other})
  assert "| prompts | toy LLM: control | toy LLM: probe | n | SmolLM2: control | SmolLM2: probe | n |" in lines
  assert "| t2i/knowledge | 100.0% | **100.0%** | 12 | 0.0% | **0.0%** | 3 |" in lines
  assert "| all | 100.0% | **100.0%** | 48 | 0.0% | **0.0%** | 12 |" in lines
  results = {"preset": "quick", "holdout": [], "understanding": {"accuracy": 1.0, "n": 1, "by_type": {},
             "examples": []}, "text_to_image": {"seen": {"n": 0}, "heldout": {"n": 0}}, "editing": {"n": 0},
             "knowledge": {"toy LLM": toy}}

  class _Config:
    workdir = str(tmp_path)
  report.write(_Config, results, {"total": 1.0}, {"cpu": "x", "vector_isa": "y", "cores": 1, "jax": "0",
                                                   "backend": "cpu", "devices": 1})
  text = (tmp_path / "report.md").read_text()
  assert "## World knowledge" in text and "| qa/paraphrase | 100.0% | **100.0%** | 12 |" in text
  assert "knowledge probes (toy LLM) 100.0%, controls 100.0%" in report.summary(results)
