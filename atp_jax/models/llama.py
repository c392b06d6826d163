"""LLaMA/Vicuna decoder (HF `LlamaModel` + `lm_head`), runnable one range of layers at a time.

Einsum alphabet: B batch, T query length, S key length, D width, N query heads, K kv heads, H head dim,
F MLP width, V vocab. The pruning engine drives `embed`, `run_layers` and `head` directly: each layer range
takes the hidden state, the position ids of its tokens and an additive attention bias.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from atp_jax.models.common import IMPLEMENTATIONS, NEG_INF, DtypePolicy, attention, dense, scan_layers, stack_layers
from atp_jax.models.config import ConfigError, TextConfig
from atp_jax.sharding import shard

# ---- pure helpers ------------------------------------------------------------------------------------------


def _pow32(base: float, exponents: np.ndarray) -> np.ndarray:
    """float32 `base ** exponents`, correctly rounded as PyTorch's float32 pow is (numpy's float32 pow is not)."""
    return (np.float64(base) ** exponents.astype(np.float64)).astype(np.float32)


def rope_inv_freq(cfg: TextConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and cos/sin scale for the static RoPE types (HF `ROPE_INIT_FUNCTIONS`).

    Computed in float32 step by step as transformers does, so that RoPE angles at long positions agree
    to the last bit (an ulp in a frequency is 1e-4 relative error at position 1000).
    """
    dim = cfg.head_dim
    p = dict(cfg.rope_scaling or ())
    if p.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError("partial_rotary_factor != 1 is not supported")
    base = cfg.rope_theta
    exponents = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    inv = np.float32(1.0) / _pow32(base, exponents)
    scale = 1.0
    kind = cfg.rope_type
    if kind == "linear":
        inv = inv / np.float32(p["factor"])
    elif kind == "llama3":
        factor, lo, hi, old = p["factor"], p["low_freq_factor"], p["high_freq_factor"], \
            p["original_max_position_embeddings"]
        wavelen = np.float32(2 * math.pi) / inv
        scaled = np.where(wavelen > old / lo, inv / np.float32(factor), inv)
        smooth = (np.float32(old) / wavelen - np.float32(lo)) / np.float32(hi - lo)
        smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif kind == "yarn":
        old = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.max_position_embeddings / old

        def mscale(s, m=1.0):
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        scale = p.get("attention_factor")
        if scale is None:
            m, m_all = p.get("mscale"), p.get("mscale_all_dim")
            scale = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

        def correction_dim(rotations):
            return dim * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
        if p.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        high = high + 0.001 if low == high else high
        pos_freqs = _pow32(base, exponents)
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
        extrapolation = 1 - ramp
        interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
        inv = interpolation * (1 - extrapolation) + (np.float32(1.0) / pos_freqs) * extrapolation
    elif kind not in ("default", "dynamic"):
        raise ConfigError(f"rope type {kind!r} is not supported")
    return inv.astype(np.float32), float(scale)


