"""The grain pipeline: formatting + packing + batching, state, mixing, sharding."""
import io
import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from metamorph.data.conversation import TokenLayout
from metamorph.data.packing import PIPELINE_REASONS
from metamorph.data.pipeline import examples, make_dataset
from metamorph.data.records import RecordError

M, SIZE = 2, 4  # visual tokens per image, image side
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["[PAD]", "[UNK]", "<|im_start|>", "<|im_end|>", "<image_start>", "<image_end>"]
WORDS = ["user", "assistant", "system", "what", "is", "this", "a", "cat", "draw", "dog", "here", "it"]
# ids: [PAD] 0, [UNK] 1, <|im_start|> 2, <|im_end|> 3, <image_start> 4, <image_end> 5, user 6,
# assistant 7, system 8, what 9, is 10, this 11, a 12, cat 13, draw 14, dog 15, here 16, it 17
X = -100  # no label


def tiny_tokenizer() -> PreTrainedTokenizerFast:
  """A word-level tokenizer (whitespace split, so newlines vanish) with ChatML."""
  tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(SPECIALS + WORDS)}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.add_special_tokens(SPECIALS)
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                      eos_token="<|im_end|>",
                                      additional_special_tokens=["<|im_start|>", "<image_start>", "<image_end>"])
  tokenizer.chat_template = CHATML
  return tokenizer


def png(color: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> bytes:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return buf.getvalue()


def example(user: str, assistant: str, images=(), id_="") -> dict:
  """A stored example as ``tfds_builder`` writes it (text fields as bytes)."""
  turns = [["user", user], ["assistant", assistant]]
  return {"id": id_.encode(), "conversations": json.dumps(turns).encode(), "images": list(images),
          "extra": b"{}"}


def pipeline(source, **kwargs):
  tokenizer = tiny_tokenizer()
  defaults = dict(tokenizer=tokenizer, layout=TokenLayout.from_tokenizer(tokenizer, M), image_size=SIZE,
                  seq_len=32, images_per_row=2, batch_size=2, seed=0, num_epochs=1, shard_index=0,
                  shard_count=1, shuffle=False, read_threads=2)
  return make_dataset(source, **{**defaults, **kwargs})


def dropped(**counts) -> list[int]:
  return [counts.get(reason, 0) for reason in PIPELINE_REASONS]


ROUND_TRIP = [
    example("<image> what is this", "a cat", [png((255, 0, 0))], "A"),     # 15 tokens, prompt image
    example("draw a dog", "here <image>", [png((0, 0, 255))], "B"),        # 14 tokens, response image
    example("what is this " * 9, "a cat", [], "C"),                       # 35 tokens: too long
    example("what is it", "a dog", [], "D"),                              # 11 tokens: starts row 2
    example("<image> what", "a", [b"junk"], "E"),                          # corrupt image
    example("<image> <image> <image> what", "it", [png((0, 0, 0))] * 3, "F"),  # too many images
]
PAD3 = [0, 0, 0]
EXPECTED = {
    "input_ids": [
        [2, 6, 4, 0, 0, 5, 9, 10, 11, 3, 2, 7, 12, 13, 3] + [2, 6, 14, 12, 15, 3, 2, 7, 16, 4, 0, 0, 5, 3] + PAD3,
        [2, 6, 9, 10, 17, 3, 2, 7, 12, 15, 3] + [0] * 21],
    "labels": [
        [X] * 12 + [12, 13, 3] + [X] * 8 + [16, 4, X, X, 5, 3] + [X] * 3,
        [X] * 8 + [12, 15, 3] + [X] * 21],
    "visual_index": [
        [-1, -1, -1, 0, 1] + [-1] * 20 + [2, 3] + [-1] * 5,
        [-1] * 32],
    "visual_target_mask": [
        [False] * 25 + [True, True] + [False] * 5,
        [False] * 32],
    "segment_ids": [[1] * 15 + [2] * 14 + PAD3, [1] * 11 + [0] * 21],
    "positions": [list(range(15)) + list(range(14)) + PAD3, list(range(11)) + [0] * 21],
    "image_mask": [[True, True], [False, False]],
    "dropped": [dropped(too_long=1), dropped(corrupt_image=1, too_many_images=1)],
}


def test_round_trip_formats_packs_and_batches_exactly():
  batches = list(pipeline(ROUND_TRIP, open_rows=1))  # greedy: rows in record order
  assert len(batches) == 1
  batch = batches[0]
  for key, expected in EXPECTED.items():
    np.testing.assert_array_equal(batch[key], np.asarray(expected), err_msg=key)
    assert batch[key].shape[0] == 2
  for key in ("input_ids", "labels", "visual_index", "segment_ids", "positions", "dropped"):
    assert batch[key].dtype == np.int32, key
  assert batch["images"].shape == (2, 2, SIZE, SIZE, 3) and batch["images"].dtype == np.float32
  red, blue = np.array([1.0, -1.0, -1.0]), np.array([-1.0, -1.0, 1.0])
  np.testing.assert_allclose(batch["images"][0, 0], np.broadcast_to(red, (SIZE, SIZE, 3)), atol=1e-6)
  np.testing.assert_allclose(batch["images"][0, 1], np.broadcast_to(blue, (SIZE, SIZE, 3)), atol=1e-6)
  assert not batch["images"][1].any()


def test_strict_raises_at_the_first_unusable_record():
  with pytest.raises(RecordError, match="record 'C'.*too_long"):
    list(pipeline(ROUND_TRIP, strict=True))


def _stream_source(n: int = 40) -> list[dict]:
  """Records of varied lengths and image counts."""
  rng = np.random.default_rng(1)
  records = []
  for i in range(n):
    k = int(rng.integers(0, 3))
    words = " ".join(rng.choice(WORDS[3:], int(rng.integers(1, 12))))
    records.append(example("<image> " * k + words, "a cat", [png((i, 2 * i, 3 * i))] * k, str(i)))
  records.append(example("what is this " * 12, "a", [], "long"))  # 44 tokens
  return records


def test_first_fit_fills_an_older_open_row():
  """Records of 20, 20, 11, 11 tokens in rows of 32: greedy needs three rows, two open rows
  take two ([20, 11] twice); rows come out oldest first."""
  source = [example("what is this " * 4 + "a", "a", [], "20a"), example("what is this " * 4 + "a", "a", [], "20b"),
            example("what is it", "a dog", [], "11a"), example("what is it", "a dog", [], "11b")]
  lengths = {}
  for open_rows in (1, 2):
    rows = [row for batch in pipeline(source, open_rows=open_rows, batch_size=1) for row in batch["segment_ids"]]
    lengths[open_rows] = [np.bincount(row)[1:].tolist() for row in rows]
  assert lengths == {1: [[20], [20, 11], [11]], 2: [[20, 11], [20, 11]]}


@pytest.mark.parametrize("open_rows", [1, 4])
def test_iterator_state_round_trips_through_json(open_rows):
  """Saved after any batch, the state resumes the same batches (open rows re-read)."""
  kwargs = dict(num_epochs=None, shuffle=True, seq_len=40, images_per_row=3, open_rows=open_rows)
  it = iter(pipeline(_stream_source(), **kwargs))
  states, batches = [], []
  for _ in range(8):
    states.append(json.dumps(it.get_state()))
    batches.append(next(it))
  for start in (1, 3, 6):
    restored = iter(pipeline(_stream_source(), **kwargs))  # a new pipeline, as after a restart
    restored.set_state(json.loads(states[start]))
    for want in batches[start:]:
      got = next(restored)
      assert got.keys() == want.keys()
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key}, resumed at batch {start}")


