"""The demo's building blocks: the shapes world and the five stages of configs/toy.py,
each in its own resumable workdir (used by ``train.demo`` and ``train.demo.experiments``).

A preset with an ``llm_config`` (configs/demo.py's ``smollm2``) trains its ``LLM_STAGES`` from
that config file in the preset's own ``workdir``, on the world and the SigLIP and visualizer
runs of ``config.workdir`` (``stage_root``, ``llm_world_root``).

A stage that finished (``STAGE/done.json`` records its steps, config, the settings of the
world it trained on and ``code_version``) is skipped on a rerun with the same config and
world; with another config, or a world rebuilt with other training splits, it is an error
naming the fields that changed (nothing is deleted). A world whose ``world.json`` matches
the config is reused. A world or a finished stage made by other code (``metamorph/`` or
``train/`` changed since) is reused with a warning that says what to delete.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import importlib.util
import json
import os
import time
from collections.abc import Callable
from typing import Any

import ml_collections
from flax.traverse_util import flatten_dict

from metamorph.files import read_json, write_json
from metamorph.shapes.mix import resolve_mix
from metamorph.shapes.scene import DEFAULT_SIZE, normalize_holdout
from metamorph.shapes.world import WORLD_FILE, write_world
from train import stages
from train.config_errors import ConfigError, check_fields, error_text
from train.defaults import base_config

# The demo's stages in training order (names of the stage registry, train.stages); each trains
# in WORKDIR/STAGE.
DEMO_STAGES = ("siglip", "visualizer", "language", "connector", "vpit")
SHARED_STAGES = ("siglip", "visualizer", "language")  # what train.demo.experiments runs share
LLM_STAGES = ("connector", "vpit")  # the preset's llm_config trains them, in the preset's workdir
TEXT_TASK = "text"  # the world's text-only (language) records in its task mix
_DEFAULTS = json.loads(base_config().to_json())  # what a field absent from an older record held
DONE_FILE = "done.json"  # what a finished stage (or the world: seconds and code) recorded
SOURCE_ROOTS = (os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # train/, and metamorph/
                os.path.abspath(importlib.util.find_spec("metamorph").submodule_search_locations[0]))


@functools.cache
def code_version(roots: tuple[str, ...] = SOURCE_ROOTS) -> str:
  """A hash of every ``.py`` file under ``roots`` (by default ``train/`` and ``metamorph/``),
  paths and contents: the code a world or a stage was made with."""
  h = hashlib.sha256()
  for root in roots:
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
      h.update(os.path.relpath(path, os.path.dirname(root)).encode() + b"\0")
      with open(path, "rb") as f:
        h.update(f.read() + b"\0")
  return h.hexdigest()[:16]


def _warn_if_other_code(done: dict, what: str, delete: str) -> None:
  """Prints a warning when ``done`` was recorded by another ``code_version``."""
  if done.get("code", code_version()) != code_version():
    print(f"{what} was made by other code (metamorph/ or train/ changed since; code version "
          f"{done['code']}, now {code_version()}); reused. Delete {delete} to redo it with this code")


def preset(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  if config.preset not in config.presets:
    raise ValueError(f"config.preset is {config.preset!r}; use one of {sorted(config.presets)}")
  return config.presets[config.preset]


def load_config_file(path: str, stage: str, field: str = "config.stage_config") -> ml_collections.ConfigDict:
  """``get_config(stage)`` of the config file at ``path``, locked (setting a field it lacks
  raises). A ``ConfigError`` (a ValueError) names the file when it is not a config file or
  sets a field ``train.defaults.base_config()`` does not have (with the nearest names); errors
  start with ``field``, the config field that named the file."""
  spec = importlib.util.spec_from_file_location("_stage_config", path)
  if spec is None or not os.path.isfile(path):
    raise ConfigError(f"{field}: {path} is not a config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not callable(getattr(module, "get_config", None)):
    raise ConfigError(f"{field}: {path} has no get_config(stage)")
  try:
    config = module.get_config(stage)
  except (AttributeError, TypeError) as e:  # a field it lacks, a get_config without a stage argument
    raise ConfigError(f"{field}: {path}: get_config({stage!r}) failed: {error_text(e)}") from e
  check_fields(config, base_config(), f"{path}:{stage}", "train.defaults.base_config()")
  config.lock()
  return config


def own_root(config: ml_collections.ConfigDict) -> str:
  """Where the preset's ``LLM_STAGES`` and its report go: its ``workdir``, else ``config.workdir``."""
  return preset(config).workdir or config.workdir


