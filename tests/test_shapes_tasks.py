"""The shapes world's conversation records: determinism, validity, holdout, grading, CLI."""
import collections
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from metamorph.data import tfds_builder
from metamorph.data.records import parse_record
from metamorph.shapes import oracle, scene
from metamorph.shapes.__main__ import main
from metamorph.shapes.examples import check_targets, make_example
from metamorph.shapes.mix import resolve_mix
from metamorph.shapes.phrases import WHERE
from metamorph.shapes.prompts import eval_prompts
from metamorph.shapes.tasks import (EDIT_KINDS, GENERATION_TASKS, MIN_TRAVEL, MULTI_KINDS, QA_KINDS,
                                    TEXT_COMPARISON_PROB, UNDERSTANDING_TASKS, VPIT_TASKS, direction, motion)
from metamorph.shapes.world import DATASET_NAME, write_split
from metamorph.tokens import IMAGE_PLACEHOLDER

HOLDOUT = (("blue", "square"), ("red", "circle"))


@pytest.fixture(scope="module")
def examples():
  """800 (record, images) of the default mix with HOLDOUT."""
  return [make_example(1, i, holdout=HOLDOUT) for i in range(800)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A small world on disk: (out_dir, counts, records)."""
  out = str(tmp_path_factory.mktemp("world"))
  counts = write_split(out, 150, 5, holdout=["red:circle", "blue:square"], progress=False)
  with open(os.path.join(out, "train.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return out, counts, records


def _files(root: str) -> dict[str, bytes]:
  out = {}
  for d, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(d, n), "rb") as f:
        out[os.path.relpath(os.path.join(d, n), root)] = f.read()
  return out


def _generated(record: dict) -> list[int]:
  """Indices (into record['image']) of the images inside gpt turns."""
  out, k = [], 0
  for turn in record["conversations"]:
    for _ in range(turn["value"].count(IMAGE_PLACEHOLDER)):
      if turn["from"] == "gpt":
        out.append(k)
      k += 1
  return out


def test_make_example_is_deterministic():
  for i in range(40):
    (ra, ia), (rb, ib) = (make_example(3, i, holdout=HOLDOUT) for _ in range(2))
    assert ra == rb and len(ia) == len(ib)
    for a, b in zip(ia, ib):
      np.testing.assert_array_equal(a, b)
  assert [make_example(3, i)[0]["conversations"] for i in range(20)] != \
    [make_example(4, i)[0]["conversations"] for i in range(20)]
  # validation draws from its own stream
  train = [make_example(0, i)[0]["conversations"] for i in range(20)]
  val = [make_example(0, i, split="validation")[0]["conversations"] for i in range(20)]
  assert train != val


def test_write_split_is_byte_identical(tmp_path, world):
  out, counts, _ = world
  again = write_split(str(tmp_path), 150, 5, holdout=HOLDOUT, progress=False)
  assert again == counts and sum(counts.values()) == 150
  assert _files(str(tmp_path)) == _files(out)


def test_every_task_kind_and_validity(examples):
  records = [r for r, _ in examples]
  assert set(r["task"] for r in records) == set(VPIT_TASKS)  # the default mix has no captions
  for record, images in examples:
    parse_record(record)  # the project's reader accepts it
    check_targets(record)
    assert len(images) == len(record.get("image", []))
    assert all(img.shape == (32, 32, 3) and img.dtype == np.uint8 for img in images)
    roles = [t["from"] for t in record["conversations"]]
    assert roles == ["human", "gpt"] * (len(roles) // 2)
    assert ("image" in record) == any(IMAGE_PLACEHOLDER in t["value"] for t in record["conversations"])
    assert len(record["meta"].get("targets", [])) == len(_generated(record))
    assert (record["task"] in GENERATION_TASKS) == bool(_generated(record))
  ids = [r["id"] for r in records]
  names = [n for r in records for n in r.get("image", [])]
  assert len(set(ids)) == len(ids) and len(set(names)) == len(names)


def test_qa_subkinds_and_paraphrases(examples):
  kinds = collections.Counter(k for r, _ in examples if r["task"] == "qa" for k in r["meta"]["questions"])
  assert set(kinds) == set(QA_KINDS)
  counts = [r["meta"]["answers"] for r, _ in examples if "count" in r["meta"].get("questions", [])]
  assert {"one", "two"} <= {a for ans in counts for a in ans}
  t2i = {r["conversations"][0]["value"].split(" a ")[0] for r, _ in examples if r["task"] == "t2i"}
  assert len(t2i) >= 4
  edits = collections.Counter(r["meta"]["edits"][0] for r, _ in examples if r["task"] == "edit")
  assert set(edits) == set(EDIT_KINDS)


def test_task_selection():
  for tasks, allowed in [("generation", GENERATION_TASKS), (["qa"], ("qa",)),
                         ({"t2i": 1, "text": 1}, ("t2i", "text")), ("understanding,t2i:0.5", None)]:
    got = {make_example(0, i, tasks=tasks)[0]["task"] for i in range(120)}
    if allowed is not None:
      assert got == set(allowed)
    else:
      assert got == set(UNDERSTANDING_TASKS) | {"t2i"}
  mix = resolve_mix("qa:3,t2i:1")
  assert mix == {"qa": 0.75, "t2i": 0.25}
  assert "caption" not in resolve_mix("all")
  assert resolve_mix("caption") == {"caption": 1.0}
  assert abs(sum(resolve_mix(None).values()) - 1) < 1e-12
  for bad in ["qa,pizza", "qa:x", "qa:-1", {"qa": 0}]:
    with pytest.raises(ValueError):
      resolve_mix(bad)


def test_holdout_never_generated_but_seen_in_prompts(examples):
  seen_in_prompts = collections.Counter()
  for record, images in examples:
    for target in record["meta"].get("targets", []):
      assert (target["color"], target["shape"]) not in HOLDOUT, record
    generated = set(_generated(record))
    for k in generated:  # the pixels agree
      read = oracle.read_image(images[k])
      assert (read["color"], read["shape"]) not in HOLDOUT
    if record["task"] == "qa":  # the one prompt image
      for o in oracle.read_objects(images[0]):
        seen_in_prompts[(o["color"], o["shape"])] += 1
  assert all(seen_in_prompts[p] > 0 for p in HOLDOUT)
  # text-to-image prompts never ask for a held-out pair
  for record, _ in examples:
    if record["task"] == "t2i":
      prompt = record["conversations"][0]["value"]
      assert "red circle" not in prompt and "blue square" not in prompt


def test_meta_targets_match_the_pngs(world):
  out, _, records = world
  checked = collections.Counter()
  for record in records:
    parse_record(record)
    check_targets(record)
    for k, target in zip(_generated(record), record["meta"].get("targets", [])):
      image = Image.open(os.path.join(out, "images", record["image"][k]))
      assert oracle.read_image(image) == target, record
      checked[record["task"]] += 1
    # single-object understanding answers agree with the oracle too
    qs = record["meta"].get("questions", [])
    if record["task"] == "qa" and "count" not in qs and "caption" not in qs:
      objs = oracle.read_objects(Image.open(os.path.join(out, "images", record["image"][0])))
      if len(objs) == 1:
        for q, a in zip(qs, record["meta"]["answers"]):
          assert objs[0][q] == a, record
  assert set(checked) == set(GENERATION_TASKS)


def _worked_answer(kind: str, question: str, a: dict, b: dict) -> tuple[str, str]:
  """(answer, verdict) a comparison of ``kind`` must get, from the two objects' attributes."""
  attr = {"which_shape": "shape", "which_color": "color", "which_larger": "size"}.get(kind, kind[5:])
  if kind.startswith("same_"):
    verdict = "yes" if a[attr] == b[attr] else "no"
  else:
    first = a["size"] == "large" if kind == "which_larger" else bool(re.search(rf"\b{a[attr]}\b", question))
    named = a if first else b
    target = {"shape": f"the {named['shape']}", "color": f"the {named['color']} one"}.get(attr, "the larger one")
    verdict = f"{target} is the {'first' if first else 'second'}"
  def phrase(obj: dict) -> str:
    return {"shape": f"a {obj['shape']}", "position": WHERE[obj["position"]]}.get(attr, obj[attr])
  return f"The first is {phrase(a)}, the second is {phrase(b)}: {verdict}.", verdict


def test_comparisons_are_worked_and_right():
  """A two-image answer names each image's attribute as the oracle reads it, then the
  right verdict; a comparison told in words (text task) is answered the same way."""
  kinds = collections.Counter()
  for i in range(80):
    record, images = make_example(2, i, tasks="multi_image")
    kind, question = record["meta"]["questions"][0], record["conversations"][0]["value"]
    a, b = (oracle.read_objects(Image.fromarray(img))[0] for img in images)
    answer, verdict = _worked_answer(kind, question, a, b)
    assert record["conversations"][1]["value"] == answer, record
    assert record["meta"]["answers"] == [verdict]
    kinds[kind] += 1
  assert set(kinds) == set(MULTI_KINDS)
  told = 0
  for i in range(80):
    record, _ = make_example(2, i, tasks="text")
    kind = record["meta"]["questions"][0]
    if kind not in MULTI_KINDS:
      continue
    question = record["conversations"][0]["value"]
    a, b = [dict(zip(("size", "color", "shape", "position"), m.groups())) for m in
            re.finditer(r"a (small|large) (\w+) (\w+) (?:on the |at the |in the )(\w+)", question)]
    answer, _ = _worked_answer(kind, question.split(". ", 1)[1], a, b)
    assert record["conversations"][1]["value"] == answer, record
    told += 1
  assert abs(told - 80 * TEXT_COMPARISON_PROB) <= 12  # binomial: a standard deviation <= 4.5


def test_motion_is_a_straight_line():
  rng = np.random.default_rng(0)
  for _ in range(50):
    s = scene.sample_shape(rng)
    frames = motion(rng, s, 4)
    c = np.asarray([f.center for f in frames])  # [4, 2]
    steps = np.diff(c, axis=0)
    np.testing.assert_allclose(steps, steps[:1].repeat(3, 0), atol=1e-9)
    assert np.linalg.norm(c[-1] - c[0]) >= MIN_TRAVEL
    h = scene.HALF_EXTENT[s.size]
    assert (c >= h - 1e-9).all() and (c <= 1 - h + 1e-9).all()
    assert frames[-1].position == scene.nearest_position(frames[-1].center)
  right = [scene.move(scene.Shape("red", "circle", "small", "left"), (x, 0.5)) for x in (0.2, 0.5)]
  up_left = [scene.move(right[0], p) for p in ((0.7, 0.7), (0.3, 0.3))]
  assert direction(right) == "to the right"
  assert direction(up_left) == "up and to the left"


def test_eval_prompts():
  prompts = eval_prompts(["red:circle", "blue:square"])
  per_pair = len(scene.SIZES) * len(scene.POSITIONS)
  assert len(prompts) == len(scene.COLORS) * len(scene.SHAPES) * per_pair
  held = [p for p in prompts if p["meta"]["heldout"]]
  assert len(held) == 2 * per_pair
  assert {(p["meta"]["targets"][0]["color"], p["meta"]["targets"][0]["shape"]) for p in held} == set(HOLDOUT)
  for p in prompts:
    [turn] = p["conversations"]  # prompt-only: one human turn, no image, one target to draw
    assert turn["from"] == "human" and turn["value"].strip() and IMAGE_PLACEHOLDER not in turn["value"]
    assert "image" not in p and len(p["meta"]["targets"]) == 1
    t = p["meta"]["targets"][0]
    assert f"{t['size']} {t['color']} {t['shape']} {WHERE[t['position']]}" in \
      p["conversations"][0]["value"]
  assert len(eval_prompts(HOLDOUT, seen=False)) == len(held)
  assert eval_prompts(HOLDOUT) == prompts  # deterministic


def test_argument_errors():
  with pytest.raises(ValueError, match="red, green"):
    scene.parse_pair("pink:circle")
  with pytest.raises(ValueError, match="circle, square"):
    scene.parse_pair("red:hexagon")
  with pytest.raises(ValueError, match="COLOR:SHAPE"):
    scene.parse_pair("red")
  assert scene.normalize_holdout(["Red:Circle", ("red", "circle")]) == (("red", "circle"),)
  with pytest.raises(ValueError):
    scene.normalize_holdout([(c, s) for c in scene.COLORS for s in scene.SHAPES])
  with pytest.raises(ValueError):
    write_split("/nonexistent", 1, 0, split="../x", progress=False)


def test_cli(tmp_path, capsys):
  out = str(tmp_path / "w")
  assert main(["--out", out, "--n", "30", "--val-n", "10", "--captions-n", "12", "--language-n", "9",
               "--seed", "2",
               "--holdout", "red:circle", "--tasks", "qa,t2i,edit", "--quiet"]) == 0
  with open(os.path.join(out, "world.json")) as f:
    world = json.load(f)
  assert world["holdout"] == [["red", "circle"]]
  assert sum(world["counts"]["train"].values()) == 30 and sum(world["counts"]["validation"].values()) == 10
  assert set(world["counts"]["train"]) <= {"qa", "t2i", "edit"}
  for name in ("train.jsonl", "validation.jsonl", "eval_t2i.jsonl", "tokenizer/tokenizer.json"):
    assert os.path.exists(os.path.join(out, name)), name
  source = tfds_builder.open_source(os.path.join(out, "tfds"), DATASET_NAME, "validation")
  assert len(source) == 10 and world["tfds"]["drop_counts"]["train"]["kept"] == 30
  # the captions split: image-caption pairs only
  assert world["counts"]["captions"] == {"caption": 12}
  assert world["tfds"]["drop_counts"]["captions"]["kept"] == 12
  with open(os.path.join(out, "captions.jsonl")) as f:
    captions = [json.loads(line) for line in f]
  for r in captions:
    [human, gpt] = r["conversations"]
    assert r["meta"]["questions"] == ["caption"] and r["meta"]["answers"] == [gpt["value"]]
    assert human["value"].startswith(IMAGE_PLACEHOLDER + "\n") and len(r["image"]) == 1
  # the language split: text-only records, no images
  assert world["counts"]["language"] == {"text": 9}
  assert world["tfds"]["drop_counts"]["language"]["kept"] == 9
  with open(os.path.join(out, "language.jsonl")) as f:
    assert not any("image" in json.loads(line) for line in f)
  with open(os.path.join(out, "validation.jsonl")) as f:
    for line in f:
      for image in json.loads(line).get("image", []):
        assert image.startswith("validation/") and os.path.exists(os.path.join(out, "images", image))
  for argv, message in [(["--out", out, "--n", "5"], "--overwrite"),
                        (["--out", str(tmp_path / "x"), "--holdout", "pink:circle"], "red, green, blue"),
                        (["--out", str(tmp_path / "x"), "--tasks", "qa,pizza"], "unknown task"),
                        (["--out", str(tmp_path / "x"), "--image-size", "8"], "--image-size"),
                        (["--out", str(tmp_path / "x"), "--captions-n", "-1"], "--captions-n"),
                        (["--out", str(tmp_path / "x"), "--language-n", "-1"], "--language-n")]:
    with pytest.raises(SystemExit) as e:
      main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    main(["--help"])
  assert e.value.code == 0 and "--holdout" in capsys.readouterr().out
