"""What one pruning module decides: the tokens' roles, ATP's side-path decision, the baselines' rankings.

Each module sits after one decoder layer and decides, from that layer's queries and keys, which visual tokens
later layers still see; decisions are cumulative. The same functions serve every execution mode (docs/method.md):
the full frame (soft, masked) and compacted ones.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import NEG_INF
from atp_jax.pruning.compaction import gather_tokens
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.masks import hard_keep, keep_top, soft_keep
from atp_jax.pruning.scoring import attention_received, minmax_normalise, redundancy_score, sap_scores, visual_positions
from atp_jax.pruning.thresholds import ThresholdMLP, resample_sorted


def prompt_mask(labels: Int[Array, "B T"], ignore_index: int = -100) -> Bool[Array, "B T"]:
    """The prompt of each training row: every token before its first supervised one (labels[t] != ignore_index).
    A row with no supervised token is all prompt. Example: labels [[-100, -100, 7, -100, 9]] -> [[1, 1, 0, 0, 0]].
    """
    return jnp.cumsum(labels != ignore_index, axis=1) == 0


def token_roles(input_ids: Int[Array, "B T"], image_mask: Bool[Array, "B T"], valid: Bool[Array, "B T"],
                has_image: Bool[Array, " B"], prompt: Bool[Array, "B T"] | None = None):
    """Which tokens query the side paths, and a per-instance seed.

    `prompt`: the tokens a model may read before it answers (None at inference: every token). In training it
    is `prompt_mask(labels)`, so no answer token (nor any token after one) ever chooses which visual keys are
    hidden, and training scores exactly the queries inference scores. Returns (text_weight [B, T]: the prompt
    text after the image, ATP's cross-attention queries; last_weight [B, T]: the prompt's last token,
    FastV/PyramidDrop's query; row_seed [B]: a hash of the row's prompt tokens, so random choices depend on
    neither batch, padding nor answer).
    """
    t = input_ids.shape[1]
    prompt = valid if prompt is None else valid & prompt
    last_visual = jnp.max(jnp.where(image_mask, jnp.arange(t), -1), axis=1)  # [B]
    text_weight = ((jnp.arange(t)[None] > last_visual[:, None]) & prompt & has_image[:, None]).astype(jnp.float32)
    last_prompt = jnp.max(jnp.where(prompt, jnp.arange(t), -1), axis=1)
    last_weight = (jnp.arange(t)[None] == last_prompt[:, None]).astype(jnp.float32)
    ids = jnp.where(prompt, input_ids, 0)
    row_seed = (ids * (2 * jnp.cumsum(prompt, axis=1) + 1)).sum(axis=1) % (2**31 - 1)
    return text_weight, last_weight, row_seed


def module_layers(pcfg: PruningConfig) -> tuple[int, ...]:
    """The decoder layers after which a pruning module runs."""
    if pcfg.method in ("atp", "spatial", "random"):
        return pcfg.atp_layers
    if pcfg.method == "fastv":
        return (pcfg.fastv_layer - 1,)
    if pcfg.method == "pdrop":
        return tuple(layer - 1 for layer in pcfg.pdrop_layers)
    return ()


def initial_thresholds(sap: np.ndarray, target_ratio: float) -> tuple[float, float]:
    """Starting (theta_r, theta_s): SAP alone keeps about half the budget and redundancy the top scores.

    With min-max normalised redundancy scores in [0, 1], theta_r = 1 - target keeps the top of the range.
    """
    order = np.sort(sap)[::-1]
    k = max(1, int(round(len(sap) * target_ratio / 2)))
    theta_s = float(np.clip((order[k - 1] + order[min(k, len(sap) - 1)]) / 2, 0.01, 0.99))
    return float(np.clip(1.0 - target_ratio, 0.01, 0.99)), theta_s


def sap_for(cfg, pcfg: PruningConfig) -> np.ndarray:
    """SAP scores in the order of the visual tokens (CLS, when kept by the 'full' strategy, always scores 1)."""
    s = sap_scores(cfg.vision.grid, pcfg.sap_lambda)
    return np.concatenate([[1.0], s]).astype(np.float32) if cfg.vision_feature_select_strategy == "full" else s


def select_queries(q: Float[Array, "B T N H"], weight: Float[Array, "B T"], n: int):
    """The side path's queries: the first `n` slots with weight > 0 gathered with their weights ([B, n, N, H],
    [B, n]); with fewer such slots the rest carry weight 0. `n` is a static bound (e.g. the text length)."""
    slot = visual_positions(weight > 0, n)
    return gather_tokens(q, slot), jnp.take_along_axis(weight, slot, axis=1)


def atp_decision(mlp: ThresholdMLP, q_vis, k_vis, q_text, text_weight: Float[Array, "B Q"],
                 keep: Float[Array, "B P"], sap: Float[Array, "B P"], pcfg: PruningConfig, soft: bool):
    """One ATP module: redundancy scores on the side path, instance thresholds, the new cumulative keep:
    (keep [B, P], thresholds [B, 2], S_red [B, P])."""
    kept = keep > 0.5
    key_bias_vis = jnp.log(keep + pcfg.log_eps) if soft else jnp.where(kept, 0.0, NEG_INF)
    s_self = attention_received(q_vis, k_vis, key_bias_vis, keep)
    s_cross = attention_received(q_text, k_vis, key_bias_vis, text_weight)
    s_red = jax.lax.stop_gradient(redundancy_score(s_self, s_cross, kept, text_weight.sum(-1) > 0))
    profile = [jax.lax.stop_gradient(resample_sorted(minmax_normalise(s, kept), kept, pcfg.sorted_len))
               for s in (s_self, s_cross)]
    theta_r, theta_s = mlp(*profile)
    if soft:
        new = keep * soft_keep(s_red, sap, theta_r, theta_s, pcfg.temperature)
    else:
        new = keep * hard_keep(s_red, sap, theta_r, theta_s)
    return new, jnp.stack([theta_r, theta_s], axis=-1), s_red


def spatial_threshold(sap: np.ndarray, target_ratio: float) -> float:
    """The SAP threshold of the densest skeleton that fits `target_ratio` of the grid (a score level's
    patches are kept or dropped together)."""
    budget = max(1, int(round(len(sap) * target_ratio)))
    levels = np.unique(sap)[::-1]
    fits = [lv for lv in levels if (sap >= lv).sum() <= budget]
    return float((fits[-1] if fits else levels[0]) - 1e-6)


def scheduled_count(pcfg: PruningConfig, m: int, num_visual: int) -> int:
    """The visual tokens a ranked baseline keeps after module `m` by its own schedule (at most those kept before).
    Example: PyramidDrop keeping 0.5 at each stage, 576 tokens, m = 1 -> 144."""
    if pcfg.method == "fastv":
        return round((1 - pcfg.fastv_ratio) * num_visual)
    if pcfg.method == "pdrop":
        return round(num_visual * pcfg.pdrop_keep ** (m + 1))
    return round(num_visual * pcfg.random_schedule[m])


def most_kept(pcfg: PruningConfig, cfg, m: int, counts: np.ndarray | None = None) -> int | None:
    """The most visual tokens any instance keeps after module `m` when that is known before the prefill runs:
    a ranked baseline's schedule or its given per-instance `counts` [B, M], the spatial skeleton; None for ATP,
    whose instances decide at run time."""
    p = cfg.num_image_tokens
    if pcfg.method in ("fastv", "pdrop", "random"):
        return min(p, int(np.max(counts[:, m])) if counts is not None else scheduled_count(pcfg, m, p))
    if pcfg.method == "spatial":
        return int((sap_for(cfg, pcfg) > spatial_threshold(sap_for(cfg, pcfg), pcfg.target_ratio)).sum())
    return None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModuleInputs:
    """What a pruning module reads from the frame (full or compacted) after its decoder layer."""

    keep: Float[Array, "B P"]  # keep weights of the frame's visual entries so far
    vis_slot: Int[Array, "B P"]  # sequence slot of each visual entry
    vis_id: Int[Array, "B P"]  # its index among the image's visual tokens
    q: Float[Array, "B T N H"]  # the layer's RoPE'd queries and keys
    k: Float[Array, "B T K H"]
    seq_keep: Float[Array, "B T"]  # the keys the baselines' query sees
    text_weight: Float[Array, "B T"]  # ATP's cross-attention queries (the prompt's text after the image)
    last_weight: Float[Array, "B T"]  # the prompt's last token (FastV's, PyramidDrop's query)
    row_seed: Int[Array, " B"]  # the random baseline's per-row seed


def ranked_decision(m: int, x: ModuleInputs, num_visual: int, pcfg: PruningConfig,
                    counts: Int[Array, " B"] | None = None) -> Float[Array, "B P"]:
    """The baselines: keep a fixed number of the kept visual tokens, ranked by the attention the prompt's last
    token pays them (FastV, PyramidDrop: softmax over every key it sees, head-averaged, visual columns) or at
    random. The number follows the method's schedule, or `counts` per instance (e.g. another method's counts,
    for a random baseline at exactly its budget); `num_visual`: the image's visual tokens."""
    kept = x.keep > 0.5
    count = scheduled_count(pcfg, m, num_visual) if counts is None else counts
    if pcfg.method == "random":  # a key per instance, from its content: a batch draws what its rows draw alone
        base = jax.random.fold_in(jax.random.key(pcfg.seed), m)
        draws = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(base, s), (num_visual,)))(x.row_seed)
        scores = jnp.take_along_axis(draws, x.vis_id, axis=1)
    else:
        q_last, _ = select_queries(x.q, x.last_weight, 1)
        received = attention_received(q_last, x.k, jnp.where(x.seq_keep > 0.5, 0.0, NEG_INF),
                                      jnp.ones(q_last.shape[:2]))  # [B, T]
        scores = jnp.take_along_axis(received, x.vis_slot, axis=1)
    return keep_top(scores, kept, count).astype(jnp.float32)


