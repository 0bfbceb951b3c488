"""The shapes world's word-level tokenizer (a ``transformers.PreTrainedTokenizerFast``).

Vocabulary: the special tokens (``SPECIAL_TOKENS``, ``<pad>`` = 0), the newline,
ASCII punctuation, the digits, the chat roles, and every word of
``phrases.world_texts()`` (the generators' templates and phrase tables) in
lower-case and capitalised form: complete by construction, no sampling.

Pre-tokenization: runs of spaces/tabs are dropped, then each newline, digit,
punctuation character and run of ASCII letters is one token. Case is kept, so
``decode(encode(text)) == text`` for canonically spaced text (single spaces
between words, none before punctuation or around newlines), which every record
of the world is. The chat template is ChatML, as SmolLM2's.
"""
from __future__ import annotations

import re
import string
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from metamorph.shapes.phrases import world_texts
from metamorph.tokens import IM_END, IM_START, IMAGE_END, IMAGE_START

PAD, UNK = "<pad>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, IM_START, IM_END, IMAGE_START, IMAGE_END)
ROLES: tuple[str, ...] = ("system", "user", "assistant")

CHAT_TEMPLATE = (
  "{% for message in messages %}"
  "{{ '" + IM_START + "' + message['role'] + '\n' + message['content'] + '" + IM_END + "' + '\n' }}"
  "{% endfor %}"
  "{% if add_generation_prompt %}{{ '" + IM_START + "assistant\n' }}{% endif %}")

_SPACES = r"[^\S\n]+"  # whitespace other than the newline
_TOKEN = r"\n|[0-9]|[A-Za-z]+|[^\sA-Za-z0-9]"  # one token of the pre-tokenizer
# Applied to the decoded string, whose tokens were joined with single spaces.
_JOIN_RULES: tuple[tuple[str, str], ...] = (
  (" \n", "\n"), ("\n ", "\n"), (IM_START + " ", IM_START), (" " + IM_END, IM_END),
  *((" " + p, p) for p in ".,;:!?>)]}"), ("< ", "<"), ("( ", "("), ("[ ", "["), ("{ ", "{"))


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  """Splits on whitespace (dropped) and punctuation (kept), keeping newlines as tokens."""
  return pre_tokenizers.Sequence([
    pre_tokenizers.Split(Regex(_SPACES), behavior="removed"),
    pre_tokenizers.Split(Regex(_TOKEN), behavior="isolated"),
  ])


def words_of(texts: Iterable[str]) -> set[str]:
  """The set of pre-tokens of some texts."""
  return {w for t in texts for w in re.findall(_TOKEN, t)}


def vocabulary() -> list[str]:
  """Tokens in id order: specials, newline, punctuation, digits, then sorted words."""
  words = words_of(world_texts()) | set(ROLES)
  base = list(SPECIAL_TOKENS) + ["\n"] + list(string.punctuation) + list(string.digits)
  words = {v for w in words if w.isalpha() for v in (w.lower(), w.capitalize())} - set(base)
  return base + sorted(words)


def build_world_tokenizer(out_dir: str | None = None) -> PreTrainedTokenizerFast:
  """The world's tokenizer; saved with ``save_pretrained(out_dir)`` when given, so
  ``transformers.AutoTokenizer.from_pretrained(out_dir)`` loads it back."""
  vocab = {tok: i for i, tok in enumerate(vocabulary())}
  tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
  tok.pre_tokenizer = pre_tokenizer()
  tok.decoder = decoders.Sequence(
    [decoders.WordPiece(prefix="\ue000", cleanup=False),  # joins tokens with spaces
     decoders.Fuse()] + [decoders.Replace(a, b) for a, b in _JOIN_RULES])
  tok.add_special_tokens(list(SPECIAL_TOKENS))
  tokenizer = PreTrainedTokenizerFast(
    tokenizer_object=tok, pad_token=PAD, unk_token=UNK, eos_token=IM_END,
    additional_special_tokens=[IM_START, IMAGE_START, IMAGE_END],
    clean_up_tokenization_spaces=False, model_max_length=4096)
  tokenizer.chat_template = CHAT_TEMPLATE
  if out_dir is not None:
    tokenizer.save_pretrained(out_dir)
  return tokenizer
