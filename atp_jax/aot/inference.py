"""The serving programs compiled for a TPU slice from abstract shapes: the programs `atp_jax.infer.generate`
runs, for one batch and prompt length, with nothing allocated, and the server's decode over the same cache
(`atp_jax.infer.slots`: continuous batching, a cache slot per row).

- `masked`: one prefill program (every slot cached, pruned keys hidden; with `method="none"` the plain
  prefill), then the decode program over that cache.
- `compact`: one prefill program (vision tower, every run of layers at its capacity, the modules and the
  compactions between runs, the LM head on the last token), then the decode program over a cache whose
  segments hold only the tokens each run kept.

How many visual tokens ATP keeps is decided per instance at run time; a compile needs one answer, so the
caller names the kept fraction after each module (`keep`); the capacities follow from it as
`prefill.plan_capacities` plans them. `possible_programs` counts what a server may compile over every budget
ATP can choose at this batch and prompt length (one prefill and one decode program per combination of
capacities).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from atp_jax.aot.analysis import ProgramCost, compile_cost
from atp_jax.aot.chips import chip_count, topology_devices
from atp_jax.aot.training import on_tpu
from atp_jax.infer.generate import DecodeState, Sampling, _decode
from atp_jax.infer.slots import CHUNK as SERVER_CHUNK
from atp_jax.infer.slots import Pool, SlotSegment
from atp_jax.infer.slots import decode_chunk as slot_decode
from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import LlavaConfig
from atp_jax.models.kv_cache import Segment
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.pruning.compaction import bucket_length, bucketed_capacities
from atp_jax.pruning.config import fit_to_depth
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.pruning.prefill import prefill_program
from atp_jax.sharding import DEFAULT_RULES, batch_sharding, logical_to_spec, make_mesh, param_shardings, use_mesh


@dataclasses.dataclass(frozen=True)
class ServingCost:
    topology: str
    chips: int
    mesh: dict
    method: str  # "none" (unpruned) or a pruning method
    mode: str  # "masked" or "compact"
    batch: int
    prompt_len: int  # tokens per prompt, image included
    new_tokens: int  # room in the cache for generated tokens
    keep: tuple[float, ...]  # fraction of the visual tokens kept after each module, as compiled
    segment_lengths: tuple[int, ...]  # tokens each run of layers processes and caches (prompt slots)
    programs: tuple[ProgramCost, ...]
    cache_bytes: int  # the whole KV cache (all chips), prompt and generation room
    cache_bytes_per_chip: int
    parameter_bytes: int  # all chips
    possible_programs: dict  # kind -> how many programs a server may compile at this batch and prompt length
    attention: str = "auto"  # the prefill's attention implementation

    @property
    def peak_bytes(self) -> int:
        """The largest per-chip footprint of any one program (its arguments include the weights and, for the
        decode, the cache)."""
        return max(p.total_bytes for p in self.programs)


def serving_model(cfg: LlavaConfig, method: str, dtype: str = "bfloat16", pruning: dict | None = None,
                  attention: str = "auto") -> PrunedLlava:
    """The model `launch/infer.py` serves, as shapes only: weights in `dtype`, pruning by `method` with the
    `pruning` fields (a run config's pruning section; the rest placed for the depth, as the trainer saves it),
    the prefill's `attention` implementation."""
    dt = jnp.dtype(dtype)
    pcfg = fit_to_depth(dict(pruning or {}) | {"method": method}, cfg.text.num_hidden_layers)
    return nnx.eval_shape(lambda: PrunedLlava(LlavaForConditionalGeneration(
        cfg, policy=DtypePolicy(dt, dt), attention=attention, rngs=nnx.Rngs(0)), pcfg, nnx.Rngs(1)))


def _with_sharding(tree):
    """A compiled program's outputs as the next program's abstract arguments (shape, dtype, sharding)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def segment_buckets(prompt_len: int, num_visual: int, fractions) -> list[int]:
    """Every length a run of layers after a module may have: buckets of `prompt_len` that hold the text (never
    pruned) plus any number of the visual tokens."""
    text = prompt_len - num_visual
    return sorted({bucket_length(text + n, prompt_len, fractions) for n in range(num_visual + 1)})


def capacities_for(keep: tuple[float, ...], prompt_len: int, num_visual: int, fractions) -> tuple[int, ...]:
    """The compact prefill's capacities when `keep` of the visual tokens stay after each module: the text plus
    those tokens, in buckets, never more than the run before (as `prefill.plan_capacities` plans them)."""
    return bucketed_capacities([prompt_len - num_visual + round(k * num_visual) for k in keep], prompt_len, fractions)


def decode_shapes(buckets: list[int], runs: int) -> int:
    """Combinations of capacities over `runs` pruned runs (each run's bucket at most the one before it): the
    compact prefill programs, and the decode programs over their caches, a server may compile."""
    ways = [1] * len(buckets)  # ways ending at each bucket, one run so far
    for _ in range(runs - 1):
        ways = [sum(ways[j] for j in range(i, len(buckets))) for i in range(len(buckets))]
    return sum(ways) if runs else 1


def serving_cost(cfg: LlavaConfig, topology: str, *, method: str = "atp", mode: str = "compact", batch: int = 8,
                 prompt_len: int = 2048, new_tokens: int = 128, keep: tuple[float, ...] | None = None,
                 data: int = 1, dtype: str = "bfloat16", decode_chunk: int = 16, pruning: dict | None = None,
                 attention: str = "auto") -> ServingCost:
    """Compiles the serving programs of `cfg` for `topology`: weights split over the `tensor` axis (the chips
    not used by `data`, which splits the batch). `keep`: kept fraction of the visual tokens after each module
    (default: half at each, as the random baseline's schedule); compact mode only. `pruning`: fields of the
    pruning config (e.g. a run config's `pruning` section). `attention`: the prefill's attention implementation
    (`common.attention`; "auto" takes the Pallas kernel on a TPU)."""
    if mode not in ("masked", "compact"):
        raise ValueError(f"mode {mode!r}: expected 'masked' or 'compact'")
    if prompt_len <= cfg.num_image_tokens:
        raise ValueError(f"prompt_len {prompt_len}: must exceed the {cfg.num_image_tokens} image tokens")
    if new_tokens < 1 or batch < 1:
        raise ValueError("batch and new_tokens must be at least 1")
    devices = topology_devices(topology)
    if len(devices) % data or batch % data:
        raise ValueError(f"data={data} must divide the {len(devices)} devices and the batch {batch}")
    mesh = make_mesh(data=data, fsdp=1, tensor=len(devices) // data, devices=devices)
    model = serving_model(cfg, method, dtype, pruning, attention)
    pcfg, modules = model.pcfg, model.module_layers
    if method == "none":
        mode = "masked"  # nothing to compact: the plain prefill
    keep = tuple(pcfg.random_schedule)[:len(modules)] if keep is None else tuple(keep) if modules else ()
    if len(keep) != len(modules) or not all(0 <= k <= 1 for k in keep):
        raise ValueError(f"keep {keep}: one fraction in [0, 1] per module after layers {modules}")
    graphdef, state = nnx.split(model)
    state = _with_sharding(jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state,
                                        param_shardings(state, mesh, DEFAULT_RULES)))
    rows = batch_sharding(mesh)
    ids = _abstract((batch, prompt_len), jnp.int32, rows)
    mask = _abstract((batch, prompt_len), jnp.bool_, rows)
    size = cfg.vision.image_size
    pixels = _abstract((batch, 3, size, size), jnp.float32, rows)
    p = cfg.num_image_tokens
    programs: list[ProgramCost] = []

    def run(name, fn, *args, **static):
        cost, compiled = compile_cost(name, fn, *args, **static)
        programs.append(cost)
        return _with_sharding(compiled.out_info)

    with use_mesh(mesh, DEFAULT_RULES):
        if mode == "masked":
            capacities, name = (), "prefill (masked)" if modules else "prefill"
        else:
            capacities, name = capacities_for(keep, prompt_len, p, pcfg.bucket_fractions), "prefill (compact)"
        out = run(name, prefill_program, graphdef, state, ids, pixels, mask, None, mode=mode,
                  capacities=capacities, last_logits_only=True, return_cache=True)
        cache, lengths = out.cache, [seg.prompt_len for seg in out.cache]
        cache = tuple(_with_room(seg, new_tokens, mesh) for seg in cache)
        ds = DecodeState(cache=cache, tokens=_abstract((batch, new_tokens + 1), jnp.int32, rows),
                         step=_abstract((), jnp.int32, NamedSharding(mesh, jax.sharding.PartitionSpec())),
                         done=_abstract((batch,), jnp.bool_, rows),
                         key=_abstract((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                       NamedSharding(mesh, jax.sharding.PartitionSpec())))
        run(f"decode ({decode_chunk} steps)", _decode, graphdef, state, ds, steps=decode_chunk, sampling=Sampling(),
            eos_id=cfg.text.eos_token_id)
        run(f"server decode ({SERVER_CHUNK} steps)", slot_decode, graphdef, state, _pool(cache, batch, rows),
            steps=SERVER_CHUNK, eos_id=cfg.text.eos_token_id)
    kv = [x for seg in cache for x in (seg.k, seg.v)]
    cache_bytes = sum(x.size * x.dtype.itemsize for x in kv)
    per_chip = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in kv)
    params = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    if mode == "compact":
        combinations = decode_shapes(segment_buckets(prompt_len, p, pcfg.bucket_fractions), len(modules))
        possible = {"prefill": combinations, "decode": combinations}
    else:
        possible = {"prefill": 1, "decode": 1}
    return ServingCost(topology=topology, chips=chip_count(topology), mesh=dict(mesh.shape), method=method,
                       mode=mode, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens,
                       keep=keep if mode == "compact" else (), segment_lengths=tuple(lengths),
                       programs=tuple(programs), cache_bytes=cache_bytes, cache_bytes_per_chip=per_chip,
                       parameter_bytes=params, possible_programs=possible,
                       attention=on_tpu(attention))


def _pool(cache: tuple[Segment, ...], batch: int, rows) -> Pool:
    """The server's decode pool (`slots.Pool`) over the abstract cache: one row per request, each with its own
    slot base, budget and sampling settings, laid out like the cache."""

    def per_row(dtype):
        return _abstract((batch,), dtype, rows)

    segments = tuple(SlotSegment(k=seg.k, v=seg.v, visible=seg.visible, next_position=seg.next_position,
                                 base=per_row(jnp.int32), start=seg.start, stop=seg.stop) for seg in cache)
    return Pool(segments=segments, token=per_row(jnp.int32), count=per_row(jnp.int32), limit=per_row(jnp.int32),
                done=per_row(jnp.bool_), seed=per_row(jnp.int32), temperature=per_row(jnp.float32),
                top_k=per_row(jnp.int32), top_p=per_row(jnp.float32))


def _with_room(seg: Segment, new_tokens: int, mesh) -> Segment:
    """The abstract segment `with_room` makes for generation, laid out by the mesh rules: keys and values
    [n, B, S, K, H] split over the batch and the KV heads, the rest over the batch."""
    n, b, s, k, h = seg.k.shape
    shape = (n, b, s + new_tokens, k, h)
    kv = NamedSharding(mesh, logical_to_spec((None, "batch", "sequence", "kv_heads", None), shape, DEFAULT_RULES,
                                             mesh))
    rows = NamedSharding(mesh, logical_to_spec(("batch",), (b,), DEFAULT_RULES, mesh))
    rows2 = NamedSharding(mesh, logical_to_spec(("batch", "sequence"), (b, s + new_tokens), DEFAULT_RULES, mesh))
    return dataclasses.replace(seg, k=_abstract(shape, seg.k.dtype, kv), v=_abstract(shape, seg.v.dtype, kv),
                               visible=_abstract((b, s + new_tokens), jnp.bool_, rows2),
                               next_position=_abstract((b,), jnp.int32, rows))


__all__ = ["ServingCost", "capacities_for", "decode_shapes", "segment_buckets", "serving_cost", "serving_model"]
