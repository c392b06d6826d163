"""Continuous batching: a pool of decode rows that requests join between decode chunks, each after a prefill of
its own (or of the requests that arrived with it), and leave when they finish, freeing their row for the next.

Every row carries its own prompt slots in each segment of the KV cache (`base`: where its first generated token
goes; with compact prefills each request has its own capacities), its own RoPE positions, token budget and
sampling settings (temperature, top-k, top-p, seed; the key of token `i` is `fold_in(key(seed), i)`), so what a
request generates does not depend on the rows beside it: greedy answers equal `generate`'s for the request alone.
The pool's shape (rows, and slots per segment) grows in buckets when a request needs more and shrinks when rows
empty, so the decode program is compiled once per shape. An empty row is `done`; it computes with the others
(static shapes) and is overwritten by the next request that takes it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.infer.generate import Sampling, prefill, round_up
from atp_jax.infer.runner import PAD_MULTIPLE, pad_prompts
from atp_jax.models.kv_cache import Segment
from atp_jax.models.llama import padding_bias

CHUNK = 8  # decode steps per call: how often requests can join and leave


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotSegment:
    """One run of decoder layers' KV cache in the pool (as `kv_cache.Segment`, with per-row prompt slots)."""

    k: Float[Array, "n R S K H"]
    v: Float[Array, "n R S K H"]
    visible: Bool[Array, "R S"]
    next_position: Int[Array, " R"]  # RoPE position of the row's first generated token
    base: Int[Array, " R"]  # the slot of the row's first generated token (its prompt fills the slots before)
    start: int = dataclasses.field(metadata={"static": True}, default=0)
    stop: int = dataclasses.field(metadata={"static": True}, default=0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Pool:
    segments: tuple[SlotSegment, ...]
    token: Int[Array, " R"]  # each row's latest token: the next decode step's input
    count: Int[Array, " R"]  # tokens the row generated so far (its latest is number count - 1)
    limit: Int[Array, " R"]  # the most tokens the row may generate
    done: Bool[Array, " R"]  # EOS generated or the limit reached (empty rows too)
    seed: Int[Array, " R"]
    temperature: Float[Array, " R"]  # 0: greedy
    top_k: Int[Array, " R"]  # 0: no cut
    top_p: Float[Array, " R"]  # 1: no cut

    @property
    def rows(self) -> int:
        return self.token.shape[0]

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(s.visible.shape[1] for s in self.segments)

    @property
    def nbytes(self) -> int:
        return sum(s.k.nbytes + s.v.nbytes for s in self.segments)


@dataclasses.dataclass(frozen=True)
class RowSpec:
    """What one request asks of its row."""

    max_new_tokens: int
    sampling: Sampling = Sampling()
    seed: int = 0


@dataclasses.dataclass
class Admitted:
    """A request that joined the pool: its ticket (stable while its row moves), its first token and what its
    prefill did."""

    ticket: int
    first_token: int
    visual_per_layer: np.ndarray  # float[L]
    keep: np.ndarray  # float[M, P]
    ttft_s: float  # its (batch's) prefill and first token


def sample_rows(logits: Float[Array, "R V"], seed: Int[Array, " R"], index: Int[Array, " R"],
                temperature: Float[Array, " R"], top_k: Int[Array, " R"], top_p: Float[Array, " R"]
                ) -> Int[Array, " R"]:
    """`generate.sample_tokens` with settings per row: greedy where the temperature is 0, else softmax(logits / T)
    cut to the top-k tokens and to the top-p mass, sampled with the key `fold_in(key(seed), index)`."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def one(x, seed, index, t, k, p):
        x = x / jnp.maximum(t, 1e-6)
        v = x.shape[-1]
        kth = jnp.where(k > 0, jnp.sort(x)[v - jnp.clip(k, 1, v)], -jnp.inf)
        x = jnp.where(x < kth, -jnp.inf, x)
        order = jnp.argsort(-x)
        sorted_probs = jax.nn.softmax(x)[order]
        cut = jnp.zeros(v, bool).at[order].set(jnp.cumsum(sorted_probs) - sorted_probs >= p)
        x = jnp.where(cut & (p < 1), -jnp.inf, x)
        return jax.random.categorical(jax.random.fold_in(jax.random.key(seed), index), x).astype(jnp.int32)

    def sampled(_):
        drawn = jax.vmap(one)(logits.astype(jnp.float32), seed, index, temperature, top_k, top_p)
        return jnp.where(temperature > 0, drawn, greedy)

    return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "eos_id"), donate_argnames=("pool",))
def decode_chunk(graphdef, state, pool: Pool, steps: int, eos_id: int) -> tuple[Pool, Int[Array, "R steps"]]:
    """`steps` decode steps of every row; returns the pool and each step's new token per row (-1 where the row
    was already done)."""
    lm = nnx.merge(graphdef, state).llava.language_model
    rows = jnp.arange(pool.rows)

    def one(i, carry):
        pool, out = carry
        fed = pool.count - 1  # the index of the token going in
        h = lm.embed(pool.token[:, None])  # [R, 1, D]
        segments = []
        for seg in pool.segments:
            slot = jnp.minimum(seg.base + fed, seg.visible.shape[1] - 1)  # a done row rewrites its last slot
            visible = seg.visible.at[rows, slot].set(True)
            positions = (seg.next_position + fed)[:, None]
            h, k, v = lm.decode_layers(h, positions, seg.k, seg.v, padding_bias(visible), slot, seg.start, seg.stop)
            segments.append(dataclasses.replace(seg, k=k, v=v, visible=visible))
        logits = lm.head(h)[:, 0].astype(jnp.float32)
        live = ~pool.done
        token = sample_rows(logits, pool.seed, pool.count, pool.temperature, pool.top_k, pool.top_p)
        count = pool.count + live
        done = pool.done | (live & ((token == eos_id) | (count >= pool.limit)))
        pool = dataclasses.replace(pool, segments=tuple(segments), token=jnp.where(live, token, pool.token),
                                   count=count, done=done)
        return pool, out.at[:, i].set(jnp.where(live, token, -1))

    return jax.lax.fori_loop(0, steps, one, (pool, jnp.full((pool.rows, steps), -1, jnp.int32)))


@functools.partial(jax.jit, static_argnames=("eos_id",), donate_argnames=("pool",))
def admit_rows(pool: Pool, rows: Int[Array, " n"], cache: tuple[Segment, ...], bases: Int[Array, " segments"],
               logits: Float[Array, "n V"], limit, seed, temperature, top_k, top_p, eos_id: int
               ) -> tuple[Pool, Int[Array, " n"]]:
    """Puts prefilled requests into pool `rows` (a row index of `pool.rows` or more drops that request: batch
    padding) and samples their first tokens. `bases`: per segment, the slot of the first generated token; the
    slots from there on hold no kept token, and a segment of `cache` longer than the pool's is cut."""
    first = sample_rows(logits, seed, jnp.zeros_like(seed), temperature, top_k, top_p)
    segments = []
    for i, (ps, s) in enumerate(zip(pool.segments, cache, strict=True)):
        length = ps.visible.shape[1]
        c = min(s.visible.shape[1], length)
        segments.append(dataclasses.replace(
            ps, k=ps.k.at[:, rows, :c].set(s.k[:, :, :c].astype(ps.k.dtype), mode="drop"),
            v=ps.v.at[:, rows, :c].set(s.v[:, :, :c].astype(ps.v.dtype), mode="drop"),
            visible=ps.visible.at[rows].set(jnp.pad(s.visible[:, :c], ((0, 0), (0, length - c))), mode="drop"),
            next_position=ps.next_position.at[rows].set(s.next_position, mode="drop"),
            base=ps.base.at[rows].set(bases[i], mode="drop")))

    def put(x, values):
        return x.at[rows].set(values.astype(x.dtype), mode="drop")

    pool = Pool(segments=tuple(segments), token=put(pool.token, first), count=put(pool.count, jnp.ones_like(first)),
                limit=put(pool.limit, limit), done=put(pool.done, (first == eos_id) | (limit <= 1)),
                seed=put(pool.seed, seed), temperature=put(pool.temperature, temperature),
                top_k=put(pool.top_k, top_k), top_p=put(pool.top_p, top_p))
    return pool, first


