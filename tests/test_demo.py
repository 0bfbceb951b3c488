"""The demo's wiring (train.demo.workflow) and grading (train.demo.report), without training."""
import json
import os

import pytest

from metamorph.shapes.examples import make_example
from train.demo import report, workflow


def _demo_config(workdir: str, preset: str = "quick"):
  import importlib.util
  spec = importlib.util.spec_from_file_location("demo_config", "configs/demo.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config()
  c.workdir, c.preset = workdir, preset
  return c


def test_stage_configs_chain_the_stages(tmp_path):
  c = _demo_config(str(tmp_path / "demo"))
  root = c.workdir
  siglip = workflow.stage_config(c, "siglip")
  assert siglip.stage == "siglip" and siglip.model.siglip_init == ""
  assert siglip.data.data_dir == os.path.join(root, "world", "tfds")
  assert siglip.train.steps == c.presets.quick.siglip_steps
  vis = workflow.stage_config(c, "visualizer")
  assert vis.model.siglip_init == os.path.join(root, "siglip") and vis.train.sample_every == vis.train.steps
  c.presets.quick.language_steps = 5
  language = workflow.stage_config(c, "language", root="/mix", shared=root)
  assert language.data.train_split == "language" and language.model.siglip_init == os.path.join(root, "siglip")
  assert workflow.stage_config(c, "connector", root="/mix", shared=root).init_from == os.path.join(root, "language")
  c.presets.quick.language_steps = 0  # no language stage: skipped, and the connector starts from scratch
  assert workflow.stage_config(c, "connector").init_from == ""
  assert workflow.train_stage(c, "language") == {"steps": 0, "seconds": 0.0}  # there is no world to train on
  assert not os.path.exists(os.path.join(root, "language"))
  vpit = workflow.stage_config(c, "vpit", root="/mix", shared=root)
  assert vpit.init_from == "/mix/connector"
  assert vpit.data.tokenizer == "/mix/world/tokenizer"
  assert vpit.model.siglip_init == os.path.join(root, "siglip")
  assert vpit.model.visualizer_from == os.path.join(root, "visualizer")
  assert vpit.train.checkpoint_every <= vpit.train.steps


def test_unknown_preset_is_a_clear_error(tmp_path):
  c = _demo_config(str(tmp_path), preset="quick")
  c.preset = "medium"
  with pytest.raises(ValueError, match="config.preset is 'medium'; use one of \\['fast', 'full', 'quick', 'smollm2'\\]"):
    workflow.preset(c)


def test_every_preset_sets_the_same_fields(tmp_path):
  c = _demo_config(str(tmp_path))
  for name in c.presets:
    assert sorted(c.presets[name]) == sorted(c.presets.full), name
    c.preset = name
    assert workflow.stage_config(c, "vpit").train.steps == c.presets[name].vpit_steps


def test_finished_stage_is_skipped(tmp_path):
  c = _demo_config(str(tmp_path))
  os.makedirs(tmp_path / "siglip")
  done = {"steps": c.presets.quick.siglip_steps, "seconds": 1.0, "last": {}}
  (tmp_path / "siglip" / workflow.DONE_FILE).write_text(json.dumps(done))
  assert workflow.train_stage(c, "siglip") == done  # would fail to train: there is no world
  done["config"] = json.loads(workflow.stage_config(c, "siglip").to_json())
  (tmp_path / "siglip" / workflow.DONE_FILE).write_text(json.dumps(done))
  assert workflow.train_stage(c, "siglip") == done
  c.seed = 7  # a finished stage with another config is an error, not a silent skip or a retrain
  with pytest.raises(ValueError, match=r"finished with another config \(changed: seed\); delete"):
    workflow.train_stage(c, "siglip")


def test_stage_trained_on_another_world_is_an_error(tmp_path):
  """A world rebuilt with other training splits stops its finished stages; another validation
  split does not."""
  c = _demo_config(str(tmp_path))
  c.presets.quick.update(world=6, validation=4, captions=4, language=4)
  workflow.build_world(c)
  done = {"steps": c.presets.quick.siglip_steps, "seconds": 1.0, "last": {},
          "config": json.loads(workflow.stage_config(c, "siglip").to_json()),
          "world": workflow._world_settings(str(tmp_path))}
  os.makedirs(tmp_path / "siglip")
  (tmp_path / "siglip" / workflow.DONE_FILE).write_text(json.dumps(done))
  c.presets.quick.validation = 5
  workflow.build_world(c)
  assert workflow.train_stage(c, "siglip") == done
  c.presets.quick.world = 7
  workflow.build_world(c)
  with pytest.raises(ValueError, match=r"finished on a world built with other settings \(changed: n\); delete"):
    workflow.train_stage(c, "siglip")


def test_world_and_stage_of_other_code_are_reused_with_a_warning(tmp_path, capsys):
  c = _demo_config(str(tmp_path))
  c.presets.quick.update(world=6, validation=4, captions=4, language=4)
  workflow.build_world(c)
  world_done = json.loads((tmp_path / "world" / workflow.DONE_FILE).read_text())
  assert world_done["code"] == workflow.code_version() and world_done["seconds"] > 0
  done = {"steps": c.presets.quick.siglip_steps, "seconds": 1.0, "code": workflow.code_version(), "last": {},
          "config": json.loads(workflow.stage_config(c, "siglip").to_json())}
  os.makedirs(tmp_path / "siglip")
  (tmp_path / "siglip" / workflow.DONE_FILE).write_text(json.dumps(done))
  capsys.readouterr()
  workflow.build_world(c)
  assert workflow.train_stage(c, "siglip") == done
  assert "other code" not in capsys.readouterr().out
  (tmp_path / "world" / workflow.DONE_FILE).write_text(json.dumps({"code": "0123"}))
  (tmp_path / "siglip" / workflow.DONE_FILE).write_text(json.dumps({**done, "code": "4567"}))
  assert workflow.build_world(c)["args"]["n"] == 6
  assert workflow.train_stage(c, "siglip")["code"] == "4567"
  out = capsys.readouterr().out
  assert f"world: warning: {tmp_path}/world was made by other code" in out
  assert f"code version 0123, now {workflow.code_version()}); reused. Delete {tmp_path} (the world" in out
  assert f"siglip: warning: {tmp_path}/siglip was made by other code" in out
  assert f"Delete {tmp_path}/siglip and the later stages to redo it" in out


def test_timed_counts_a_reused_step_by_its_record(tmp_path):
  """A step an earlier run made counts the seconds it took then, and is named as reused."""
  os.makedirs(tmp_path / "siglip")
  record = tmp_path / "siglip" / workflow.DONE_FILE
  record.write_text(json.dumps({"seconds": 291.0}))
  timings, reused = {}, []
  assert workflow.timed("siglip", lambda: "kept", str(tmp_path), timings, reused) == "kept"
  assert timings == {"siglip": 291.0} and reused == ["siglip"]
  workflow.timed("siglip", lambda: record.write_text(json.dumps({"seconds": 5.0})), str(tmp_path), timings, reused)
  assert timings == {"siglip": 5.0} and reused == ["siglip"]  # made now: not reused again
  workflow.timed("language", lambda: None, str(tmp_path), timings, reused)  # nothing recorded: this call's time
  assert timings["language"] < 1.0 and reused == ["siglip"]


def test_code_version_hashes_the_python_sources(tmp_path):
  (tmp_path / "pkg").mkdir()
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  roots = (str(tmp_path / "pkg"),)
  before = workflow.code_version.__wrapped__(roots)
  (tmp_path / "pkg" / "notes.md").write_text("not code")
  assert workflow.code_version.__wrapped__(roots) == before
  (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
  assert workflow.code_version.__wrapped__(roots) != before
  (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
  assert workflow.code_version.__wrapped__(roots) == before
  (tmp_path / "pkg" / "a.py").rename(tmp_path / "pkg" / "b.py")
  assert workflow.code_version.__wrapped__(roots) != before


def test_grades_are_exact():
  targets = [{"color": "red", "shape": "circle", "size": "small", "position": "left"},
             {"color": "blue", "shape": "square", "size": "large", "position": "top"}]
  reads = [{"color": "red", "shape": "circle", "size": "large", "position": "left"}, {}]
  g = report._grade(reads, targets)
  assert g == {"color": 0.5, "shape": 0.5, "size": 0.0, "position": 0.5, "all_three": 0.5, "n": 2}
  assert report._normalize(" In the Center. ") == "in the center"


def test_scene_of_a_question():
  scenes = set()
  for index in range(60):
    record, _ = make_example(0, index, tasks="qa,multi_image,video_qa")
    got = report.looks_at(record)
    if record["task"] == "qa":
      assert got == ("one object" if record["meta"]["objects"] == [1] else "2 objects")
    elif record["task"] == "multi_image":
      assert got == "2 images" and record["meta"]["objects"] == [1, 1]
    else:
      assert got == f"{len(record['image'])} frames"
    scenes.add(got)
  assert {"one object", "2 objects", "2 images"} <= scenes
  assert report.looks_at({"task": "qa", "image": ["a.png"]}) == ""  # a world without meta.objects


def test_report_files(tmp_path):
  c = _demo_config(str(tmp_path))
  grades = {"color": 1.0, "shape": 0.5, "size": 1.0, "position": 1.0, "all_three": 0.5, "n": 2,
            "no_image": 0, "token_cosine": 0.9}
  results = {"preset": "quick", "holdout": ["red:triangle"],
             "understanding": {"accuracy": 0.75, "n": 4, "by_type": {"qa/color": {"accuracy": 0.75, "n": 4}},
                               "by_scene": {"2 objects": {"accuracy": 0.5, "n": 2}},
                               "examples": [{"question": "q", "answer": "a", "expected": "a"}]},
             "text_to_image": {"seen": grades, "heldout": {**grades, "all_three": 0.0}, "gallery": None},
             "editing": {"n": 0}, "loss_plot": None}
  host = {"cpu": "AMD EPYC", "vector_isa": "AVX2", "cores": 2, "jax": "0.10.2", "backend": "cpu", "devices": 1}
  path = report.write(c, results, {"total": 12.0}, host)
  text = (tmp_path / "report.md").read_text()
  assert path == str(tmp_path / "report.md")
  assert "earlier runs" not in text
  assert "| seen | 100.0% | 50.0% | 100.0% | 100.0% | **50.0%** | 0 | 0.900 | 2 |" in text
  assert "| qa/color | 75.0% | 4 |" in text
  assert "| 2 objects | 50.0% | 2 |" in text
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["seconds"] == {"total": 12.0}
  assert saved["machine"] == host
  assert "Measured on AMD EPYC (2 logical cores, AVX2), JAX 0.10.2 on cpu (1 device)." in text
  assert "understanding 75.0% (n=4)" in report.summary(results)
  report.write(c, results, {"world": 3.0, "siglip": 20.0, "total": 23.0}, host, reused=["world"], this_run=21.0)
  assert ("Made by earlier runs, with the seconds they took then (perhaps on another machine): world. "
          "This run took 21 s.") in (tmp_path / "report.md").read_text()
  saved = json.loads((tmp_path / "report.json").read_text())
  assert saved["reused"] == ["world"] and saved["this_run_seconds"] == 21.0


class _EchoModel:
  """Answers "red" to every question (a stand-in for ``metamorph.load``'s model)."""

  def generate(self, prompts, images, max_new_tokens):
    return [type("Out", (), {"text": "red"})() for _ in prompts]


@pytest.mark.parametrize("limit, graded, right", [(0, 5, 3), (2, 2, 2), (4, 4, 3)])
def test_understanding_grades_the_first_limit_questions_0_all(limit, graded, right, monkeypatch):
  monkeypatch.setattr(report, "_images", lambda record, world: [])
  def question(answer, task="qa"):
    return {"id": answer, "task": task, "image": ["a.png"], "meta": {"questions": ["color"]},
            "conversations": [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": answer}]}
  records = [question("red"), question("red"), question("blue"), question("red"), question("green"),
             {**question("red"), "image": []}]  # no image: not an understanding question
  u = report.understanding(_EchoModel(), "world", records, limit)
  assert (u["n"], round(u["accuracy"] * u["n"])) == (graded, right)


def test_a_field_an_older_record_lacks_counts_as_its_default():
  old = {"stage": "vpit", "optim": {"lr": 0.001}}
  new = {"stage": "vpit", "optim": {"lr": 0.001}, "tuning": {"mode": "full"}}
  assert workflow._changed(old, new, {"tuning": {"mode": "full"}}) == []
  assert workflow._changed(old, {**new, "tuning": {"mode": "lora"}}, {"tuning": {"mode": "full"}}) == ["tuning.mode"]
  assert workflow._changed(old, new) == ["tuning.mode"]  # no defaults: a new field is a change
