"""`compact` mode: after each pruning module the kept tokens are gathered into a shorter sequence.

Each segment of layers runs as one jitted program on a sequence whose length is rounded up to a bucket
(`PruningConfig.bucket_fractions` of the prompt length), so a prefill compiles at most one program per
(segment, bucket) and the layers after a module really process fewer tokens. Rows keep their own token
sets, padded to the batch maximum and masked. Every token carries its original sequence index and its
original RoPE position.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.kv_cache import Segment, make_segment
from atp_jax.models.llama import padding_bias, positions_from_mask
from atp_jax.pruning.accounting import visual_tokens_per_layer
from atp_jax.pruning.compaction import bucket_length, compaction_index, gather_tokens
from atp_jax.pruning.engine import ModuleInputs, PrunedLlava, check_counts, decide, token_roles
from atp_jax.pruning.scoring import visual_positions

TRACES = {"segment": 0, "compact": 0}  # programs traced, for tests that count compilations


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Frame:
    """The tokens of a (possibly compacted) sequence, one entry per slot."""

    h: Float[Array, "B T D"]
    positions: Int[Array, "B T"]  # RoPE positions (original unless position_mode is contiguous)
    valid: Bool[Array, "B T"]  # a real token (not padding)
    vis_id: Int[Array, "B T"]  # index among the image's visual tokens, -1 for text
    source: Int[Array, "B T"]  # index in the original sequence
    text_weight: Float[Array, "B T"]  # text after the image (ATP's cross-attention queries)
    last_weight: Float[Array, "B T"]  # the prompt's last token


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompactOutput:
    logits: Float[Array, "B S V"]  # at the final frame's slots
    source: Int[Array, "B S"]  # original sequence index of each slot
    valid: Bool[Array, "B S"]
    keep: Float[Array, "B M P"]  # visual tokens kept after each module, original visual order
    counts: Float[Array, "B M"]
    visual_per_layer: Float[Array, "B L"]
    lengths: tuple[int, ...] = dataclasses.field(metadata={"static": True}, default=())  # sequence length per segment
    cache: tuple[Segment, ...] | None = None  # the KV cache per segment, when asked for


@functools.partial(jax.jit, static_argnames=("graphdef", "start", "stop", "m", "max_text", "with_cache"))
def _segment(graphdef, state, frame: Frame, row_seed, counts, start: int, stop: int, m: int | None, max_text: int,
             with_cache: bool):
    """Layers start..stop-1 on the frame; with a module, also its decision (seq_keep, keep, vis_id); with
    `with_cache`, also the layers' keys and values: (frame, decision | None, kv | None)."""
    TRACES["segment"] += 1
    model = nnx.merge(graphdef, state)
    lm = model.llava.language_model
    bias = padding_bias(frame.valid)
    out = lm.run_layers(frame.h, frame.positions, bias, start, stop, return_last_qk=m is not None,
                        return_kv=with_cache)
    h, kv = out.h, out.kv
    if m is None:
        return dataclasses.replace(frame, h=h), None, kv
    q, k = out.qk
    is_visual = (frame.vis_id >= 0) & frame.valid
    p = min(model.llava.config.num_image_tokens, frame.vis_id.shape[1])
    vis_slot = visual_positions(is_visual, p)  # [B, P']
    slot_valid = jnp.take_along_axis(is_visual, vis_slot, axis=1)
    vis_id = jnp.where(slot_valid, jnp.take_along_axis(frame.vis_id, vis_slot, axis=1), 0)
    seq_keep = frame.valid.astype(jnp.float32)
    inputs = ModuleInputs(slot_valid.astype(jnp.float32), vis_slot, vis_id, q, k, seq_keep, frame.text_weight,
                          frame.last_weight, row_seed)
    keep, _, _ = decide(model, m, inputs, soft=False, max_text=max_text, counts=counts)
    rows = jnp.arange(keep.shape[0])[:, None]
    dropped = slot_valid & (keep < 0.5)
    seq_keep = frame.valid.at[rows, vis_slot].set(jnp.where(dropped, False, jnp.take_along_axis(frame.valid, vis_slot,
                                                                                                   axis=1)))
    return dataclasses.replace(frame, h=h), (seq_keep, keep * slot_valid, jnp.where(slot_valid, vis_id, -1)), kv


