"""The KV cache of a (possibly pruned) prefill: one segment per run of decoder layers that saw the same tokens.

After each pruning module the later layers see fewer tokens, so each segment has its own cache length,
its own visible keys and its own next RoPE position (original positions: the prompt's real length;
contiguous positions: the number of tokens the segment kept). Generated tokens are appended to every
segment at the same slot, `prompt_len + step`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Segment:
    k: Float[Array, "n B S K H"]  # keys of layers start..stop-1
    v: Float[Array, "n B S K H"]
    visible: Bool[Array, "B S"]  # real, kept tokens (and generated ones once written)
    next_position: Int[Array, " B"]  # RoPE position of the first generated token
    start: int = dataclasses.field(metadata={"static": True}, default=0)
    stop: int = dataclasses.field(metadata={"static": True}, default=0)
    prompt_len: int = dataclasses.field(metadata={"static": True}, default=0)  # slots holding the prompt


def make_segment(kv, visible: Bool[Array, "B S"], real_length: Int[Array, " B"], contiguous: bool, start: int,
                 stop: int) -> Segment:
    """A segment from a prefill's keys/values `kv` ([n, B, S, K, H] each) and the tokens its layers saw
    (`visible`); `real_length`: the prompt's real tokens per row."""
    nxt = visible.sum(axis=1).astype(jnp.int32) if contiguous else real_length.astype(jnp.int32)
    return Segment(k=kv[0], v=kv[1], visible=visible, next_position=nxt, start=start, stop=stop,
                   prompt_len=visible.shape[1])


def with_room(segment: Segment, new_tokens: int) -> Segment:
    """The segment with `new_tokens` empty (invisible) slots appended for generation."""
    pad = [(0, 0), (0, 0), (0, new_tokens), (0, 0), (0, 0)]
    return dataclasses.replace(segment, k=jnp.pad(segment.k, pad), v=jnp.pad(segment.v, pad),
                               visible=jnp.pad(segment.visible, [(0, 0), (0, new_tokens)]),
                               next_position=jnp.copy(segment.next_position))  # own buffers: the decode donates


def cache_bytes(segments) -> int:
    return sum(s.k.nbytes + s.v.nbytes for s in segments)
