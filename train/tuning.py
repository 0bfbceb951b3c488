"""The tuning-mode registry: how a stage's trainable parameters train.

A stage (``train.stages``) says *which* parameters its method trains; the tuning mode, chosen
by ``config.tuning.mode``, says *how*. The trainer applies a mode in these places:

  transform(model, seed) the built model, pretrained weights loaded -> the model that trains
                         (a mode may add parameters, e.g. LoRA's low-rank factors, drawn from
                         ``seed``); a mode that needs an LLM raises ValueError for a model
                         without one;
  trainable(filter)      the stage's trainable nnx filter -> the parameters that train (a mode
                         may narrow it, e.g. a frozen LLM, or extend it, e.g. LoRA's factors);
  new_rows_only          of the LLM's embedding / LM head only the new token rows train
                         (``Stage.with_new_tokens``), even where the stage trains them in full;
  prepare(model, key)    inside the train step's loss, on the model about to run (e.g. LoRA's
                         dropout keys); evaluation and export never call it;
  merge(model)           the trained model -> the model to export, with the stage's own
                         parameter paths (e.g. LoRA folds its factors back into the kernels, in
                         place), so an export loads like any other;
  export(model, folder, base)  the trained model *before* ``merge`` -> extra files next to the
                         exported model in ``folder`` (e.g. LoRA's PEFT adapter folder
                         ``folder/lora``); ``base`` names the pretrained LLM (``model.llm_init``).

  full        the stage's trainable parameters train in full.
  frozen_llm  the LLM is frozen: only the stage's trainables outside it (projector, vision
              head) and the new token rows of its embedding / LM head train (X-LLM).
  lora        low-rank adapters on the LLM's projections ``config.tuning.lora.targets``
              (MultiModal-GPT: r=16, alpha=16 on q, k, v, o) train, with frozen_llm's set.

Adding a mode: write a function ``(**options) -> TuningMode`` and add it to ``MODES``; its
options are the fields of ``config.tuning.<mode name>`` (add them, with their defaults, in
``train/defaults.py``), passed as keyword arguments; a mode without such a sub-dict takes none.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
from flax import nnx

from metamorph.convert import peft
from metamorph.files import ConversionError, read_json
from metamorph.layers import lora as lora_layer
from train import token_rows

Filter = Any  # an nnx filter: nnx.Param, nnx.All(...), or a callable (path, value) -> bool

LLM = ("llm",)                                            # the LLM's path prefix in a MetaMorph model
PEFT_DIR = "lora"                                         # WORKDIR/model/lora: the PEFT adapter folder


def _same_model(model: nnx.Module, seed: int = 0) -> nnx.Module:
  del seed
  return model


def _same(x):
  return x


def _nothing(*args) -> None:
  del args


@dataclasses.dataclass(frozen=True)
class TuningMode:
  name: str
  transform: Callable[[nnx.Module, int], nnx.Module] = _same_model
  trainable: Callable[[Filter], Filter] = _same
  new_rows_only: bool = False
  prepare: Callable[[nnx.Module, jax.Array], None] = _nothing
  merge: Callable[[nnx.Module], nnx.Module] = _same
  export: Callable[[nnx.Module, str, str], None] = _nothing


def _no_options(name: str, options: Mapping) -> None:
  if options:
    raise ValueError(f"config.tuning: the tuning mode {name!r} takes no options, got {sorted(options)}")


def full(**options) -> TuningMode:
  """The stage's trainable parameters train in full."""
  _no_options("full", options)
  return TuningMode("full")


# ----------------------------------------------------------------------------- a frozen LLM

def _require_llm(mode: str, model: nnx.Module) -> None:
  if not isinstance(getattr(model, LLM[0], None), nnx.Module):
    raise ValueError(f"config.tuning.mode {mode!r} tunes around an LLM, and this stage's model "
                     f"({type(model).__name__}) has none: use config.tuning.mode=full")


def _outside_llm(trainable: Filter) -> Callable[[tuple, Any], bool]:
  """The stage's trainables outside the LLM, plus its token tables (their new rows train)."""
  def keep(path: tuple, value: Any) -> bool:
    return (nnx.filterlib.to_predicate(trainable)(path, value)
            and (path[:1] != LLM or token_rows.is_table(path)))
  return keep


def _frozen_llm_transform(model: nnx.Module, seed: int = 0) -> nnx.Module:
  del seed
  _require_llm("frozen_llm", model)
  return model


def frozen_llm(**options) -> TuningMode:
  """The LLM stays frozen; the stage's other trainables and the new token rows train."""
  _no_options("frozen_llm", options)
  return TuningMode("frozen_llm", transform=_frozen_llm_transform, trainable=_outside_llm, new_rows_only=True)


# ----------------------------------------------------------------------------- LoRA

