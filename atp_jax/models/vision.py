"""CLIP ViT vision tower (HF `CLIPVisionModel`), returning the hidden states LLaVA selects from."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from atp_jax.models.common import DtypePolicy, attention, dense, scan_layers, stack_layers
from atp_jax.models.config import VisionConfig


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def layer_norm(ln: nnx.LayerNorm, x, dtype):
    """LayerNorm in float32, result in the compute dtype."""
    return ln(x.astype(jnp.float32)).astype(dtype)


def _ln(cfg: VisionConfig, policy: DtypePolicy, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=jnp.float32,
                         param_dtype=policy.param_dtype, scale_metadata={"logical_axes": ("embed",)},
                         bias_metadata={"logical_axes": ("embed",)}, rngs=rngs)


class ClipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        d, self.n = cfg.hidden_size, cfg.num_attention_heads
        self.q_proj = dense(d, d, ("embed", "heads"), policy, rngs, use_bias=True)
        self.k_proj = dense(d, d, ("embed", "heads"), policy, rngs, use_bias=True)
        self.v_proj = dense(d, d, ("embed", "heads"), policy, rngs, use_bias=True)
        self.out_proj = dense(d, d, ("heads", "embed"), policy, rngs, use_bias=True)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n, -1)  # [B, T, N, H]
        k = self.k_proj(x).reshape(b, t, self.n, -1)  # [B, T, N, H]
        v = self.v_proj(x).reshape(b, t, self.n, -1)  # [B, T, N, H]
        return self.out_proj(attention(q, k, v).reshape(b, t, -1))  # [B, T, D]


class ClipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        self.dtype = policy.dtype
        self.layer_norm1 = _ln(cfg, policy, rngs)
        self.self_attn = ClipAttention(cfg, policy, rngs)
        self.layer_norm2 = _ln(cfg, policy, rngs)
        self.fc1 = dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), policy, rngs, use_bias=True)
        self.fc2 = dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), policy, rngs, use_bias=True)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        x = x + self.self_attn(layer_norm(self.layer_norm1, x, self.dtype))
        return x + self.fc2(quick_gelu(self.fc1(layer_norm(self.layer_norm2, x, self.dtype))))


class ClipVisionTower(nnx.Module):
    def __init__(self, cfg: VisionConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, policy.dtype
        d, p = cfg.hidden_size, cfg.patch_size
        self.patch_embedding = nnx.Conv(3, d, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                                        dtype=policy.dtype, param_dtype=policy.param_dtype,
                                        kernel_metadata={"logical_axes": (None, None, None, "embed")}, rngs=rngs)
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), policy.param_dtype),
                                         logical_axes=("embed",))
        self.position_embedding = nnx.Embed(cfg.num_patches + 1, d, dtype=policy.dtype, param_dtype=policy.param_dtype,
                                            embedding_metadata={"logical_axes": (None, "embed")}, rngs=rngs)
        self.pre_layrnorm = _ln(cfg, policy, rngs)
        self.layers = stack_layers(lambda r: ClipLayer(cfg, policy, r), cfg.num_hidden_layers, rngs)
        # LLaVA never applies post_layernorm; it is kept so checkpoints convert both ways without loss.
        self.post_layernorm = _ln(cfg, policy, rngs)

    def __call__(self, pixel_values: Float[Array, "B 3 I I"], num_layers: int) -> Float[Array, "L B P D"]:
        """Hidden states 0..num_layers (0 = embeddings after pre_layrnorm), as HF's `hidden_states` tuple."""
        x = jnp.transpose(pixel_values, (0, 2, 3, 1)).astype(self.dtype)  # [B, I, I, 3]
        x = self.patch_embedding(x)  # [B, G, G, D]
        b = x.shape[0]
        x = x.reshape(b, -1, x.shape[-1])  # [B, G*G, D]
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)  # [B, P, D]
        x = x + self.position_embedding.embedding[...].astype(self.dtype)[None]
        x = layer_norm(self.pre_layrnorm, x, self.dtype)

        def body(layer, h):
            h = layer(h)
            return h, h

        _, hs = scan_layers(self.layers, 0, num_layers, x, body)  # [L, B, P, D]
        return jnp.concatenate([x[None], hs], axis=0)  # [L+1, B, P, D]
