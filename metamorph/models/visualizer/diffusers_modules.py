"""The glue to diffusers: its Flax UNet, VAE and schedulers, built from their kwargs, and
their parameter trees as NNX parameters. Only this module imports diffusers.

The UNet / VAE parameters live in the NNX module as ``nnx.Param`` leaves of nested
``nnx.Dict``s whose structure is exactly diffusers' Flax ``params`` dict (``to_params``);
``to_plain`` gives the plain nested dict back for ``.apply({"params": ...})`` and
``load_tree`` sets it from such a dict. Importing this module silences diffusers'
"Flax classes are deprecated" messages (``quiet_diffusers``).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from diffusers.utils import logging as diffusers_logging
from flax import nnx

from metamorph.params import flatten_tree


class _DropFlaxDeprecation(logging.Filter):
  """diffusers logs "Flax classes are deprecated" at import and at every module setup /
  scheduler construction (hundreds of times per trace); we know, and keep logs readable."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "Flax classes are deprecated" not in record.getMessage()


def quiet_diffusers() -> None:
  """Drops diffusers' "Flax classes are deprecated" messages: at diffusers' own handler, and
  at every diffusers ``*_flax`` logger that exists (for whatever else handles them, e.g. a
  test's log capture). Idempotent; run at this module's import, before and after the Flax
  classes load."""
  diffusers_logging.get_logger("diffusers")  # configures diffusers' root logger and its handler
  for handler in logging.getLogger("diffusers").handlers:
    if not any(isinstance(f, _DropFlaxDeprecation) for f in handler.filters):
      handler.addFilter(_DropFlaxDeprecation())
  for name in list(logging.root.manager.loggerDict):
    logger = logging.getLogger(name)
    if name.startswith("diffusers") and name.endswith("_flax") and not any(
        isinstance(f, _DropFlaxDeprecation) for f in logger.filters):
      logger.addFilter(_DropFlaxDeprecation())


quiet_diffusers()  # before the Flax classes log at their import

from diffusers import (FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxDPMSolverMultistepScheduler,  # noqa: E402
                       FlaxUNet2DConditionModel)
from diffusers.schedulers.scheduling_utils_flax import CommonSchedulerState  # noqa: E402

quiet_diffusers()  # the Flax modules' loggers exist now

SAMPLERS = ("ddim", "dpm")
UNET_FIELDS = frozenset(f.name for f in dataclasses.fields(FlaxUNet2DConditionModel)) - {"dtype", "parent", "name"}
VAE_FIELDS = frozenset(f.name for f in dataclasses.fields(FlaxAutoencoderKL)) - {"dtype", "parent", "name"}
UNET_GROUPS = 32  # diffusers' Flax UNet GroupNorms have 32 groups, fixed
# the keys of ``scheduler``'s schedule: the DDPM training schedule, then DDIM's options
SCHEDULE_KEYS = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
DDIM_KEYS = ("clip_sample", "set_alpha_to_one", "steps_offset")


def tuples(value):
  """JSON lists -> tuples, recursively (diffusers' linen modules must be hashable)."""
  if isinstance(value, (list, tuple)):
    return tuple(tuples(v) for v in value)
  if isinstance(value, Mapping):
    return {k: tuples(v) for k, v in value.items()}
  return value


def unet_field(kwargs: Mapping[str, Any], name: str):
  """``kwargs[name]``, or the default of ``FlaxUNet2DConditionModel``'s field."""
  return _field(kwargs, FlaxUNet2DConditionModel, name)


def vae_field(kwargs: Mapping[str, Any], name: str):
  """``kwargs[name]``, or the default of ``FlaxAutoencoderKL``'s field."""
  return _field(kwargs, FlaxAutoencoderKL, name)


def _field(kwargs: Mapping[str, Any], cls, name: str):
  if name in kwargs:
    return kwargs[name]
  return {f.name: f.default for f in dataclasses.fields(cls)}[name]


# ----------------------------------------------------------------------------- modules


def _freeze(kwargs: Mapping[str, Any]) -> tuple:
  return tuple(sorted(kwargs.items()))


def unet_module(kwargs: Mapping[str, Any], dtype: str) -> FlaxUNet2DConditionModel:
  """``FlaxUNet2DConditionModel(**kwargs, dtype=dtype)``, one per (kwargs, dtype)."""
  return _diffusers_module("unet", _freeze(kwargs), dtype)


def vae_module(kwargs: Mapping[str, Any], dtype: str) -> FlaxAutoencoderKL:
  """``FlaxAutoencoderKL(**kwargs, dtype=dtype)``, one per (kwargs, dtype)."""
  return _diffusers_module("vae", _freeze(kwargs), dtype)


