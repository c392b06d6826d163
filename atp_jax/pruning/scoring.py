"""ATP token scores: redundancy from a side-path attention, and the spatial (SAP) skeleton score.

Einsum alphabet: B batch, T sequence, Q queries, P visual tokens, N query heads, K kv heads, G = N // K,
H head dim. All functions are pure; masks are float keep-weights in [0, 1] (soft) or exact 0/1 (hard).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import cpu_unsharded

TINY = 1e-12


def visual_positions(image_mask: Bool[Array, "B T"], num_visual: int) -> Int[Array, "B P"]:
    """Sequence index of each row's first `num_visual` marked tokens, in order; then unmarked ones (rows with
    fewer marks, e.g. without an image, fill up with unmarked indices). Serves any token selection.

    Example: image_mask [[0, 1, 1, 0]], num_visual 2 -> [[1, 2]]; num_visual 3 -> [[1, 2, 0]].
    """
    return jnp.argsort(~image_mask, axis=1, stable=True)[:, :num_visual].astype(jnp.int32)


# On XLA:CPU outside a mesh the side path's logits go in pieces of at most this many floats (2.4 MB: 128 queries
# x 8 heads x 576 keys on the benchmark model), which stay in cache: larger pieces ran ~1.5x slower per float
# there, and smaller ones pay XLA:CPU's cost per op again and again on small models.
CPU_LOGITS_BLOCK = 128 * 8 * 576


def attention_received(q: Float[Array, "B Q N H"], k: Float[Array, "B P K H"], key_bias: Float[Array, "B P"],
                       query_weight: Float[Array, "B Q"]) -> Float[Array, "B P"]:
    """Attention each key receives: softmax over keys (with `key_bias` added to the logits), averaged over
    heads, then a `query_weight`-weighted mean over queries (zero where all weights are zero).

    This is the side path of ATP: one q.k^T against the visual keys at one layer, so the decoder's own
    attention never has to return probabilities. On XLA:CPU outside a mesh the logits go in pieces of at most
    `CPU_LOGITS_BLOCK` floats: as many rows at a time as fit, or one row with its queries in chunks (at the
    first module a row's logits are [Q, N, P] = 576 x 8 x 576 on the benchmark model: 10.6 MB). Pieces change
    only the order of the sum over queries.
    Example: one query, one head, keys with equal logits and key_bias [0, 0, -inf] -> [0.5, 0.5, 0].
    """
    b, nq, n, _ = q.shape
    per_row = nq * n * k.shape[1]
    if not cpu_unsharded() or b * per_row <= CPU_LOGITS_BLOCK:
        return _attention_received(q, k, key_bias, query_weight, nq)
    rows = max(1, CPU_LOGITS_BLOCK // per_row)
    chunk = nq if rows > 1 else max(1, CPU_LOGITS_BLOCK // (n * k.shape[1]))

    def row(x):
        return _attention_received(*(a[None] for a in x), chunk)[0]

    return jax.lax.map(row, (q, k, key_bias, query_weight), batch_size=rows)


def _attention_received(q, k, key_bias, query_weight, chunk: int):
    b, nq, n, h = q.shape
    kv = k.shape[2]
    weight = query_weight / jnp.maximum(query_weight.sum(-1, keepdims=True), TINY) / n  # [B, Q], head mean folded in
    k = k.astype(jnp.float32)
    total = 0.0
    for start in range(0, nq, chunk):
        stop = min(start + chunk, nq)
        qg = q[:, start:stop].reshape(b, stop - start, kv, n // kv, h).astype(jnp.float32)  # [B, Q, K, G, H]
        # Keys last and queries outermost: XLA:CPU runs this layout ~2.5x faster than [B, K, G, Q, P].
        logits = jnp.einsum("bqkgh,bpkh->bqkgp", qg, k) / math.sqrt(h)
        probs = jax.nn.softmax(logits + key_bias[:, None, None, None, :], axis=-1)
        total = total + jnp.einsum("bqkgp,bq->bp", probs, weight[:, start:stop])
    return total


def minmax_normalise(x: Float[Array, "B P"], kept: Bool[Array, "B P"]) -> Float[Array, "B P"]:
    """Min-max normalisation over each row's kept entries; 1 where all kept entries are equal, 0 off the set.

    Example: x [[2, 4, 3, 9]], kept [[1, 1, 1, 0]] -> [[0, 1, 0.5, 0]].
    """
    lo = jnp.min(jnp.where(kept, x, jnp.inf), axis=-1, keepdims=True)
    hi = jnp.max(jnp.where(kept, x, -jnp.inf), axis=-1, keepdims=True)
    span = hi - lo
    out = jnp.where(span > 0, (x - lo) / jnp.where(span > 0, span, 1.0), 1.0)
    return jnp.where(kept, out, 0.0)


def redundancy_score(s_self: Float[Array, "B P"], s_cross: Float[Array, "B P"], kept: Bool[Array, "B P"],
                     has_cross: Bool[Array, " B"]) -> Float[Array, "B P"]:
    """S_red = (norm(S_self) + norm(S_cross)) / 2, or norm(S_self) alone when no text follows the image."""
    a, c = minmax_normalise(s_self, kept), minmax_normalise(s_cross, kept)
    return jnp.where(has_cross[:, None], (a + c) / 2, a)


def sap_scores(grid: int, lam: float) -> np.ndarray:
    """Spatial score of each patch of a `grid` x `grid` image, row-major: float32[grid * grid].

    Nested uniform grids, one per stride s > 1 dividing `grid`, all anchored at the centre patch c = grid // 2
    (patch (i, j) is on grid s when (i - c) and (j - c) are multiples of s). A patch scores 1 - lam / s^2 for
    the coarsest grid it is on, and -1 when on none, so thresholding the score keeps an evenly spread
    skeleton whose density the threshold chooses.

    Example: grid 4, lam 3: (2, 2) is on the stride-4 grid -> 1 - 3/16 = 0.8125; (0, 0), (0, 2), (2, 0) are
    on the stride-2 grid -> 0.25; the other 12 patches -> -1.
    """
    c = grid // 2
    offsets = np.arange(grid) - c
    out = np.full((grid, grid), -1.0, np.float32)
    for s in sorted(s for s in range(2, grid + 1) if grid % s == 0):  # finer first: coarser grids overwrite
        on = (offsets[:, None] % s == 0) & (offsets[None, :] % s == 0)
        out[on] = 1.0 - lam / s**2
    return out.reshape(-1)
