"""The sharding layer on 8 CPU devices (conftest sets the device count): meshes, specs, placement, constraints."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import atp_jax
from atp_jax import LlavaConfig, LlavaForConditionalGeneration
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.sharding import (
    DEFAULT_RULES,
    batch_sharding,
    global_batch,
    logical_to_spec,
    make_mesh,
    param_specs,
    shard,
    shard_state,
    sharded_init,
    use_mesh,
)
from atp_jax.testing.reference import random_inputs

# Every sharded size even: vocab 160, widths 64/32, mlp 128/64, kv 2 x 16.
CFG = LlavaConfig.tiny()
PCFG = PruningConfig(atp_layers=(0, 1, 2))


def make_model() -> LlavaForConditionalGeneration:
    return LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(0))


def flat(state) -> dict:
    return {k: v.get_value() for k, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(2, 2, 2)


@pytest.fixture(scope="module")
def specs(mesh):
    """PartitionSpecs of a PrunedLlava's state, from its abstract state (nothing allocated)."""
    model = nnx.eval_shape(lambda: PrunedLlava(make_model(), PCFG, rngs=nnx.Rngs(1)))
    return {k: v.get_value() for k, v in nnx.to_flat_state(param_specs(nnx.state(model), DEFAULT_RULES, mesh))}


# ---- mesh --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sizes", "shape"), [((8, 1, 1), (8, 1, 1)), ((2, 4, 1), (2, 4, 1)), ((2, 2, 2), (2, 2, 2)),
                                              ((-1, 1, 1), (8, 1, 1)), ((2, -1, 1), (2, 4, 1)),
                                              ((1, 2, -1), (1, 2, 4))])
def test_make_mesh_shapes(sizes, shape):
    mesh = make_mesh(*sizes)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3
    assert mesh.devices.size == 8


def test_make_mesh_subset_of_devices():
    mesh = make_mesh(devices=jax.devices()[:2])
    assert tuple(mesh.shape.values()) == (2, 1, 1)


@pytest.mark.parametrize("sizes", [(3, 1, 1), (2, 2, 1), (2, 2, 4), (-1, 3, 1), (-1, -1, 1), (0, 8, 1), (-2, 1, 1)])
def test_make_mesh_bad_sizes(sizes):
    with pytest.raises(ValueError, match="mesh|devices"):
        make_mesh(*sizes)


# ---- specs -------------------------------------------------------------------------------------------------------


def test_logical_to_spec_rules(mesh):
    assert logical_to_spec(("embed", "heads"), (64, 64), DEFAULT_RULES, mesh) == P("fsdp", "tensor")
    assert logical_to_spec(("embed", "heads"), (4, 64, 64), DEFAULT_RULES, mesh) == P(None, "fsdp", "tensor")
    assert logical_to_spec(("batch", "sequence", "embed"), (8, 5, 64), DEFAULT_RULES, mesh) == \
        P(("data", "fsdp"), None, None)  # fsdp taken by the batch: embed replicated
    assert logical_to_spec(("embed", "embed"), (64, 64), DEFAULT_RULES, mesh) == P("fsdp", None)
    assert logical_to_spec(("unknown", None), (64, 64), DEFAULT_RULES, mesh) == P(None, None)
    with pytest.raises(ValueError, match="do not match"):
        logical_to_spec(("embed",), (2, 4, 64), DEFAULT_RULES, mesh)


def test_logical_to_spec_not_divisible_is_replicated(mesh):
    assert logical_to_spec(("vocab", "embed"), (161, 64), DEFAULT_RULES, mesh) == P(None, "fsdp")
    assert logical_to_spec(("batch",), (6,), DEFAULT_RULES, mesh) == P(None)  # 6 rows over 2 x 2
    odd = nnx.eval_shape(lambda: LlavaForConditionalGeneration(
        dataclasses.replace(CFG, text=dataclasses.replace(CFG.text, vocab_size=161)), rngs=nnx.Rngs(0)))
    s = param_specs(nnx.state(odd), DEFAULT_RULES, mesh)
    assert s.language_model.embed_tokens.embedding.get_value() == P(None, "fsdp")
    assert s.language_model.lm_head.kernel.get_value() == P("fsdp", None)


def test_logical_to_spec_missing_mesh_axis():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    assert logical_to_spec(("batch", "embed"), (8, 64), DEFAULT_RULES, mesh) == P("data", None)


