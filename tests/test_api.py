"""The Python API: loading checkpoints (with and without a visualizer, plain LLMs), answers
with images, image inputs, chat (an earlier answer's image reaches the prompt), seeds, and greedy
answers against transformers' ``generate`` (SmolLM2, an exported text-only checkpoint)."""
import json
import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from PIL import Image
from transformers import AutoModelForCausalLM

import metamorph
from metamorph.api.model import MetaMorphModel
from metamorph.convert import ConversionError
from metamorph.files import write_json, write_safetensors
from metamorph.params import load_module_params, module_params
from metamorph.convert.llama import export_hf, save_llm
from metamorph.shapes.tokenizer import build_world_tokenizer
from metamorph.generation.prompts import PromptTooLong
from tests import generate_fixtures as fx


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return fx.toy_checkpoint(str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def mm(run):
  return metamorph.load(run)


def _picture(seed: int = 0) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 255, (24, 24, 3), dtype=np.uint8)
  return Image.fromarray(pixels)


def test_smollm2_greedy_generate_equals_transformers(smollm2, smollm2_hf):
  llm, tokenizer, _ = smollm2
  mm = MetaMorphModel(llm, tokenizer)
  question = "Name three animals that live in the sea."
  [out] = mm.generate([question], max_new_tokens=32)  # the buckets of test_smollm2's greedy test: no new compilation
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
  with torch.no_grad():
    ref = smollm2_hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                              max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
  assert len(out.token_ids) >= 16
  assert out.token_ids == ref[:len(out.token_ids)], (out.text, tokenizer.decode(ref))
  assert out.text == tokenizer.decode(ref[:len(out.token_ids)], skip_special_tokens=True).strip()
  assert out.visual_tokens == [] and out.images == []


def test_load_workdir_finds_its_visualizer_and_draws(run, mm):
  with open(os.path.join(run, "model", "config.json")) as f:
    assert json.load(f)["visualizer"] == "vis"  # relative to the run
  assert mm.is_metamorph and mm.visualizer is not None
  out = mm.generate(["Generate an image of a red circle.", "Draw two."], max_new_tokens=20, max_images=1,
                    render_steps=3, seed=0)
  for g in out:
    assert g.text == "<image>" and g.finish_reason == "stop"
    assert len(g.visual_tokens) == 1 and g.visual_tokens[0].shape == (fx.M, fx.DV)
    np.testing.assert_allclose(np.linalg.norm(g.visual_tokens[0], axis=-1), 1.0, atol=1e-5)
    assert len(g.images) == 1 and g.images[0].size == (fx.IMAGE_SIZE, fx.IMAGE_SIZE) and g.images[0].mode == "RGB"
  # the answer's images are the visualizer's rendering of its visual tokens
  again = mm.render(np.stack([g.visual_tokens[0] for g in out]), steps=3, seed=0)
  for g, image in zip(out, again):
    np.testing.assert_array_equal(np.asarray(g.images[0]), np.asarray(image))
  two = mm.generate(["Two images."], max_new_tokens=20, max_images=2, render_steps=3)[0]
  assert two.text.split() == ["<image>", "<image>"] and len(two.images) == 2  # the world tokenizer spaces words


def test_image_inputs_and_chat(mm):
  picture = _picture()
  tokens = mm.encode_image(picture)
  assert tokens.shape == (fx.M, fx.DV)
  by_image = mm.generate(["What colour is the shape?"], images=[[picture]], max_new_tokens=8, render_steps=3)
  by_tokens = mm.generate(["What colour is the shape?"], images=[[tokens]], max_new_tokens=8, render_steps=3)
  assert by_image[0].token_ids == by_tokens[0].token_ids
  np.testing.assert_allclose(by_image[0].visual_tokens[0], by_tokens[0].visual_tokens[0], atol=1e-6)
  # multi-turn: an image in, an earlier answer's image given back as its visual tokens
  first = mm.chat([{"role": "user", "content": "Edit this.", "images": [picture]}], max_new_tokens=8,
                  render_steps=3)
  reply = mm.chat([{"role": "user", "content": "Edit this.", "images": [picture]},
                   {"role": "assistant", "content": first.text, "images": first.visual_tokens},
                   {"role": "user", "content": "Again."}], max_new_tokens=8, render_steps=3)
  assert reply.text == "<image>" and len(reply.images) == 1
  with pytest.raises(ValueError, match="placeholders"):
    mm.chat([{"role": "user", "content": "<image> <image>", "images": [picture]}])
  with pytest.raises(ValueError, match="end with a user"):
    mm.chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])


