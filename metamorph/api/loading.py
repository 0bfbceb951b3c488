"""Loading a model for the API: which checkpoint, which tokenizer, which visualizer.

``load`` reads a MetaMorph checkpoint (a training workdir or its ``model`` folder) or a
plain LLM (a ``.gguf`` file, a transformers folder, our converted LLM folder, or
``"smollm2"``). A MetaMorph checkpoint names the visualizer that draws its images
(config.json's ``"visualizer"``); that visualizer must have learned the tokens of the
checkpoint's own SigLIP tower.
"""
from __future__ import annotations

import os
import warnings
from typing import Any

import jinja2
import numpy as np
from flax import nnx

from metamorph import model_folder
from metamorph.api.model import MetaMorphModel
from metamorph.convert import load_llm, smollm2_gguf_path
from metamorph.files import ConversionError
from metamorph.params import module_params

# bf16 rounding (a relative error <= 2**-8) when one of the two stages stored its tower in bf16
_ENCODER_RTOL, _ENCODER_ATOL = 1e-2, 1e-6


def load(path: str, visualizer: Any = None, *, route: str = "vpit") -> MetaMorphModel:
  """A ``MetaMorphModel`` from a MetaMorph checkpoint or a plain LLM (see the module doc).

  ``visualizer``: a visualizer checkpoint path (or a ``Visualizer`` module); by default
  the one the checkpoint names (``config.json``'s ``"visualizer"``, written from
  ``model.visualizer_from`` at training time), else none. A path's SigLIP tower must
  have the checkpoint's weights (``ConversionError`` otherwise). ``route``: the output
  route of the answers' visual tokens (``metamorph.routes``).
  """
  source = smollm2_gguf_path() if path == "smollm2" else os.fspath(path)
  if not os.path.exists(source):
    raise ConversionError(f"{source}: no such checkpoint (a training workdir, a converted folder, "
                          "a transformers folder, a .gguf file, or 'smollm2')")
  folder = model_folder.exported(source) if os.path.isdir(source) else source
  kind = model_folder.kind_of(folder) if os.path.isdir(folder) else None
  if kind == model_folder.VISUALIZER:
    raise ConversionError(f"{source}: holds a visualizer; load the MetaMorph checkpoint and pass this "
                          "one as visualizer=")
  if kind not in (None, model_folder.METAMORPH, model_folder.LLM):
    raise ConversionError(f"{source}: holds {model_folder.KINDS[kind]}; metamorph.load reads "
                          f"{model_folder.KINDS[model_folder.METAMORPH]} or {model_folder.KINDS[model_folder.LLM]}")
  if kind == model_folder.METAMORPH:
    model, tokenizer, meta = model_folder.read_metamorph(folder, remat="none")
    if visualizer is None and meta.get("visualizer"):
      visualizer = _resolve(meta["visualizer"], source, folder)
      if visualizer is None:
        warnings.warn(f"{folder}: its visualizer {meta['visualizer']!r} was not found; images will come "
                      "back as visual tokens only", stacklevel=2)
  else:
    model, tokenizer = load_llm(folder)
  if tokenizer is None:
    raise ConversionError(f"{source}: ships no tokenizer; generation needs one")
  _check_chat_template(tokenizer, folder)
  if isinstance(visualizer, (str, os.PathLike)):
    trained = load_visualizer_model(os.fspath(visualizer))
    if kind == model_folder.METAMORPH and model.vision is not None:
      _check_same_encoder(model.vision, trained.vision, source, os.fspath(visualizer))
    visualizer = trained.visualizer
  return MetaMorphModel(model, tokenizer, visualizer=visualizer, route=route, source=source)


def load_visualizer_model(path: str):
  """The ``VisualizerModel`` (frozen SigLIP tower + visualizer) of a visualizer-stage
  workdir or its exported folder."""
  return model_folder.read_visualizer(model_folder.exported(path))


def _resolve(entry: str, checkpoint: str, folder: str) -> str | None:
  """A path from a checkpoint's meta: as given (relative to the working directory),
  else relative to the checkpoint; None when neither exists."""
  if not isinstance(entry, str):
    raise ConversionError(f"{folder}/config.json: 'visualizer' is {entry!r}, not a path; set it to the "
                          "visualizer's workdir or folder, or remove it")
  candidates = [entry] if os.path.isabs(entry) else [entry, os.path.join(checkpoint, entry),
                                                     os.path.join(folder, entry)]
  return next((c for c in candidates if os.path.exists(c)), None)


def _check_chat_template(tokenizer, folder: str) -> None:
  """Raises ``ConversionError`` now, not at the first prompt, when the tokenizer's chat
  template does not render a one-message conversation (a damaged template file)."""
  if not getattr(tokenizer, "chat_template", None):
    return
  try:
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
  except jinja2.TemplateError as e:
    raise ConversionError(f"{folder}: the tokenizer's chat template does not render ({type(e).__name__}: {e}); "
                          "repair or remove chat_template.jinja (or tokenizer_config.json's chat_template)") from e


def _token_params(tower: nnx.Module) -> dict[str, np.ndarray]:
  """The SigLIP tower's tensors its visual tokens depend on (not the MAP head, not post_ln)."""
  return {k: v for k, v in module_params(tower).items() if not k.startswith(("head/", "post_ln/"))}


def _check_same_encoder(ours: nnx.Module, theirs: nnx.Module, source: str, visualizer: str) -> None:
  """Raises unless the visualizer's SigLIP tower (whose tokens it learned to draw) has the
  checkpoint's tower's weights: another encoder's tokens would be drawn as noise."""
  a, b = _token_params(ours), _token_params(theirs)
  differ = sorted(set(a) ^ set(b)) or [
    k for k in sorted(a) if a[k].shape != b[k].shape or not np.allclose(
      a[k].astype(np.float32), b[k].astype(np.float32), rtol=_ENCODER_RTOL, atol=_ENCODER_ATOL)]
  if differ:
    raise ConversionError(
      f"{visualizer}: this visualizer was trained on another SigLIP encoder's tokens than {source} predicts "
      f"({len(differ)} of the vision towers' tensors differ, e.g. {differ[0]!r}); pass a visualizer trained "
      "with the same encoder (the same model.siglip_init in both stages)")