@jax.named_scope("pruning_decision")
def decide(model, m: int, x: ModuleInputs, soft: bool, max_text: int,
           counts: Int[Array, "B M"] | None = None):
    """Module `m` of `model` (a PrunedLlava): its new keep weights for the frame's visual entries, its thresholds
    and its redundancy scores (ATP; zeros for the other methods). The same code serves the full frame (masked,
    soft) and compacted ones. `max_text` bounds the text tokens after the image (ATP's cross queries are
    gathered to that static count)."""
    pcfg, cfg = model.pcfg, model.llava.config
    keep = x.keep
    sap_np = sap_for(cfg, pcfg)
    sap = jnp.asarray(sap_np)[x.vis_id]  # [B, P']
    theta, score = jnp.zeros((keep.shape[0], 2)), jnp.zeros_like(keep)
    if pcfg.method == "atp":
        q_text, text_weight = select_queries(x.q, x.text_weight, min(max_text, x.q.shape[1]))
        keep, theta, score = atp_decision(model.thresholds[m], gather_tokens(x.q, x.vis_slot),
                                          gather_tokens(x.k, x.vis_slot), q_text, text_weight, keep, sap, pcfg, soft)
    elif pcfg.method == "spatial":
        gap = sap - spatial_threshold(sap_np, pcfg.target_ratio)
        keep = keep * (jax.nn.sigmoid(pcfg.temperature * gap) if soft else (gap > 0))
    else:  # fastv, pdrop, random: hard top-k among the kept tokens, in every mode
        keep = ranked_decision(m, x, cfg.num_image_tokens, pcfg, None if counts is None else counts[:, m])
    return keep, theta, score


def check_counts(counts, pcfg: PruningConfig, batch: int, num_modules: int):
    """Validates per-instance budgets for the ranked baselines: an int array [batch, modules], or None."""
    if counts is None:
        return None
    if pcfg.method not in ("random", "fastv", "pdrop"):
        raise ValueError(f"counts apply to the ranked baselines (random, fastv, pdrop), not {pcfg.method!r}")
    counts = jnp.asarray(counts)
    if counts.shape != (batch, num_modules) or not jnp.issubdtype(counts.dtype, jnp.number):
        raise ValueError(f"counts must be a number array of shape {(batch, num_modules)} (batch, modules), "
                         f"got {counts.dtype}{list(counts.shape)}")
    return jnp.round(counts).astype(jnp.int32)