def test_sampling_seeds_and_guidance(tmp_path):
  tokenizer = build_world_tokenizer()
  mm = MetaMorphModel(fx.tiny_metamorph(tokenizer, seed=3), tokenizer)
  kwargs = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.9}
  prompts = ["Describe the picture.", "Hello there."]
  a = mm.generate(prompts, seed=1, **kwargs)
  b = mm.generate(prompts, seed=1, **kwargs)
  c = mm.generate(prompts, seed=2, **kwargs)
  assert [g.token_ids for g in a] == [g.token_ids for g in b]
  assert [g.token_ids for g in a] != [g.token_ids for g in c]
  guided = mm.generate(prompts, seed=1, guidance=2.0, **kwargs)  # the unconditional rows run too
  assert [g.token_ids for g in guided] == [g.token_ids for g in a]  # text is unaffected by guidance


def test_model_without_visualizer_returns_visual_tokens_only(tmp_path):
  tokenizer = build_world_tokenizer()
  model = fx.drawing_metamorph(tokenizer, tokenizer.convert_tokens_to_ids("<|im_end|>"))
  run = fx.write_workdir(str(tmp_path / "run"), model, tokenizer, visualizer_entry="missing/vis")
  with pytest.warns(UserWarning, match="not found"):
    mm = metamorph.load(run)
  [out] = mm.generate(["Generate an image."], max_new_tokens=12, max_images=1)
  assert out.text == "<image>" and len(out.visual_tokens) == 1 and out.images == []
  with pytest.raises(ValueError, match="no visualizer"):
    mm.render(out.visual_tokens)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    quiet = metamorph.load(fx.write_workdir(str(tmp_path / "plain"), model, tokenizer))
  assert quiet.visualizer is None


def test_text_only_llm_checkpoint_answers_as_transformers_generate(tmp_path):
  """A text-only checkpoint serves text: its greedy answer (with and without a repetition
  penalty) is transformers' ``generate`` of the same LLM exported as a ``LlamaForCausalLM``
  folder, on the prompt of the tokenizer's own chat template: the same tokens up to the stop
  token, the same text. It takes no images."""
  tokenizer = build_world_tokenizer()
  llm = fx.tiny_metamorph(tokenizer).llm
  save_llm(llm, tokenizer, str(tmp_path / "llm"))
  export_hf(llm, tokenizer, str(tmp_path / "hf"))
  mm = metamorph.load(str(tmp_path / "llm"))
  assert not mm.is_metamorph
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hello."}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
  hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
  # these answers take both ends: the stop token, and the whole budget (the penalty keeps it talking)
  for penalty, finish, length in ((1.0, "stop", 2), (1.3, "length", 16)):
    [out] = mm.generate(["Hello."], max_new_tokens=16, repetition_penalty=penalty)
    with torch.no_grad():
      ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                        max_new_tokens=16, do_sample=False, repetition_penalty=penalty,
                        eos_token_id=list(mm.stop_ids), pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert out.token_ids == ref, (penalty, out.text, tokenizer.decode(ref))
    assert out.text == tokenizer.decode([t for t in ref if t not in mm.stop_ids], skip_special_tokens=True).strip()
    assert (out.finish_reason, len(ref), out.images) == (finish, length, [])
  with pytest.raises(ValueError, match="text-only"):
    mm.generate(["What is it?"], images=[[_picture()]])
  with pytest.raises(ValueError, match="no vision tower"):
    mm.encode_image(_picture())


