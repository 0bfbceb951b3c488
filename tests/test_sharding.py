"""Every parameter of every model carries logical axis names the rules table knows; the
CPU backend splits into several devices on request."""
import os
import subprocess
import sys

import jax
import pytest
from flax import nnx

from metamorph import sharding
from metamorph.models import siglip as S
from metamorph.models.llama import Llama, LlamaConfig
from metamorph.models.metamorph import MetaMorph, MetaMorphConfig

LLM = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=4, attention_bias=True, mlp_bias=True)
ENCODER = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2)
VISION = S.SiglipVisionConfig(**ENCODER, image_size=16, patch_size=4)

MODELS = {
    "llama_untied_biases": lambda: Llama(LLM, rngs=nnx.Rngs(0)),
    "llama_tied": lambda: Llama(LLM.replace(tie_word_embeddings=True), rngs=nnx.Rngs(0)),
    "metamorph": lambda: MetaMorph(MetaMorphConfig(LLM, vision_dim=8, num_visual_tokens=4), rngs=nnx.Rngs(0)),
    "siglip": lambda: S.Siglip(S.SiglipConfig(VISION, S.SiglipTextConfig(**ENCODER)), rngs=nnx.Rngs(0)),
    "siglip_vision_no_head": lambda: S.SiglipVisionTower(VISION.replace(vision_use_head=False), rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_param_has_logical_axis_names(name):
  known = {axis for axis, _ in sharding.AXIS_RULES}
  flat = nnx.to_flat_state(nnx.state(nnx.eval_shape(MODELS[name]), nnx.Param))
  assert len(flat) > 10
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == len(var.shape), path
    assert set(names) - {None} <= known, (path, names)


def test_no_parameter_uses_a_mesh_axis_twice():
  for name, make in MODELS.items():
    for path, var in nnx.to_flat_state(nnx.state(nnx.eval_shape(make), nnx.Param)):
      axes = [a for a in sharding.logical_to_spec(var.get_metadata()["out_sharding"]) if a is not None]
      flat = [x for a in axes for x in ((a,) if isinstance(a, str) else a)]
      assert len(flat) == len(set(flat)), (name, path, axes)


def _cpu_devices_after(n: int, env: dict) -> int:
  """The CPU device count a fresh interpreter ends up with after ``use_cpu_devices(n)``."""
  code = ("import jax; from metamorph import sharding; "
          f"sharding.use_cpu_devices({n}); print(len(jax.devices('cpu')))")
  env = {**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu", **env}
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                       check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return int(out.stdout.split()[-1])


def test_use_cpu_devices_splits_the_cpu_before_jax_starts():
  assert _cpu_devices_after(2, {}) == 2
  assert _cpu_devices_after(0, {}) == 1


def test_use_cpu_devices_leaves_a_count_set_in_xla_flags():
  assert _cpu_devices_after(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == 3


def test_use_cpu_devices_warns_once_jax_has_started():
  before = len(jax.devices("cpu"))
  with pytest.warns(UserWarning, match="ignored: JAX started"):
    sharding.use_cpu_devices(before + 5)
  assert len(jax.devices("cpu")) == before