def empty_pool(template: Sequence[Segment], rows: int, lengths: Sequence[int]) -> Pool:
    """A pool of empty (done) rows with `lengths` slots per segment, its segments shaped like `template`'s."""
    segments = []
    for seg, length in zip(template, lengths, strict=True):
        n, _, _, kv_heads, head_dim = seg.k.shape
        zeros = jnp.zeros((n, rows, length, kv_heads, head_dim), seg.k.dtype)
        segments.append(SlotSegment(k=zeros, v=jnp.zeros_like(zeros), visible=jnp.zeros((rows, length), bool),
                                    next_position=jnp.zeros(rows, jnp.int32), base=jnp.zeros(rows, jnp.int32),
                                    start=seg.start, stop=seg.stop))

    def ints(value):  # a buffer each: the pool is donated
        return jnp.full(rows, value, jnp.int32)

    return Pool(segments=tuple(segments), token=ints(0), count=ints(1), limit=ints(1), done=jnp.ones(rows, bool),
                seed=ints(0), temperature=jnp.zeros(rows), top_k=ints(0), top_p=jnp.ones(rows))


def remap(pool: Pool, index: np.ndarray, lengths: Sequence[int]) -> Pool:
    """A pool whose row i is `pool`'s row `index[i]` (-1: an empty row), with `lengths` slots per segment (a
    row's generation must fit in them)."""
    return _remap(pool, jnp.asarray(index, jnp.int32), tuple(lengths))


