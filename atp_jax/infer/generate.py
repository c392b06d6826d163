"""Generation: a jitted (pruned) prefill, then a jitted decode loop over a per-segment KV cache.

The prefill runs in `masked` mode (every slot cached, pruned ones hidden) or `compact` mode (each segment of
layers caches only the tokens it kept). Decoding appends each new token to every segment at slot
`prompt_len + step`, at RoPE position `next_position + step` of that segment (computed from the segment's
real token counts, never from one shared past length). Sampling: greedy (temperature 0), temperature,
top-k, top-p, from an explicit PRNG key folded with the step. Rows stop at EOS; the host checks stop
strings between decode chunks and can stream tokens as they arrive.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.kv_cache import Segment, cache_bytes, with_room
from atp_jax.models.llama import padding_bias
from atp_jax.pruning.engine import PrunedLlava, PrunedOutput
from atp_jax.pruning.prefill import prefill_compact, prefill_program


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut


def sample_tokens(logits: Float[Array, "B V"], key, sampling: Sampling) -> Int[Array, " B"]:
    """Greedy argmax at temperature 0; otherwise softmax(logits / T) restricted to the top-k tokens and to the
    smallest set whose probability reaches top-p (always at least the most likely token)."""
    if sampling.temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k > 0:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_probs = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), order, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # probability mass ranked above each token
        cut_sorted = before >= sampling.top_p
        cut = jnp.zeros_like(cut_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(cut_sorted)
        logits = jnp.where(cut, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
    cache: tuple[Segment, ...]
    tokens: Int[Array, "B N"]  # generated tokens; token j+1 is produced by decode step j
    step: Int[Array, ""]  # decode steps done (token `step` is the next input)
    done: Bool[Array, " B"]
    key: Array


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "sampling", "eos_id"), donate_argnames=("ds",))
def _decode(graphdef, state, ds: DecodeState, steps: int, sampling: Sampling, eos_id: int) -> DecodeState:
    lm = nnx.merge(graphdef, state).llava.language_model

    def one(_, ds: DecodeState) -> DecodeState:
        rows = jnp.arange(ds.tokens.shape[0])
        h = lm.embed(ds.tokens[rows, ds.step][:, None])  # [B, 1, D]
        cache = []
        for seg in ds.cache:
            slot = seg.prompt_len + ds.step
            visible = seg.visible.at[:, slot].set(True)
            positions = (seg.next_position + ds.step)[:, None]  # [B, 1]
            h, k, v = lm.decode_layers(h, positions, seg.k, seg.v, padding_bias(visible), slot, seg.start, seg.stop)
            cache.append(dataclasses.replace(seg, k=k, v=v, visible=visible))
        logits = lm.head(h)[:, 0].astype(jnp.float32)  # [B, V]
        token = sample_tokens(logits, jax.random.fold_in(ds.key, ds.step + 1), sampling)
        token = jnp.where(ds.done, eos_id, token)
        tokens = ds.tokens.at[:, ds.step + 1].set(token)
        return DecodeState(cache=tuple(cache), tokens=tokens, step=ds.step + 1, done=ds.done | (token == eos_id),
                           key=ds.key)

    return jax.lax.fori_loop(0, steps, one, ds)


@dataclasses.dataclass
class Generation:
    tokens: np.ndarray  # int32[B, n] generated tokens, EOS (and what follows it) cut in `lengths`
    lengths: np.ndarray  # int[B] tokens per row before EOS / stop
    visual_per_layer: np.ndarray  # float[B, L] visual tokens entering each decoder layer
    keep: np.ndarray  # float[B, M, P] visual tokens kept after each module
    ttft_s: float  # prefill + first token
    decode_s: float
    cache_bytes: int
    prefill_lengths: tuple[int, ...] = ()  # the prefill program's: the prompt's length, then each capacity (compact)

    def row(self, b: int) -> list[int]:
        return self.tokens[b, :self.lengths[b]].tolist()


def round_up(n: int, multiple: int) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def prefill(model: PrunedLlava, input_ids, pixel_values, attention_mask, *, mode: str, counts=None) -> PrunedOutput:
    """The prefill generation starts from, in `mode` ("compact" or "masked"): the last prompt token's logits
    [B, 1, V] and the KV cache, one segment per run of layers."""
    if mode == "compact":
        return prefill_compact(model, input_ids, pixel_values, attention_mask, last_logits_only=True, counts=counts,
                               return_cache=True)
    graphdef, state = nnx.split(model)
    return prefill_program(graphdef, state, input_ids, pixel_values, attention_mask, counts, mode="masked",
                           last_logits_only=True, return_cache=True)


def generate(model: PrunedLlava, input_ids, pixel_values, attention_mask=None, *, max_new_tokens: int = 64,
             sampling: Sampling = Sampling(), eos_id: int, seed: int = 0, mode: str = "compact", chunk: int = 16,
             budget_multiple: int = 32, counts=None,
             on_tokens: Callable[[np.ndarray, int], np.ndarray | None] | None = None) -> Generation:
    """Generates up to `max_new_tokens` per row after a pruned prefill of the (right- or left-padded) prompts.

    `mode`: "compact" (pruned tokens removed from compute and cache: `prefill.prefill_compact`) or "masked".
    The decode runs in jitted chunks of `chunk` steps; the cache has room for `max_new_tokens` rounded up to
    `budget_multiple`, so one program serves nearby budgets. `counts`: per-instance budgets for the ranked
    baselines, as in `PrunedLlava.__call__`. After every chunk `on_tokens(tokens_so_far [B, n], n)` may return a bool
    [B] array of rows to stop (stop strings, streaming to a terminal).
    """
    if mode not in ("compact", "masked"):
        raise ValueError(f"mode {mode!r}: expected 'compact' or 'masked'")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    input_ids = jnp.asarray(input_ids, jnp.int32)
    b, t = input_ids.shape
    mask = jnp.ones((b, t), bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    budget = round_up(max_new_tokens, budget_multiple)
    graphdef, state = nnx.split(model)
    start = time.perf_counter()
    out = prefill(model, input_ids, pixel_values, mask, mode=mode, counts=counts)
    first_logits, cache, per_layer, keep = out.logits[:, 0], out.cache, out.visual_per_layer, out.keep
    key = jax.random.key(seed)
    first = sample_tokens(first_logits, jax.random.fold_in(key, 0), sampling)
    tokens = jnp.zeros((b, budget + 1), jnp.int32).at[:, 0].set(first)
    ds = DecodeState(cache=tuple(with_room(s, budget) for s in cache), tokens=tokens, step=jnp.int32(0),
                     done=first == eos_id, key=key)
    jax.block_until_ready(ds.tokens)
    ttft = time.perf_counter() - start
    generated = 1
    if on_tokens is not None:
        ds = _apply_stops(ds, on_tokens(np.asarray(ds.tokens[:, :1]), 1))
    start = time.perf_counter()
    while generated < max_new_tokens and not bool(ds.done.all()):
        steps = min(chunk, max_new_tokens - generated)
        ds = _decode(graphdef, state, ds, steps=steps, sampling=sampling, eos_id=eos_id)
        generated += steps
        if on_tokens is not None:
            ds = _apply_stops(ds, on_tokens(np.asarray(ds.tokens[:, :generated]), generated))
    tokens = np.asarray(ds.tokens[:, :generated])
    decode_s = time.perf_counter() - start
    is_eos = tokens == eos_id
    lengths = np.where(is_eos.any(1), is_eos.argmax(1), generated)
    return Generation(tokens=tokens, lengths=lengths, visual_per_layer=np.asarray(per_layer), keep=np.asarray(keep),
                      ttft_s=ttft, decode_s=decode_s, cache_bytes=cache_bytes(ds.cache),
                      prefill_lengths=tuple(out.lengths))


def _apply_stops(ds: DecodeState, stop) -> DecodeState:
    if stop is None:
        return ds
    return dataclasses.replace(ds, done=ds.done | jnp.asarray(stop, bool))
