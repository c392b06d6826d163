"""Model pieces on their own: configs, the image merge, attention chunking, full-size shapes."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atp_jax import DtypePolicy, LlavaConfig, LlavaForConditionalGeneration
from atp_jax.convert.checkpoint import abstract_model
from atp_jax.models.common import attention
from atp_jax.models.config import ConfigError
from atp_jax.models.llama import padding_bias, positions_from_mask
from atp_jax.models.llava import merge_image_features


def test_hf_config_round_trip_through_transformers():
    from transformers import LlavaConfig as HFLlavaConfig

    for cfg in (LlavaConfig.tiny(), LlavaConfig.llava15_7b(),
                LlavaConfig.tiny(vision_feature_layer=(-3, -1), vision_feature_select_strategy="full")):
        hf = HFLlavaConfig(**cfg.to_hf_dict())
        assert LlavaConfig.from_hf_dict(hf.to_dict()) == cfg
        assert LlavaConfig.from_dict(cfg.to_dict()) == cfg


LLAVA_HF_7B_CONFIG = {  # llava-hf/llava-1.5-7b-hf config.json (transformers v4), relying on HF defaults
    "architectures": ["LlavaForConditionalGeneration"], "ignore_index": -100, "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlamaForCausalLM"],
                    "max_position_embeddings": 4096, "model_type": "llama", "rms_norm_eps": 1e-05,
                    "torch_dtype": "float16", "vocab_size": 32064},
    "tie_word_embeddings": False, "torch_dtype": "float16", "transformers_version": "4.36.0.dev0",
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 24,
                      "patch_size": 14, "projection_dim": 768, "vocab_size": 32000},
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "vocab_size": 32064,
}


@pytest.mark.parametrize("d", [
    LLAVA_HF_7B_CONFIG,
    {"model_type": "llava"},  # everything from defaults
    {"text_config": {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 8},  # kv heads = heads
     "vision_config": {"model_type": "clip_vision_model"}},  # CLIP defaults, not LLaVA's
], ids=["llava-1.5-7b-hf", "empty", "partial"])
def test_omitted_fields_take_transformers_defaults(d):
    from transformers import LlavaConfig as HFLlavaConfig

    resolved = HFLlavaConfig(**d).to_dict()
    assert LlavaConfig.from_hf_dict(d) == LlavaConfig.from_hf_dict(resolved)
    assert LlavaConfig.from_hf_dict(d).to_hf_dict()["text_config"]["num_key_value_heads"] == \
        resolved["text_config"]["num_key_value_heads"]


def test_llava15_7b_hf_config_is_the_7b_preset():
    cfg = LlavaConfig.from_hf_dict(LLAVA_HF_7B_CONFIG)
    assert cfg == LlavaConfig.llava15_7b()
    with pytest.raises(ConfigError, match="disagrees"):
        LlavaConfig.from_hf_dict({**LLAVA_HF_7B_CONFIG, "vocab_size": 32000})


@pytest.mark.parametrize("field,value,match", [
    ("sliding_window", 4096, "sliding_window"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_parameters", {"rope_type": "longrope", "rope_theta": 1e4}, "longrope"),
])
def test_unsupported_text_fields_raise(field, value, match):
    d = LlavaConfig.tiny().to_hf_dict()
    d["text_config"][field] = value
    with pytest.raises(ConfigError, match=match):
        LlavaConfig.from_hf_dict(d)


def test_bad_vision_feature_layer_raises():
    with pytest.raises(ConfigError, match="out of range"):
        LlavaConfig.tiny(vision_feature_layer=-9)


def test_llava15_7b_shapes_without_memory():
    model = abstract_model(LlavaConfig.llava15_7b(), DtypePolicy(jnp.bfloat16, jnp.bfloat16))
    params = nnx.to_pure_dict(nnx.state(model))
    n = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert 7.05e9 < n < 7.07e9  # LLaVA-1.5-7B: 7,063,427,072 parameters
    lm = params["language_model"]
    assert lm["layers"]["self_attn"]["q_proj"]["kernel"].shape == (32, 4096, 4096)
    assert lm["layers"]["mlp"]["gate_proj"]["kernel"].shape == (32, 4096, 11008)
    assert params["vision_tower"]["patch_embedding"]["kernel"].shape == (14, 14, 3, 1024)
    assert params["multi_modal_projector"]["linear_1"]["kernel"].shape == (1024, 4096)
    out = nnx.eval_shape(lambda m, i, p: m(i, p), model, jax.ShapeDtypeStruct((2, 640), jnp.int32),
                         jax.ShapeDtypeStruct((2, 3, 336, 336), jnp.float32))
    assert out.logits.shape == (2, 640, 32064)


def test_merge_image_features_literal():
    embeds = jnp.zeros((2, 5, 1))
    features = jnp.array([[[1.0], [2.0]], [[3.0], [4.0]]])
    mask = jnp.array([[0, 1, 1, 0, 0], [0, 0, 0, 1, 1]], bool)
    out = merge_image_features(embeds, features, mask)[..., 0]
    np.testing.assert_array_equal(out, [[0, 1, 2, 0, 0], [0, 0, 0, 3, 4]])


def test_positions_skip_padding():
    mask = jnp.array([[1, 1, 1, 0], [0, 0, 1, 1]])
    np.testing.assert_array_equal(positions_from_mask(mask, 2, 4), [[0, 1, 2, 2], [0, 0, 0, 1]])


@pytest.mark.parametrize("causal,kv_heads,use_bias", [(True, 4, True), (True, 1, False), (False, 2, True)])
def test_chunked_attention_equals_one_call(causal, kv_heads, use_bias):
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.standard_normal((2, 37, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((2, 37, kv_heads, 8)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((2, 37, kv_heads, 8)), jnp.float32)
    bias = padding_bias(jnp.asarray(rng.random((2, 37)) > 0.2)) if use_bias else None
    whole = attention(q, k, v, bias, causal=causal, chunk=None)
    for chunk in (5, 16):
        np.testing.assert_allclose(attention(q, k, v, bias, causal=causal, chunk=chunk), whole, atol=1e-6)
    if causal:  # the future never leaks: changing the last key leaves earlier outputs alone
        k2 = k.at[:, -1].add(1.0)
        np.testing.assert_allclose(attention(q, k2, v, bias, causal=True, chunk=5)[:, :-1], whole[:, :-1], atol=1e-6)


def test_image_token_count_is_checked():
    cfg = LlavaConfig.tiny()
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[1] + [cfg.image_token_index] * (cfg.num_image_tokens - 1) + [5]])
    with pytest.raises(ValueError, match="image tokens"):
        model(ids, jnp.zeros((1, 3, 56, 56)))
    with pytest.raises(ValueError, match="2 images for a batch of 1"):
        model(ids, jnp.zeros((2, 3, 56, 56)))


def test_bfloat16_policy_keeps_norms_and_softmax_in_float32():
    cfg = dataclasses.replace(LlavaConfig.tiny())
    model = LlavaForConditionalGeneration(cfg, policy=DtypePolicy(jnp.bfloat16, jnp.bfloat16), rngs=nnx.Rngs(0))
    ids = jnp.asarray([[1] + [cfg.image_token_index] * cfg.num_image_tokens + [5, 6]])
    out = model(ids, jnp.ones((1, 3, 56, 56)))
    assert out.logits.dtype == jnp.float32 and bool(jnp.isfinite(out.logits).all())
    assert model.language_model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16


def test_every_parameter_names_its_logical_axes():
    """Sharding rules map these names to mesh axes; stacked layers add one leading, unnamed axis."""
    model = abstract_model(LlavaConfig.tiny(), DtypePolicy())
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes, ndim = var.get_metadata()["logical_axes"], len(var.get_value().shape)
        assert len(axes) == (ndim - 1 if "layers" in path else ndim), (path, axes)


def test_remat_gives_the_same_gradients(tiny_cfg):
    from atp_jax.testing.reference import random_inputs

    model = LlavaForConditionalGeneration(tiny_cfg, rngs=nnx.Rngs(0))
    ids, pixels = (jnp.asarray(x) for x in random_inputs(tiny_cfg, 2, 5, seed=1))

    def grads(remat: bool):
        model.language_model.remat = remat
        return nnx.grad(lambda m: jnp.square(m(ids, pixels).logits).mean())(model)

    plain, remat = jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