@functools.partial(jax.jit, static_argnames=("lengths",))
def _remap(pool: Pool, index: Int[Array, " R"], lengths: tuple[int, ...]) -> Pool:
    take = jnp.maximum(index, 0)
    empty = index < 0

    def fit(x, axis, length):  # cut or pad the slot axis to `length`
        x = jax.lax.slice_in_dim(x, 0, min(length, x.shape[axis]), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, length - x.shape[axis])
        return jnp.pad(x, pad)

    segments = tuple(dataclasses.replace(seg, k=fit(seg.k[:, take], 2, length), v=fit(seg.v[:, take], 2, length),
                                         visible=fit(seg.visible[take], 1, length) & ~empty[:, None],
                                         next_position=seg.next_position[take], base=seg.base[take])
                     for seg, length in zip(pool.segments, lengths, strict=True))
    return Pool(segments=segments, token=pool.token[take], count=pool.count[take], limit=pool.limit[take],
                done=pool.done[take] | empty, seed=pool.seed[take], temperature=pool.temperature[take],
                top_k=pool.top_k[take], top_p=pool.top_p[take])


class SlotDecoder:
    """Continuous decoding of one model: `admit` prefills requests into free rows, `step` decodes every row one
    chunk, `release` frees a finished request's row. Not thread-safe: one thread drives it.

    `max_rows`: requests decoded together at most. Rows come in powers of two up to it, and so do prefill
    batches (a batch is padded with copies of its last request), bounding the compiled programs. A row needs,
    in each segment, the slots of the tokens its prompt kept there plus its token budget (rounded up to
    `budget_multiple`); the pool's slots per segment are the most any row needed so far, rounded up to
    `length_multiple`. They only grow (an emptied pool comes back at the same size), so the shapes, and the
    compiled programs, settle.
    """

    def __init__(self, runner, max_rows: int, chunk: int = CHUNK, budget_multiple: int = 32,
                 length_multiple: int = 64):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.runner, self.max_rows, self.chunk = runner, max_rows, chunk
        self.budget_multiple, self.length_multiple = budget_multiple, length_multiple
        self.graphdef, self.state = nnx.split(runner.pruned)
        self.pool: Pool | None = None
        self.lengths: tuple[int, ...] | None = None  # the pool's slots per segment, the most needed so far
        self.row_of: dict[int, int] = {}  # ticket -> row
        self.next_ticket = 0

    @property
    def busy(self) -> int:
        return len(self.row_of)

    @property
    def free(self) -> int:
        return self.max_rows - self.busy

    @property
    def rows(self) -> int:
        pool = self.pool  # read once: another thread may ask while the pool changes
        return 0 if pool is None else pool.rows

    @property
    def kv_bytes(self) -> int:
        pool = self.pool
        return 0 if pool is None else pool.nbytes

    def bucket(self, n: int) -> int:
        """The rows (or prefill batch) that hold `n` requests: the next power of two, at most `max_rows`."""
        return min(1 << max(n - 1, 0).bit_length(), self.max_rows)

    def admit(self, prompts: Sequence, specs: Sequence[RowSpec]) -> list[Admitted]:
        """Prefills `prompts` (runner.Prompt) as one batch and puts them into free rows."""
        n = len(prompts)
        if not 0 < n <= self.free or len(specs) != n:
            raise ValueError(f"cannot admit {n} requests ({len(specs)} specs) with {self.free} rows free")
        batch = self.bucket(n)
        padded = list(prompts) + [prompts[-1]] * (batch - n)
        ids, mask = pad_prompts([p.input_ids for p in padded], self.runner.pad_id, PAD_MULTIPLE)
        start = time.perf_counter()
        out = prefill(self.runner.pruned, ids, np.stack([p.pixels for p in padded]), mask, mode=self.runner.mode)
        budget = round_up(max(s.max_new_tokens for s in specs), self.budget_multiple)
        kept = self._kept_slots(out, int(mask.sum(1).max()))
        self._fit(n, out.cache, tuple(k + budget for k in kept))
        taken = set(self.row_of.values())
        rows = [r for r in range(self.pool.rows) if r not in taken][:n]
        specs = list(specs) + [specs[-1]] * (batch - n)
        settings = [np.array([getattr(s.sampling, name) for s in specs], dtype)
                    for name, dtype in (("temperature", np.float32), ("top_k", np.int32), ("top_p", np.float32))]
        self.pool, first = admit_rows(
            self.pool, jnp.asarray(rows + [self.pool.rows] * (batch - n), jnp.int32), out.cache,
            jnp.asarray(kept, jnp.int32), out.logits[:, 0],
            jnp.asarray([s.max_new_tokens for s in specs], jnp.int32), jnp.asarray([s.seed for s in specs], jnp.int32),
            *map(jnp.asarray, settings), eos_id=self.runner.eos_id)
        first = np.asarray(first)
        ttft = time.perf_counter() - start
        per_layer, keep = np.asarray(out.visual_per_layer), np.asarray(out.keep)
        admitted = []
        for i, row in enumerate(rows):
            ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
            self.row_of[ticket] = row
            admitted.append(Admitted(ticket, int(first[i]), per_layer[i], keep[i], ttft))
        return admitted

    def step(self) -> dict[int, list[int]]:
        """One decode chunk of every row: per ticket, the tokens its row generated (none once it is done)."""
        if self.pool is None:
            return {}
        self.pool, out = decode_chunk(self.graphdef, self.state, self.pool, steps=self.chunk,
                                      eos_id=self.runner.eos_id)
        out = np.asarray(out)
        return {ticket: [int(t) for t in out[row] if t >= 0] for ticket, row in self.row_of.items()}

    def release(self, ticket: int) -> None:
        """Frees the ticket's row; the pool shrinks when at most half its rows are busy."""
        del self.row_of[ticket]
        if not self.row_of:
            self.pool = None
        elif self.bucket(self.busy) < self.pool.rows:
            tickets = sorted(self.row_of)
            index = np.full(self.bucket(self.busy), -1)
            index[:len(tickets)] = [self.row_of[t] for t in tickets]
            self.pool = remap(self.pool, index, self.pool.lengths)
            self.row_of = {t: i for i, t in enumerate(tickets)}

    def warm_up(self, prompt, max_new_tokens: int) -> list[int]:
        """Compiles the programs that requests with prompts like `prompt` (its length, and for ATP the tokens it
        keeps) and budgets up to `max_new_tokens` run: the prefill of every batch size, and the admission and
        decode chunk of every pool size. The small programs that move rows between pool sizes compile on first
        use, and a prompt that keeps more tokens, or a longer budget, grows the pool once. Returns the batch
        sizes warmed."""
        sizes = sorted({self.bucket(n) for n in range(1, self.max_rows + 1)})
        for n in sizes + sizes:  # twice: ATP's compact capacities, planned from the first prefill, settle
            admitted = self.admit([prompt] * n, [RowSpec(max_new_tokens)] * n)
            self.step()
            for a in admitted:
                self.release(a.ticket)
        return sizes

    def reset(self) -> None:
        """Drops every row (after a failure)."""
        self.pool, self.row_of = None, {}

    def _kept_slots(self, out, prompt_tokens: int) -> list[int]:
        """Per segment of `out`'s cache, the slots that hold what any row kept: every row's tokens lie in the
        first ones (prompts are right-padded; a compact prefill gathers the kept tokens to the front)."""
        if self.runner.mode != "compact":
            return [prompt_tokens] * len(out.cache)  # masked: the prompt's slots, the pruned ones hidden
        return [prompt_tokens, *np.asarray(out.needed).tolist()][:len(out.cache)]

    def _fit(self, n: int, template: Sequence[Segment], need: tuple[int, ...]) -> None:
        """Grows the pool to hold `n` more rows that need `need` slots per segment."""
        rows = self.bucket(self.busy + n)
        need = tuple(round_up(k, self.length_multiple) for k in need)
        self.lengths = need if self.lengths is None else tuple(map(max, self.lengths, need))
        if self.pool is None:
            self.pool = empty_pool(template, rows, self.lengths)
        elif rows > self.pool.rows or self.lengths != self.pool.lengths:
            index = np.full(rows, -1)
            index[:self.pool.rows] = np.arange(self.pool.rows)
            self.pool = remap(self.pool, index, self.lengths)
