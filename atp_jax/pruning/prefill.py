"""The inference prefill as one jitted program per prompt shape: masked, or compact with planned capacities.

In `compact` mode the sequence after each pruning module is gathered into a static number of slots, its
capacity, so the whole prefill (vision tower, every run of layers, every module, the compactions, the LM head)
is one program with no transfer to the host between modules. A capacity holds the text (never pruned) and the
visual tokens the module may keep, rounded up to a bucket (`PruningConfig.bucket_fractions` of the prompt
length):

- the ranked baselines and the spatial skeleton know their counts before the prefill runs (their schedule, or
  the per-instance `counts` they are given), so their capacities are exact;
- ATP decides per instance at run time, so its capacities are the buckets that held the most it kept in earlier
  prefills of the same prompt length. The first prefill of a length runs at full capacity. The program reports
  the most tokens any row kept after each module (`needed`, read back with the logits); a prefill that
  overflowed a capacity is run again at full capacity, so the result is always exact (compact == masked),
  and the capacities grow to hold it. In a steady state one program serves each prompt length.
"""

from __future__ import annotations

import functools
import weakref

import jax
import numpy as np
from flax import nnx

from atp_jax.pruning.compaction import bucketed_capacities
from atp_jax.pruning.decisions import most_kept
from atp_jax.pruning.engine import PrunedLlava, PrunedOutput

# What ATP kept in earlier compact prefills, per model and prompt length: the most tokens any row kept after
# each module. Only speed depends on it; results never do.
_seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@functools.partial(jax.jit, static_argnames=("graphdef", "mode", "capacities", "last_logits_only", "return_cache"))
def prefill_program(graphdef, state, input_ids, pixel_values, attention_mask, counts, *, mode: str,
                    capacities: tuple[int, ...] = (), last_logits_only: bool = False,
                    return_cache: bool = False) -> PrunedOutput:
    """`PrunedLlava.__call__` as one jitted program, the model given as `nnx.split`'s (graphdef, state)."""
    model = nnx.merge(graphdef, state)
    return model(input_ids, pixel_values, attention_mask, mode=mode, counts=counts, capacities=capacities,
                 last_logits_only=last_logits_only, return_cache=return_cache)


def plan_capacities(model: PrunedLlava, prompt_len: int, counts=None) -> tuple[int, ...]:
    """The slots after each module for a compact prefill of `prompt_len` tokens: the text plus the most visual
    tokens an instance may keep (known, or the most ATP kept before; all of them the first time), rounded up to
    a bucket, never more than the run before."""
    cfg, pcfg = model.llava.config, model.pcfg
    text = prompt_len - cfg.num_image_tokens
    seen = _seen.get(model, {}).get(prompt_len)
    counts = None if counts is None else np.asarray(counts)
    slots = []
    for m in range(len(model.module_layers)):
        visual = most_kept(pcfg, cfg, m, counts)
        if visual is not None:
            slots.append(text + visual)
        elif seen is not None:
            slots.append(int(seen[m]))
        else:
            slots.append(prompt_len)
    return bucketed_capacities(slots, prompt_len, pcfg.bucket_fractions)


def remember(model: PrunedLlava, prompt_len: int, needed: np.ndarray) -> None:
    """Grows the memory of what the model kept at this prompt length (per module, the most tokens of any row)."""
    per_length = _seen.setdefault(model, {})
    before = per_length.get(prompt_len)
    per_length[prompt_len] = needed if before is None else np.maximum(before, needed)


def prefill_compact(model: PrunedLlava, input_ids, pixel_values, attention_mask=None, *,
                    last_logits_only: bool = False, counts=None, return_cache: bool = False,
                    capacities: tuple[int, ...] | None = None) -> PrunedOutput:
    """A prefill that removes pruned tokens (their compute and their KV cache) after every module, as one
    program; exact whatever the capacities (an overflowing prefill runs again at full capacity).

    `capacities`: the slots after each module (default: `plan_capacities`). `counts`: per-instance budgets for
    the ranked baselines. `last_logits_only`, `return_cache`: as in `PrunedLlava.__call__`.
    """
    t = input_ids.shape[1]
    graphdef, state = nnx.split(model)
    images = pixel_values is not None
    planned = tuple(capacities) if capacities is not None else plan_capacities(model, t, counts)

    def run(caps):
        return prefill_program(graphdef, state, input_ids, pixel_values, attention_mask, counts, mode="compact",
                               capacities=caps if images else (), last_logits_only=last_logits_only,
                               return_cache=return_cache)

    out = run(planned)
    if not images or not model.module_layers:
        return out
    needed = np.asarray(out.needed)  # the one read-back, after the whole prefill
    if (needed > np.asarray(planned)).any():
        full = (t,) * len(planned)
        out = run(full)
        needed = np.asarray(out.needed)
    remember(model, t, needed)
    return out
