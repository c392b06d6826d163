"""The segment walk that serves every execution mode: decoder layers in runs between pruning modules.

Einsum alphabet: B batch, T sequence (of the current frame), P visual tokens, M pruning modules.

A `Frame` holds one entry per sequence slot: the hidden state and each token's bookkeeping. The walk runs the
layers up to a module, lets the module decide (`decisions.decide`) from that layer's queries and keys, writes
the new keep weights into the frame, and goes on. The mode decides what the keep weights do:

- `soft` (training): weights in (0, 1) enter attention as log(keep + eps) on the visual keys.
- `masked` (static shapes): hard 0/1 decisions; a dropped key gets NEG_INF, which equals removing it.
- `compact` (inference): after each module the kept tokens are gathered into a frame of a static `capacity`
  (so the later layers really process fewer tokens); each token keeps its original sequence index and RoPE
  position. A row that keeps more tokens than the capacity loses the rest: the walk reports, per module, the
  most tokens any row kept (`needed`), and the caller reruns with room when that exceeds the capacity.

The three modes take the same decisions on the same inputs: masked == compact exactly (when nothing overflows),
and soft == masked in the limit of a hard temperature.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.kv_cache import Segment, make_segment
from atp_jax.models.llama import padding_bias, positions_from_mask
from atp_jax.pruning.compaction import compaction_index, gather_tokens
from atp_jax.pruning.decisions import ModuleInputs, decide, token_roles
from atp_jax.pruning.masks import key_bias
from atp_jax.pruning.scoring import visual_positions

MODES = ("soft", "masked", "compact")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Frame:
    """The tokens of a (possibly compacted) sequence, one entry per slot."""

    h: Float[Array, "B T D"]
    positions: Int[Array, "B T"]  # RoPE positions (the original ones unless position_mode is contiguous)
    valid: Bool[Array, "B T"]  # a real token (not padding)
    prompt: Bool[Array, "B T"]  # a real token the side paths may read (training: not the answer)
    keep: Float[Array, "B T"]  # keep weight: 1 on text, the visual token's weight so far (soft, masked)
    vis_id: Int[Array, "B T"]  # index among the image's visual tokens, -1 for text
    source: Int[Array, "B T"]  # index in the original sequence
    text_weight: Float[Array, "B T"]  # the prompt's text after the image (ATP's cross-attention queries)
    last_weight: Float[Array, "B T"]  # the prompt's last token (FastV's, PyramidDrop's query)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Walked:
    frame: Frame  # after the last layer
    keep: Float[Array, "B M P"]  # visual keep weights after each module, original visual order
    thresholds: Float[Array, "B M 2"]  # (theta_r, theta_s) per module; zeros for methods without them
    scores: Float[Array, "B M P"]  # ATP's redundancy score at each module, original visual order
    needed: Int[Array, " M"]  # the most tokens any row kept after each module (text included)
    cache: tuple[Segment, ...] | None  # the KV cache per run of layers, when asked for


def initial_frame(model, input_ids: Int[Array, "B T"], pixel_values, attention_mask=None,
                  prompt: Bool[Array, "B T"] | None = None) -> tuple[Frame, Int[Array, " B"], Bool[Array, " B"]]:
    """Embeddings with the image merged in and every token's bookkeeping in the original order; the per-row
    seed of the random baseline; which rows have an image. `prompt`: see `decisions.token_roles`."""
    b, t = input_ids.shape
    h, _, image_mask = model.llava.embed(input_ids, pixel_values)
    valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    has_image = image_mask.any(axis=1) & (pixel_values is not None)
    prompt = valid if prompt is None else valid & prompt
    text_weight, last_weight, row_seed = token_roles(input_ids, image_mask, valid, has_image, prompt)
    is_visual = image_mask & has_image[:, None]
    frame = Frame(h=h, positions=positions_from_mask(attention_mask, b, t), valid=valid, prompt=prompt,
                  keep=jnp.ones((b, t), jnp.float32),
                  vis_id=jnp.where(is_visual, jnp.cumsum(is_visual, axis=1) - 1, -1),
                  source=jnp.broadcast_to(jnp.arange(t), (b, t)), text_weight=text_weight, last_weight=last_weight)
    return frame, row_seed, has_image


@jax.named_scope("compaction")
def compact(frame: Frame, kept: Bool[Array, "B T"], capacity: int, contiguous: bool) -> Frame:
    """Each row's kept tokens gathered, in order, into `capacity` slots (the rest padding)."""
    index, valid = compaction_index(kept, capacity)
    out = jax.tree.map(lambda x: gather_tokens(x, index), frame)
    out = dataclasses.replace(out, valid=valid, prompt=out.prompt & valid, keep=valid.astype(jnp.float32),
                              vis_id=jnp.where(valid, out.vis_id, -1))
    if contiguous:
        out = dataclasses.replace(out, positions=positions_from_mask(valid, *valid.shape))
    return out


