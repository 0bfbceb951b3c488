"""The shapes world's word-level tokenizer."""
import pytest
from transformers import AutoTokenizer

from metamorph.data import conversation
from metamorph.shapes.examples import make_example
from metamorph.shapes.phrases import world_texts
from metamorph.shapes.prompts import eval_prompts
from metamorph.shapes.tasks import TASKS
from metamorph.shapes.tokenizer import SPECIAL_TOKENS, build_world_tokenizer

ROLE = {"human": "user", "gpt": "assistant"}


@pytest.fixture(scope="module")
def tokenizer():
  return build_world_tokenizer()


@pytest.fixture(scope="module")
def records():
  """Records of every task kind (each kind forced, plus the default mix) and eval prompts."""
  out = [make_example(7, i, tasks=[t], holdout=["red:circle"])[0]
         for t in TASKS for i in range(60)]
  out += [make_example(8, i)[0] for i in range(300)]
  return out + eval_prompts(["red:circle"])


def _messages(record):
  return [{"role": ROLE[t["from"]], "content": t["value"]} for t in record["conversations"]]


def test_special_tokens_and_size(tokenizer):
  ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
  assert ids == list(range(len(SPECIAL_TOKENS))) and tokenizer.pad_token_id == 0
  assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<pad>"
  for tok, i in zip(SPECIAL_TOKENS, ids):
    assert tokenizer.encode(tok, add_special_tokens=False) == [i]
  assert tokenizer.encode("red<|im_end|>\n", add_special_tokens=False)[1] == tokenizer.eos_token_id
  assert len(tokenizer) < 500  # 347 at the time of writing
  assert tokenizer.convert_tokens_to_ids(["\n"]) != [tokenizer.unk_token_id]


def test_vocabulary_is_complete(tokenizer, records):
  unk = tokenizer.unk_token_id
  for text in world_texts():
    assert unk not in tokenizer.encode(text, add_special_tokens=False), text
  for record in records:
    for turn in record["conversations"]:
      ids = tokenizer.encode(turn["value"], add_special_tokens=False)
      assert unk not in ids, turn["value"]
      assert tokenizer.decode(ids) == turn["value"]  # exact round trip, case and spacing
  assert tokenizer.encode("a pink hexagon", add_special_tokens=False)[1:] == [unk, unk]


def test_pre_tokenizer_keeps_newlines(tokenizer):
  tokens = tokenizer.tokenize("<image>\nWhat colour is the shape?  It is 12.")
  assert tokens == ["<", "image", ">", "\n", "What", "colour", "is", "the", "shape", "?",
                    "It", "is", "1", "2", "."]


def test_chat_template_round_trip(tokenizer, records):
  for record in records[::7]:
    msgs = _messages(record)
    prompt_only = record["conversations"][-1]["from"] == "human"
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt_only)
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=prompt_only)["input_ids"]
    assert text.startswith("<|im_start|>user\n") and text.count("<|im_end|>\n") == len(msgs)
    assert text.endswith("<|im_start|>assistant\n") == prompt_only
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids).split() == text.split()
    plain = tokenizer.decode(ids, skip_special_tokens=True).split()
    words = " ".join(f"{m['role']}\n{m['content']}" for m in msgs).split()
    assert plain == words + (["assistant"] if prompt_only else [])


def test_save_and_load(tmp_path, tokenizer, records):
  build_world_tokenizer(str(tmp_path))
  assert (tmp_path / "tokenizer.json").exists()
  loaded = AutoTokenizer.from_pretrained(str(tmp_path))
  assert len(loaded) == len(tokenizer) and loaded.get_vocab() == tokenizer.get_vocab()
  assert loaded.pad_token_id == 0 and loaded.eos_token == "<|im_end|>"
  for record in records[::11]:
    msgs = _messages(record)
    a = tokenizer.apply_chat_template(msgs)["input_ids"]
    assert loaded.apply_chat_template(msgs)["input_ids"] == a
    assert loaded.decode(a) == tokenizer.decode(a)


def test_the_formatter_accepts_it(tokenizer, records):
  """The project's conversation formatter places images and labels with this tokenizer."""
  layout = conversation.TokenLayout.from_tokenizer(tokenizer, num_visual_tokens=4)
  record = next(r for r in records if r["task"] == "edit")
  turns = [(ROLE[t["from"]], t["value"]) for t in record["conversations"]]
  f = conversation.format_conversation(turns, tokenizer, layout)
  assert f.num_images == 2 and int(f.visual_target_mask.sum()) == 4
  assert tokenizer.unk_token_id not in f.input_ids.tolist()
