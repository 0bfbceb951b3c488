"""Language kept: plain questions from outside the shapes world, asked of a pretrained LLM
before VPiT and of the MetaMorph it became after, graded by word match.

The questions are ones SmolLM2-135M-Instruct answers right (greedy, 32 new tokens, its chat
template and default system prompt; picked once from 22 candidates, so its "before" is 12 of
12 by construction): what is measured is how many of them the morphed model still answers.
They use none of the world's words (colours, shapes, positions, sizes). An answer is right
when it contains one of the expected answers as a whole word, case-insensitively ("7" or
"seven" for the days of a week).
"""
from __future__ import annotations

import re
from typing import Any

import metamorph

MAX_NEW_TOKENS = 32
# (question, accepted answers)
QUESTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
  ("What is the capital of France?", ("Paris",)),
  ("What is the capital of Japan?", ("Tokyo",)),
  ("What is the capital of Germany?", ("Berlin",)),
  ("How many days are in a week?", ("7", "seven")),
  ("Who wrote Romeo and Juliet?", ("Shakespeare",)),
  ("What is the chemical formula of water?", ("H2O",)),
  ("What is 2 + 2?", ("4", "four")),
  ("What language is spoken in Brazil?", ("Portuguese",)),
  ("What is the opposite of hot?", ("cold",)),
  ("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
  ("At what temperature in Celsius does water boil?", ("100",)),
  ("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
)


def correct(answer: str, accepted: tuple[str, ...]) -> bool:
  """``answer`` contains one of ``accepted`` as a whole word (case-insensitive)."""
  return any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", answer, re.IGNORECASE) for a in accepted)


def ask(mm, questions: tuple[tuple[str, tuple[str, ...]], ...] = QUESTIONS) -> dict[str, Any]:
  """Greedy answers of ``mm`` (a ``metamorph.load`` model) to ``questions``, graded:
  {"accuracy", "n", "answers": [{"question", "answer", "expected", "ok"}]}."""
  outs = mm.generate([q for q, _ in questions], max_new_tokens=MAX_NEW_TOKENS)
  answers = [{"question": q, "answer": o.text, "expected": list(a), "ok": correct(o.text, a)}
             for (q, a), o in zip(questions, outs)]
  return {"accuracy": sum(x["ok"] for x in answers) / len(answers), "n": len(answers), "answers": answers}


def compare(before: dict[str, Any], after: dict[str, Any], before_model: str, after_model: str) -> dict[str, Any]:
  """Two ``ask`` results of the same questions, before and after VPiT, side by side; "kept": the
  fraction of the questions answered right before that are still answered right after (None
  when none was)."""
  pairs = [(b["ok"], a["ok"]) for b, a in zip(before["answers"], after["answers"])]
  right_before = [a for b, a in pairs if b]
  return {"before": before, "after": after, "before_model": before_model, "after_model": after_model,
          "kept": sum(right_before) / len(right_before) if right_before else None}


def language_kept(before: str, after: str) -> dict[str, Any]:
  """``compare`` of ``ask`` of the LLM at ``before`` (e.g. the GGUF file) and of the MetaMorph
  at ``after`` (its vpit workdir)."""
  return compare(ask(metamorph.load(before)), ask(metamorph.load(after)), before, after)


def _percent(x) -> str:
  return "n/a" if x is None else f"{100 * x:.0f}%"


def summary(results: dict[str, Any]) -> str:
  n = results["before"]["n"]
  return (f"general questions: {_percent(results['before']['accuracy'])} before VPiT, "
          f"{_percent(results['after']['accuracy'])} after (n={n}); kept {_percent(results['kept'])}")


def cell(x: dict) -> str:
  """A markdown table cell of one graded answer of ``ask``: right or not, and its text."""
  text = " ".join(x["answer"].split()).replace("|", "\\|")
  return ("yes: " if x["ok"] else "no: ") + f"`{text[:80]}`"


def markdown(results: dict[str, Any]) -> list[str]:
  """The report's section: both scores and every answer."""
  lines = ["## Language kept (general questions)", "",
           f"{summary(results)}. Before: `{results['before_model']}`; after: `{results['after_model']}`.", "",
           "| question | expected | before | after |", "|---|---|---|---|"]
  for b, a in zip(results["before"]["answers"], results["after"]["answers"]):
    lines.append(f"| {b['question']} | {' / '.join(b['expected'])} | {cell(b)} | {cell(a)} |")
  return lines


def append_to_report(path: str, results: dict[str, Any]) -> None:
  """Appends ``markdown(results)`` to the report at ``path``."""
  with open(path, "a", encoding="utf-8") as f:
    f.write("\n" + "\n".join(markdown(results)) + "\n")
