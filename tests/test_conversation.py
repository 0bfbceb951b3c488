"""Record validation and chat-template formatting (ChatML and LLaMA-3 templates)."""
import copy
import json

import numpy as np
import pytest

from metamorph.data.conversation import TokenLayout, format_conversation
from metamorph.data.records import DropCounts, RecordError, parse_line, read_records
from metamorph.tokens import IGNORE

M = 3
LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's chat template
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
TEXT_TURNS = [("system", "Be brief."), ("user", "What is 2+2?"), ("assistant", "It is 4."),
              ("user", "And 3+3?"), ("assistant", "6.")]


@pytest.fixture(scope="module")
def chatml(smollm2):
  tokenizer = copy.deepcopy(smollm2[1])
  tokenizer.add_tokens(["<image_start>", "<image_end>"], special_tokens=True)
  return tokenizer


@pytest.fixture(scope="module")
def llama3(chatml):
  tokenizer = copy.deepcopy(chatml)
  tokenizer.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                       special_tokens=True)
  tokenizer.bos_token, tokenizer.eos_token = "<|begin_of_text|>", "<|eot_id|>"
  tokenizer.chat_template = LLAMA3_TEMPLATE
  return tokenizer


def _template_ids(tokenizer, turns, **kwargs):
  text = tokenizer.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False, **kwargs)
  return tokenizer.encode(text, add_special_tokens=False)


def _labelled_text(tokenizer, formatted):
  keep = formatted.labels != IGNORE
  return tokenizer.decode(formatted.labels[keep])


@pytest.mark.parametrize("name, end_of_turn", [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_text_only_ids_equal_the_chat_template(name, end_of_turn, request):
  tokenizer = request.getfixturevalue(name)
  layout = TokenLayout.from_tokenizer(tokenizer, M)
  formatted = format_conversation(TEXT_TURNS, tokenizer, layout)
  assert formatted.input_ids.tolist() == _template_ids(tokenizer, TEXT_TURNS)
  assert _labelled_text(tokenizer, formatted) == f"It is 4.{end_of_turn}6.{end_of_turn}"
  np.testing.assert_array_equal(formatted.labels[formatted.labels != IGNORE],
                                formatted.input_ids[formatted.labels != IGNORE])
  assert not formatted.visual_target_mask.any() and (formatted.visual_index == -1).all()


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_generation_prompt_matches_the_template(name, request):
  tokenizer = request.getfixturevalue(name)
  layout = TokenLayout.from_tokenizer(tokenizer, M)
  turns = TEXT_TURNS[:2]
  formatted = format_conversation(turns, tokenizer, layout, add_generation_prompt=True)
  assert formatted.input_ids.tolist() == _template_ids(tokenizer, turns, add_generation_prompt=True)
  assert (formatted.labels == IGNORE).all()


def test_images_expand_to_slots_in_prompts_and_responses(chatml):
  layout = TokenLayout.from_tokenizer(chatml, M)
  turns = [("user", "<image>\nMake it blue."), ("assistant", "Done: <image>"),
           ("user", "Again, like <image>?"), ("assistant", "Yes.")]
  f = format_conversation(turns, chatml, layout)
  start = np.flatnonzero(f.input_ids == layout.image_start_id)
  end = np.flatnonzero(f.input_ids == layout.image_end_id)
  assert len(start) == len(end) == f.num_images == 3
  np.testing.assert_array_equal(end - start, M + 1)
  for image, s in enumerate(start):
    np.testing.assert_array_equal(f.visual_index[s + 1:s + 1 + M], image * M + np.arange(M))
    np.testing.assert_array_equal(f.input_ids[s + 1:s + 1 + M], layout.slot_id)
  assert (f.visual_index >= 0).sum() == 3 * M
  # only the response image is a regression target; its start/end tokens carry labels
  np.testing.assert_array_equal(np.flatnonzero(f.visual_target_mask), start[1] + 1 + np.arange(M))
  assert f.labels[start[1]] == layout.image_start_id and f.labels[end[1]] == layout.image_end_id
  assert f.labels[start[0]] == IGNORE and f.labels[start[2]] == IGNORE
  # with the slots put back as <image>, the ids decode to the template's text
  text = chatml.apply_chat_template([{"role": r, "content": t} for r, t in turns], tokenize=False)
  decoded = chatml.decode(f.input_ids[f.visual_index < 0])
  assert decoded == text.replace("<image>", "<image_start><image_end>")


def test_too_long_is_a_record_error(chatml):
  layout = TokenLayout.from_tokenizer(chatml, M)
  with pytest.raises(RecordError, match="too_long"):
    format_conversation(TEXT_TURNS, chatml, layout, max_length=10)


def test_layout_needs_the_image_tokens(smollm2):
  with pytest.raises(ValueError, match="add_image_tokens"):
    TokenLayout.from_tokenizer(smollm2[1], M)


BAD = {
    "malformed_json": '{"id": 1, "conversations": [',
    "malformed_record": json.dumps({"conversations": [{"from": "human", "value": 3}]}),
    "empty_conversation": json.dumps({"conversations": []}),
    "unknown_role": json.dumps({"conversations": [{"from": "robot", "value": "hi"}]}),
    "non_alternating": json.dumps({"conversations": [{"from": "human", "value": "a"},
                                                     {"from": "human", "value": "b"}]}),
    "placeholder_mismatch": json.dumps({"image": ["a.png", "b.png"],
                                        "conversations": [{"from": "human", "value": "<image> hi"},
                                                          {"from": "gpt", "value": "yo"}]}),
}
GOOD = json.dumps({"id": "ok", "image": "a.png", "conversations": [
    {"from": "system", "value": "s"}, {"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "yo"}]})


@pytest.mark.parametrize("reason", sorted(BAD))
def test_each_bad_record_kind(reason):
  with pytest.raises(RecordError) as e:
    parse_line(BAD[reason])
  assert e.value.reason == reason


def test_read_records_counts_and_strict_names_the_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_text("\n".join([GOOD, *BAD.values(), GOOD]) + "\n")
  counts = DropCounts()
  kept = list(read_records(str(path), counts=counts))
  assert [where for where, _ in kept] == [f"{path}:1", f"{path}:8"]
  assert kept[0][1].turns[0] == ("system", "s") and kept[0][1].images == ("a.png",)
  assert counts.counts == {reason: 1 for reason in BAD}
  with pytest.raises(RecordError, match=r"data\.jsonl:2: malformed_json"):
    list(read_records(str(path), strict=True))


def test_json_list_files(tmp_path):
  path = tmp_path / "data.json"
  path.write_text(json.dumps([json.loads(GOOD), {"conversations": []}]))
  counts = DropCounts()
  assert len(list(read_records(str(path), counts=counts))) == 1
  assert counts.counts == {"empty_conversation": 1}