def test_param_specs_model(specs):
    lm = ("llava", "language_model")
    assert specs[(*lm, "layers", "self_attn", "q_proj", "kernel")] == P(None, "fsdp", "tensor")  # stacked
    assert specs[(*lm, "layers", "self_attn", "k_proj", "kernel")] == P(None, "fsdp", "tensor")
    assert specs[(*lm, "layers", "self_attn", "o_proj", "kernel")] == P(None, "tensor", "fsdp")
    assert specs[(*lm, "layers", "mlp", "down_proj", "kernel")] == P(None, "tensor", "fsdp")
    assert specs[(*lm, "layers", "input_layernorm", "weight")] == P(None, "fsdp")
    assert specs[(*lm, "embed_tokens", "embedding")] == P("tensor", "fsdp")
    assert specs[(*lm, "lm_head", "kernel")] == P("fsdp", "tensor")
    assert specs[(*lm, "norm", "weight")] == P("fsdp")
    assert specs[("llava", "vision_tower", "patch_embedding", "kernel")] == P(None, None, None, "fsdp")
    assert specs[("llava", "vision_tower", "layers", "fc1", "bias")] == P(None, "tensor")
    assert specs[("llava", "multi_modal_projector", "linear_2", "kernel")] == P("fsdp", None)
    thresholds = {k: v for k, v in specs.items() if k[0] == "thresholds"}
    assert len(thresholds) == 12 and all(v == P() for v in thresholds.values())  # no metadata: replicated


# ---- placement and forward ---------------------------------------------------------------------------------------


def test_shard_state_forward_matches_unsharded(mesh):
    model = make_model()
    ids, pixels = random_inputs(CFG, batch=8, text_len=6)
    want = np.asarray(atp_jax.forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits)

    shardings = shard_state(model, mesh)
    q = model.language_model.layers.self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == P(None, "fsdp", "tensor") and q.sharding.mesh == mesh
    assert model.language_model.embed_tokens.embedding.get_value().sharding.spec == P("tensor", "fsdp")
    assert model.vision_tower.pre_layrnorm.scale.get_value().sharding.spec == P("fsdp")
    assert shardings.language_model.norm.weight.get_value().spec == P("fsdp")

    batch = global_batch({"input_ids": ids, "pixel_values": pixels}, mesh)
    assert batch["input_ids"].sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(batch["pixel_values"]), pixels)
    got = atp_jax.forward(model, batch["input_ids"], batch["pixel_values"]).logits
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


def test_shard_state_pruned_model_replicates_thresholds(mesh):
    model = PrunedLlava(make_model(), PCFG, rngs=nnx.Rngs(1))
    shardings = shard_state(model, mesh)
    kernel = model.thresholds[0].hidden.kernel.get_value()
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == 8
    assert shardings.thresholds[0].hidden.kernel.get_value().spec == P()
    assert model.llava.language_model.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")


def test_sharded_init_equals_eager_init(mesh):
    model = sharded_init(make_model, mesh)
    want = flat(nnx.state(make_model()))
    got = flat(nnx.state(model))
    assert got.keys() == want.keys()
    for k in want:
        # jit and eager initialisers may differ in the last bit (the position embedding's does)
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, atol=1e-7, err_msg=str(k))
    assert got[("language_model", "layers", "self_attn", "q_proj", "kernel")].sharding.spec == P(None, "fsdp", "tensor")
    assert got[("language_model", "embed_tokens", "embedding")].sharding.spec == P("tensor", "fsdp")
    assert got[("vision_tower", "post_layernorm", "bias")].sharding.spec == P("fsdp")


# ---- batches and activation constraints ----------------------------------------------------------------------------


def test_global_batch(mesh):
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    out = global_batch({"x": x}, mesh)["x"]
    assert out.shape == (8, 3) and out.sharding == batch_sharding(mesh)
    assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}  # 4 batch shards, each on 2 tensor devices
    np.testing.assert_array_equal(np.asarray(out), x)
    with pytest.raises(ValueError, match="do not split"):
        global_batch({"x": x[:6]}, mesh)


def test_shard_is_noop_without_mesh():
    x = jnp.ones((8, 64))
    assert shard(x, "batch", "embed") is x
    text = jax.jit(lambda y: shard(y * 2, "batch", "embed")).lower(x).as_text()
    assert "sharding_constraint" not in text


def test_shard_constrains_under_use_mesh(mesh):
    def f(y):
        return shard(y * 2, "sequence", "heads")

    fn = jax.jit(f)
    x = jnp.ones((8, 64))
    assert fn(x).sharding.is_fully_replicated  # traced without a mesh: no constraint
    with use_mesh(mesh):
        out = fn(x)  # retraced: the mesh is part of jax's trace context
        text = fn.lower(x).as_text()
    assert out.sharding.spec == P(None, "tensor")
    assert re.search(r'sharding_constraint .*\[\{\}, \{"tensor"\}\]', text)
    with use_mesh(mesh):
        h = jax.jit(lambda y: shard(y, "batch", "sequence", "embed"))(jnp.ones((8, 5, 64)))
    assert h.sharding.spec == P(("data", "fsdp"))  # embed dropped: fsdp already used by the batch
    with pytest.raises(ValueError, match="logical axes"):
        with use_mesh(mesh):
            shard(x, "batch")
