"""Building blocks shared by the vision tower and the decoder: dense layers, attention, stacked layers.

Einsum alphabet: B batch, T query length, S key length, D width, N query heads, K kv heads, H head dim.
Parameters carry `logical_axes` metadata (mapped to mesh axes by the sharding rules); a stacked layer
axis is implicit and leading.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

NEG_INF = -1e30  # finite so that adding further (log-mask) biases never produces inf - inf
CPU_QUERY_CHUNK = 128


@dataclasses.dataclass(frozen=True)
class DtypePolicy:
    """Parameter storage dtype and compute dtype. Norms, softmax and RoPE always run in float32."""

    param_dtype: jnp.dtype = jnp.float32
    dtype: jnp.dtype = jnp.float32


FLOAT32 = DtypePolicy()


def dense(din: int, dout: int, axes: tuple[str, str], policy: DtypePolicy, rngs: nnx.Rngs,
          use_bias: bool = False) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=policy.dtype, param_dtype=policy.param_dtype,
                      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]}, rngs=rngs)


IMPLEMENTATIONS = ("auto", "xla", "pallas")


def target_platform() -> str:
    """The platform programs are built for: the active mesh's devices (a TPU slice compiled ahead of time from
    this host included), else the default backend."""
    from atp_jax.sharding import active_mesh

    mesh = active_mesh()
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


@jax.named_scope("attention")  # names its ops in profiles (benchmarks/profile_prefill.py)
def attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
              bias: Float[Array, "B N T S"] | None = None, *, causal: bool = False,
              chunk: int | str | None = "auto", implementation: str = "auto") -> Float[Array, "B T N H"]:
    """Scaled dot-product attention through `jax.nn.dot_product_attention` (fused kernels where available), or
    the Pallas TPU flash-attention kernel (`tpu_attention.py`).

    `implementation`: "xla", "pallas", or "auto": Pallas for programs built for a TPU with more than one query
    (prefill and training; a decode step's single query stays on XLA).

    GQA needs no repeat: the kernel maps each group of N // K query heads onto one kv head. `bias` is added
    to the float32 logits; softmax runs in float32. `causal` (query t, key s, T == S) masks s > t.

    XLA:CPU has no fused kernel and materialises [B, N, T, S] logits, so on CPU the queries go in chunks
    (`chunk="auto"`; None disables): each chunk's logits stay in cache and, when causal, a chunk skips the
    keys after its last query (half the work). Other backends get one call with `is_causal`.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {implementation!r}: expected one of {IMPLEMENTATIONS}")
    t = q.shape[1]
    if implementation == "auto":
        implementation = "pallas" if t > 1 and target_platform() == "tpu" else "xla"
    if implementation == "pallas":
        from atp_jax.models.tpu_attention import flash_attention

        return flash_attention(q, k, v, bias, causal=causal)
    if bias is not None:
        bias = bias.astype(jnp.float32)
    if chunk == "auto":
        chunk = CPU_QUERY_CHUNK if jax.default_backend() == "cpu" else None
    if chunk is None or t <= chunk:
        return jax.nn.dot_product_attention(q, k, v, bias=bias, is_causal=causal)
    if causal and k.shape[1] != t:
        raise ValueError("causal attention needs as many keys as queries")
    if bias is None:
        return rowwise(lambda q, k, v: _chunked(q, k, v, None, causal, chunk), q, k, v)
    bias = jnp.broadcast_to(bias, (q.shape[0],) + bias.shape[1:])
    return rowwise(lambda q, k, v, bias: _chunked(q, k, v, bias, causal, chunk), q, k, v, bias)


def cpu_unsharded() -> bool:
    """Programs built for XLA:CPU outside any mesh (inference here): where `rowwise` and query chunks pay."""
    from atp_jax.sharding import active_mesh

    return target_platform() == "cpu" and active_mesh() is None


def rowwise(fn: Callable, *arrays: Array):
    """`fn(*arrays)` for arrays with a leading batch axis; on XLA:CPU outside any mesh (inference), the rows one at
    a time (`lax.map`, a loop). A batch's attention logits outgrow the cache, and XLA:CPU then runs them 1.4-2x
    slower per row (benchmark model, batch 4). Under a mesh (training, sharded serving) the batch stays whole:
    it is sharded there."""
    if arrays[0].shape[0] == 1 or not cpu_unsharded():
        return fn(*arrays)
    return jax.lax.map(lambda row: jax.tree.map(lambda y: y[0], fn(*(x[None] for x in row))), arrays)


def _chunked(q, k, v, bias, causal: bool, chunk: int):
    """`attention` on XLA:CPU: the queries in chunks of `chunk`, each against the keys it may see."""
    t = q.shape[1]
    out = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        keys = stop if causal else k.shape[1]
        b = None
        if bias is not None:  # bias may broadcast over queries (T axis of size 1)
            b = bias[:, :, start:stop, :keys] if bias.shape[2] > 1 else bias[..., :keys]
        mask = None
        if causal:
            mask = jnp.arange(keys)[None, :] <= jnp.arange(start, stop)[:, None]  # [T_chunk, S_chunk]
        out.append(jax.nn.dot_product_attention(q[:, start:stop], k[:, :keys], v[:, :keys], bias=b, mask=mask))
    return jnp.concatenate(out, axis=1)


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], n: int, rngs: nnx.Rngs) -> nnx.Module:
    """`n` copies of a layer with their parameters stacked on a leading axis (for `scan_layers`)."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0)
    def build(rngs):
        return make(rngs)

    return build(rngs)


def scan_layers(layers: nnx.Module, start: int, stop: int, carry, body: Callable, xs=None, remat: bool = False):
    """Runs stacked `layers[start:stop]` in order with `lax.scan`: `carry, y = body(layer, carry)`, or
    `body(layer, carry, x)` with per-layer inputs `xs` (leading axis stop - start). `remat`: keep only each
    layer's input for the backward pass and recompute the rest (activation memory of one layer, not all).

    Each step reads its layer from the full stack by index: slicing the stack to the range first would copy
    those layers' weights on every call (a full copy of the weights per decode step). Returns the final carry
    and the stacked per-layer outputs `y`.
    """
    graphdef, state = nnx.split(layers)

    def step(c, i_and_x):
        i, x = i_and_x
        layer = nnx.merge(graphdef, jax.tree.map(lambda w: jax.lax.dynamic_index_in_dim(w, i, keepdims=False), state))
        return body(layer, c) if xs is None else body(layer, c, x)

    return jax.lax.scan(jax.checkpoint(step) if remat else step, carry, (jnp.arange(start, stop), xs))