def test_an_earlier_assistant_image_reaches_the_prompt(monkeypatch):
  """``chat`` with an image in an earlier assistant turn: its visual tokens fill the visual slots
  of that turn in the prompt the engine gets, the first generated token's logits (the model's
  own full forward over that prompt) move when the image changes, and so does the reply."""
  tokenizer = build_world_tokenizer()
  mm = MetaMorphModel(fx.tiny_metamorph(tokenizer), tokenizer)
  prompts = []
  generate = mm.engine.generate

  def spy(batch, **kwargs):
    prompts.extend(batch)
    return generate(batch, **kwargs)

  monkeypatch.setattr(mm.engine, "generate", spy)
  picture = _picture()
  earlier = np.random.default_rng(5).normal(size=(2, fx.M, fx.DV)).astype(np.float32)
  earlier /= np.linalg.norm(earlier, axis=-1, keepdims=True)

  def reply(tokens):
    return mm.chat([{"role": "user", "content": "Edit this.", "images": [picture]},
                    {"role": "assistant", "content": "<image>", "images": [tokens]},
                    {"role": "user", "content": "Again."}], max_new_tokens=8)

  replies = [reply(earlier[0]), reply(earlier[1]), reply(earlier[0])]
  start, end = mm.layout.image_start_id, mm.layout.image_end_id
  graphdef, state = nnx.split(mm.model)

  @jax.jit
  def last_logits(state, ids, vidx, tokens):  # the model's own full forward, no cache
    model = nnx.merge(graphdef, state)
    hidden, _ = model.llm.forward(model.embed(ids[None], vidx[None], tokens[None]))
    return model.llm.logits(hidden)[0, -1]

  picture_tokens, logits = mm.encode_image(picture), []
  for prompt, tokens in zip(prompts, earlier[[0, 1, 0]]):
    np.testing.assert_allclose(prompt.visual_tokens[0], picture_tokens, atol=1e-6)
    np.testing.assert_array_equal(prompt.visual_tokens[1], tokens)
    ids, vidx = np.asarray(prompt.input_ids), np.asarray(prompt.visual_index)
    slots = np.flatnonzero(vidx >= fx.M)  # the second image's slots, in order
    np.testing.assert_array_equal(vidx[slots], np.arange(fx.M, 2 * fx.M))
    assert np.all(np.diff(slots) == 1) and ids[slots[0] - 1] == start and ids[slots[-1] + 1] == end
    before = tokenizer.decode(ids[:slots[0]])
    assert before.rstrip().endswith("<|im_start|>assistant\n<image_start>"), before  # the assistant's turn
    logits.append(np.asarray(last_logits(state, ids, vidx, prompt.visual_tokens)))
  for r, first in zip(replies, logits):
    assert r.token_ids[0] == first.argmax()  # the engine's first token is the forward's greedy choice
  np.testing.assert_allclose(logits[2], logits[0], atol=1e-6)
  assert np.abs(logits[1] - logits[0]).max() > 5e-3  # measured: 0.027 (the logits' spread: 0.12)
  assert replies[2].token_ids == replies[0].token_ids != replies[1].token_ids


def test_load_errors(tmp_path, run):
  with pytest.raises(ConversionError, match="no such checkpoint"):
    metamorph.load(str(tmp_path / "nowhere"))
  with pytest.raises(ConversionError, match="visualizer"):
    metamorph.load(os.path.join(run, "vis"))
  mm = metamorph.load(run, visualizer=os.path.join(run, "vis"))
  with pytest.raises(PromptTooLong):
    mm.generate([" ".join(["red"] * fx.CONTEXT)])


def test_visualizer_of_another_encoder_is_refused(tmp_path, run):
  """A visualizer draws the tokens of the SigLIP tower it was trained on: one whose tower
  differs from the checkpoint's is refused; the same tower rounded to bf16 is accepted."""
  from train import model_init
  mm = metamorph.load(run)
  other = str(tmp_path / "other")
  model_init.export(fx.tiny_visualizer(), None, os.path.join(other, model_init.MODEL_DIR))
  with pytest.raises(ConversionError, match=f"{other}: this visualizer was trained on another SigLIP encoder"):
    metamorph.load(run, visualizer=other)
  rounded = fx.tiny_visualizer()
  ours = module_params(mm.model.vision)
  load_module_params(rounded.vision, {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float32)
                                              for k, v in ours.items()}, "bf16")
  assert not np.array_equal(module_params(rounded.vision)["pos_embed"], ours["pos_embed"])
  model_init.export(rounded, None, os.path.join(str(tmp_path / "rounded"), model_init.MODEL_DIR))
  assert metamorph.load(run, visualizer=str(tmp_path / "rounded")).visualizer is not None


def test_a_folder_in_the_documented_format_loads(tmp_path):
  """Our format on disk (config.json {format, kind, config, visualizer}, model.safetensors,
  the tokenizer's files), written without the library's writer, loads: checkpoints written
  before a change of the code keep loading."""
  tokenizer = build_world_tokenizer()
  model = fx.tiny_metamorph(tokenizer, seed=4)
  folder = str(tmp_path / "run" / "model")
  os.makedirs(folder)
  write_json(os.path.join(folder, "config.json"),
             {"format": "metamorph", "kind": "metamorph", "config": model.config.to_dict(), "visualizer": ""})
  write_safetensors(os.path.join(folder, "model.safetensors"), module_params(model))
  tokenizer.save_pretrained(folder)
  mm = metamorph.load(str(tmp_path / "run"))
  assert mm.is_metamorph and mm.visualizer is None
  ours, theirs = module_params(mm.model), module_params(model)
  assert sorted(ours) == sorted(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)


def test_an_unknown_output_route_names_the_known_ones():
  tokenizer = build_world_tokenizer()
  with pytest.raises(ValueError, match=r"unknown output route 'tool'; the known routes are \['vpit'\]"):
    MetaMorphModel(fx.tiny_metamorph(tokenizer), tokenizer, route="tool")