def walk(model, frame: Frame, row_seed: Int[Array, " B"], has_image: Bool[Array, " B"], *, mode: str,
         modules: tuple[int, ...], max_text: int, counts: Int[Array, "B M"] | None = None,
         capacities: tuple[int, ...] = (), padded: bool = True, return_cache: bool = False) -> Walked:
    """Every decoder layer on `frame`, with the pruning modules after `modules` (the model's module layers, or
    none: an input without an image). `mode`: soft, masked or compact; `capacities`: compact only, the slots
    of the frame after each module. `padded`: the frame has padding to hide (else its first run needs no bias).
    `max_text`: a static bound on the text after the image. `counts`: per-instance budgets [B, M] for the
    ranked baselines."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: expected one of {MODES}")
    if mode == "compact" and len(capacities) != len(modules):
        raise ValueError(f"compact mode needs one capacity per module, got {capacities} for {modules}")
    lm, pcfg = model.llava.language_model, model.pcfg
    p, n_layers = model.llava.config.num_image_tokens, model.llava.config.text.num_hidden_layers
    contiguous, soft = pcfg.position_mode == "contiguous", mode == "soft"
    b = frame.h.shape[0]
    rows = jnp.arange(b)[:, None]
    real_length = frame.valid.sum(axis=1)
    keeps, thetas, scores, needed, cache = [], [], [], [], []
    start = 0
    for m, layer in enumerate(modules + (None,)):
        stop = n_layers if layer is None else layer + 1
        bias = padding_bias(frame.valid) if padded else None
        if m > 0 and mode != "compact":
            pruned = key_bias(frame.keep, pcfg.log_eps if soft else None)
            bias = pruned if bias is None else pruned + bias
        out = lm.run_layers(frame.h, frame.positions, bias, start, stop, return_last_qk=layer is not None,
                            return_kv=return_cache)
        if return_cache:
            seen = frame.valid & (frame.keep > 0.5)
            cache.append(make_segment(out.kv, seen, real_length, contiguous, start, stop))
        frame = dataclasses.replace(frame, h=out.h)
        if layer is None:
            break
        # The module: the frame's visual entries (slot order is the original visual order), its decision.
        q, k = out.qk
        is_visual = (frame.vis_id >= 0) & frame.valid
        vis_slot = visual_positions(is_visual, min(p, is_visual.shape[1]))  # [B, P']
        slot_valid = jnp.take_along_axis(is_visual, vis_slot, axis=1)
        vis_id = jnp.where(slot_valid, jnp.take_along_axis(frame.vis_id, vis_slot, axis=1), 0)
        before = jnp.take_along_axis(frame.keep, vis_slot, axis=1) * slot_valid
        inputs = ModuleInputs(before, vis_slot, vis_id, q, k, frame.keep * frame.prompt, frame.text_weight,
                              frame.last_weight, row_seed)
        keep, theta, score = decide(model, m, inputs, soft, max_text=max_text, counts=counts)
        keep = jnp.where(slot_valid & has_image[:, None], keep, 0.0)
        frame = dataclasses.replace(frame, keep=frame.keep.at[rows, vis_slot].set(
            jnp.where(slot_valid, keep, jnp.take_along_axis(frame.keep, vis_slot, axis=1))))
        to_visual = jnp.where(slot_valid, vis_id, p)  # original visual order; p: dropped by the scatter
        keeps.append(jnp.zeros((b, p), keep.dtype).at[rows, to_visual].set(keep, mode="drop"))
        scores.append(jnp.zeros((b, p), score.dtype).at[rows, to_visual].set(score * slot_valid, mode="drop"))
        thetas.append(theta)
        kept = frame.valid & (frame.keep > 0.5)
        needed.append(kept.sum(axis=1).max())
        if mode == "compact":
            frame, padded = compact(frame, kept, capacities[m], contiguous), True
        elif contiguous:
            frame = dataclasses.replace(frame, positions=positions_from_mask(kept, *kept.shape))
        start = stop
    n = len(modules)
    return Walked(frame=frame,
                  keep=jnp.stack(keeps, axis=1) if keeps else jnp.zeros((b, n, p)),
                  thresholds=jnp.stack(thetas, axis=1) if thetas else jnp.zeros((b, n, 2)),
                  scores=jnp.stack(scores, axis=1) if scores else jnp.zeros((b, n, p)),
                  needed=jnp.stack(needed) if needed else jnp.zeros((0,), jnp.int32),
                  cache=tuple(cache) if return_cache else None)