def rope_cos_sin(cfg: TextConfig, positions: Int[Array, "B T"]) -> tuple[Float[Array, "B T H"], Float[Array, "B T H"]]:
    """cos and sin tables (float32) for rotate-half RoPE at the given position ids."""
    inv, scale = rope_inv_freq(cfg)
    inv = jnp.asarray(inv)
    if cfg.rope_type == "dynamic":
        # HF's dynamic NTK: the base grows once the sequence exceeds max_position_embeddings.
        p, dim, max_pos = dict(cfg.rope_scaling), cfg.head_dim, cfg.max_position_embeddings
        seq = jnp.maximum(jnp.max(positions) + 1, max_pos).astype(jnp.float32)
        base = cfg.rope_theta * ((p["factor"] * seq / max_pos) - (p["factor"] - 1)) ** (dim / (dim - 2))
        inv = 1.0 / base ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    freqs = positions.astype(jnp.float32)[..., None] * inv  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: Float[Array, "B T N H"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]):
    """HF's rotate-half convention (no q/k permutation needed when converting)."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


def padding_bias(attention_mask: Bool[Array, "B S"] | None) -> Float[Array, "B 1 1 S"] | None:
    """Additive float32 bias that hides padding keys (NEG_INF); None without a mask. Causality is separate."""
    if attention_mask is None:
        return None
    return jnp.where(attention_mask.astype(bool), 0.0, NEG_INF).astype(jnp.float32)[:, None, None, :]


def positions_from_mask(attention_mask: Bool[Array, "B T"] | None, batch: int, length: int) -> Int[Array, "B T"]:
    """Position ids that skip padding (left or right): cumsum of the mask minus one; arange without a mask."""
    if attention_mask is None:
        return jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


# ---- layers ----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, policy: DtypePolicy):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), policy.param_dtype), logical_axes=("embed",))

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.cfg = cfg
        self.q_proj = dense(d, n * h, ("embed", "heads"), policy, rngs)
        self.k_proj = dense(d, k * h, ("embed", "kv_heads"), policy, rngs)
        self.v_proj = dense(d, k * h, ("embed", "kv_heads"), policy, rngs)
        self.o_proj = dense(n * h, d, ("heads", "embed"), policy, rngs)

    def qkv(self, x: Float[Array, "B T D"], cos, sin):
        b, t, _ = x.shape
        h = self.cfg.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, -1, h), cos, sin)  # [B, T, N, H]
        k = apply_rope(self.k_proj(x).reshape(b, t, -1, h), cos, sin)  # [B, T, K, H]
        return q, k, self.v_proj(x).reshape(b, t, -1, h)  # v: [B, T, K, H]

    def __call__(self, x: Float[Array, "B T D"], cos, sin, bias: Float[Array, "B N T S"] | None,
                 implementation: str = "auto"):
        """Causal self-attention: output [B, T, D], plus the RoPE'd queries [B, T, N, H], keys and values
        [B, T, K, H] (for side paths and the KV cache). `implementation`: as in `common.attention`."""
        q, k, v = self.qkv(x, cos, sin)
        out = attention(q, k, v, bias, causal=True, implementation=implementation)
        return self.o_proj(out.reshape(x.shape[0], x.shape[1], -1)), (q, k, v)

    def decode(self, x: Float[Array, "B 1 D"], cos, sin, k_cache: Float[Array, "B S K H"],
               v_cache: Float[Array, "B S K H"], bias: Float[Array, "B 1 1 S"], slot):
        """One new token per row: its key and value written at cache `slot`, then attention over the cache
        (`bias` hides empty and pruned slots; the new slot must be visible): one slot for every row, or an int [B]
        array, a slot per row. Returns (out, k_cache, v_cache)."""
        q, k, v = self.qkv(x, cos, sin)
        if jnp.ndim(slot) == 0:
            k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), slot, axis=1)
            v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), slot, axis=1)
        else:
            rows = jnp.arange(x.shape[0])
            k_cache = k_cache.at[rows, slot].set(k[:, 0].astype(k_cache.dtype))
            v_cache = v_cache.at[rows, slot].set(v[:, 0].astype(v_cache.dtype))
        out = attention(q, k_cache, v_cache, bias, causal=False)  # [B, 1, N, H]
        return self.o_proj(out.reshape(x.shape[0], 1, -1)), k_cache, v_cache


class MLP(nnx.Module):
    def __init__(self, cfg: TextConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = dense(d, f, ("embed", "mlp"), policy, rngs)
        self.up_proj = dense(d, f, ("embed", "mlp"), policy, rngs)
        self.down_proj = dense(f, d, ("mlp", "embed"), policy, rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, policy: DtypePolicy, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy)
        self.self_attn = Attention(cfg, policy, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy)
        self.mlp = MLP(cfg, policy, rngs)

    def __call__(self, x: Float[Array, "B T D"], cos, sin, bias, implementation: str = "auto"):
        """Output [B, T, D] and the attention's (q, k, v)."""
        attended, qkv = self.self_attn(self.input_layernorm(x), cos, sin, bias, implementation)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), qkv

    def decode(self, x: Float[Array, "B 1 D"], cos, sin, k_cache, v_cache, bias, slot):
        attended, k_cache, v_cache = self.self_attn.decode(self.input_layernorm(x), cos, sin, k_cache, v_cache, bias,
                                                           slot)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), k_cache, v_cache


# ---- model -----------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayersOutput:
    """What `LlamaDecoder.run_layers` returns; the optional parts are None unless asked for."""

    h: Float[Array, "B T D"]  # the hidden state after the layers
    qk: tuple[Array, Array] | None = None  # the last layer's RoPE'd queries [B, T, N, H] and keys [B, T, K, H]
    kv: tuple[Array, Array] | None = None  # every layer's keys and values, each [n, B, T, K, H] (the KV cache)


