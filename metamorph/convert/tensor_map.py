"""How one of our parameters maps onto a transformers tensor (and back)."""
from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
  """Our parameter ``ours`` [shape] <-> a transformers tensor ``hf`` [hf_shape].

  From transformers: take rows ``rows`` (one part of a fused projection), then
  ``transpose`` (a permutation), then reshape to ``shape``. ``to_hf`` inverts it.
  """
  ours: str
  hf: str
  hf_shape: tuple[int, ...]
  shape: tuple[int, ...]
  transpose: tuple[int, ...] | None = None
  rows: tuple[int, int] | None = None

  def from_hf(self, value: np.ndarray) -> np.ndarray:
    if self.rows is not None:
      value = value[self.rows[0]:self.rows[1]]
    if self.transpose is not None:
      value = value.transpose(self.transpose)
    return value.reshape(self.shape)

  def to_hf(self, value: np.ndarray) -> np.ndarray:
    if self.rows is not None:
      raise NotImplementedError(f"{self.hf}: exporting one part of a fused tensor")
    if self.transpose is None:
      return value.reshape(self.hf_shape)
    permuted = tuple(self.hf_shape[i] for i in self.transpose)
    return value.reshape(permuted).transpose(np.argsort(self.transpose))

  def prefixed(self, ours: str, hf: str) -> TensorMap:
    return dataclasses.replace(self, ours=ours + self.ours, hf=hf + self.hf)
