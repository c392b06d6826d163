"""ATP inside LLaVA: pruning modules between decoder layers, in `soft` and `masked` mode (static shapes).

Einsum alphabet: B batch, T sequence, P visual tokens, M pruning modules, L decoder layers, V vocab.
Each module sits after one decoder layer and decides, from that layer's queries and keys, which visual
tokens later layers still see; decisions are cumulative. `soft` multiplies soft keep-weights D and adds
log(D + eps) to the attention logits of visual keys; `masked` uses hard 0/1 decisions (NEG_INF).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import NEG_INF
from atp_jax.models.kv_cache import Segment, make_segment
from atp_jax.models.llama import padding_bias, positions_from_mask
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.pruning.accounting import budget_losses, visual_tokens_per_layer
from atp_jax.pruning.compaction import gather_tokens
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.masks import hard_keep, keep_top, key_bias, scatter_to_sequence, soft_keep
from atp_jax.pruning.scoring import attention_received, minmax_normalise, redundancy_score, sap_scores, visual_positions
from atp_jax.pruning.thresholds import ThresholdMLP, resample_sorted


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrunedOutput:
    logits: Float[Array, "B T V"]
    keep: Float[Array, "B M P"]  # visual keep weights after each module (0/1 when hard), original visual order
    counts: Float[Array, "B M"]  # visual tokens kept after each module (soft sums in soft mode)
    visual_per_layer: Float[Array, "B L"]  # visual tokens entering each decoder layer
    thresholds: Float[Array, "B M 2"]  # (theta_r, theta_s) per module; zeros for methods without them
    scores: Float[Array, "B M P"]  # ATP's redundancy score S_red at each module (0 off the kept set, other methods)
    has_image: Bool[Array, " B"]
    cache: tuple[Segment, ...] | None = None  # the KV cache per segment of layers, when asked for


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


def ranked_decision(m: int, keep: Float[Array, "B P"], vis_id: Int[Array, "B P"], q_last: Float[Array, "B 1 N H"],
                    k_all, seq_keep: Float[Array, "B T"], vis_slot: Int[Array, "B P"], row_seed: Int[Array, " B"],
                    num_visual: int, pcfg: PruningConfig, counts: Int[Array, " B"] | None = None
                    ) -> Float[Array, "B P"]:
    """The baselines: keep a fixed number of the kept visual tokens, ranked by the attention the prompt's last
    token pays them (FastV, PyramidDrop: softmax over every key it sees, head-averaged, visual columns) or at
    random. The number follows the method's schedule, or `counts` per instance (e.g. another method's counts,
    for a random baseline at exactly its budget). `vis_slot`: sequence slot of each visual entry; `vis_id`:
    its index among the image's `num_visual` tokens."""
    kept = keep > 0.5
    if counts is not None:
        count = counts
    elif pcfg.method == "fastv":
        count = round((1 - pcfg.fastv_ratio) * num_visual)
    elif pcfg.method == "pdrop":
        count = round(num_visual * pcfg.pdrop_keep ** (m + 1))
    else:
        count = round(num_visual * pcfg.random_schedule[m])
    if pcfg.method == "random":  # a key per instance, from its content: a batch draws what its rows draw alone
        base = jax.random.fold_in(jax.random.key(pcfg.seed), m)
        draws = jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(base, s), (num_visual,)))(row_seed)
        scores = jnp.take_along_axis(draws, vis_id, axis=1)
    else:
        received = attention_received(q_last, k_all, jnp.where(seq_keep > 0.5, 0.0, NEG_INF),
                                      jnp.ones(q_last.shape[:2]))  # [B, T]
        scores = jnp.take_along_axis(received, vis_slot, axis=1)
    return keep_top(scores, kept, count).astype(jnp.float32)


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


