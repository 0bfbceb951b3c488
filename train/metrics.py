"""Metrics: ``WORKDIR/metrics.jsonl`` (one object per logged step) and TensorBoard,
written by process 0; throughput and model FLOPs utilisation (MFU).

MFU = achieved model FLOPs / (devices x peak FLOP/s). Model FLOPs per trained
token follow PaLM (Chowdhery et al. 2022, appendix B):

  6 * N_trained + 2 * N_frozen_llm + 12 * L * d_model * T   (LLM; N without embeddings)
  + 2 * N_vision * patches_per_image * images / tokens        (frozen encoder, forward)

where T is the sequence length (attention), N_trained the trained parameters of the
LLM + projector + head and N_frozen_llm the frozen LLM parameters (forward +
backward through activations only is counted as 2N, a lower bound).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

# bf16 dense peak FLOP/s per device, by jax device_kind prefix.
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def peak_flops(configured: float = 0.0) -> float | None:
  """Peak FLOP/s of one device: the configured value, else the table's; None if unknown (CPU)."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)


def count_params(state_part) -> int:
  return sum(x.size for x in jax.tree.leaves(state_part))


def llm_flops_per_token(n_trained: int, n_frozen: int, layers: int, width: int, seq_len: int) -> float:
  return 6.0 * n_trained + 2.0 * n_frozen + 12.0 * layers * width * seq_len


# FLOPs formulas of the stages (``Stage.flops``): (model spec, abstract train state, sequence
# length) -> (model FLOPs per trained token, per image) of a step.

def metamorph_flops(spec, state, seq_len: int) -> tuple[float, float]:
  """The LLM as above; the frozen vision encoder's forward per image."""
  llm, vision = spec.config.llm, spec.config.vision
  n_vision = count_params(state.frozen["vision"])
  n_frozen_llm = count_params(state.frozen) - n_vision
  per_token = llm_flops_per_token(count_params(state.params), n_frozen_llm, llm.num_layers, llm.hidden_size,
                                  seq_len)
  return per_token, 2.0 * n_vision * vision.num_patches


def siglip_flops(spec, state, seq_len: int) -> tuple[float, float]:
  """Both towers train: 6 N per caption token (text tower), 6 N per patch (vision tower)."""
  del seq_len  # captions have data.text_len tokens, counted by the batch
  n_vision = count_params(state.params["vision"])
  return 6.0 * (count_params(state.params) - n_vision), 6.0 * n_vision * spec.config.vision.num_patches


def unmodelled_flops(spec, state, seq_len: int) -> tuple[float, float]:
  """No formula (the diffusion UNet's FLOPs): no MFU for the stage."""
  del spec, state, seq_len
  return 0.0, 0.0


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and a TensorBoard event file (process 0 only).

  Both are written synchronously in the caller's thread, at each ``write``: a failure
  (a full disk) is raised there, once, to the caller. No background thread or exit
  hook is left to fail again (tensorboardX's ``SummaryWriter`` has both).
  """

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    os.makedirs(os.path.join(workdir, "tensorboard"), exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import event_file_writer, summary  # slow import: tensorboardX (seconds), process 0 only
    from tensorboardX.proto import event_pb2
    self._summary, self._event = summary.scalar, event_pb2.Event
    self._tb = event_file_writer.EventsWriter(os.path.join(workdir, "tensorboard", "events"))

  def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
    if not self.active:
      return
    values = {f"{prefix}{k}": _scalar(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": step, **values}, sort_keys=True) + "\n")
    now = time.time()
    for name, value in values.items():
      if isinstance(value, (int, float)):
        self._tb.write_event(self._event(wall_time=now, step=step, summary=self._summary(name, value)))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      try:
        self._jsonl.close()
      finally:
        self._tb.close()


def _scalar(value: Any) -> Any:
  value = np.asarray(value)
  if value.size == 1:
    return value.item()
  return value.tolist()
