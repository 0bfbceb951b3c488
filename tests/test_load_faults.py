"""`metamorph.load` and `python -m decode` on damaged checkpoint folders and unreadable images:
one clear error each (a ``ConversionError`` from the API, one ``error:`` line and exit code 2
from the CLI), naming the damaged file; never a traceback."""
import json
import os
import shutil

import pytest
from PIL import Image

import metamorph
from decode.__main__ import main
from metamorph.files import ConversionError
from tests.generate_fixtures import toy_checkpoint
from tests.image_faults import png_header


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return toy_checkpoint(str(tmp_path_factory.getbasetemp()))


def _truncate(path: str, fraction: float = 0.2) -> None:
  os.truncate(path, int(os.path.getsize(path) * fraction))


def _edit_config(folder: str, edit) -> None:
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    meta = json.load(f)
  edit(meta)
  with open(path, "w") as f:
    json.dump(meta, f)


def _remove_tokenizer(folder: str, keep=()) -> None:
  for name in os.listdir(folder):
    if name.startswith(("tokenizer", "chat_template", "special_tokens")) and name not in keep:
      os.remove(os.path.join(folder, name))


DAMAGE = {  # name -> (damage done to RUN/model, a piece of the error that names it)
    "truncated_weights": (lambda m: _truncate(os.path.join(m, "model.safetensors")),
                          "model/model.safetensors: not a readable safetensors file"),
    "weights_header_only": (lambda m: _truncate(os.path.join(m, "model.safetensors"), 0.0005),
                            "model/model.safetensors: not a readable safetensors file"),
    "missing_weights": (lambda m: os.remove(os.path.join(m, "model.safetensors")),
                        "model/model.safetensors: file not found"),
    "garbled_config": (lambda m: open(os.path.join(m, "config.json"), "w").write('{"format": "metamorph", "ki'),
                       "model/config.json: not valid JSON"),
    "config_not_utf8": (lambda m: open(os.path.join(m, "config.json"), "ab").write(b"\xff"),
                        "model/config.json: not valid JSON"),
    "config_wrong_type": (lambda m: _edit_config(m, lambda c: c["config"]["llm"].update(num_layers="two")),
                          "model/config.json: invalid MetaMorph config"),
    "visualizer_not_a_path": (lambda m: _edit_config(m, lambda c: c.update(visualizer=5)),
                              "model/config.json: 'visualizer' is 5, not a path"),
    "missing_tokenizer": (_remove_tokenizer, "ships no tokenizer"),
    "tokenizer_config_only": (lambda m: _remove_tokenizer(m, keep=("tokenizer_config.json",)),
                              "the tokenizer files could not be loaded"),
    "garbled_tokenizer": (lambda m: open(os.path.join(m, "tokenizer.json"), "w").write("{not json"),
                          "the tokenizer files could not be loaded"),
    "broken_chat_template": (lambda m: open(os.path.join(m, "chat_template.jinja"), "w").write("{{ messages }"),
                             "the tokenizer's chat template does not render"),
    "truncated_visualizer": (lambda m: _truncate(os.path.join(os.path.dirname(m), "vis", "model", "model.safetensors")),
                             "vis/model/model.safetensors: not a readable safetensors file"),
}


@pytest.fixture(scope="module")
def damaged(run, tmp_path_factory):
  """name -> a copy of the toy workdir with that damage."""
  root, out = tmp_path_factory.mktemp("damaged"), {}
  for name, (damage, _) in DAMAGE.items():
    copy = str(root / name)
    shutil.copytree(run, copy, symlinks=True)
    damage(os.path.join(copy, "model"))
    out[name] = copy
  return out


@pytest.mark.parametrize("name", sorted(DAMAGE))
def test_a_damaged_checkpoint_is_one_clear_error(damaged, name, tmp_path, capsys):
  expected = DAMAGE[name][1]
  with pytest.raises(ConversionError, match=expected.replace("(", r"\(").replace(".", r"\.")):
    metamorph.load(damaged[name])
  assert main(["--checkpoint", damaged[name], "--prompt", "hi", "--max-new-tokens", "2",
               "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # huge.png: refused, image_too_large
def test_unreadable_images_are_one_clear_error(run, tmp_path, capsys):
  good = tmp_path / "good.png"
  Image.new("RGB", (8, 8)).save(good)
  (tmp_path / "truncated.png").write_bytes(good.read_bytes()[:30])
  (tmp_path / "text.png").write_text("not an image")
  (tmp_path / "huge.png").write_bytes(png_header(10000, 10000))
  for name, reason in (("truncated.png", "corrupt_image"), ("text.png", "corrupt_image"),
                       ("absent.png", "missing_image"), ("huge.png", "10000 x 10000"), ("", "missing_image")):
    path = str(tmp_path / name)
    assert main(["--checkpoint", run, "--prompt", "hi", "--image", path, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot read image: ") and err.count("\n") == 1 and path in err, (name, err)
  mm = metamorph.load(run)
  for name in ("truncated.png", "text.png", "absent.png", "huge.png"):
    with pytest.raises(ValueError, match=str(tmp_path / name)):
      mm.generate(["<image> What is it?"], images=[[str(tmp_path / name)]], max_new_tokens=2)


def test_a_prompts_file_with_bad_bytes_or_wrong_types_names_the_line(run, tmp_path, capsys):
  prompts = tmp_path / "prompts.jsonl"
  for content, expected in ((b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', "prompts.jsonl:2: not UTF-8 (byte 0xe9"),
                            (b'{"prompt": "ok"}\n\n{"prompt": "x", "images": [3]}\n', "prompts.jsonl:3: expected"),
                            (b'{"prompt": "ok", "images": ["\\u0000"]}\n', "cannot read image")):
    prompts.write_bytes(content)
    assert main(["--checkpoint", run, "--prompts-file", str(prompts), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
