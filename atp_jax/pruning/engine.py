"""ATP inside LLaVA: `PrunedLlava` holds the model and its pruning modules and runs a forward pass in any
execution mode through the one segment walk (`driver.walk`); its budget losses for training.

Einsum alphabet: B batch, T sequence, S slots of the output frame, P visual tokens, M pruning modules,
L decoder layers, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.kv_cache import Segment
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.pruning.accounting import budget_losses, visual_tokens_per_layer
from atp_jax.pruning.compaction import gather_tokens
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.decisions import check_counts, initial_thresholds, module_layers, sap_for
from atp_jax.pruning.driver import initial_frame, walk
from atp_jax.pruning.thresholds import ThresholdMLP


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PrunedOutput:
    logits: Float[Array, "B S V"]  # at every slot of the output frame, or [B, 1, V] for the prompt's last token
    keep: Float[Array, "B M P"]  # visual keep weights after each module (0/1 when hard), original visual order
    counts: Float[Array, "B M"]  # visual tokens kept after each module (soft sums in soft mode)
    visual_per_layer: Float[Array, "B L"]  # visual tokens entering each decoder layer
    thresholds: Float[Array, "B M 2"]  # (theta_r, theta_s) per module; zeros for methods without them
    scores: Float[Array, "B M P"]  # ATP's redundancy score S_red at each module (0 off the kept set, other methods)
    has_image: Bool[Array, " B"]
    source: Int[Array, "B S"]  # the original sequence index of each output slot (compact: the kept tokens)
    valid: Bool[Array, "B S"]  # which output slots hold a real token
    needed: Int[Array, " M"]  # the most tokens any row kept after each module (compact: checks the capacities)
    cache: tuple[Segment, ...] | None = None  # the KV cache per segment of layers, when asked for
    lengths: tuple[int, ...] = dataclasses.field(metadata={"static": True}, default=())  # slots per run of layers


class PrunedLlava(nnx.Module):
    """LLaVA with visual-token pruning modules between decoder layers."""

    def __init__(self, llava: LlavaForConditionalGeneration, pcfg: PruningConfig, rngs: nnx.Rngs):
        layers = module_layers(pcfg)
        n = llava.config.text.num_hidden_layers
        if layers and (layers[0] < 0 or layers[-1] >= n - 1):
            raise ValueError(f"pruning modules after layers {layers} do not fit a {n}-layer decoder")
        self.llava, self.pcfg, self.module_layers = llava, pcfg, layers
        theta_r, theta_s = initial_thresholds(sap_for(llava.config, pcfg), pcfg.target_ratio)
        self.thresholds = nnx.List([ThresholdMLP(pcfg.sorted_len, pcfg.mlp_width, theta_r, theta_s, rngs)
                                    for _ in layers]) if pcfg.method == "atp" else nnx.List([])

    def __call__(self, input_ids: Int[Array, "B T"], pixel_values=None, attention_mask=None, *,
                 mode: str = "masked", counts: Int[Array, "B M"] | None = None,
                 prompt: Bool[Array, "B T"] | None = None, capacities: tuple[int, ...] = (),
                 last_logits_only: bool = False, return_cache: bool = False) -> PrunedOutput:
        """A forward pass with pruning in `mode` (`driver`): "soft" (training), "masked" or "compact".

        `prompt`: in training, `prompt_mask(labels)`: only prompt tokens query the side paths (see
        `decisions.token_roles`); None (inference) when the whole input is the prompt. `counts`: for the ranked
        baselines (random, FastV, PyramidDrop), the visual tokens each instance keeps after each module instead
        of the method's schedule, e.g. another method's `PrunedOutput.counts`. `capacities`: compact mode, the
        slots of the sequence after each module (`prefill.plan_capacities`; a row that keeps more loses tokens,
        which `needed` shows). `last_logits_only`: logits of the prompt's last token only, [B, 1, V].
        `return_cache`: also the KV cache, one segment per run of layers between modules (masked: every slot,
        pruned keys hidden; compact: the kept tokens only)."""
        cfg = self.llava.config
        b, t = input_ids.shape
        p, n_layers = cfg.num_image_tokens, cfg.text.num_hidden_layers
        frame, row_seed, has_image = initial_frame(self, input_ids, pixel_values, attention_mask, prompt)
        modules = self.module_layers if pixel_values is not None else ()  # nothing to prune without an image
        capacities = tuple(capacities) if mode == "compact" and modules else ()
        walked = walk(self, frame, row_seed, has_image, mode=mode, modules=modules, max_text=max(1, t - p),
                      counts=check_counts(counts, self.pcfg, b, len(self.module_layers)), capacities=capacities,
                      padded=attention_mask is not None, return_cache=return_cache)
        h, out = walked.frame.h, walked.frame
        if last_logits_only:
            last = jnp.argmax(out.last_weight, axis=1)[:, None]  # [B, 1]
            h, source, valid = gather_tokens(h, last), gather_tokens(out.source, last), gather_tokens(out.valid, last)
        else:
            source, valid = out.source, out.valid
        n_modules = len(self.module_layers)
        keep = walked.keep if modules else jnp.zeros((b, n_modules, p))
        counts = keep.sum(-1)
        num_visual = has_image.astype(jnp.float32) * p
        return PrunedOutput(logits=self.llava.language_model.head(h).astype(jnp.float32), keep=keep, counts=counts,
                            visual_per_layer=visual_tokens_per_layer(counts, modules, n_layers, num_visual),
                            thresholds=walked.thresholds if modules else jnp.zeros((b, n_modules, 2)),
                            scores=walked.scores if modules else jnp.zeros((b, n_modules, p)),
                            has_image=has_image, source=source, valid=valid,
                            needed=walked.needed if modules else jnp.zeros((n_modules,), jnp.int32),
                            cache=walked.cache, lengths=(t, *capacities))

    def losses(self, out: PrunedOutput) -> dict[str, Float[Array, ""]]:
        """The weighted budget losses over the batch's rows with an image, from the soft counts (the trainer adds
        them to L_lm), and those rows' average visual tokens per layer."""
        pcfg = self.pcfg
        l_atp, l_target, avg = budget_losses(out.counts, self.module_layers, self.llava.config.text.num_hidden_layers,
                                             self.llava.config.num_image_tokens,
                                             out.has_image.astype(jnp.float32), pcfg.target_ratio, pcfg.target_scope)
        return {"atp": pcfg.lambda_atp * l_atp, "target": pcfg.lambda_target * l_target, "avg_visual_tokens": avg}