def decide(model: PrunedLlava, m: int, x: ModuleInputs, soft: bool, max_text: int,
           counts: Int[Array, "B M"] | None = None):
    """Module `m`'s new keep weights for the frame's visual entries, its thresholds and its redundancy scores
    (ATP; zeros for the other methods). The same code serves the full frame (masked, soft) and compacted ones.
    `max_text` bounds the text tokens after the image (ATP's cross queries are gathered to that static count)."""
    pcfg, cfg = model.pcfg, model.llava.config
    keep, vis_slot, vis_id, q, k = x.keep, x.vis_slot, x.vis_id, x.q, x.k
    text_weight, last_weight = x.text_weight, x.last_weight
    sap_np = sap_for(cfg, pcfg)
    sap = jnp.asarray(sap_np)[vis_id]  # [B, P']
    theta, score = jnp.zeros((keep.shape[0], 2)), jnp.zeros_like(keep)
    if pcfg.method == "atp":
        q_text, text_weight = select_queries(q, text_weight, min(max_text, q.shape[1]))
        keep, theta, score = atp_decision(model.thresholds[m], gather_tokens(q, vis_slot), gather_tokens(k, vis_slot),
                                   q_text, text_weight, keep, sap, pcfg, soft)
    elif pcfg.method == "spatial":
        gap = sap - spatial_threshold(sap_np, pcfg.target_ratio)
        keep = keep * (jax.nn.sigmoid(pcfg.temperature * gap) if soft else (gap > 0))
    else:  # fastv, pdrop, random: hard top-k among the kept tokens, in every mode
        q_last, _ = select_queries(q, last_weight, 1)
        keep = ranked_decision(m, keep, vis_id, q_last, k, x.seq_keep, vis_slot, x.row_seed, cfg.num_image_tokens,
                               pcfg, None if counts is None else counts[:, m])
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