@functools.cache
def _diffusers_module(which: str, kwargs: tuple, dtype: str):
  cls = FlaxUNet2DConditionModel if which == "unet" else FlaxAutoencoderKL
  return cls(**dict(kwargs), dtype=jnp.dtype(dtype))


def vae_encode(kwargs: Mapping[str, Any], dtype: str, params: Mapping, images: jax.Array):
  """The VAE's posterior (``latent_dist``, channels-last) of NCHW images."""
  return vae_module(kwargs, dtype).apply({"params": params}, images, method=FlaxAutoencoderKL.encode).latent_dist


def vae_decode(kwargs: Mapping[str, Any], dtype: str, params: Mapping, latents: jax.Array) -> jax.Array:
  """NHWC latents -> NCHW images (the VAE's decoder)."""
  return vae_module(kwargs, dtype).apply({"params": params}, latents, method=FlaxAutoencoderKL.decode).sample


def scheduler(sampler: str, schedule: Mapping[str, Any]):
  """diffusers' Flax DDIM ("ddim") or DPM-Solver++ ("dpm": order 2, midpoint, "linspace"
  spacing) scheduler, float32; ``schedule`` holds ``SCHEDULE_KEYS`` and DDIM's ``DDIM_KEYS``
  (which DPM-Solver++ ignores). One per (sampler, schedule)."""
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; use one of {list(SAMPLERS)}")
  return _scheduler(sampler, _freeze(schedule))


@functools.cache
def _scheduler(sampler: str, schedule: tuple):
  schedule = dict(schedule)
  common = {k: schedule[k] for k in SCHEDULE_KEYS}
  if sampler == "ddim":
    return FlaxDDIMScheduler(**common, **{k: schedule[k] for k in DDIM_KEYS}, dtype=jnp.float32)
  return FlaxDPMSolverMultistepScheduler(**common, dtype=jnp.float32, solver_order=2,
                                         algorithm_type="dpmsolver++", solver_type="midpoint",
                                         lower_order_final=True, timestep_spacing="linspace")


def alphas_cumprod(schedule: Mapping[str, Any]) -> jax.Array:
  """[num_train_timesteps] float32: the DDPM schedule's cumulative products of alpha."""
  return CommonSchedulerState.create(scheduler("ddim", schedule)).alphas_cumprod


# ----------------------------------------------------------------------------- parameters


def _fast_key(key: jax.Array) -> jax.Array:
  """An ``unsafe_rbg`` key derived from ``key``. diffusers' inits draw ~100 arrays; with
  threefry keys XLA:CPU spends ~10 s compiling the draws of even a tiny UNet, with
  ``unsafe_rbg`` a few. The initializers (and so the distributions) are diffusers'."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    data = jax.random.key_data(key)
  else:
    data = jnp.asarray(key)
  data = data.reshape(-1).astype(jnp.uint32)
  if data.shape[0] < 4:
    data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])[:4]
  return jax.random.wrap_key_data(data[:4], impl="unsafe_rbg")


@functools.partial(jax.jit, static_argnums=0)
def init_weights(module, key: jax.Array) -> dict:
  """diffusers' ``init_weights`` of the UNet or the VAE, jitted (one compilation per module
  config, a few seconds; eager it runs ~200 small compilations) with an ``unsafe_rbg`` key."""
  return module.init_weights(_fast_key(key))


def to_params(tree, dtype) -> nnx.Dict:
  """diffusers' nested ``params`` dict -> nested ``nnx.Dict`` of ``nnx.Param`` (same keys)."""
  if isinstance(tree, Mapping):
    return nnx.Dict({str(k): to_params(v, dtype) for k, v in tree.items()})
  return nnx.Param(jnp.asarray(tree, dtype))


def to_plain(tree) -> dict:
  """Inverse of ``to_params``: a plain nested dict of arrays."""
  if isinstance(tree, Mapping):
    return {k: to_plain(v) for k, v in tree.items()}
  return tree[...]


def load_tree(target: nnx.Dict, params: Mapping, name: str) -> None:
  """Copies a nested dict of arrays into the matching ``nnx.Param`` leaves of ``target``."""
  ours, theirs = flatten_tree(target), flatten_tree(params)
  missing, unexpected = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
  if missing or unexpected:
    raise ValueError(f"{name} params do not match the config: missing {missing[:5]} "
                     f"({len(missing)} in all), unexpected {unexpected[:5]} ({len(unexpected)} in all)")
  for key, var in ours.items():
    if tuple(np.shape(theirs[key])) != tuple(var.shape):
      raise ValueError(f"{name} param '{key}' has shape {tuple(np.shape(theirs[key]))}, "
                       f"the config implies {tuple(var.shape)}")
  for key, var in ours.items():
    var.set_value(jnp.asarray(theirs[key], var.dtype))
