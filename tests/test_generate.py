"""Generation with a (pruned) KV cache: parity with transformers' generate, masked == compact, batch == singles."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atp_jax import load_pretrained
from atp_jax.infer.generate import Sampling, generate, sample_tokens
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.testing.reference import random_inputs

NO_EOS = -1  # random weights: never stop early, so every step is compared


@pytest.fixture(scope="module")
def llava(tiny_hf):
    model, cfg = load_pretrained(tiny_hf[0])
    return model


def pruned(llava, **kw) -> PrunedLlava:
    pcfg = dataclasses.replace(PruningConfig(atp_layers=(0, 1, 2)), **kw)
    return PrunedLlava(llava, pcfg, rngs=nnx.Rngs(1))


def set_thresholds(model: PrunedLlava, unit_r: float, unit_s: float):
    for mlp in model.thresholds:
        mlp.head.kernel[...] = jnp.zeros_like(mlp.head.kernel[...])
        mlp.head.bias[...] = jnp.array([np.log(unit_r / (1 - unit_r)), np.log(unit_s / (1 - unit_s))])


def test_greedy_equals_transformers_generate(tiny_cfg, tiny_hf, llava):
    import torch

    _, ref = tiny_hf
    ids, pixels = random_inputs(tiny_cfg, batch=1, text_len=6, seed=11)
    with torch.no_grad():
        theirs = ref.generate(input_ids=torch.as_tensor(ids, dtype=torch.long), pixel_values=torch.as_tensor(pixels),
                              max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                              min_new_tokens=20)[0, ids.shape[1]:].numpy()
    for mode in ("masked", "compact"):
        ours = generate(pruned(llava, method="none"), ids, pixels, max_new_tokens=20, eos_id=NO_EOS, mode=mode,
                        chunk=7)
        np.testing.assert_array_equal(ours.tokens[0], theirs)


@pytest.mark.parametrize("method", ["atp", "fastv"])
def test_masked_and_compact_generate_the_same_tokens(tiny_cfg, llava, method):
    model = pruned(llava, method=method, fastv_layer=2)
    if method == "atp":
        set_thresholds(model, 0.5, 0.6)
    ids, pixels = random_inputs(tiny_cfg, batch=3, text_len=6, seed=12)
    masked = generate(model, ids, pixels, max_new_tokens=12, eos_id=NO_EOS, mode="masked")
    compact = generate(model, ids, pixels, max_new_tokens=12, eos_id=NO_EOS, mode="compact")
    if method == "atp":  # the first compact prefill of a length plans ATP's capacities at full capacity
        np.testing.assert_array_equal(masked.tokens, compact.tokens)
        compact = generate(model, ids, pixels, max_new_tokens=12, eos_id=NO_EOS, mode="compact")
    np.testing.assert_array_equal(masked.visual_per_layer, compact.visual_per_layer)
    assert masked.visual_per_layer[:, -1].max() < tiny_cfg.num_image_tokens  # pruning really happened
    np.testing.assert_array_equal(masked.tokens, compact.tokens)
    assert compact.cache_bytes < masked.cache_bytes


def test_batch_of_four_equals_four_single_runs_with_padding(tiny_cfg, llava):
    model = pruned(llava)
    set_thresholds(model, 0.5, 0.6)
    rows = [random_inputs(tiny_cfg, batch=1, text_len=n, seed=20 + n) for n in (3, 6, 4, 8)]
    t = max(r[0].shape[1] for r in rows)
    ids = np.zeros((4, t), np.int32)
    mask = np.zeros((4, t), bool)
    for i, (row, _) in enumerate(rows):  # rows 0, 2 right-padded, rows 1, 3 left-padded
        n = row.shape[1]
        sl = slice(0, n) if i % 2 == 0 else slice(t - n, t)
        ids[i, sl], mask[i, sl] = row[0], True
    pixels = np.concatenate([r[1] for r in rows])
    both = generate(model, ids, pixels, mask, max_new_tokens=10, eos_id=NO_EOS)
    for i, (row, pix) in enumerate(rows):
        alone = generate(model, row, pix, max_new_tokens=10, eos_id=NO_EOS)
        np.testing.assert_array_equal(both.tokens[i], alone.tokens[0])
        np.testing.assert_array_equal(both.visual_per_layer[i], alone.visual_per_layer[0])


def test_cache_holds_each_kept_token_once_and_positions_continue_the_prompt(tiny_cfg, llava):
    """Regressions of other projects: a scoring pass that writes a second KV entry for a layer, and decode
    positions shifted by the number of dropped tokens."""
    from atp_jax.pruning.prefill import prefill_compact

    model = pruned(llava)
    set_thresholds(model, 0.5, 0.6)
    ids, pixels = random_inputs(tiny_cfg, batch=2, text_len=6, seed=13)
    out = prefill_compact(model, jnp.asarray(ids), jnp.asarray(pixels), return_cache=True)
    counts = np.asarray(out.counts)
    assert [s.start for s in out.cache] == [0, 1, 2, 3] and [s.stop for s in out.cache] == [1, 2, 3, 4]
    for m, seg in enumerate(out.cache):
        assert seg.k.shape[0] == seg.stop - seg.start  # one entry per layer, no duplicate from the side path
        visual = tiny_cfg.num_image_tokens if m == 0 else counts[:, m - 1]
        text = ids.shape[1] - tiny_cfg.num_image_tokens  # BOS and the text
        np.testing.assert_array_equal(np.asarray(seg.visible).sum(1), visual + text)
        np.testing.assert_array_equal(seg.next_position, ids.shape[1])  # original positions: the prompt length
    contiguous = dataclasses.replace(model.pcfg, position_mode="contiguous")
    model_c = PrunedLlava(model.llava, contiguous, rngs=nnx.Rngs(1))
    model_c.thresholds = model.thresholds
    out = prefill_compact(model_c, jnp.asarray(ids), jnp.asarray(pixels), return_cache=True)
    for seg in out.cache:
        np.testing.assert_array_equal(seg.next_position, np.asarray(seg.visible).sum(1))


def test_unpruned_decode_equals_full_forward_logits(tiny_cfg, llava):
    """Feeding the generated tokens back through a plain forward gives the same greedy choices."""
    from atp_jax import forward

    ids, pixels = random_inputs(tiny_cfg, batch=2, text_len=5, seed=14)
    gen = generate(pruned(llava, method="none"), ids, pixels, max_new_tokens=8, eos_id=NO_EOS)
    full = np.concatenate([ids, gen.tokens], axis=1)
    logits = np.asarray(forward(llava, jnp.asarray(full), jnp.asarray(pixels)).logits)
    greedy = logits[:, ids.shape[1] - 1:-1].argmax(-1)
    np.testing.assert_array_equal(greedy, gen.tokens)


def test_eos_stops_rows_and_sampling_is_seeded(tiny_cfg, llava):
    ids, pixels = random_inputs(tiny_cfg, batch=2, text_len=5, seed=15)
    model = pruned(llava, method="none")
    greedy = generate(model, ids, pixels, max_new_tokens=8, eos_id=NO_EOS)
    eos = int(greedy.tokens[0, 3])
    stopped = generate(model, ids, pixels, max_new_tokens=8, eos_id=eos)
    assert stopped.lengths[0] <= 3 and stopped.row(0) == greedy.row(0)[:stopped.lengths[0]]
    hot = Sampling(temperature=1.5, top_k=20, top_p=0.9)
    a = generate(model, ids, pixels, max_new_tokens=8, eos_id=NO_EOS, sampling=hot, seed=1)
    b = generate(model, ids, pixels, max_new_tokens=8, eos_id=NO_EOS, sampling=hot, seed=1)
    c = generate(model, ids, pixels, max_new_tokens=8, eos_id=NO_EOS, sampling=hot, seed=2)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert (a.tokens != c.tokens).any()


def test_top_k_and_top_p_restrict_the_choices():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = jax.vmap(lambda k, s: sample_tokens(logits, k, s)[0], in_axes=(0, None))
    assert set(np.asarray(draw(keys, Sampling(temperature=1.0, top_k=2)))) == {0, 1}
    assert set(np.asarray(draw(keys, Sampling(temperature=1.0, top_p=0.7)))) == {0, 1}  # 0.5 + 0.3 reaches 0.7
    assert set(np.asarray(draw(keys, Sampling(temperature=1.0, top_p=0.5)))) == {0}
    assert set(np.asarray(draw(keys, Sampling(temperature=1.0)))) == {0, 1, 2, 3}
    assert int(sample_tokens(logits, keys[0], Sampling())[0]) == 0
