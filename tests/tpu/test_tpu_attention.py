"""The Pallas TPU flash-attention path against XLA's, on CPU in Pallas' TPU interpret mode: outputs and gradients
(into q, k, v and the additive bias that carries ATP's soft masks), GQA, padding to the kernel's blocks, a
sharded call, and a soft-mode training loss of the pruned model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from atp_jax.models.common import attention


def inputs(b=2, t=130, n=4, kv=2, h=64, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, n, h))
    k, v = (jax.random.normal(kk, (b, t, kv, h)) for kk in keys[1:3])
    keep = jax.random.uniform(keys[3], (b, t))  # soft keep weights on the keys, as ATP's soft masks
    bias = jnp.log(keep + 1e-6).at[0, -5:].set(-1e30)[:, None, None, :]  # and padding on row 0: [B, 1, 1, S]
    return q, k, v, bias


@pytest.mark.parametrize("causal,per_head", [(True, False), (False, False), (True, True)])
def test_flash_attention_matches_xla_with_its_gradients(causal, per_head):
    q, k, v, bias = inputs()
    if per_head:  # a bias that differs per head and query goes in as the kernel's own bias array
        bias = bias + 0.1 * jax.random.normal(jax.random.key(5), (2, 4, 130, 130))

    def loss(impl, q, k, v, bias):
        out = attention(q, k, v, bias, causal=causal, implementation=impl)
        return jnp.sum(jnp.sin(out[:, :-5]))  # padded queries' outputs are not used

    grad = jax.value_and_grad(loss, argnums=(1, 2, 3, 4))
    want, want_grads = grad("xla", q, k, v, bias)
    with pltpu.force_tpu_interpret_mode():
        got, got_grads = grad("pallas", q, k, v, bias)
    np.testing.assert_allclose(got, want, rtol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        assert float(jnp.abs(w).max()) > 0  # the gradient reaches every input, the bias included
        np.testing.assert_allclose(g, w, atol=2e-4 * float(jnp.abs(w).max()))


def test_flash_attention_under_a_mesh_runs_per_device():
    from atp_jax.sharding import make_mesh, use_mesh

    q, k, v, bias = inputs(b=4, n=4, kv=4)
    want = attention(q, k, v, bias, causal=True, implementation="xla")
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    with use_mesh(mesh), pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda *a: attention(*a, causal=True, implementation="pallas"))(q, k, v, bias)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_the_pruned_model_trains_the_same_on_the_kernel():
    from atp_jax.models.config import LlavaConfig
    from atp_jax.models.llava import LlavaForConditionalGeneration
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.pruning.engine import PrunedLlava
    from atp_jax.testing.reference import random_inputs

    cfg = LlavaConfig.tiny()
    ids, pixels = random_inputs(cfg, batch=2, text_len=12, seed=1)
    model = PrunedLlava(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)),
                        PruningConfig(atp_layers=(0, 2), target_ratio=0.5), rngs=nnx.Rngs(1))

    def loss(m):
        out = m(jnp.asarray(ids), jnp.asarray(pixels), mode="soft")
        parts = m.losses(out)
        return jnp.mean(out.logits ** 2) + parts["atp"] + parts["target"]

    results = {}
    for impl in ("xla", "pallas"):
        model.llava.language_model.attention = impl
        with pltpu.force_tpu_interpret_mode():
            value, grads = nnx.value_and_grad(loss)(model)
        results[impl] = (value, nnx.state(grads, nnx.Param))
    (want, want_grads), (got, got_grads) = results["xla"], results["pallas"]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    thresholds = [jnp.abs(g).max() for g in jax.tree.leaves(want_grads["thresholds"])]
    assert max(thresholds) > 0  # through the soft masks into the threshold MLPs
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4 * max(1e-3, float(jnp.abs(w).max())))


def test_the_target_platform_follows_the_mesh_and_bad_names_are_refused():
    from atp_jax.aot.chips import topology_devices
    from atp_jax.models.common import target_platform
    from atp_jax.sharding import make_mesh, use_mesh

    assert target_platform() == "cpu"
    with use_mesh(make_mesh(data=4, devices=topology_devices("v5e:2x2"))):
        assert target_platform() == "tpu"
    with pytest.raises(ValueError, match="attention implementation 'cuda'"):
        attention(*inputs()[:3], implementation="cuda")


def test_a_program_compiled_for_a_tpu_slice_calls_the_kernel():
    from atp_jax.aot.chips import topology_devices
    from atp_jax.sharding import make_mesh, use_mesh

    q, k, v, bias = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs(b=4))
    texts = {}
    for impl in ("auto", "xla"):
        with use_mesh(make_mesh(data=4, devices=topology_devices("v5e:2x2"))):
            fn = jax.jit(lambda *a, impl=impl: attention(*a, causal=True, implementation=impl))
            texts[impl] = fn.lower(q, k, v, bias).compile().as_text()
    assert "tpu_custom_call" in texts["auto"] and "tpu_custom_call" not in texts["xla"]
