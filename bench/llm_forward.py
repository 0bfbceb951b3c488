"""SmolLM2-135M forward throughput: ours (jax.jit, f32) vs transformers PyTorch (f32).

  python -m bench.llm_forward [--batch 8] [--length 256] [--repeats 5]

Both run the same weights (the Q4_1 GGUF dequantised to f32) on the same random
token batch; prints tokens/s of each and the ratio ours / transformers.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench.timing import time_it
from train.demo import machine


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--length", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()

  import torch
  from transformers import AutoModelForCausalLM

  from metamorph.convert import load_llm, smollm2_gguf_path
  path = smollm2_gguf_path()
  llm, _ = load_llm(path)
  ids = np.random.default_rng(0).integers(0, llm.config.vocab_size, (args.batch, args.length))
  tokens = args.batch * args.length

  graphdef, state = nnx.split(llm)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids))
  ids_jax = jnp.asarray(ids, jnp.int32)
  ours = time_it(lambda: forward(state, ids_jax).block_until_ready(), args.repeats)

  hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                            dtype=torch.float32).eval()
  ids_torch = torch.tensor(ids)
  with torch.inference_mode():
    theirs = time_it(lambda: hf(ids_torch), args.repeats)

  print(f"machine: {machine.line(machine.info())}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  print(f"SmolLM2-135M forward, batch {args.batch} x {args.length}, float32, median of {args.repeats}")
  print(f"  ours (jax.jit):         {tokens / ours:10.0f} tokens/s  ({ours * 1e3:.0f} ms)")
  print(f"  transformers (PyTorch): {tokens / theirs:10.0f} tokens/s  ({theirs * 1e3:.0f} ms)")
  print(f"  ratio ours / transformers: {theirs / ours:.2f}x")


if __name__ == "__main__":
  main()