def stage_root(config: ml_collections.ConfigDict, stage: str) -> str:
  """The folder whose ``STAGE/`` trains ``stage`` in the main job."""
  return own_root(config) if stage in LLM_STAGES else config.workdir


def llm_tasks(config: ml_collections.ConfigDict) -> str:
  """The task mix of the ``LLM_STAGES``' world: ``config.tasks``, without its text-only records
  when the preset's ``language_records`` is off."""
  if preset(config).language_records:
    return config.tasks
  mix = {t: w for t, w in resolve_mix(config.tasks or None).items() if t != TEXT_TASK}
  return ",".join(f"{t}:{w!r}" for t, w in mix.items())


def llm_world_root(config: ml_collections.ConfigDict) -> str:
  """The folder whose ``world/`` the ``LLM_STAGES`` train on: ``config.workdir``'s (the shared
  world), or the preset's own workdir when its task mix differs (``llm_tasks``)."""
  if llm_tasks(config) == config.tasks:
    return config.workdir
  if own_root(config) == config.workdir:
    raise ValueError(f"config.presets.{config.preset}.language_records=False trains on a world of its own: "
                     f"set config.presets.{config.preset}.workdir to a folder other than config.workdir "
                     f"({config.workdir}), whose world the other stages keep")
  return own_root(config)


def stage_config(config: ml_collections.ConfigDict, stage: str, root: str | None = None,
                 shared: str | None = None, world: str | None = None) -> ml_collections.ConfigDict:
  """The config of ``stage`` (from the preset's ``llm_config`` for the ``LLM_STAGES`` when it
  names one, else ``config.stage_config``), pointed at the world under ``world`` (default
  ``root``) and at the earlier runs it starts from (``train.stages``) under ``root`` (default
  ``config.workdir``); the ``SHARED_STAGES`` under ``shared`` (default ``root``). A stage whose
  config has no ``data.tokenizer`` keeps its LLM's own (a pretrained LLM's); vpit trains with
  the preset's ``vpit_tuning``."""
  p = preset(config)
  root = root or config.workdir
  shared = shared or root
  world = world or root
  c = (load_config_file(p.llm_config, stage, f"config.presets.{config.preset}.llm_config")
       if stage in LLM_STAGES and p.llm_config else load_config_file(config.stage_config, stage))
  c.seed = config.seed
  c.data.data_dir = os.path.join(world, "world", "tfds")
  if c.data.tokenizer:
    c.data.tokenizer = os.path.join(world, "world", "tokenizer")
  if stage == "vpit":
    c.tuning.mode = p.vpit_tuning
  c.train.steps = p[f"{stage}_steps"]
  c.train.checkpoint_every = max(1, min(c.train.checkpoint_every, c.train.steps))
  c.train.log_every = max(1, min(c.train.log_every, c.train.steps))
  c.train.eval_every = 0
  for start in stages.get(stage).starts_from:
    if start.required or p[f"{start.stage}_steps"]:  # no language stage: the connector starts afresh
      *parents, name = start.field.split(".")
      folder = shared if start.stage in SHARED_STAGES else root
      setattr(functools.reduce(getattr, parents, c), name, os.path.join(folder, start.stage))
  if stages.get(stage).sample:  # one sheet of samples, at the end
    c.train.sample_every = c.train.steps
  return c


def pretrained_llm(config: ml_collections.ConfigDict) -> str:
  """The pretrained LLM the preset's ``LLM_STAGES`` start from (the connector config's
  ``model.llm_init``, e.g. SmolLM2's GGUF); "" for an LLM trained from scratch."""
  return stage_config(config, "connector", own_root(config), config.workdir).model.llm_init


def build_world(config: ml_collections.ConfigDict, root: str | None = None, tasks: str | None = None,
                shared_splits: bool = True) -> dict:
  """The shapes world under ``ROOT/world`` (default root ``config.workdir``, task mix
  ``config.tasks``; the ``captions`` and ``language`` splits of the SigLIP and language
  stages unless ``shared_splits`` is False), unless one with the same settings is there."""
  p, out = preset(config), os.path.join(root or config.workdir, "world")
  size = DEFAULT_SIZE
  tasks = config.tasks if tasks is None else tasks
  holdout = normalize_holdout([s for s in config.holdout.split(",") if s.strip()])
  captions_n, language_n = (p.captions, p.language) if shared_splits else (0, 0)
  want = {"n": p.world, "val_n": p.validation, "captions_n": captions_n, "language_n": language_n,
          "seed": config.seed, "image_size": size, "holdout": [f"{c}:{s}" for c, s in holdout],
          "tasks": resolve_mix(tasks or None)}
  path = os.path.join(out, WORLD_FILE)
  if os.path.isfile(path):
    world = read_json(path)
    if world.get("args") == want:
      print(f"world: {out} is up to date ({p.world} records)")
      _warn_if_other_code(done_record(out) or {}, f"world: warning: {out}", f"{os.path.dirname(out)} (the world and "
                          "every stage trained on it)")
      return world
    print(f"world: {out} was built with other settings; rebuilding")
  print(f"world: building {p.world} + {p.validation} records (+ {captions_n} captions, "
        f"{language_n} text-only) in {out}")
  start = time.perf_counter()
  world = write_world(out, p.world, config.seed, holdout, size, p.validation, tasks or None,
                      captions_n=captions_n, language_n=language_n)
  write_json(os.path.join(out, DONE_FILE), {"seconds": time.perf_counter() - start, "code": code_version()})
  return world


