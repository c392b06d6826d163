"""The multimodal projector from CLIP features to the LLM width: `mlp2x_gelu` or `linear`."""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float

from atp_jax.models.common import DtypePolicy, dense
from atp_jax.models.config import LlavaConfig


class Projector(nnx.Module):
    """`mlp2x_gelu`: Linear -> exact (erf) GELU -> Linear, as LLaVA-1.5; `linear`: one Linear (LLaVA-1.0)."""

    def __init__(self, cfg: LlavaConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        din = cfg.vision.hidden_size * len(cfg.feature_layers)
        dout = cfg.text.hidden_size
        bias = cfg.multimodal_projector_bias
        self.linear_1 = dense(din, dout, ("vision_embed", "embed"), policy, rngs, use_bias=bias)
        self.linear_2 = (dense(dout, dout, ("embed", "embed"), policy, rngs, use_bias=bias)
                         if cfg.projector_type == "mlp2x_gelu" else None)

    def __call__(self, x: Float[Array, "B P C"]) -> Float[Array, "B P D"]:
        x = self.linear_1(x)
        if self.linear_2 is None:
            return x
        return self.linear_2(jax.nn.gelu(x, approximate=False))