@functools.partial(jax.jit, static_argnames=("length", "contiguous"))
def _compact(frame: Frame, seq_keep, length: int, contiguous: bool) -> Frame:
    TRACES["compact"] += 1
    index, valid = compaction_index(seq_keep, length)
    out = jax.tree.map(lambda x: gather_tokens(x, index), frame)
    out = dataclasses.replace(out, valid=valid, vis_id=jnp.where(valid, out.vis_id, -1))
    if contiguous:
        out = dataclasses.replace(out, positions=positions_from_mask(valid, *valid.shape))
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "last_only"))
def _head(graphdef, state, frame: Frame, last_only: bool):
    model = nnx.merge(graphdef, state)
    h = frame.h
    if last_only:
        h = gather_tokens(h, jnp.argmax(frame.last_weight, axis=1)[:, None])  # [B, 1, D]
    return model.llava.language_model.head(h).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _initial_frame(graphdef, state, input_ids, pixel_values, attention_mask):
    """Embeddings with the image merged in, and every token's bookkeeping, in the original order."""
    model = nnx.merge(graphdef, state)
    b, t = input_ids.shape
    h, _, image_mask = model.llava.embed(input_ids, pixel_values)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    has_image = image_mask.any(axis=1)
    text_weight, last_weight, row_seed = token_roles(input_ids, image_mask, valid, has_image)
    frame = Frame(h=h, positions=positions_from_mask(attention_mask, b, t), valid=valid,
                  vis_id=jnp.where(image_mask, jnp.cumsum(image_mask, axis=1) - 1, -1),
                  source=jnp.broadcast_to(jnp.arange(t), (b, t)), text_weight=text_weight, last_weight=last_weight)
    return frame, row_seed, has_image


def prefill_compact(model: PrunedLlava, input_ids, pixel_values, attention_mask=None,
                    last_logits_only: bool = False, counts=None, return_cache: bool = False) -> CompactOutput:
    """A prefill that removes pruned tokens (and so their compute and KV cache) after every module.

    `last_logits_only`: logits of the prompt's last token only (what generation needs), `[B, 1, V]`.
    `counts`: per-instance budgets for the ranked baselines, as in `PrunedLlava.__call__`.
    `return_cache`: also the KV cache, one segment per run of layers, each as long as its compacted frame.
    """
    llava, pcfg = model.llava, model.pcfg
    cfg = llava.config
    b, t = input_ids.shape
    p, n_layers = cfg.num_image_tokens, cfg.text.num_hidden_layers
    # Split once: the jitted stages take the state as a pytree (an nnx.jit per stage would walk the model
    # graph on every call, a large share of a small prefill).
    graphdef, state = nnx.split(model)
    frame, row_seed, has_image = _initial_frame(graphdef, state, input_ids, pixel_values, attention_mask)
    modules = model.module_layers if pixel_values is not None else ()
    counts = check_counts(counts, pcfg, b, len(model.module_layers))
    keeps, lengths, start, cache = [], [t], 0, []
    real_length = frame.valid.sum(axis=1)
    for m, layer in enumerate(modules + (None,)):
        stop = n_layers if layer is None else layer + 1
        seen = frame.valid
        frame, decision, kv = _segment(graphdef, state, frame, row_seed, counts, start=start, stop=stop,
                                       m=None if layer is None else m, max_text=max(1, t - p),
                                       with_cache=return_cache)
        if return_cache:
            cache.append(make_segment(kv, seen, real_length, pcfg.position_mode == "contiguous", start, stop))
        if decision is None:
            break
        seq_keep, keep_slots, ids_slots = decision
        rows = jnp.arange(b)[:, None]
        keep = jnp.zeros((b, p)).at[rows, jnp.where(ids_slots >= 0, ids_slots, p)].set(keep_slots, mode="drop")
        keeps.append(keep)
        length = bucket_length(int(np.asarray(seq_keep.sum(axis=1)).max()), t, pcfg.bucket_fractions)
        frame = _compact(frame, seq_keep, length=length, contiguous=pcfg.position_mode == "contiguous")
        lengths.append(length)
        start = stop
    logits = _head(graphdef, state, frame, last_only=last_logits_only)
    keep_all = jnp.stack(keeps, axis=1) if keeps else jnp.zeros((b, len(model.module_layers), p))
    counts = keep_all.sum(-1)
    per_layer = visual_tokens_per_layer(counts, modules, n_layers, has_image.astype(jnp.float32) * p)
    return CompactOutput(logits=logits, source=frame.source, valid=frame.valid, keep=keep_all, counts=counts,
                         visual_per_layer=per_layer, lengths=tuple(lengths),
                         cache=tuple(cache) if return_cache else None)