def done_record(workdir: str) -> dict | None:
  """What ``workdir`` (a stage's, or the world) recorded when it was made; None if nothing."""
  path = os.path.join(workdir, DONE_FILE)
  return read_json(path) if os.path.isfile(path) else None


def _changed(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
  """The dotted config fields whose values differ between two JSON config dicts; a field
  missing from ``old`` (a record of an earlier version) counts as its value in ``defaults``."""
  a, b = flatten_dict(old, sep="."), flatten_dict(new, sep=".")
  d = flatten_dict(defaults or {}, sep=".")
  return sorted(k for k in set(a) | set(b) if a.get(k, d.get(k)) != b.get(k))


def _world_settings(root: str) -> dict | None:
  """The settings that make the training splits of the world under ``root`` (all of
  ``world.json``'s args but the validation size); None when there is no world."""
  path = os.path.join(root, "world", WORLD_FILE)
  if not os.path.isfile(path):
    return None
  return {k: v for k, v in read_json(path).get("args", {}).items() if k != "val_n"}


def train_stage(config: ml_collections.ConfigDict, stage: str, root: str | None = None,
                shared: str | None = None, world: str | None = None, workdir: str | None = None) -> dict:
  """Trains one stage in ``workdir`` (default ``ROOT/STAGE``; resuming, or skipping it when done
  or when the preset gives it 0 steps); returns its done record. ``root``, ``shared`` and
  ``world`` as in ``stage_config``."""
  from train.trainer import run  # slow import: jax, flax, orbax, grain (about 3 s), only to train
  workdir = workdir or os.path.join(root or config.workdir, stage)
  c = stage_config(config, stage, root, shared, world)
  if c.train.steps == 0:
    print(f"{stage}: 0 steps in this preset, skipped")
    return {"steps": 0, "seconds": 0.0}
  wanted, settings = json.loads(c.to_json()), _world_settings(world or root or config.workdir)
  done = done_record(workdir)
  if done is not None:
    world_changed = _changed(done["world"], settings) if done.get("world") and settings else []  # older records: none
    for what, changed in (("with another config", _changed(done.get("config", wanted), wanted, _DEFAULTS)),
                          ("on a world built with other settings", world_changed)):
      if changed:
        raise ValueError(f"{workdir} finished {what} (changed: {', '.join(changed[:8])}); delete {workdir} "
                         "(and the later stages) to retrain, or use another config.workdir")
    if done.get("steps") == c.train.steps:
      print(f"{stage}: done ({c.train.steps} steps in {done['seconds']:.0f}s), skipped")
      _warn_if_other_code(done, f"{stage}: warning: {workdir}", f"{workdir} and the later stages")
      return done
  start = time.perf_counter()
  last = run(c, workdir)
  done = {"steps": c.train.steps, "seconds": time.perf_counter() - start, "config": wanted, "world": settings,
          "code": code_version(), "last": {k: v for k, v in last.items() if isinstance(v, (int, float))}}
  write_json(os.path.join(workdir, DONE_FILE), done)
  return done


def timed(name: str, make: Callable[[], Any], root: str, timings: dict[str, float], reused: list[str],
          label: str | None = None) -> Any:
  """Runs ``make`` (building ``ROOT/NAME``: the world or a stage) and returns its result;
  records in ``timings`` (under ``label``, default ``name``) the seconds ``ROOT/NAME`` took when
  it was made (its done record's, else this call's), and appends the label to ``reused`` when
  an earlier run made it."""
  folder, label = os.path.join(root, name), label or name
  before, start = done_record(folder), time.perf_counter()
  out = make()
  after = done_record(folder)
  timings[label] = (after or {}).get("seconds", time.perf_counter() - start)
  if before is not None and after == before:
    reused.append(label)
  return out
