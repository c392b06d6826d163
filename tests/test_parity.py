"""Logit parity with transformers' PyTorch LlavaForConditionalGeneration on tiny random models."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from atp_jax import LlavaConfig, forward, load_pretrained
from atp_jax.models.llama import positions_from_mask
from atp_jax.testing.reference import hf_logits, random_inputs, save_hf_model

TEXT = LlavaConfig.tiny().text
CASES = {
    "gqa_layer-2_default": {},
    "mha_layer-1_full": dict(text=dataclasses.replace(TEXT, num_key_value_heads=4), vision_feature_layer=-1,
                             vision_feature_select_strategy="full"),
    "mqa_layer-list": dict(text=dataclasses.replace(TEXT, num_key_value_heads=1), vision_feature_layer=(-3, -1)),
    "tied_rope-linear": dict(text=dataclasses.replace(TEXT, tie_word_embeddings=True,
                                                      rope_scaling=(("factor", 2.0), ("rope_type", "linear")))),
    "rope-llama3": dict(text=dataclasses.replace(TEXT, rope_theta=500000.0, rope_scaling=(
        ("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
        ("original_max_position_embeddings", 64), ("rope_type", "llama3")))),
    "rope-yarn": dict(text=dataclasses.replace(TEXT, rope_scaling=(
        ("factor", 4.0), ("original_max_position_embeddings", 128), ("rope_type", "yarn")))),
    "rope-dynamic": dict(text=dataclasses.replace(TEXT, max_position_embeddings=16, rope_scaling=(
        ("factor", 2.0), ("rope_type", "dynamic")))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(name, tmp_path):
    cfg = dataclasses.replace(LlavaConfig.tiny(), **CASES[name])
    ref = save_hf_model(cfg, tmp_path / "hf", seed=1)
    model, loaded = load_pretrained(tmp_path / "hf")
    assert loaded == cfg
    ids, pixels = random_inputs(cfg, batch=2, text_len=9, seed=2)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits)
    theirs = hf_logits(ref, ids, pixels)
    assert ours.shape == theirs.shape == (2, ids.shape[1], cfg.text.vocab_size)
    assert np.abs(theirs).max() > 1.0  # logits large enough for the bound to bite
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


def test_padded_batch_matches_transformers(tiny_cfg, tiny_hf):
    """Batch 2, row 0 right-padded and row 1 left-padded, positions skipping the padding."""
    directory, ref = tiny_hf
    model, _ = load_pretrained(directory)
    a, pixels_a = random_inputs(tiny_cfg, batch=1, text_len=6, seed=3)
    b, pixels_b = random_inputs(tiny_cfg, batch=1, text_len=5, seed=4)
    length = a.shape[1] + 2
    ids, mask = np.zeros((2, length), np.int32), np.zeros((2, length), np.int32)
    ids[0, :a.shape[1]], mask[0, :a.shape[1]] = a[0], 1  # right padding
    ids[1, -b.shape[1]:], mask[1, -b.shape[1]:] = b[0], 1  # left padding
    pixels = np.concatenate([pixels_a, pixels_b])
    positions = np.asarray(positions_from_mask(jnp.asarray(mask), *ids.shape))
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask)).logits)
    theirs = hf_logits(ref, ids, pixels, attention_mask=mask, position_ids=positions)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], atol=1e-4, rtol=0)
    # Each padded row equals the same prompt run alone without padding.
    for row in range(2):
        alone = np.asarray(forward(model, jnp.asarray(ids[row][valid[row]][None]), jnp.asarray(pixels[row:row + 1])
                                   ).logits)[0]
        np.testing.assert_allclose(ours[row][valid[row]], alone, atol=1e-5, rtol=0)


def test_bfloat16_close_to_transformers(tmp_path, tiny_cfg):
    ref = save_hf_model(tiny_cfg, tmp_path / "hf", seed=4, dtype="bfloat16")
    model, _ = load_pretrained(tmp_path / "hf", dtype="bfloat16")
    ids, pixels = random_inputs(tiny_cfg, batch=2, text_len=9, seed=5)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits)
    theirs = hf_logits(ref, ids, pixels)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= 0.05 * scale
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.9


def test_text_only_matches_transformers(tiny_cfg, tiny_hf):
    directory, ref = tiny_hf
    model, _ = load_pretrained(directory)
    ids = np.array([[1, 7, 9, 11, 13, 40]], np.int32)
    np.testing.assert_allclose(np.asarray(forward(model, jnp.asarray(ids)).logits), hf_logits(ref, ids), atol=1e-4)