@dataclasses.dataclass(frozen=True)
class LoraOptions:
  """``config.tuning.lora``: adapters of rank ``rank`` scaled by alpha / rank on the LLM's
  projections named in ``targets``, dropout ``dropout`` on their input while training."""
  rank: int = 16
  alpha: float = 16.0
  dropout: float = 0.05
  targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  from_peft: str = ""   # a PEFT LoRA folder to start the adapters from (its r, alpha, targets must match)

  def __post_init__(self):
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f"config.tuning.lora.rank must be an integer >= 1, got {self.rank!r}")
    if not self.alpha > 0:
      raise ValueError(f"config.tuning.lora.alpha must be > 0, got {self.alpha!r}")
    if not 0 <= self.dropout < 1:
      raise ValueError(f"config.tuning.lora.dropout must be in [0, 1), got {self.dropout!r}")
    if not self.targets:
      raise ValueError("config.tuning.lora.targets names no module; e.g. q_proj,k_proj,v_proj,o_proj "
                       "(and gate_proj,up_proj,down_proj for the MLP)")


def parse_targets(targets: str | Iterable[str]) -> tuple[str, ...]:
  """"q_proj, v_proj" (or a sequence of names) -> ("q_proj", "v_proj")."""
  names = targets.split(",") if isinstance(targets, str) else list(targets)
  return tuple(n.strip() for n in names if n.strip())


def _lora_trainable(trainable: Filter) -> Callable[[tuple, Any], bool]:
  outside = _outside_llm(trainable)
  return lambda path, value: isinstance(value, lora_layer.LoraParam) or outside(path, value)


def _check_peft_folder(options: LoraOptions) -> None:
  """The PEFT folder's r, lora_alpha and target modules are the config's (an adapter is read as
  it was trained; the config states what trains)."""
  path = os.path.join(options.from_peft, peft.CONFIG_FILE)
  try:
    folder = read_json(path)
  except ConversionError as e:
    raise ValueError(f"config.tuning.lora.from_peft: {e}") from e
  theirs = {"rank": folder.get("r"), "alpha": folder.get("lora_alpha"),
            "targets": folder.get("target_modules")}
  ours = {"rank": options.rank, "alpha": options.alpha, "targets": sorted(options.targets)}
  if isinstance(theirs["targets"], list):
    theirs["targets"] = sorted(theirs["targets"])
  for field, value in ours.items():
    if theirs[field] != value and not (field == "alpha" and theirs[field] is not None
                                       and float(theirs[field]) == value):
      raise ValueError(f"config.tuning.lora.{field} is {value!r}, the PEFT folder {path} has {theirs[field]!r}: "
                       f"set --config.tuning.lora.{field} to match it")


def _lora_transform(options: LoraOptions, model: nnx.Module, seed: int = 0) -> nnx.Module:
  _require_llm("lora", model)
  if options.from_peft:
    _check_peft_folder(options)
    try:
      peft.read_peft_adapter(model, options.from_peft, seed=seed)
    except ConversionError as e:
      raise ValueError(f"config.tuning.lora.from_peft: {e}") from e
    for _, layer in lora_layer.lora_layers(model):
      layer.dropout = options.dropout  # this run's, not the folder's
    return model
  try:
    lora_layer.add_lora(model, options.targets, rank=options.rank, alpha=options.alpha, dropout=options.dropout,
                        under=LLM, seed=seed)
  except lora_layer.LoraConfigError as e:
    raise ValueError(f"config.tuning.lora.{e.field}: {e}") from e
  return model


def _lora_prepare(model: nnx.Module, key: jax.Array) -> None:
  lora_layer.set_dropout_key(model, key)


def _lora_export(model: nnx.Module, folder: str, base: str = "") -> None:
  """The LLM's adapters as a PEFT folder, ``folder/lora`` (before they are merged)."""
  peft.write_peft_adapter(model.llm, os.path.join(folder, PEFT_DIR), base_model_name_or_path=base)


def lora(**options) -> TuningMode:
  """Low-rank adapters on the LLM's ``targets`` projections train, with frozen_llm's set
  (the stage's trainables outside the LLM, the new token rows); the export merges them."""
  fields = {f.name for f in dataclasses.fields(LoraOptions)}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"config.tuning.lora has no field(s) {unknown}; its fields are {', '.join(sorted(fields))}")
  if "targets" in options:
    options = {**options, "targets": parse_targets(options["targets"])}
  settings = LoraOptions(**options)
  return TuningMode(
      "lora", transform=lambda model, seed=0: _lora_transform(settings, model, seed), trainable=_lora_trainable,
      new_rows_only=True, prepare=_lora_prepare if settings.dropout else _nothing, merge=lora_layer.merge_lora,
      export=_lora_export)


MODES: dict[str, Callable[..., TuningMode]] = {"full": full, "frozen_llm": frozen_llm, "lora": lora}


def get(name: str, **options) -> TuningMode:
  """The tuning mode ``name`` with its ``options``; a clear error for an unknown one."""
  if name not in MODES:
    raise ValueError(f"config.tuning.mode is {name!r}; use one of {', '.join(MODES)}")
  return MODES[name](**options)


def from_config(tuning: Any) -> TuningMode:
  """The mode ``config.tuning`` names, with the options of its own sub-dict
  ``config.tuning.<mode>`` (none where there is no such sub-dict)."""
  name = tuning.mode
  own = tuning.get(name) if name in MODES else None  # an unknown name: get() says which are known
  options = own.to_dict() if hasattr(own, "to_dict") else dict(own or {})
  return get(name, **options)
