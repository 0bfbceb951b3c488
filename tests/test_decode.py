"""The sampling script: answers, PNG images and JSON records; prompts files; clear errors."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from decode.__main__ import main
from tests.generate_fixtures import CONTEXT, DV, IMAGE_SIZE, M, toy_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return toy_checkpoint(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("pictures") / "shape.png")
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
  return path


def test_prompt_prints_the_answer_and_writes_png_and_json(run, picture, tmp_path, capsys):
  out = str(tmp_path / "out")
  rc = main(["--checkpoint", run, "--prompt", "What colour is the shape?", "--image", picture, "--out", out,
             "--max-new-tokens", "8", "--json"])
  assert rc == 0
  stdout = capsys.readouterr().out.strip().splitlines()
  assert len(stdout) == 1
  record = json.loads(stdout[0])
  assert record["text"] == "<image>" and record["finish_reason"] == "stop" and record["input_images"] == [picture]
  with open(os.path.join(out, "records.jsonl")) as f:
    assert [json.loads(line) for line in f] == [record]
  [png], [npy] = record["images"], record["visual_tokens"]
  assert Image.open(png).size == (IMAGE_SIZE, IMAGE_SIZE)
  assert np.load(npy, allow_pickle=False).shape == (M, DV)
  rc = main(["--checkpoint", run, "--prompt", "Draw.", "--out", out, "--max-new-tokens", "8"])
  text = capsys.readouterr().out
  assert rc == 0 and "prompt: Draw.\nanswer: <image>\nimage: " in text


def test_prompts_file_with_a_progress_bar(run, picture, tmp_path, capsys):
  lines = [{"prompt": "Generate an image of a red circle.", "id": "red circle"},
           {"prompt": "What is this?", "images": [os.path.basename(picture)]},
           {"prompt": "<image> and <image>?", "images": [picture, picture], "id": "pair"}]
  prompts = os.path.join(os.path.dirname(picture), "prompts.jsonl")  # image paths relative to the file
  with open(prompts, "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in lines))
  out = str(tmp_path / "out")
  rc = main(["--checkpoint", run, "--prompts-file", prompts, "--out", out, "--max-new-tokens", "12",
             "--temperature", "0.5", "--top-p", "0.9", "--guidance", "2", "--seed", "3", "--json"])
  captured = capsys.readouterr()
  assert rc == 0
  records = [json.loads(line) for line in captured.out.strip().splitlines()]
  assert [r["id"] for r in records] == ["red circle", "1", "pair"]
  assert records[0]["images"][0] == os.path.join(out, "red_circle-0.png")
  assert all(os.path.isfile(p) for r in records for p in r["images"])
  assert "3/3" in captured.err  # tqdm's progress bar


def test_clear_errors(run, picture, tmp_path, capsys):
  def error(*args) -> str:
    assert main(["--checkpoint", run, "--out", str(tmp_path / "out"), *args]) == 2
    return capsys.readouterr().err

  assert "checkpoint not found" in error("--prompt", "hi", "--checkpoint", str(tmp_path / "missing"))
  broken = tmp_path / "broken.png"
  broken.write_text("not an image")
  assert "cannot read image" in error("--prompt", "hi", "--image", str(broken))
  assert "cannot read image" in error("--prompt", "hi", "--image", str(tmp_path / "absent.png"))
  assert "longer than the context" in error("--prompt", " ".join(["red"] * CONTEXT))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n{"images": []}\n')
  assert "bad.jsonl:2" in error("--prompts-file", str(bad))


def test_help_lists_the_flags():
  result = subprocess.run([sys.executable, "-m", "decode", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, check=False)
  assert result.returncode == 0
  for flag in ("--checkpoint", "--prompt", "--image", "--prompts-file", "--out", "--max-new-tokens",
               "--temperature", "--top-p", "--guidance", "--seed", "--json"):
    assert flag in result.stdout
