"""The draft decoder: a cheap regression of the clean sample from the visual tokens, which
the UNet then refines (``VisualizerConfig.draft_width``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from metamorph.layers.dense import conv, dense, dtypes, table
from metamorph.models.visualizer.config import VisualizerConfig


class DraftDecoder(nnx.Module):
  """Visual tokens [B, m, Dv] -> a draft of the clean sample [B, C, S, S] (NCHW, the UNet's
  layout), by regression. Each token: fc1 (Dv -> 8w) -> GELU; the m tokens' features are
  mixed by a learned [m, m] matrix ``mix`` (identity at init), since an encoder's tokens
  carry more than their own cell (SigLIP's each the whole image, the toy's windowed
  encoder's its 2 x 2-cell quadrant); then fc2 (-> r*r*w/2), unfolded
  over the r x r pixels the token's grid cell covers (r = S / sqrt(m)); then three 3x3
  convs (w/2 -> w -> w -> C, GELU between) mix neighbouring cells. w = ``draft_width``.
  Params: fc1/{kernel,bias}, mix, fc2/..., conv1/..., conv2/..., conv3/...."""

  def __init__(self, config: VisualizerConfig, *, rngs: nnx.Rngs):
    w, c = config.draft_width, config
    kw = dict(rngs=rngs, **dtypes(c))
    conv3x3 = lambda d_in, d_out: conv(d_in, d_out, (3, 3), (None, None, "channels", "channels"), **kw)
    self.side = config.grid_side
    self.cell = config.sample_size // self.side
    self.features = w // 2
    self.fc1 = dense(c.token_dim, 8 * w, ("vis_embed", "mlp"), **kw)
    self.mix = table((c.num_tokens, c.num_tokens), ("positions", "positions"),
                     lambda key, shape, dtype: jnp.eye(shape[0], dtype=dtype), param_dtype=c.param_dtype)
    self.fc2 = dense(8 * w, self.cell * self.cell * self.features, ("mlp", "channels"), **kw)
    self.conv1 = conv3x3(self.features, w)
    self.conv2 = conv3x3(w, w)
    self.conv3 = conv3x3(w, c.channels)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    b, k, r = tokens.shape[0], self.side, self.cell
    h = jax.nn.gelu(self.fc1(tokens))                                     # [B, m, 8w]
    h = jnp.einsum("bmf,mn->bnf", h, self.mix[...].astype(h.dtype))      # token n reads all m
    cells = self.fc2(h)                                                   # [B, m, r*r*F]
    cells = cells.reshape(b, k, k, r, r, self.features).transpose(0, 1, 3, 2, 4, 5)
    x = cells.reshape(b, k * r, k * r, self.features)                     # [B, S, S, F]
    x = self.conv3(jax.nn.gelu(self.conv2(jax.nn.gelu(self.conv1(x)))))  # [B, S, S, C]
    return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)
