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


# Threshold ranges: a little beyond every score a token can have (min-max normalised S_red in [0, 1]; S_sp is
# -1 off the grids and in (0, 1) on them), so both "keep everything" and "keep nothing" are reachable.
THETA_R_RANGE = (-0.05, 1.05)
THETA_S_RANGE = (-1.05, 1.0)


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def _unit(value: float, bounds: tuple[float, float]) -> float:
    lo, hi = bounds
    return min(max((value - lo) / (hi - lo), 1e-4), 1 - 1e-4)


class ThresholdMLP(nnx.Module):
    """[sorted S_self (n), sorted S_cross (n)] -> Dense(width) -> GELU -> two sigmoid heads -> theta_r, theta_s,
    each mapped onto its range.

    The heads start with small weights and biases at the initial thresholds, so before training every
    instance gets thresholds close to them, chosen to land the first keep ratio near the target.
    """

    def __init__(self, n: int, width: int, init_theta_r: float, init_theta_s: float, rngs: nnx.Rngs):
        bias = jnp.array([logit(_unit(init_theta_r, THETA_R_RANGE)), logit(_unit(init_theta_s, THETA_S_RANGE))])
        self.hidden = nnx.Linear(2 * n, width, rngs=rngs)
        self.head = nnx.Linear(width, 2, kernel_init=nnx.initializers.normal(1e-3), bias_init=lambda *_: bias,
                               rngs=rngs)

    def __call__(self, profile_self: Float[Array, "B n"], profile_cross: Float[Array, "B n"]):
        x = jnp.concatenate([profile_self, profile_cross], axis=-1).astype(jnp.float32)  # [B, 2n]
        unit = jax.nn.sigmoid(self.head(jax.nn.gelu(self.hidden(x), approximate=False)))  # [B, 2]
        (r_lo, r_hi), (s_lo, s_hi) = THETA_R_RANGE, THETA_S_RANGE
        return r_lo + (r_hi - r_lo) * unit[:, 0], s_lo + (s_hi - s_lo) * unit[:, 1]
