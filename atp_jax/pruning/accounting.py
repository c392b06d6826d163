"""Visual-token accounting (per layer, average), the ATP budget losses, and analytic prefill FLOPs."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from atp_jax.models.config import LlavaConfig, TextConfig, VisionConfig


def visual_tokens_per_layer(module_counts: Float[Array, "B M"], module_layers: tuple[int, ...], num_layers: int,
                            num_visual: Float[Array, " B"]) -> Float[Array, "B L"]:
    """Visual tokens entering each decoder layer. A module placed after layer k sets the count of layers
    k+1 onwards; layers up to k see all `num_visual` (or the previous module's count).

    Example: counts [[100, 50]], module_layers (1, 2), num_layers 4, num_visual [200] -> [[200, 200, 100, 50]].
    """
    before = np.array([sum(k < layer for k in module_layers) for layer in range(num_layers)])  # modules passed
    table = jnp.concatenate([num_visual[:, None], module_counts], axis=1)  # [B, M + 1]
    return table[:, before]


def budget_losses(soft_counts: Float[Array, "B M"], module_layers: tuple[int, ...], num_layers: int,
                  num_visual: int, has_image: Float[Array, " B"], target_ratio: float, scope: str = "batch"):
    """The budget losses over the rows with an image, and their average visual tokens per decoder layer.

    L_atp = mean_i sum_k (N_ik / N_img) (l_k + 1) / L: module k after layer l_k weighs the l_k + 1 layers that
    have run, so no module weighs zero. L_target binds the average visual tokens over all decoder layers
    (the paper's accounting), N_i: scope "batch" = |mean_i(N_i / N_img) - rho| (the batch meets the budget,
    each instance keeps what it needs); "instance" = mean_i |N_i / N_img - rho| (every instance pulled to rho).

    Example: counts [[100, 50], [20, 10]], layers (1, 2) of 4, N_img 200, rows [1, 1], rho 0.25: per-layer
    tokens [200, 200, 100, 50] and [200, 200, 20, 10], N = [137.5, 107.5]; L_atp = mean(0.5 * 2/4 + 0.25 * 3/4,
    0.1 * 2/4 + 0.05 * 3/4) = 0.2625; batch L_target = |0.6125 - 0.25| = 0.3625.
    """
    n_img = float(num_visual)
    rows = jnp.maximum(has_image.sum(), 1.0)
    share = soft_counts / n_img  # [B, M]
    depth = (jnp.asarray(module_layers, jnp.float32) + 1) / num_layers  # [M]
    l_atp = ((share * depth).sum(-1) * has_image).sum() / rows
    per_layer = visual_tokens_per_layer(soft_counts, module_layers, num_layers,
                                        jnp.full(soft_counts.shape[:1], n_img))
    ratio = per_layer.mean(-1) / n_img  # [B]
    mean_ratio = (ratio * has_image).sum() / rows
    if scope == "batch":
        l_target = jnp.abs(mean_ratio - target_ratio)
    elif scope == "instance":
        l_target = (jnp.abs(ratio - target_ratio) * has_image).sum() / rows
    else:
        raise ValueError(f"scope {scope!r}: expected 'batch' or 'instance'")
    return l_atp, l_target, mean_ratio * n_img


# ---- analytic FLOPs (a multiply-add counts 2) ------------------------------------------------------------------


def decoder_layer_flops(cfg: TextConfig, n: float) -> float:
    """One LLaMA layer over n tokens: q/k/v/o projections, q.k^T and p.v over the full n x n square, SwiGLU."""
    d, h, heads, kv = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    projections = 2 * n * d * h * (2 * heads + 2 * kv)
    attention = 2 * 2 * n * n * heads * h
    mlp = 2 * 3 * n * d * cfg.intermediate_size
    return projections + attention + mlp


def vision_flops(cfg: VisionConfig, layers_run: int) -> float:
    t, d = cfg.num_patches + 1, cfg.hidden_size
    patch = 2 * cfg.num_patches * 3 * cfg.patch_size**2 * d
    layer = 2 * t * d * 4 * d + 2 * 2 * t * t * d + 2 * 2 * t * d * cfg.intermediate_size
    return patch + layers_run * layer


def prefill_flops(cfg: LlavaConfig, tokens_per_layer) -> dict[str, float]:
    """FLOPs of one prefill whose decoder layer l processes tokens_per_layer[l] tokens (text + visual).

    Reported apart: vision tower (up to the deepest feature layer), projector, decoder, and the LM head for
    the next-token logits (last position only).
    """
    tokens = np.asarray(tokens_per_layer, np.float64)
    if tokens.shape != (cfg.text.num_hidden_layers,):
        raise ValueError(f"tokens_per_layer must have one entry per decoder layer ({cfg.text.num_hidden_layers})")
    vision = vision_flops(cfg.vision, max(cfg.feature_layers))
    c = cfg.vision.hidden_size * len(cfg.feature_layers)
    d = cfg.text.hidden_size
    projector = 2 * cfg.num_image_tokens * (c * d + (d * d if cfg.projector_type == "mlp2x_gelu" else 0))
    decoder = float(sum(decoder_layer_flops(cfg.text, n) for n in tokens))
    head = 2 * d * cfg.text.vocab_size
    return {"vision": vision, "projector": projector, "decoder": decoder, "head": head,
            "total": vision + projector + decoder + head}


def train_step_flops(cfg: LlavaConfig, seq_len: int, batch: int, remat: bool = False,
                     train_vision: bool = True) -> float:
    """Model FLOPs of one training step on `batch` sequences of `seq_len` tokens (image included), every token
    computed (soft masks hide tokens, they remove none): forward, and twice that backward, for the decoder, the
    projector and the LM head over every position; the decoder forward once more under remat; the vision tower
    forward only when it is frozen. ATP's side paths are left out (under 0.1% at LLaVA's sizes)."""
    p = prefill_flops(cfg, np.full(cfg.text.num_hidden_layers, seq_len))
    trained = p["decoder"] + p["projector"] + p["head"] * seq_len
    return batch * (3 * trained + (p["decoder"] if remat else 0.0) + p["vision"] * (3 if train_vision else 1))


def flops_ratio(cfg: LlavaConfig, visual_per_layer, text_tokens: int) -> float:
    """Prefill FLOPs with `visual_per_layer` visual tokens per decoder layer over the unpruned prefill."""
    visual = np.asarray(visual_per_layer, np.float64)
    full = np.full(cfg.text.num_hidden_layers, cfg.num_image_tokens + text_tokens, np.float64)
    return prefill_flops(cfg, visual + text_tokens)["total"] / prefill_flops(cfg, full)["total"]
