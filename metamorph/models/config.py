"""The base of the models' frozen-dataclass configs: JSON-able, strict on unknown keys."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

C = TypeVar("C", bound="ModelConfig")


class ModelConfig:
  """Mixin for ``@dataclasses.dataclass(frozen=True)`` model configs."""

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Builds the config from ``to_dict``'s output; unknown keys are an error."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ValueError(f"unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**data)

  def replace(self: C, **changes) -> C:
    return dataclasses.replace(self, **changes)
