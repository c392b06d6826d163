"""The per-module threshold MLP: sorted score profiles of an instance -> its thresholds (theta_r, theta_s)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float


def resample_sorted(scores: Float[Array, "B P"], kept: Bool[Array, "B P"], n: int) -> Float[Array, "B n"]:
    """Each row's kept scores sorted in descending order and linearly resampled to n values (0 if none kept),
    a fixed-size profile of a variable number of tokens.

    Example: scores [[0.2, 0.9, 0.5, 0.7]], kept [[1, 1, 1, 0]], n 5 -> [[0.9, 0.7, 0.5, 0.35, 0.2]].
    """
    count = kept.sum(-1, keepdims=True)  # [B, 1]
    ranked = -jnp.sort(-jnp.where(kept, scores, -jnp.inf), axis=-1)  # [B, P], kept first, descending
    ranked = jnp.where(jnp.isfinite(ranked), ranked, 0.0)
    pos = jnp.linspace(0.0, 1.0, n)[None, :] * jnp.maximum(count - 1, 0)  # [B, n]
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
    frac = pos - lo
    a, b = jnp.take_along_axis(ranked, lo, -1), jnp.take_along_axis(ranked, hi, -1)
    return jnp.where(count > 0, a + (b - a) * frac, 0.0)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


class ThresholdMLP(nnx.Module):
    """[sorted S_self (n), sorted S_cross (n)] -> Dense(width) -> GELU -> two sigmoid heads: theta_r, theta_s.

    The heads start at zero weight with biases at logit(init), so before training every instance gets the
    initial thresholds, chosen to land the first keep ratio near the target.
    """

    def __init__(self, n: int, width: int, init_theta_r: float, init_theta_s: float, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(2 * n, width, rngs=rngs)
        self.head = nnx.Linear(width, 2, kernel_init=nnx.initializers.zeros,
                               bias_init=lambda *_: jnp.array([logit(init_theta_r), logit(init_theta_s)]), rngs=rngs)

    def __call__(self, profile_self: Float[Array, "B n"], profile_cross: Float[Array, "B n"]):
        x = jnp.concatenate([profile_self, profile_cross], axis=-1).astype(jnp.float32)  # [B, 2n]
        theta = jax.nn.sigmoid(self.head(jax.nn.gelu(self.hidden(x), approximate=False)))  # [B, 2]
        return theta[:, 0], theta[:, 1]