class LlamaDecoder(nnx.Module):
    """Embedding table, stacked decoder layers, final norm and LM head."""

    def __init__(self, cfg: TextConfig, policy: DtypePolicy, rngs: nnx.Rngs, *, remat: bool = False,
                 attention: str = "auto"):
        """`remat`: recompute each layer's activations in the backward pass (training memory). `attention`: the
        prefill's and training's attention implementation, "auto", "xla" or "pallas" (`common.attention`)."""
        if attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention implementation {attention!r}: expected one of {IMPLEMENTATIONS}")
        self.cfg, self.dtype = cfg, policy.dtype
        self.remat, self.attention = remat, attention
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=policy.dtype,
                                      param_dtype=policy.param_dtype,
                                      embedding_metadata={"logical_axes": ("vocab", "embed")}, rngs=rngs)
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, policy, r), cfg.num_hidden_layers, rngs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, policy)
        self.lm_head = None if cfg.tie_word_embeddings else dense(cfg.hidden_size, cfg.vocab_size,
                                                                  ("embed", "vocab"), policy, rngs)

    def embed(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        table = self.embed_tokens.embedding[...]
        return jnp.take(table, jnp.clip(input_ids, 0, table.shape[0] - 1), axis=0).astype(self.dtype)

    def run_layers(self, h: Float[Array, "B T D"], positions: Int[Array, "B T"],
                   bias: Float[Array, "B N T S"] | None = None, start: int = 0, stop: int | None = None,
                   return_last_qk: bool = False, return_kv: bool = False) -> LayersOutput:
        """Decoder layers `start..stop-1` on `h`, tokens at RoPE `positions`.

        Attention is causal in the order of `h`; `bias` adds to the logits (padding, pruning masks). Returns the
        hidden state and, when asked, the last layer's RoPE'd queries and keys (the pruning side path; no gradient
        flows back through them) and every layer's keys and values (the KV cache).
        """
        stop = self.cfg.num_hidden_layers if stop is None else stop
        cos, sin = rope_cos_sin(self.cfg, positions)
        b, t = h.shape[:2]
        hd = self.cfg.head_dim
        # The last layer's queries and keys ride in the scan's carry (each layer overwrites them): taking the last
        # layer out of the loop instead copies its weights out of the stack and costs XLA:CPU ~4 ms a module on
        # the benchmark model. No layer reads the carried q and k, so remat saves nothing more for them; they
        # carry no gradient (the pruning side path scores without one), so the backward pass has nothing to add.
        qk = ((jnp.zeros((b, t, self.cfg.num_attention_heads, hd), self.dtype),
               jnp.zeros((b, t, self.cfg.num_key_value_heads, hd), self.dtype)) if return_last_qk else None)

        def body(layer, carry):
            x, _ = carry
            x, (q, k, v) = layer(shard(x, "batch", "sequence", "embed"), cos, sin, bias, self.attention)
            last_qk = jax.lax.stop_gradient((q, k)) if return_last_qk else None
            return (x, last_qk), ((k, v) if return_kv else None)

        kv = (jnp.zeros((0, b, t, self.cfg.num_key_value_heads, hd), self.dtype),) * 2
        if stop > start:
            (h, qk), kv = scan_layers(self.layers, start, stop, (h, qk), body, remat=self.remat)
        return LayersOutput(h=h, qk=qk, kv=kv if return_kv else None)

    def decode_layers(self, h: Float[Array, "B 1 D"], positions: Int[Array, "B 1"], k_cache, v_cache,
                      bias: Float[Array, "B 1 1 S"], slot, start: int, stop: int):
        """One decode step through layers `start..stop-1` with their caches `k_cache`, `v_cache`
        [stop - start, B, S, K, H]; the new token's keys and values land at `slot`. Returns (h, k_cache, v_cache)."""
        cos, sin = rope_cos_sin(self.cfg, positions)

        def body(layer, x, cache):
            x, k, v = layer.decode(x, cos, sin, *cache, bias, slot)
            return x, (k, v)

        h, (k_cache, v_cache) = scan_layers(self.layers, start, stop, h, body, xs=(k_cache, v_cache))
        return h, k_cache, v_cache

    def head(self, h: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        h = self.norm(h)
        if self.lm_head is None:
            return h @ self.embed_tokens.embedding[...].astype(self.dtype).T
        return self.lm_head(h)
