"""A short SmolLM2-135M-Instruct connector + VPiT run (configs/smollm2_135m.py, the demo's
tuning mode, the toy SigLIP tower of conftest's ``siglip_run``) that learns and exports; and the
demo's ``smollm2`` preset wiring (train.demo.workflow), without training.

The train split holds two records (one t2i, one qa) and each packed row one record, so every
batch is the same two records: the loss of the second step is below the first's because of
the first update, not by luck of the batches.
"""
import json
import os

import numpy as np
import pytest

import metamorph
from configs.smollm2_135m import get_config
from metamorph.api.prompts import text_prompt, visual_prompts
from metamorph.convert import smollm2_gguf_path
from metamorph.convert.gguf import load_gguf_tokenizer
from metamorph.data.images import load_image
from metamorph.files import read_safetensors
from metamorph.params import module_params
from metamorph.shapes.mix import resolve_mix
from metamorph.shapes.world import write_world
from tests.test_demo import _demo_config as demo_config
from train import trainer
from train.demo import workflow

STEPS = 2
PARIS = [("What is the capital of France?", "Paris")]


@pytest.fixture(scope="module")
def two_records(tmp_path_factory):
  """A 16 px world whose train split is one t2i and one qa record (seed 1)."""
  out = str(tmp_path_factory.mktemp("two_records"))
  world = write_world(out, n=2, seed=1, holdout=["red:circle"], image_size=16, val_n=2, tasks="qa:1,t2i:1",
                      progress=False)
  assert world["counts"]["train"] == {"qa": 1, "t2i": 1}
  return out


def _config(stage: str, world: str, siglip: str, **fields):
  c = get_config(stage)
  c.data.data_dir = os.path.join(world, "tfds")
  # 16 px images of 4 visual tokens: the qa record is 47 tokens, the t2i one 57, so a 64-token
  # row holds exactly one and a batch of 2 rows is one epoch
  c.data.update(image_size=16, seq_len=64, images_per_row=1, open_rows=1, num_threads=1)
  c.model.num_visual_tokens = 4
  c.model.siglip_init = siglip
  c.mesh.cpu_devices = 0  # the test process's one CPU device
  c.train.update(steps=STEPS, batch_size=2, log_every=1, checkpoint_every=STEPS, eval_every=0,
                 async_checkpoints=False)
  c.optim.warmup_frac = 0.0
  c.update_from_flattened_dict(fields)
  return c


def _losses(workdir: str) -> list[float]:
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r["loss"] for r in sorted((r for r in rows if "loss" in r), key=lambda r: r["step"])]


@pytest.fixture(scope="module")
def vpit_run(two_records, siglip_run, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("smollm2_run"))
  connector, vpit = os.path.join(root, "connector"), os.path.join(root, "vpit")
  trainer.run(_config("connector", two_records, siglip_run), connector)
  trainer.run(_config("vpit", two_records, siglip_run, init_from=connector), vpit)
  return connector, vpit


def test_connector_and_vpit_learn_the_repeated_batch(vpit_run):
  for workdir in vpit_run:
    losses = _losses(workdir)
    assert len(losses) == STEPS and np.isfinite(losses).all(), (workdir, losses)
    assert losses[-1] < losses[0], (workdir, losses)


def test_the_export_loads_and_still_answers(vpit_run, two_records):
  connector, vpit = vpit_run
  mm = metamorph.load(vpit)
  [(question, want)] = PARIS
  [out] = mm.generate([question], max_new_tokens=12)
  assert want in out.text, out.text  # SmolLM2's knowledge, through our export and loader
  # the export holds the trained weights, merged: layer 0's q_proj moved away from the
  # connector's (the GGUF's: the connector does not train it)
  key = "llm/layers/0/attention/q_proj/kernel"
  before = read_safetensors(os.path.join(connector, "model"))[key]
  after = module_params(mm.model)[key]
  assert after.shape == before.shape and not np.allclose(after, before)
  with open(os.path.join(two_records, "validation.jsonl"), encoding="utf-8") as f:
    record = json.loads(f.readline())
  image = load_image(os.path.join(two_records, "images", record["image"][0]))
  [seen] = mm.generate(["What is in the image?"], images=[[image]], max_new_tokens=4)
  assert seen.text.strip()  # the image path runs end to end on the export
  # a text question reaches the morphed model as it reaches SmolLM2 (train.demo.general_questions
  # compares the two): the same ids, SmolLM2's default system prompt included
  turns = [("user", question)]
  base = load_gguf_tokenizer(smollm2_gguf_path())
  want = text_prompt(turns, base).input_ids
  got = visual_prompts(turns, np.zeros((0, mm.m, mm.vision_dim), np.float32), mm.tokenizer, mm.layout, False)[0]
  np.testing.assert_array_equal(got.input_ids, want)
  assert "You are a helpful AI assistant" in base.decode(want)


