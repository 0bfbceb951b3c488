"""Config mistakes stop ``python -m train`` / ``python -m train.demo`` before anything runs:
exit status 2 and one ``error:`` line on stderr naming the field, the config file and the
nearest names (unknown fields) or the type, the value and the file (wrong types)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from configs.toy import get_config as toy_config
from tests.train_fixtures import ROOT, config_flags, tiny_config
from train.config_errors import ConfigError, check_override, nearest
from train.defaults import base_config
from train.demo import workflow

TOY = "configs/toy.py:siglip"


def _run(module: str, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=timeout)


def _train(tmp_path, *args: str) -> subprocess.CompletedProcess:
  # a data_dir that does not exist: nothing can train even if a check let the command through
  return _run("train", f"--config={TOY}", f"--workdir={tmp_path / 'run'}", *args,
              f"--config.data.data_dir={tmp_path / 'no_data'}")


def _usage_error(p: subprocess.CompletedProcess) -> str:
  """The one ``error:`` line of a command that stopped with exit status 2."""
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  return lines[0]


@pytest.mark.parametrize("override, expected", [
  ("--config.nonexistent=1", f"error: --config.nonexistent=1: {TOY} has no field nonexistent; the fields of the "
   "config are data, init_from, mesh, model, optim, seed, stage, train, tuning"),
  ("--config.optim.lrr=1", f"error: --config.optim.lrr=1: {TOY} has no field optim.lrr; did you mean optim.lr?"),
  ("--config.trian.steps=3", f"error: --config.trian.steps=3: {TOY} has no field trian.steps; did you mean "
   "train.steps?"),
  ("--config.train.steps=abc", f"error: --config.train.steps=abc: train.steps of {TOY} takes an int "
   "(default 2400), not 'abc'"),
  ("--config.optim.lr=fast", f"error: --config.optim.lr=fast: optim.lr of {TOY} takes a float (default 0.001), "
   "not 'fast'"),
  ("--config.data.strict=maybe", f"error: --config.data.strict=maybe: data.strict of {TOY} takes true or false "
   "(default False), not 'maybe'"),
])
def test_a_bad_override_is_one_usage_line(tmp_path, override, expected):
  assert _usage_error(_train(tmp_path, override)) == expected
  assert not os.path.exists(tmp_path / "run")


def test_good_overrides_pass_and_the_first_bad_one_is_named(tmp_path):
  # a bare bool, a space-separated int and a float go through; the misspelt field after them is the error
  line = _usage_error(_train(tmp_path, "--config.data.strict", "--config.train.steps", "5",
                             "--config.optim.lr=2e-4", "--config.model.llm.hiden_size=8"))
  assert line.startswith(f"error: --config.model.llm.hiden_size=8: {TOY} has no field model.llm.hiden_size; "
                         "did you mean model.llm.hidden_size")
  assert _usage_error(_train(tmp_path, "--config.train.steps", "7x")).endswith("not '7x'")


def test_a_config_file_that_sets_an_unknown_field_is_named(tmp_path):
  path = tmp_path / "typo.py"
  path.write_text("from train.defaults import base_config\n\n\ndef get_config():\n"
                  "  c = base_config()\n  c.train.stepz = 3\n  return c\n")
  assert _usage_error(_run("train", f"--config={path}", f"--workdir={tmp_path / 'run'}")) == (
    f"error: {path} sets train.stepz, which is not a field of train.defaults.base_config(); did you mean "
    "train.steps?")
  assert _usage_error(_run("train", f"--config={tmp_path / 'none.py'}", f"--workdir={tmp_path / 'run'}")) == (
    f"error: --config={tmp_path / 'none.py'}: there is no config file {tmp_path / 'none.py'}")


def test_the_demo_names_a_misspelt_field_of_its_config(tmp_path):
  line = _usage_error(_run("train.demo", "--config.presett=quick", f"--config.workdir={tmp_path / 'demo'}"))
  assert line == "error: --config.presett=quick: configs/demo.py has no field presett; did you mean preset or presets?"
  assert not os.path.exists(tmp_path / "demo")


def test_a_value_out_of_range_is_still_the_trainers_error(tmp_path):
  p = _train(tmp_path, "--config.train.steps=0")
  assert p.returncode == 1 and p.stderr.strip().splitlines()[-1] == "error: config.train.steps must be >= 1, got 0"


@pytest.mark.parametrize("stage", ["siglip", "visualizer", "language", "connector", "vpit"])
def test_every_override_the_training_tests_pass_is_accepted(stage):
  for flag in config_flags(tiny_config(stage, "/world")):
    field, value = flag.removeprefix("--config.").split("=", 1)
    check_override(toy_config(stage), field, value, f"configs/toy.py:{stage}")


def test_nearest_finds_a_field_by_its_last_name():
  assert nearest("steps", base_config()) == ["train.steps"]
  assert nearest("zzzz", base_config()) == []
  with pytest.raises(ConfigError, match=r"optim\.lr is float 0\.001, not a group of fields"):
    check_override(base_config(), "optim.lr.x", "1", "base")


def test_load_config_file_names_the_file_and_the_field(tmp_path):
  path = tmp_path / "stage.py"
  path.write_text("from train.defaults import base_config\n\n\ndef get_config(stage):\n"
                  "  c = base_config()\n  c.model.siglip_int = 'x'\n  return c\n")
  with pytest.raises(ConfigError, match=rf"^{path}:vpit sets model.siglip_int, which is not a field of "
                     r"train.defaults.base_config\(\); did you mean model.siglip_init\?$"):
    workflow.load_config_file(str(path), "vpit")
  path.write_text("def get_config():\n  return None\n")
  with pytest.raises(ConfigError, match=r"get_config\('vpit'\) failed: .*takes 0 positional arguments"):
    workflow.load_config_file(str(path), "vpit")
  c = workflow.load_config_file(os.path.join(ROOT, "configs/toy.py"), "vpit")
  with pytest.raises(AttributeError, match="siglip_init"):  # locked: a misspelt programmatic set raises
    c.model.siglip_int = "x"
