"""The sampling loop: diffusers' DDIM (eta 0) or DPM-Solver++ (order 2) inside one
``jax.lax.fori_loop``, from pure noise or, as img2img (SDEdit), from a noised draft."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from metamorph.models.visualizer.config import VisualizerConfig
from metamorph.models.visualizer.diffusers_modules import SAMPLERS, scheduler


def static_number(x) -> float | None:
  """x as a Python float when it is concrete, else None (a tracer)."""
  try:
    return float(x)
  except (TypeError, jax.errors.ConcretizationTypeError):
    return None


def _clipping(config: VisualizerConfig, eps_fn, alphas_cumprod: jax.Array):
  """``eps_fn`` rewritten so that the x0 it implies is clipped to [-1, 1] (``clip_sample`` for
  DPM-Solver++, which diffusers' Flax version lacks: in pixel space at high noise,
  x0 = (x - sigma eps) / alpha amplifies the model's errors ~100x and the samples saturate)."""
  def clipped(x, t):
    out = eps_fn(x, t)
    a = jnp.sqrt(alphas_cumprod[t])
    s = jnp.sqrt(1.0 - alphas_cumprod[t])
    if config.prediction_type == "epsilon":
      x0 = jnp.clip((x - s * out) / a, -1.0, 1.0)
      return (x - a * x0) / s
    x0 = jnp.clip(a * x - s * out, -1.0, 1.0)  # v-prediction
    return (a * x - x0) / s
  return clipped


def strength_steps(steps: int, strength: float) -> int:
  """How many of ``steps`` an img2img run at ``strength`` takes: diffusers' int(steps * strength),
  but at least one (where diffusers would run none)."""
  return max(1, min(int(steps * strength), steps))


def denoise(config: VisualizerConfig, eps_fn, shape: tuple[int, ...], *, steps: int, rng: jax.Array,
            sampler: str = "ddim", init: jax.Array | None = None, strength: float = 1.0) -> jax.Array:
  """The sampling loop: noise of ``shape`` (NCHW) from ``rng``, then ``steps`` of diffusers'
  DDIM (eta 0) or DPM-Solver++ (order 2) with ``eps_fn(x, t) -> model output`` (epsilon or v,
  per ``config.prediction_type``), all inside one ``jax.lax.fori_loop``. Returns the final
  sample (DDIM: x_0; diffusers' Flax DPM-Solver stops at timestep 0, sigma ~ 0.01).

  With ``init`` (a clean sample of ``shape``) and ``strength`` < 1, as diffusers' img2img:
  ``init`` noised to the timestep of step ``steps - strength_steps(steps, strength)``, then
  the remaining steps."""
  solver = scheduler(sampler, config.schedule)
  state = solver.set_timesteps(solver.create_state(), steps, shape)
  noise = jax.random.normal(rng, shape, jnp.float32)
  start = 0
  if init is not None and strength < 1.0:
    start = steps - strength_steps(steps, strength)
    x = solver.add_noise(state, init.astype(jnp.float32), noise, state.timesteps[start])
  else:
    x = noise * state.init_noise_sigma
  if config.clip_sample and sampler == "dpm":
    eps_fn = _clipping(config, eps_fn, state.common.alphas_cumprod)

  def body(i, carry):
    x, state = carry
    t = state.timesteps[i]
    return solver.step(state, eps_fn(x, t), t, x, return_dict=False)

  if sampler == "ddim":  # DDIM's state is constant: close over it (keeps num_inference_steps static)
    return jax.lax.fori_loop(start, steps, lambda i, x: body(i, (x, state))[0], x)
  return jax.lax.fori_loop(start, steps, body, (x, state))[0]


def check_sampling(config: VisualizerConfig, steps, guidance, sampler) -> None:
  """ValueErrors for bad sampling arguments."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps must be an int >= 1, got {steps!r}")
  if steps > config.num_train_timesteps:
    raise ValueError(f"steps ({steps}) must be at most num_train_timesteps ({config.num_train_timesteps})")
  g = static_number(guidance)
  if g is not None and not g >= 0:
    raise ValueError(f"guidance must be >= 0, got {guidance!r}")