def _smollm2_demo(workdir: str):
  c = demo_config(workdir, preset="smollm2")
  c.presets.smollm2.workdir = workdir + "_smollm2"
  return c


def test_the_smollm2_preset_trains_its_llm_stages_on_the_shared_runs(tmp_path):
  c = _smollm2_demo(str(tmp_path / "demo"))
  shared, own = c.workdir, c.presets.smollm2.workdir
  assert [workflow.stage_root(c, s) for s in workflow.DEMO_STAGES] == [shared] * 3 + [own] * 2
  siglip = workflow.stage_config(c, "siglip")  # the toy config's, as the full preset trains it
  assert siglip.model.llm_init == "" and siglip.train.steps == c.presets.full.siglip_steps
  assert siglip.data.tokenizer == os.path.join(shared, "world", "tokenizer")
  world = workflow.llm_world_root(c)
  assert world == shared
  for stage in workflow.LLM_STAGES:
    s = workflow.stage_config(c, stage, own, shared, world)
    assert s.model.llm_init.endswith(".gguf") and s.data.tokenizer == ""  # SmolLM2's own tokenizer
    assert s.data.data_dir == os.path.join(shared, "world", "tfds")
    assert s.model.siglip_init == os.path.join(shared, "siglip")
    assert s.model.visualizer_from == os.path.join(shared, "visualizer")
  vpit = workflow.stage_config(c, "vpit", own, shared, world)
  assert vpit.init_from == os.path.join(own, "connector") and vpit.tuning.mode == c.presets.smollm2.vpit_tuning
  assert workflow.stage_config(c, "connector", own, shared, world).init_from == ""  # from the GGUF


def test_without_language_records_the_llm_stages_get_a_world_of_their_own(tmp_path):
  c = _smollm2_demo(str(tmp_path / "demo"))
  c.presets.smollm2.language_records = False
  mix = resolve_mix(workflow.llm_tasks(c))
  default = resolve_mix(None)
  assert "text" not in mix and set(mix) == set(default) - {"text"}
  assert all(abs(mix[t] - default[t] / (1 - default["text"])) < 1e-12 for t in mix)  # the others' proportions
  assert workflow.llm_world_root(c) == c.presets.smollm2.workdir
  c.presets.smollm2.workdir = ""  # its world would replace the shared one
  with pytest.raises(ValueError, match="language_records=False trains on a world of its own"):
    workflow.llm_world_root(c)


def test_the_language_records_experiment_trains_both_arms_from_the_presets_connector(tmp_path):
  from train.demo.experiments import language_records
  c = _smollm2_demo(str(tmp_path / "demo"))
  shared, own = c.workdir, c.presets.smollm2.workdir
  arms = {name: language_records.plan(c, name, 7) for name in language_records.ARMS}
  assert arms["with"].world_root == shared  # the shared world holds the text-only records
  assert arms["without"].world_root == os.path.join(own, "language_records", "without")
  for name, arm in arms.items():
    p = workflow.preset(arm.config)
    assert p.vpit_steps == 7 and p.language_records == (name == "with")
    assert arm.workdir == os.path.join(own, "language_records", name, "vpit")
    vpit = workflow.stage_config(arm.config, "vpit", own, shared, arm.world_root)
    assert vpit.init_from == os.path.join(own, "connector") and vpit.train.steps == 7
    assert vpit.data.data_dir == os.path.join(arm.world_root, "world", "tfds")
  assert "text" not in resolve_mix(workflow.llm_tasks(arms["without"].config))
  assert c.presets.smollm2.vpit_steps != 7 and c.presets.smollm2.language_records  # the demo's config untouched
