"""The main job, ``python -m train.demo`` (``make demo``): the shapes world, the five
training stages of configs/toy.py, then the graded report.

``full`` is the graded demo; ``fast`` trades its scores for time; ``--config.preset=quick``
checks the mechanics in minutes (CI runs it); ``smollm2`` morphs the pretrained
SmolLM2-135M-Instruct instead of the toy LLM (``make demo-smollm2``), reusing this workdir's
world, SigLIP and visualizer. Any field is overridable, e.g.
``--config.presets.full.vpit_steps=800``.
"""
import ml_collections


def _preset(**values) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(values)


def get_config():
  c = ml_collections.ConfigDict()
  c.preset = "full"             # a key of presets
  c.workdir = "runs/demo"       # world/, siglip/, visualizer/, language/, connector/, vpit/, report.*
  c.stage_config = "configs/toy.py"
  c.seed = 0
  # (colour, shape) pairs never generated in training; understanding data still shows them
  c.holdout = "red:triangle,blue:circle,yellow:cross"
  c.tasks = ""                  # the world's task mix ("" = the default mix; see metamorph.shapes.mix)
  c.presets = ml_collections.ConfigDict()
  # world / validation / captions / language: records of the train, validation, captions (SigLIP)
  # and language (text-only, the language stage's) splits; *_steps: each stage's training steps.
  # llm_config: the config file of the connector and vpit stages ("" = config.stage_config);
  # workdir: where they and the report go ("" = config.workdir; the world, siglip, visualizer and
  # language stages stay in config.workdir); vpit_tuning: the vpit stage's config.tuning.mode;
  # language_records: the world's text-only ("text" task) records in the connector and vpit
  # mix (False: they train on a world without them, built in the preset's workdir).
  # Why each value, and the runs behind it: docs/findings.md, in the sections named.
  llm = dict(llm_config="", workdir="", vpit_tuning="full", language_records=True)
  full = dict(**llm,
    world=20000,
    validation=4000,          # enough understanding questions to grade against 95% (section 14)
    captions=20000, language=4000, siglip_steps=2400,
    visualizer_steps=600,     # 400 drew worse images and edits (section 7)
    language_steps=0,         # off: VPiT teaches the comparisons it taught, in less time (sections 9, 11)
    connector_steps=50,
    vpit_steps=2000,          # fewer leave understanding underfit (sections 13, 15)
    eval_understanding=0, eval_edit=60, eval_t2i=0, eval_knowledge=0, render_steps=10, render_guidance=1.0)
  c.presets.full = _preset(**full)
  # fast: the full preset's world and grading at about half the steps: lower scores in about 60%
  # of the time (section 16)
  c.presets.fast = _preset(**{**full, "siglip_steps": 1200, "visualizer_steps": 300, "vpit_steps": 1200})
  # smollm2: SmolLM2-135M-Instruct (configs/smollm2_135m.py) on the full preset's world, SigLIP and
  # visualizer (reused from config.workdir when there; "full"'s values, so that they match)
  c.presets.smollm2 = _preset(**{
    **full, "llm_config": "configs/smollm2_135m.py", "workdir": "runs/demo_smollm2",
    # 60 minutes for connector + vpit on 2 cores: a LoRA vpit step of 8 x 256 tokens (about 22
    # records) takes 11.3 s at a slow hour (bench.tuning_modes; full tuning 16.0 s), a connector
    # step about as long, plus about 90 s per stage to load, compile, checkpoint and export:
    # 30 + 250 steps, about 56 minutes; vpit sees about 5,500 of the world's 20,000 records, once
    "connector_steps": 30, "vpit_steps": 250,
    "vpit_tuning": "lora"})   # 0.70x full's step time; frozen_llm cannot adapt the LLM (section 21)
  # quick: the full preset's stages (no language stage; tests/test_train.py trains that one)
  c.presets.quick = _preset(**llm, world=600, validation=100, captions=600, language=100, siglip_steps=10,
                            visualizer_steps=10, language_steps=0, connector_steps=5, vpit_steps=10,
                            eval_understanding=16, eval_edit=4, eval_t2i=16, eval_knowledge=4,
                            render_steps=5, render_guidance=3.0)
  # eval_understanding: 0 = every question of the validation split, else the first n
  # eval_t2i: 0 = every prompt of world/eval_t2i.jsonl (seen and held-out pairs), else the first n of each
  # eval_knowledge: 0 = every world-knowledge probe (train.demo.report.grade_knowledge), else the first n
  # of each kind
  return c
