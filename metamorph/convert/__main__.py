"""Checkpoint conversion.

  python -m metamorph.convert llm SRC DST        # .gguf file or transformers folder -> ours
  python -m metamorph.convert siglip SRC DST     # transformers SigLIP folder -> ours
  python -m metamorph.convert export-hf SRC DST  # our (or any loadable) LLM -> transformers folder
  python -m metamorph.convert visualizer SRC DST # diffusers Stable Diffusion folder -> ours

Our checkpoints are folders with config.json, model.safetensors and the
tokenizer files; `metamorph.convert.load_llm(DST)` reads them.
"""
from __future__ import annotations

import argparse
import sys
import time

from metamorph.convert import ConversionError, read_llm


def _llm(args) -> str:
  from metamorph.convert import llama  # slow import: flax (`--help` needs none)
  model_config, params, tokenizer = read_llm(args.src)
  model = llama.build(model_config, params, args.src)
  llama.save_llm(model, tokenizer, args.dst)
  return f"{model_config.num_layers}-layer LLM, vocab {model_config.vocab_size}"


def _siglip(args) -> str:
  from metamorph.convert.siglip import convert_siglip  # slow import: flax
  convert_siglip(args.src, args.dst)
  return "SigLIP"


def _export_hf(args) -> str:
  from metamorph.convert import llama  # slow import: flax
  model_config, params, tokenizer = read_llm(args.src)
  llama.export_hf(llama.build(model_config, params, args.src), tokenizer, args.dst)
  return "transformers LlamaForCausalLM folder"


def _visualizer(args) -> str:
  from metamorph.convert.visualizer import convert_visualizer, count_params  # slow import: flax, diffusers
  params = convert_visualizer(args.src, args.dst)["params"]
  return (f"Stable Diffusion visualizer (UNet {count_params(params['unet']):,} and "
          f"VAE {count_params(params['vae']):,} parameters)")


COMMANDS = {
    "llm": (_llm, "a .gguf file, a transformers LLaMA folder or our folder -> our LLM checkpoint"),
    "siglip": (_siglip, "a transformers SigLIP folder -> our SigLIP checkpoint"),
    "export-hf": (_export_hf, "an LLM checkpoint (any of the above) -> a transformers folder"),
    "visualizer": (_visualizer, ("a local diffusers Stable Diffusion folder (unet/, vae/, scheduler/; "
                                 "safetensors weights) -> our visualizer checkpoint (diffusers Flax "
                                 "UNet and VAE parameters), without torch")),
}


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m metamorph.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (_, help_text) in COMMANDS.items():
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("src", help="source file or folder")
    p.add_argument("dst", help="destination folder (created)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.perf_counter()
  try:
    what = COMMANDS[args.command][0](args)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {what} to {args.dst} in {time.perf_counter() - start:.1f}s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
