"""Attention through the Pallas TPU flash-attention kernel (`jax.experimental.pallas.ops.tpu.flash_attention`).

The kernel never materialises the [T, S] probabilities in HBM and differentiates into its additive bias, which
is how ATP's soft masks (log keep weights on the keys), padding and pruned keys reach it. What it needs and what
this wrapper does about it:
- heads-major [B, N, T, H] inputs, the same head count for q, k and v: transposed, kv heads repeated (GQA);
- sequence lengths in multiples of its 128-token blocks: q, k, v and the bias padded, the padding hidden by
  segment ids (no bias array is made for it);
- a bias as a full [B, N, T, S] array (no broadcasting), which with its gradient would cost more memory than
  XLA's attention saves. Our biases are on keys only (ATP's masks, padding, pruned keys: [B, 1, 1, S]), so they
  go in as one more head dimension instead: q gets a 1 there and each key its bias, and q.k adds the bias to
  every logit exactly. The head dimension is padded to the kernel's 128 lanes (128 -> 256 for LLaMA: twice
  the attention's FLOPs, a few percent of a 7B step's at 2048 tokens), the bias travels in k's dtype, and its
  gradient comes back through dk. Any other bias shape goes in as `ab`;
- it adds the bias before scaling by `sm_scale`: q is scaled first and `sm_scale` is 1;
- GSPMD cannot split a Pallas call: under a mesh (`sharding.use_mesh`) the call runs per device in `shard_map`,
  the batch split over the mesh's batch axes and the heads over `tensor` where they divide.

On CPU the same kernel runs in Pallas' TPU interpret mode (`pltpu.force_tpu_interpret_mode()`), which is how the
tests check it against the XLA path.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

BLOCK = 128


def _pad_to(x, axis: int, length: int, value=0.0):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _flash(q, k, v, ab, q_ids, kv_ids, causal: bool):
    from jax.experimental.pallas.ops.tpu.flash_attention import BlockSizes, SegmentIds, flash_attention

    b, n, t, h = q.shape
    blocks = BlockSizes.get_default(b, n, t, k.shape[2], h)
    return flash_attention(q, k, v, ab, SegmentIds(q=q_ids, kv=kv_ids), causal=causal, sm_scale=1.0,
                           block_sizes=blocks)


def flash_attention(q: Float[Array, "B T N H"], k: Float[Array, "B S K H"], v: Float[Array, "B S K H"],
                    bias: Float[Array, "B _ _ S"] | None = None, *, causal: bool = False) -> Float[Array, "B T N H"]:
    """Scaled dot-product attention, as `common.attention` computes it, on the Pallas TPU kernel."""
    from atp_jax.sharding import BATCH_AXES, active_mesh

    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    if causal and s != t:
        raise ValueError("causal attention needs as many keys as queries")
    tp, sp = (max(BLOCK, math.ceil(x / BLOCK) * BLOCK) for x in (t, s))
    qt = _pad_to((q * (h ** -0.5)).astype(q.dtype), 1, tp).transpose(0, 2, 1, 3)  # [B, N, Tp, H]
    kt, vt = (_pad_to(jnp.repeat(x, n // kv_heads, axis=2), 1, sp).transpose(0, 2, 1, 3) for x in (k, v))
    # Padding as segments: real queries (1) see real keys (1) only; padded queries (0) see padded keys (0), a
    # finite answer that is dropped below.
    q_ids = jnp.broadcast_to((jnp.arange(tp) < t).astype(jnp.int32), (b, tp))
    kv_ids = jnp.broadcast_to((jnp.arange(sp) < s).astype(jnp.int32), (b, sp))
    ab = None
    if bias is not None and bias.shape[1] == bias.shape[2] == 1:
        # A bias on keys only (ATP's masks, padding): one more head dimension, 1 on the queries and the bias on
        # the keys, adds it to every logit exactly, with no [T, S] array (padded to the kernel's 128 lanes).
        hp = math.ceil((h + 1) / BLOCK) * BLOCK
        ones = jnp.ones(qt.shape[:3] + (1,), qt.dtype)
        qt = _pad_to(jnp.concatenate([qt, ones], axis=-1), 3, hp)
        key_bias = _pad_to(bias[:, 0, 0, :], 1, sp).astype(kt.dtype)  # [B, Sp]
        kt = _pad_to(jnp.concatenate([kt, jnp.broadcast_to(key_bias[:, None, :, None], kt.shape[:3] + (1,))],
                                     axis=-1), 3, hp)
        vt = _pad_to(vt, 3, hp)
    elif bias is not None:
        ab = jnp.broadcast_to(bias.astype(jnp.float32), (b, n, t, s))
        ab = _pad_to(_pad_to(ab, 3, sp), 2, tp)

    def run(qt, kt, vt, ab, q_ids, kv_ids):
        return _flash(qt, kt, vt, ab, q_ids, kv_ids, causal)

    mesh = active_mesh()
    if mesh is not None and mesh.size > 1:
        batch = tuple(a for a in BATCH_AXES if a in mesh.shape)
        batch = (batch or None) if b % math.prod(mesh.shape[a] for a in batch) == 0 else None
        heads = "tensor" if "tensor" in mesh.shape and n % mesh.shape["tensor"] == 0 else None
        spec, rows = P(batch, heads, None, None), P(batch, None)
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec, spec, spec, None if ab is None else spec, rows, rows),
                            out_specs=spec, check_vma=False)
    out = run(qt, kt, vt, ab, q_ids, kv_ids)  # [B, N, Tp, Hp]
    return out[..., :h].transpose(0, 2, 1, 3)[:, :t]


__all__ = ["flash_attention"]
