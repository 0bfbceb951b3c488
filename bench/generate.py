"""Decoding speed: ours (KV-cached, jitted while loop) vs transformers and vs the reference way.

  python -m bench.generate [--new-tokens 128] [--repeats 5] [--image-repeats 3] [--threads N]

1. SmolLM2-135M-Instruct greedy decoding, float32, the same chat prompt, ``--new-tokens``
   new tokens (no early stop), at batch 1 and 8: tokens/s of ``metamorph.generation.engine.Engine``
   vs transformers' ``generate`` (PyTorch), and the ratio ours / transformers.
2. One image answer (m = 64 visual tokens, then ``<image_end>``) from a MetaMorph on
   SmolLM2-135M (random projector and vision head, SO400M's width 1152; the prompt ends
   with ``<image_start>``): seconds with the cache vs ``reference_generate``, the reference
   implementation's way (no cache, the full forward over the sequence so far at each step,
   padded to a multiple of 32, host round trip per step), and the ratio.

Timings are medians after one warm-up (compilation) run; the two sides of each ratio run
alternately, so that both see the same load of the machine.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import numpy as np

QUESTION = "Write a short story about a lighthouse keeper."


def interleaved(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
  """Median seconds of ``a()`` and of ``b()``, run alternately (after one warm-up of each) so
  that both see the same machine load."""
  a(), b()  # warm-up: compilation, caches
  times: tuple[list[float], list[float]] = ([], [])
  for _ in range(repeats):
    for fn, out in ((a, times[0]), (b, times[1])):
      start = time.perf_counter()
      fn()
      out.append(time.perf_counter() - start)
  return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--image-repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=0,
                      help="limit both XLA and torch to this many CPU threads (0: their defaults)")
  args = parser.parse_args()
  if args.threads:  # before jax starts its CPU client
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                               f"intra_op_parallelism_threads={args.threads}").strip()

  import torch
  from flax import nnx
  from transformers import AutoModelForCausalLM

  from metamorph.convert import load_llm, smollm2_gguf_path
  from metamorph.generation.engine import Engine
  from metamorph.generation.prompts import Prompt
  from tests.reference_decoder import reference_generate
  from metamorph.models.metamorph import MetaMorph, MetaMorphConfig
  from metamorph.models.vocab import add_image_tokens
  from train.demo import machine

  path = smollm2_gguf_path()
  llm, tokenizer = load_llm(path)
  if args.threads:
    torch.set_num_threads(args.threads)
  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
  n = args.new_tokens
  engine = Engine(llm, eos_ids=())  # no stop token: exactly n new tokens
  print(f"machine: {machine.line(machine.info())}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), XLA threads: {args.threads or 'default'}")
  print(f"SmolLM2-135M greedy decoding, float32, prompt {len(prompt)} tokens, {n} new tokens, "
        f"median of {args.repeats}")
  for batch in (1, 8):
    prompts = [Prompt.text(prompt)] * batch
    ids = torch.tensor([prompt] * batch)
    mask = torch.ones_like(ids)

    def transformers_generate(ids=ids, mask=mask):
      with torch.inference_mode():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=tokenizer.pad_token_id)

    ours, theirs = interleaved(lambda prompts=prompts: engine.generate(prompts, max_new_tokens=n),
                               transformers_generate, args.repeats)
    tokens = batch * n
    print(f"  batch {batch}: ours {tokens / ours:8.1f} tokens/s ({ours:.2f}s), transformers "
          f"{tokens / theirs:8.1f} tokens/s ({theirs:.2f}s); ratio ours / transformers: {theirs / ours:.2f}x")

  model_llm, start, end = add_image_tokens(llm, tokenizer)
  config = MetaMorphConfig(llm=model_llm.config, vision_dim=1152, num_visual_tokens=64, image_start_id=start,
                           image_end_id=end)
  model = MetaMorph(config, rngs=nnx.Rngs(0), llm=model_llm)
  image_prompt = tokenizer.apply_chat_template(
      [{"role": "user", "content": "Generate an image of a red circle."}], add_generation_prompt=True,
      return_dict=True)["input_ids"] + tokenizer("Here is an image based on your request: ")["input_ids"] + [start]
  image_prompt = Prompt.text(image_prompt)
  steps = config.num_visual_tokens + 1
  image_engine = Engine(model, eos_ids=[tokenizer.eos_token_id])
  answer = image_engine.generate([image_prompt], max_new_tokens=steps)[0]
  assert answer.visual_tokens.shape == (1, 64, 1152) and answer.token_ids == [end], answer
  reference = reference_generate(model, image_prompt, max_new_tokens=steps, eos_ids=[tokenizer.eos_token_id])
  drift = float(np.abs(reference.visual_tokens - answer.visual_tokens).max())
  cached, naive = interleaved(
      lambda: image_engine.generate([image_prompt], max_new_tokens=steps),
      lambda: reference_generate(model, image_prompt, max_new_tokens=steps, eos_ids=[tokenizer.eos_token_id]),
      args.image_repeats)
  print(f"One image answer (64 visual tokens + <image_end>, prompt {len(image_prompt)} tokens), batch 1, float32 "
        f"(max |cached - reference| visual token difference {drift:.1e})")
  print(f"  cached engine: {cached:.2f}s, reference (full forward every step): {naive:.2f}s; "
        f"ratio reference / cached: {naive / cached:.1f}x")


if __name__ == "__main__":
  main()
