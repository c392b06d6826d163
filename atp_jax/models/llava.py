"""LLaVA-1.5: CLIP features -> projector -> merged at image-token positions -> LLaMA decoder.

Einsum alphabet: B batch, T sequence, P visual tokens per image, C CLIP width (x feature layers),
D LLM width, V vocab. `input_ids` follow the llava-hf convention: one `image_token_index` per visual token.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import FLOAT32, DtypePolicy
from atp_jax.models.config import LlavaConfig
from atp_jax.models.llama import LlamaDecoder, padding_bias, positions_from_mask
from atp_jax.models.projector import Projector
from atp_jax.models.vision import ClipVisionTower


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlavaOutput:
    logits: Float[Array, "B T V"]
    image_features: Float[Array, "B P D"] | None = None


def select_features(hidden_states: Float[Array, "L B P C"], layers: tuple[int, ...], strategy: str):
    """HF `get_image_features`: pick hidden states by index, drop CLS for 'default', concat on channels."""
    picked = [hidden_states[i] for i in layers]
    if strategy == "default":
        picked = [h[:, 1:] for h in picked]
    return jnp.concatenate(picked, axis=-1)  # [B, P, C * len(layers)]


def merge_image_features(embeds: Float[Array, "B T D"], features: Float[Array, "B P D"],
                         image_mask: Bool[Array, "B T"]) -> Float[Array, "B T D"]:
    """Writes each row's image features, in order, at that row's image-token positions (static shapes).

    Example: image_mask [[0, 1, 1, 0]] -> positions 1 and 2 take features[0, 0] and features[0, 1].
    """
    idx = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, features.shape[1] - 1)  # [B, T]
    gathered = jnp.take_along_axis(features, idx[..., None], axis=1)  # [B, T, D]
    return jnp.where(image_mask[..., None], gathered.astype(embeds.dtype), embeds)


class LlavaForConditionalGeneration(nnx.Module):
    def __init__(self, cfg: LlavaConfig, *, policy: DtypePolicy = FLOAT32, remat: bool = False,
                 attention: str = "auto", rngs: nnx.Rngs):
        """`remat` and `attention`: how the decoder runs (`LlamaDecoder`); what it computes does not change."""
        self.config = cfg
        self.vision_tower = ClipVisionTower(cfg.vision, policy, rngs)
        self.multi_modal_projector = Projector(cfg, policy, rngs)
        self.language_model = LlamaDecoder(cfg.text, policy, rngs, remat=remat, attention=attention)

    def image_features(self, pixel_values: Float[Array, "B 3 I I"]) -> Float[Array, "B P D"]:
        cfg = self.config
        hidden = self.vision_tower(pixel_values, num_layers=max(cfg.feature_layers))  # [L+1, B, P+1, C]
        feats = select_features(hidden, cfg.feature_layers, cfg.vision_feature_select_strategy)  # [B, P, C]
        return self.multi_modal_projector(feats)  # [B, P, D]

    def embed(self, input_ids: Int[Array, "B T"], pixel_values: Float[Array, "B 3 I I"] | None = None):
        """Token embeddings with image features merged in; also returns the features and the image mask."""
        cfg = self.config
        image_mask = input_ids == cfg.image_token_index  # [B, T]
        embeds = self.language_model.embed(input_ids)  # [B, T, D]
        if pixel_values is None:
            return embeds, None, image_mask
        _check_image_tokens(input_ids, image_mask, cfg.num_image_tokens, pixel_values.shape[0])
        features = self.image_features(pixel_values)
        return merge_image_features(embeds, features, image_mask), features, image_mask

    def __call__(self, input_ids: Int[Array, "B T"], pixel_values: Float[Array, "B 3 I I"] | None = None,
                 attention_mask: Bool[Array, "B T"] | None = None,
                 position_ids: Int[Array, "B T"] | None = None) -> LlavaOutput:
        b, t = input_ids.shape
        h, features, _ = self.embed(input_ids, pixel_values)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask, b, t)
        h = self.language_model.run_layers(h, position_ids, padding_bias(attention_mask)).h
        logits = self.language_model.head(h).astype(jnp.float32)
        return LlavaOutput(logits=logits, image_features=features)


@nnx.jit
def forward(model: LlavaForConditionalGeneration, input_ids, pixel_values=None, attention_mask=None,
            position_ids=None) -> LlavaOutput:
    """The jitted full forward pass (prefill without cache)."""
    return model(input_ids, pixel_values, attention_mask, position_ids)


def _check_image_tokens(input_ids, image_mask, per_image: int, num_images: int) -> None:
    """One image per row; with concrete inputs, each row holds exactly one image's worth of image tokens, or none."""
    if input_ids.shape[0] != num_images:
        raise ValueError(f"pixel_values holds {num_images} images for a batch of {input_ids.shape[0]} rows")
    if isinstance(image_mask, jax.core.Tracer):
        return
    counts = np.asarray(image_mask).sum(axis=1)
    bad = [i for i, c in enumerate(counts) if c not in (0, per_image)]
    if bad:
        raise ValueError(f"rows {bad} hold {counts[bad].tolist()} image tokens; each row needs {per_image} "
                         "(one per visual token) or 0")
