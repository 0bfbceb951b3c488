"""One chat turn with a text LLM: ``python -m metamorph.chat --model PATH "message"``.

PATH is a .gguf file, a transformers folder or a converted checkpoint;
``smollm2`` names the SmolLM2-135M-Instruct GGUF that `make setup` installs.
"""
from __future__ import annotations

import argparse
import sys
import time

from metamorph.convert import ConversionError, load_llm, smollm2_gguf_path
from metamorph.generate import greedy_generate


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m metamorph.chat", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("message", help="the user's message")
  parser.add_argument("--model", default="smollm2", help="checkpoint path, or 'smollm2' (default)")
  parser.add_argument("--system", default=None, help="optional system prompt")
  parser.add_argument("--max-new-tokens", type=int, default=64)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  path = smollm2_gguf_path() if args.model == "smollm2" else args.model
  start = time.perf_counter()
  try:
    llm, tokenizer = load_llm(path)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if tokenizer is None or not tokenizer.chat_template:
    print(f"error: {path} has no tokenizer with a chat template", file=sys.stderr)
    return 2
  print(f"loaded {path} ({llm.config.num_layers} layers) in {time.perf_counter() - start:.1f}s")
  messages = ([{"role": "system", "content": args.system}] if args.system else [])
  messages.append({"role": "user", "content": args.message})
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
  start = time.perf_counter()
  [answer] = greedy_generate(llm, [prompt], max_new_tokens=args.max_new_tokens,
                             eos_ids=[tokenizer.eos_token_id], pad_id=tokenizer.pad_token_id or 0)
  elapsed = time.perf_counter() - start
  print(f"user: {args.message}")
  print(f"assistant: {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
  print(f"({len(answer)} tokens in {elapsed:.1f}s, including compilation)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
