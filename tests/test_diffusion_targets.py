"""The visualizer's diffusion training targets against diffusers' (PyTorch) ``DDPMScheduler``:
the noised sample is ``add_noise`` and the target is the noise (epsilon) or ``get_velocity``
(v_prediction), for every beta schedule the config allows, at the same timesteps and noise,
float32. (tests/test_visualizer.py checks that the loss regresses the UNet on them.)"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from metamorph.models import visualizer as V

# (beta_schedule, beta_start, beta_end): the presets' schedules (toy: linear, sd15: scaled_linear)
# and the cosine one (its betas come from alpha_bar, beta_start / beta_end are unused)
SCHEDULES = [("linear", 0.0001, 0.02), ("scaled_linear", 0.00085, 0.012), ("squaredcos_cap_v2", 0.0001, 0.02)]
# float32 on both sides. The two cumulative products of the alphas differ by an ulp or so
# (<= 6e-7); near t = 0, where alphas_cumprod is ~1, that is up to 3e-6 in sqrt(1 - a_t), the
# noise's coefficient (|noise| < 4 here). An off-by-one timestep moves the coefficients by > 1e-4.
ATOL = 1e-5


def reference(config: V.VisualizerConfig) -> DDPMScheduler:
  return DDPMScheduler(num_train_timesteps=config.num_train_timesteps, beta_schedule=config.beta_schedule,
                       beta_start=config.beta_start, beta_end=config.beta_end,
                       prediction_type=config.prediction_type)


def reference_targets(config: V.VisualizerConfig, x0, noise, t) -> tuple[np.ndarray, np.ndarray]:
  """diffusers' (x_t, target) for numpy x0, noise [B, ...] and t [B]."""
  ref = reference(config)
  x0, noise, t = (torch.from_numpy(np.array(a)) for a in (x0, noise, t))
  target = noise if config.prediction_type == "epsilon" else ref.get_velocity(x0, noise, t)
  return ref.add_noise(x0, noise, t).numpy(), target.numpy()


def test_the_presets_schedules_are_among_those_checked():
  checked = {(s, start, end) for s, start, end in SCHEDULES}
  for preset in (V.VisualizerConfig.toy(), V.VisualizerConfig.sd15()):
    assert (preset.beta_schedule, preset.beta_start, preset.beta_end) in checked
    assert preset.prediction_type in V.PREDICTION_TYPES
  assert {s for s, _, _ in SCHEDULES} == set(V.BETA_SCHEDULES)


@pytest.mark.parametrize("prediction_type", V.PREDICTION_TYPES)
@pytest.mark.parametrize("schedule, beta_start, beta_end", SCHEDULES)
def test_targets_equal_diffusers_ddpm_scheduler(schedule, beta_start, beta_end, prediction_type):
  config = V.VisualizerConfig.toy().replace(beta_schedule=schedule, beta_start=beta_start, beta_end=beta_end,
                                            prediction_type=prediction_type)
  rng = np.random.default_rng(0)
  t = np.concatenate([[0, 1, 499, 998, 999], rng.integers(0, config.num_train_timesteps, 11)]).astype(np.int32)
  x0 = rng.uniform(-1, 1, (len(t), 3, 4, 4)).astype(np.float32)
  noise = rng.normal(size=x0.shape).astype(np.float32)
  x_t, target = V.diffusion_targets(config, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  want_x_t, want_target = reference_targets(config, x0, noise, t)
  np.testing.assert_allclose(x_t, want_x_t, atol=ATOL, rtol=0)
  np.testing.assert_allclose(target, want_target, atol=ATOL, rtol=0)
  # the check can tell the two prediction types (and the schedule's ends) apart
  if prediction_type == "v_prediction":
    assert np.abs(target - noise).max() > 0.1
  assert np.abs(x_t[0] - x0[0]).max() < 0.1 and np.abs(x_t[4] - noise[4]).max() < 0.1
