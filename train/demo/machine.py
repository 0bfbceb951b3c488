"""What a timing was measured on: the demo's report and the bench scripts name the machine,
since two 2-core VMs of this project differ by 2x (docs/findings.md, section 10)."""
from __future__ import annotations

import os
import platform
from typing import Any

# /proc/cpuinfo flag -> vector instruction set, widest first
VECTOR_ISAS = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"), ("sve", "SVE"), ("asimd", "NEON"))


def cpu_from_cpuinfo(text: str) -> tuple[str | None, str | None]:
  """(model name, widest vector instruction set) from /proc/cpuinfo's text; None where absent."""
  model, flags = None, set()
  for line in text.splitlines():
    key, _, value = line.partition(":")
    key = key.strip().lower()
    if key in ("model name", "cpu model") and model is None:
      model = value.strip()
    elif key in ("flags", "features") and not flags:
      flags = set(value.split())
  return model, next((name for flag, name in VECTOR_ISAS if flag in flags), None)


def info() -> dict[str, Any]:
  """CPU model, logical cores, widest vector instruction set (None where unknown), JAX
  version, backend and device count."""
  import jax  # slow import: jax (about 2 s), for its version and devices only
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      cpu, isa = cpu_from_cpuinfo(f.read())
  except OSError:  # not Linux
    cpu, isa = None, None
  devices = jax.devices()
  return {"cpu": cpu or platform.processor() or platform.machine(), "vector_isa": isa,
          "cores": os.cpu_count(), "jax": jax.__version__, "backend": devices[0].platform,
          "devices": len(devices)}


def line(m: dict[str, Any]) -> str:
  """``info()``'s record in one line."""
  isa = f", {m['vector_isa']}" if m.get("vector_isa") else ""
  return (f"{m['cpu']} ({m['cores']} logical cores{isa}), JAX {m['jax']} on {m['backend']} "
          f"({m['devices']} device{'s' if m['devices'] != 1 else ''})")