def _records(batches) -> list[tuple[int, ...]]:
  """The packed records' token ids, one tuple per segment of every row."""
  return [tuple(row[seg == k].tolist()) for b in batches for row, seg in zip(b["input_ids"], b["segment_ids"])
          for k in range(1, seg.max() + 1)]


def test_every_record_is_packed_once_and_every_drop_counted_once():
  source = _stream_source()
  packed = {}
  for open_rows in (1, 4):
    batches = list(pipeline(source, seq_len=40, images_per_row=3, batch_size=1, open_rows=open_rows))
    assert sum(b["dropped"].sum(axis=0) for b in batches).tolist() == dropped(too_long=1)
    packed[open_rows] = _records(batches)
  assert len(packed[1]) == len(source) - 1
  assert packed[4] != packed[1] and sorted(packed[4]) == sorted(packed[1])  # reordered, none lost


def test_mixture_follows_the_weights():
  first = [{"source": 0, "i": i} for i in range(50)]
  second = [{"source": 1, "i": i} for i in range(30)]
  ds = examples([(first, 0.7), (second, 0.3)], seed=3, num_epochs=None, shard_index=0, shard_count=1)
  fraction = np.mean([ds[i]["source"] == 0 for i in range(10_000)])
  assert abs(fraction - 0.7) < 0.02


def test_shards_are_disjoint_and_cover_the_data():
  source = [{"i": i} for i in range(101)]
  shards = [[e["i"] for e in examples(source, seed=5, num_epochs=1, shard_index=k, shard_count=2)]
            for k in range(2)]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == list(range(101))
  assert shards[0] != sorted(shards[0])  # shuffled