class PrunedLlava(nnx.Module):
    """LLaVA with visual-token pruning modules between decoder layers (`soft` and `masked` modes)."""

    def __init__(self, llava: LlavaForConditionalGeneration, pcfg: PruningConfig, rngs: nnx.Rngs):
        if pcfg.mode == "compact":
            raise ValueError("compact mode runs through prefill_compact, not the static-shape model")
        layers = module_layers(pcfg)
        n = llava.config.text.num_hidden_layers
        if layers and (layers[0] < 0 or layers[-1] >= n - 1):
            raise ValueError(f"pruning modules after layers {layers} do not fit a {n}-layer decoder")
        self.llava, self.pcfg, self.module_layers = llava, pcfg, layers
        theta_r, theta_s = initial_thresholds(sap_for(llava.config, pcfg), pcfg.target_ratio)
        self.thresholds = nnx.List([ThresholdMLP(pcfg.sorted_len, pcfg.mlp_width, theta_r, theta_s, rngs)
                                    for _ in layers]) if pcfg.method == "atp" else nnx.List([])

    def __call__(self, input_ids: Int[Array, "B T"], pixel_values=None, attention_mask=None,
                 counts: Int[Array, "B M"] | None = None, return_cache: bool = False,
                 prompt: Bool[Array, "B T"] | None = None) -> PrunedOutput:
        """`prompt`: in training, `prompt_mask(labels)`: only prompt tokens query the side paths (see
        `token_roles`); None (inference) when the whole input is the prompt. `counts`: for the ranked baselines
        (random, FastV, PyramidDrop), the visual tokens each instance keeps after each module instead of the
        method's schedule, e.g. another method's `PrunedOutput.counts`.
        `return_cache`: also the KV cache, one segment per run of layers between modules, its pruned keys
        hidden (`masked` mode: the cache keeps every slot)."""
        cfg, pcfg = self.llava.config, self.pcfg
        lm, soft = self.llava.language_model, pcfg.mode == "soft"
        b, t = input_ids.shape
        p, n_layers = cfg.num_image_tokens, cfg.text.num_hidden_layers
        h, _, image_mask = self.llava.embed(input_ids, pixel_values)
        valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
        has_image = image_mask.any(axis=1) & (pixel_values is not None)
        vis_idx = visual_positions(image_mask, p)  # [B, P]
        prompt = valid if prompt is None else valid & prompt
        text_weight, last_weight, row_seed = token_roles(input_ids, image_mask, valid, has_image, prompt)
        positions = positions_from_mask(attention_mask, b, t)
        pad = padding_bias(attention_mask)
        vis_id = jnp.broadcast_to(jnp.arange(p), (b, p))  # the full frame holds every visual token, in order
        keep = jnp.ones((b, p), jnp.float32)
        keeps, thetas, scores, cache = [], [], [], []
        start = 0
        modules = self.module_layers if pixel_values is not None else ()  # nothing to prune without an image
        counts = check_counts(counts, pcfg, b, len(self.module_layers))
        for m, layer in enumerate(modules + (None,)):
            stop = n_layers if layer is None else layer + 1
            bias = pad if m == 0 else self._bias(keep, vis_idx, has_image, t, pad)
            if return_cache:
                visible = valid & (scatter_to_sequence(keep, vis_idx, has_image, t, 1.0) > 0.5)
            out = lm.run_layers(h, positions, bias, start, stop, return_last_qk=layer is not None,
                                return_kv=return_cache)
            h = out.h
            if return_cache:
                cache.append(make_segment(out.kv, visible, valid.sum(1), pcfg.position_mode == "contiguous", start,
                                          stop))
            if layer is None:
                break
            q, k = out.qk
            # The keys the baselines' query (the prompt's last token) sees: the prompt's, as at inference.
            seq_keep = scatter_to_sequence(keep, vis_idx, has_image, t, 1.0) * prompt
            inputs = ModuleInputs(keep, vis_idx, vis_id, q, k, seq_keep, text_weight, last_weight, row_seed)
            keep, theta, score = decide(self, m, inputs, soft, max_text=max(1, t - p), counts=counts)
            keep = jnp.where(has_image[:, None], keep, 0.0)
            keeps.append(keep)
            thetas.append(theta)
            scores.append(score)
            if pcfg.position_mode == "contiguous":
                seq_keep = scatter_to_sequence(keep, vis_idx, has_image, t, 1.0) > 0.5
                positions = positions_from_mask(seq_keep & valid, b, t)
            start = stop
        logits = lm.head(h).astype(jnp.float32)
        n_modules = len(self.module_layers)
        keep_all = jnp.stack(keeps, axis=1) if keeps else jnp.zeros((b, n_modules, p))
        counts = keep_all.sum(-1)
        num_visual = has_image.astype(jnp.float32) * p
        return PrunedOutput(logits=logits, keep=keep_all, counts=counts,
                            visual_per_layer=visual_tokens_per_layer(counts, modules, n_layers, num_visual),
                            thresholds=jnp.stack(thetas, axis=1) if thetas else jnp.zeros((b, n_modules, 2)),
                            scores=jnp.stack(scores, axis=1) if scores else jnp.zeros((b, n_modules, p)),
                            has_image=has_image, cache=tuple(cache) if return_cache else None)

    def _bias(self, keep, vis_idx, has_image, length, pad):
        seq_keep = scatter_to_sequence(keep, vis_idx, has_image, length, 1.0)  # [B, T], 1 on text
        bias = key_bias(seq_keep, self.pcfg.log_eps if self.pcfg.mode == "soft" else None)  # [B, 1, 1, T]
        return bias if pad is None else bias + pad

    def losses(self, out: PrunedOutput) -> dict[str, Float[Array, ""]]:
        """The weighted budget losses over the batch's rows with an image, from the soft counts (the trainer adds
        them to L_lm), and those rows' average visual tokens per layer."""
        pcfg = self.pcfg
        l_atp, l_target, avg = budget_losses(out.counts, self.module_layers, self.llava.config.text.num_hidden_layers,
                                             self.llava.config.num_image_tokens,
                                             out.has_image.astype(jnp.float32), pcfg.target_ratio, pcfg.target_scope)
        return {"atp": pcfg.lambda_atp * l_atp, "target": pcfg.lambda_target * l_target, "avg_visual_tokens": avg}
