"""Compaction: gather each row's kept tokens (in order) into a shorter array of a bucketed static length."""

from __future__ import annotations

import math

import jax.numpy as jnp
from jaxtyping import Array, Bool, Int


def bucket_length(count: int, full: int, fractions: tuple[float, ...]) -> int:
    """The smallest bucket ceil(f * full) that holds `count` tokens, so only len(fractions) programs compile.

    Example: count 170, full 640, fractions (0.25, 0.5, 1.0) -> 320.
    """
    for f in sorted(fractions):
        length = max(1, math.ceil(f * full))
        if length >= count:
            return length
    raise ValueError(f"{count} tokens exceed the largest bucket of {full}")


def bucketed_capacities(slots, full: int, fractions: tuple[float, ...]) -> tuple[int, ...]:
    """Capacities of the runs after each module from the tokens each must hold: each rounded up to a bucket of
    `full` (`bucket_length`), never more than the run before (tokens are only ever removed).

    Example: slots [170, 400, 90], full 640, fractions (0.25, 0.5, 1.0) -> (320, 320, 160).
    """
    out, bound = [], full
    for n in slots:
        bound = min(bound, bucket_length(min(n, full), full, fractions))
        out.append(bound)
    return tuple(out)


def compaction_index(keep: Bool[Array, "B T"], length: int) -> tuple[Int[Array, "B L"], Bool[Array, "B L"]]:
    """Indices of each row's kept tokens in their original order, padded to `length`, and which are real.

    Example: keep [[1, 0, 1, 1], [0, 1, 0, 0]], length 3 -> index [[0, 2, 3], [1, 0, 2]],
    valid [[1, 1, 1], [1, 0, 0]] (padding slots point at dropped tokens and are masked).
    """
    order = jnp.argsort(~keep, axis=1, stable=True)[:, :length].astype(jnp.int32)
    valid = jnp.arange(length)[None, :] < keep.sum(axis=1, keepdims=True)
    return order, valid


def gather_tokens(x: Array, index: Int[Array, "B L"]) -> Array:
    """x[b, index[b, l], ...] for arrays whose first two axes are batch and sequence."""
    idx = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, idx, axis=1)
