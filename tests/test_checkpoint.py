"""metamorph.checkpoint on a CPU host split into two XLA devices (a subprocess: the
device count is fixed when JAX starts)."""
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
  import sys
  import jax
  import numpy as np
  from metamorph import checkpoint, sharding
  sharding.use_cpu_devices(2)
  compiles = []
  jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
  replicated = jax.sharding.NamedSharding(sharding.make_mesh(data=2, fsdp=1), jax.sharding.PartitionSpec())
  rng = np.random.default_rng(0)
  state = {f"w{i}": jax.device_put(rng.normal(size=(i + 3, 5)).astype(np.float32), replicated) for i in range(6)}
  ckpt = checkpoint.Checkpoints(sys.argv[1], with_data=False)
  before = len(compiles)
  ckpt.save(1, state, {"note": "test"})
  ckpt.wait()
  saved = len(compiles) - before
  assert checkpoint.verify(f"{sys.argv[1]}/checkpoints/1", 1) is None, "sealed by its manifest"
  restored, meta, step = ckpt.restore(checkpoint.abstract_like(state, {k: replicated for k in state}))
  ckpt.close()
  assert step == 1 and meta == {"note": "test"}, (step, meta)
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored[k].sharding == replicated
  print("compiles during save:", saved)
""")


def test_replicated_save_compiles_nothing_and_restores_exactly(tmp_path):
  """Orbax's replica-parallel default would slice each replicated array with an eager op,
  a compile per shape (six here); the CPU handler writes whole arrays."""
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}, "JAX_PLATFORMS": "cpu"},
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "compiles during save: 0" in out.stdout, out.stdout
