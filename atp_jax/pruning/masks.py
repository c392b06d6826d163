"""Thresholds to keep-masks (soft for training, hard for inference) and masks to attention biases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import NEG_INF


def soft_keep(s_red: Float[Array, "B P"], s_sp: Float[Array, "B P"], theta_r: Float[Array, " B"],
              theta_s: Float[Array, " B"], temperature: float) -> Float[Array, "B P"]:
    """M = max(sigmoid(T (S_red - theta_r)), sigmoid(T (S_sp - theta_s))): differentiable in the thresholds."""
    m_r = jax.nn.sigmoid(temperature * (s_red - theta_r[:, None]))
    m_s = jax.nn.sigmoid(temperature * (s_sp - theta_s[:, None]))
    return jnp.maximum(m_r, m_s)


def hard_keep(s_red: Float[Array, "B P"], s_sp: Float[Array, "B P"], theta_r: Float[Array, " B"],
              theta_s: Float[Array, " B"]) -> Bool[Array, "B P"]:
    """keep = (S_red > theta_r) or (S_sp > theta_s); the limit of `soft_keep` as T grows (at 0.5)."""
    return (s_red > theta_r[:, None]) | (s_sp > theta_s[:, None])


def key_bias(keep: Float[Array, "B T"], eps: float | None) -> Float[Array, "B 1 1 T"]:
    """Attention bias on keys from per-token keep weights, broadcast over heads and queries.

    Soft (`eps` given): log(keep + eps), so a weight of 1 (text tokens, kept tokens) adds ~0. Hard
    (`eps` None, keep exactly 0 or 1): NEG_INF on dropped keys, the same as removing them. NEG_INF is
    finite, so a query whose every visible key is dropped (a pruned token with nothing kept before it)
    still gets a finite, if meaningless, output; no kept token ever reads it.
    Example: keep [[1, 0, 1]], hard -> [[[[0, NEG_INF, 0]]]].
    """
    if eps is None:
        bias = jnp.where(keep > 0.5, 0.0, NEG_INF)
    else:
        bias = jnp.log(keep + eps)
    return bias.astype(jnp.float32)[:, None, None, :]


def keep_top(scores: Float[Array, "B P"], kept: Bool[Array, "B P"], k: int | Int[Array, " B"]) -> Bool[Array, "B P"]:
    """The `k` (one number, or one per row) highest-scoring entries among each row's kept ones (all of them
    when fewer are kept); ties go to the earlier token.

    Example: scores [[0.1, 0.7, 0.3, 0.9]], kept [[1, 1, 1, 0]], k 2 -> [[0, 1, 1, 0]].
    """
    order = jnp.argsort(-jnp.where(kept, scores, -jnp.inf), axis=-1, stable=True)  # [B, P], best first
    rank = jnp.argsort(order, axis=-1)  # rank of each entry
    return kept & (rank < jnp.reshape(jnp.asarray(k), (-1, 1)))
