"""The pruning engine inside LLaVA: soft and masked modes, their invariants, and edge cases."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atp_jax import LlavaConfig, LlavaForConditionalGeneration, forward
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.testing.reference import random_inputs

CFG = LlavaConfig.tiny()  # 4 decoder layers, 16 visual tokens
PCFG = PruningConfig(atp_layers=(0, 1, 2))


@pytest.fixture(scope="module")
def llava():
    return LlavaForConditionalGeneration(CFG, rngs=nnx.Rngs(0))


def pruned(llava, **kw) -> PrunedLlava:
    return PrunedLlava(llava, dataclasses.replace(PCFG, **kw), rngs=nnx.Rngs(1))


def set_thresholds(model: PrunedLlava, unit_r: float, unit_s: float):
    """Every module's thresholds fixed at the given points of their ranges, for every instance."""
    for mlp in model.thresholds:
        mlp.head.kernel[...] = jnp.zeros_like(mlp.head.kernel[...])
        mlp.head.bias[...] = jnp.array([np.log(unit_r / (1 - unit_r)), np.log(unit_s / (1 - unit_s))])


def batch(n=4, seed=0, text_len=8):
    ids, pixels = random_inputs(CFG, n, text_len, seed=seed)
    return jnp.asarray(ids), jnp.asarray(pixels)


@pytest.mark.parametrize("mode,temperature", [("masked", 10.0), ("soft", 1e4)])
def test_thresholds_that_keep_everything_equal_the_unpruned_model(llava, mode, temperature):
    model = pruned(llava, temperature=temperature)
    set_thresholds(model, 1e-6, 1e-6)
    ids, pixels = batch()
    out = model(ids, pixels, mode=mode)
    np.testing.assert_array_equal(out.counts, CFG.num_image_tokens)
    np.testing.assert_allclose(out.logits, forward(llava, ids, pixels).logits, atol=1e-5, rtol=0)


def test_thresholds_that_keep_nothing_drop_every_visual_token_without_nans(llava):
    model = pruned(llava)
    set_thresholds(model, 1 - 1e-6, 1 - 1e-6)
    ids, pixels = batch()
    out = model(ids, pixels)
    np.testing.assert_array_equal(out.counts, 0)
    assert np.isfinite(np.asarray(out.logits)).all()
    np.testing.assert_array_equal(out.visual_per_layer, [[16, 0, 0, 0]] * 4)


def test_masked_batch_equals_singles(llava):
    model = pruned(llava)
    ids, pixels = batch(4, seed=3)
    out = model(ids, pixels)
    assert len({tuple(c) for c in np.asarray(out.counts).tolist()}) > 1  # rows keep different numbers
    for i in range(4):
        one = model(ids[i:i + 1], pixels[i:i + 1])
        np.testing.assert_array_equal(one.keep[0], out.keep[i])
        np.testing.assert_allclose(one.logits[0], out.logits[i], atol=1e-5, rtol=0)


def test_padded_batch_equals_singles(llava):
    model = pruned(llava)
    a, pa = batch(1, seed=4, text_len=8)
    b, pb = batch(1, seed=5, text_len=5)
    length = a.shape[1]
    ids = np.zeros((2, length), np.int32)
    mask = np.zeros((2, length), np.int32)
    ids[0], mask[0] = a[0], 1
    ids[1, -b.shape[1]:], mask[1, -b.shape[1]:] = b[0], 1  # left padding
    out = model(jnp.asarray(ids), jnp.concatenate([pa, pb]), jnp.asarray(mask))
    alone = model(b, pb)
    np.testing.assert_array_equal(out.keep[1], alone.keep[0])
    np.testing.assert_allclose(out.logits[1, -b.shape[1]:], alone.logits[0], atol=1e-5, rtol=0)


def test_soft_mode_gradients_reach_every_threshold_parameter(llava):
    model = pruned(llava)
    ids, pixels = batch(2)

    def loss(m):
        out = m(ids, pixels, mode="soft")
        parts = m.losses(out)
        return out.logits[:, -1].std() + parts["atp"] + parts["target"]

    only_thresholds = nnx.DiffState(0, nnx.All(nnx.Param, nnx.PathContains("thresholds")))
    grads = nnx.grad(loss, argnums=only_thresholds)(model)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 4 * len(PCFG.atp_layers)
    for g in leaves:
        assert bool(jnp.isfinite(g).all()) and float(jnp.abs(g).sum()) > 0


def test_soft_with_large_temperature_approaches_masked(llava):
    ids, pixels = batch(4, seed=6)
    hard = pruned(llava)(ids, pixels)
    soft = pruned(llava, temperature=1e5)(ids, pixels, mode="soft")
    np.testing.assert_allclose(soft.keep, hard.keep, atol=1e-6, rtol=0)
    np.testing.assert_allclose(soft.logits, hard.logits, atol=1e-4, rtol=0)


def test_inputs_without_image_or_without_text_after_it(llava):
    model = pruned(llava)
    ids, pixels = batch(2)
    text_only = jnp.asarray([[1, 5, 6, 7, 8]])
    out = model(text_only)
    np.testing.assert_array_equal(out.counts, 0)
    np.testing.assert_allclose(out.logits, forward(llava, text_only).logits, atol=1e-5)
    image_last = ids[:, : 1 + CFG.num_image_tokens]  # BOS, then the image, nothing after
    out = model(image_last, pixels)
    assert np.isfinite(np.asarray(out.logits)).all() and (np.asarray(out.counts) > 0).all()
    soft = pruned(llava)
    assert all(np.isfinite(np.asarray(x)).all()
               for x in jax.tree.leaves(soft.losses(soft(image_last, pixels, mode="soft"))))


def test_accounting_and_losses(llava):
    model = pruned(llava)
    out = model(*batch(3))
    counts = np.asarray(out.counts)
    per_layer = np.asarray(out.visual_per_layer)
    np.testing.assert_array_equal(per_layer[:, 0], 16)
    np.testing.assert_array_equal(per_layer[:, 1:], counts)  # modules after layers 0, 1, 2 of 4
    assert (np.diff(counts, axis=1) <= 0).all()  # cumulative
    parts = model.losses(out)
    np.testing.assert_allclose(parts["avg_visual_tokens"], per_layer.mean(), rtol=1e-6)


def test_contiguous_positions(llava):
    original = pruned(llava)
    contiguous = pruned(llava, position_mode="contiguous")
    ids, pixels = batch(2)
    a, b = original(ids, pixels), contiguous(ids, pixels)
    np.testing.assert_array_equal(a.keep[:, 0], b.keep[:, 0])  # the first decision precedes any renumbering
    assert not np.allclose(a.logits[:, -1], b.logits[:, -1])


def test_spatial_baseline_keeps_the_sap_skeleton(llava):
    model = pruned(llava, method="spatial", target_ratio=0.25)
    out = model(*batch(2))
    keep = np.asarray(out.keep[0, 0]).reshape(4, 4)
    assert keep.sum() == 4 and keep[2, 2] == 1  # the stride-2 and stride-4 grids: (0,0), (0,2), (2,0), (2,2)


def numpy_last_token_attention(llava, ids, pixels, layer: int) -> np.ndarray:
    """Head-averaged attention probabilities of the last token over the visual tokens at decoder `layer`,
    computed in numpy from the full causal softmax over all keys (the FastV recipe)."""
    from atp_jax.models.llama import positions_from_mask, rope_cos_sin

    lm = llava.language_model
    h, _, image_mask = llava.embed(ids, pixels)
    positions = positions_from_mask(None, *ids.shape)
    x = np.asarray(lm.run_layers(h, positions, None, 0, layer).h, np.float64)  # input of `layer`
    params = jax.tree.map(lambda a: np.asarray(a[layer], np.float64), nnx.to_pure_dict(nnx.state(lm.layers)))
    norm = x / np.sqrt((x**2).mean(-1, keepdims=True) + CFG.text.rms_norm_eps) * params["input_layernorm"]["weight"]
    hd, n, kv = CFG.text.head_dim, CFG.text.num_attention_heads, CFG.text.num_key_value_heads
    q = (norm @ params["self_attn"]["q_proj"]["kernel"]).reshape(*x.shape[:2], n, hd)
    k = (norm @ params["self_attn"]["k_proj"]["kernel"]).reshape(*x.shape[:2], kv, hd)
    cos, sin = (np.asarray(a, np.float64)[:, :, None] for a in rope_cos_sin(CFG.text, positions))

    def rope(a):
        return a * cos + np.concatenate([-a[..., hd // 2:], a[..., :hd // 2]], -1) * sin

    q, k = rope(q), rope(k)
    out = []
    for b in range(x.shape[0]):
        probs = []
        for head in range(n):
            logits = q[b, -1, head] @ k[b, :, head // (n // kv)].T / np.sqrt(hd)  # last query sees every key
            e = np.exp(logits - logits.max())
            probs.append(e / e.sum())
        out.append(np.mean(probs, 0)[np.asarray(image_mask[b])])
    return np.array(out)


def test_fastv_keeps_the_tokens_a_numpy_reference_ranks_first(llava):
    model = pruned(llava, method="fastv", fastv_layer=2, fastv_ratio=0.75)
    ids, pixels = batch(3, seed=7)
    out = model(ids, pixels)
    attn = numpy_last_token_attention(llava, ids, pixels, layer=1)
    for b in range(3):
        want = np.zeros(16)
        want[np.argsort(-attn[b], kind="stable")[:4]] = 1
        np.testing.assert_array_equal(out.keep[b, 0], want)
    np.testing.assert_array_equal(out.visual_per_layer, [[16, 16, 4, 4]] * 3)


def test_pyramid_drop_halves_the_kept_tokens_at_each_stage(llava):
    model = pruned(llava, method="pdrop", pdrop_layers=(1, 2, 3), pdrop_keep=0.5)
    ids, pixels = batch(3, seed=8)
    out = model(ids, pixels)
    keep = np.asarray(out.keep)
    np.testing.assert_array_equal(out.counts, [[8, 4, 2]] * 3)
    assert (keep[:, 1] <= keep[:, 0]).all() and (keep[:, 2] <= keep[:, 1]).all()  # nested
    attn = numpy_last_token_attention(llava, ids, pixels, layer=0)  # the first stage: nothing pruned yet
    for b in range(3):
        want = np.zeros(16)
        want[np.argsort(-attn[b], kind="stable")[:8]] = 1
        np.testing.assert_array_equal(keep[b, 0], want)


def test_random_follows_its_schedule_and_is_batch_invariant(llava):
    model = pruned(llava, method="random", random_schedule=(0.5, 0.25, 0.25))
    ids, pixels = batch(3, seed=9)
    out = model(ids, pixels)
    np.testing.assert_array_equal(out.counts, [[8, 4, 4]] * 3)
    assert len({tuple(np.flatnonzero(r)) for r in np.asarray(out.keep[:, 0])}) > 1  # rows draw differently
    one = model(ids[1:2], pixels[1:2])
    np.testing.assert_array_equal(one.keep[0], out.keep[1])


def test_random_at_another_methods_per_instance_counts(llava):
    from atp_jax.pruning.prefill import prefill_compact

    atp = pruned(llava)
    set_thresholds(atp, 0.5, 0.6)
    ids, pixels = batch(4, seed=5)
    atp_counts = atp(ids, pixels).counts
    assert len({tuple(r) for r in np.asarray(atp_counts)}) > 1  # the rows differ, so the check means something
    rand = pruned(llava, method="random")
    masked, compact = rand(ids, pixels, counts=atp_counts), prefill_compact(rand, ids, pixels, counts=atp_counts)
    np.testing.assert_array_equal(masked.counts, atp_counts)
    np.testing.assert_array_equal(compact.keep, masked.keep)
    with pytest.raises(ValueError, match="shape"):
        rand(ids, pixels, counts=atp_counts[:, :2])
    with pytest.raises(ValueError, match="ranked baselines"):
        atp(ids, pixels, counts=atp_counts)


@pytest.mark.parametrize("method", ["atp", "fastv", "pdrop", "random", "spatial"])
def test_compact_picks_the_same_tokens_and_logits_as_masked(llava, method):
    from atp_jax.pruning.prefill import prefill_compact

    extra = {"pdrop_layers": (1, 2, 3)} if method == "pdrop" else {}
    model = pruned(llava, method=method, **extra)
    ids, pixels = batch(4, seed=3)
    masked, compact = model(ids, pixels), prefill_compact(model, ids, pixels)
    if method == "atp":  # the first prefill of a length runs at full capacity; the next one at planned ones
        np.testing.assert_array_equal(compact.keep, masked.keep)
        compact = prefill_compact(model, ids, pixels)
    np.testing.assert_array_equal(compact.keep, masked.keep)
    np.testing.assert_array_equal(compact.visual_per_layer, masked.visual_per_layer)
    source, valid = np.asarray(compact.source), np.asarray(compact.valid)
    at_source = np.take_along_axis(np.asarray(masked.logits), source[..., None], axis=1)
    text = valid & (source > CFG.num_image_tokens)  # the text after the image
    assert text.sum(1).min() == 7  # random_inputs: BOS, 16 visual tokens, 7 text tokens
    np.testing.assert_allclose(np.asarray(compact.logits)[text], at_source[text], atol=1e-4, rtol=0)
    assert compact.lengths[-1] < ids.shape[1]  # tokens really removed


def test_compact_keeps_original_positions_and_row_order(llava):
    from atp_jax.pruning.prefill import prefill_compact

    model = pruned(llava)
    ids, pixels = batch(2, seed=11)
    out = prefill_compact(model, ids, pixels)
    source, valid = np.asarray(out.source), np.asarray(out.valid)
    for b in range(2):
        kept = source[b][valid[b]]
        assert (np.diff(kept) > 0).all()  # original order
        n_visual = int(np.asarray(out.keep[b, -1]).sum())
        assert len(kept) == 1 + n_visual + 7  # BOS, the surviving visual tokens, the text


def count_compiles():
    """A list that grows by one entry per program XLA compiles while the listener is registered."""
    compiled = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return compiled, listener


def test_compact_prefill_is_one_program_with_no_host_transfer_and_compiles_nothing_in_a_steady_state(llava):
    from atp_jax.pruning.prefill import plan_capacities, prefill_compact, prefill_program

    model = pruned(llava)
    set_thresholds(model, 0.5, 0.7)
    batches = [batch(2, seed=20 + seed) for seed in range(4)]  # varied kept counts
    first = [prefill_compact(model, *b) for b in batches]  # plans ATP's capacities from what it keeps
    assert first[0].lengths == (24,) * 4  # the first prefill of a length runs at full capacity
    capacities = plan_capacities(model, 24)
    assert capacities[-1] < 24  # then tokens are really removed
    for b in batches:  # compiles the program of the capacities that hold every batch seen
        prefill_compact(model, *b)
    compiled, listener = count_compiles()
    try:
        again = [prefill_compact(model, *b) for b in batches[::-1]]  # a steady state: nothing new compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiled == []
    assert all(out.lengths == (24, *capacities) for out in again)
    for out, before in zip(again[::-1], first, strict=True):
        np.testing.assert_array_equal(out.keep, before.keep)
    graphdef, state = nnx.split(model)
    with jax.transfer_guard("disallow"):  # the whole prefill runs on the device: no transfer to or from the host
        out = prefill_program(graphdef, state, *batches[0], None, None, mode="compact", capacities=capacities,
                              last_logits_only=True)
        jax.block_until_ready(out)


def test_an_overflowing_compact_prefill_is_rerun_exactly(llava):
    from atp_jax.pruning.prefill import prefill_compact

    model = pruned(llava)
    set_thresholds(model, 0.2, 0.7)  # keeps many visual tokens
    ids, pixels = batch(2, seed=21)
    masked = model(ids, pixels)
    too_small = (12, 10, 9)  # 8 text tokens and at most 4, 2, 1 visual ones: fewer than ATP keeps here
    assert (np.asarray(masked.counts) + 8 > np.asarray(too_small)).any()
    out = prefill_compact(model, ids, pixels, capacities=too_small)
    assert out.lengths == (24,) * 4  # run again with room for every token
    np.testing.assert_array_equal(out.keep, masked.keep)
    with pytest.raises(ValueError, match="one capacity per module"):
        prefill_compact(model, ids, pixels, capacities=(12, 10))


def test_compact_batch_equals_singles(llava):
    from atp_jax.pruning.prefill import prefill_compact

    model = pruned(llava)
    ids, pixels = batch(3, seed=5)
    out = prefill_compact(model, ids, pixels)
    for b in range(3):
        one = prefill_compact(model, ids[b:b + 1], pixels[b:b + 1])
        np.testing.assert_array_equal(one.keep[0], out.keep[b])
        mine = np.asarray(out.logits[b])[np.asarray(out.valid[b])]
        alone = np.asarray(one.logits[0])[np.asarray(one.valid[0])]
        np.testing.assert_allclose(mine, alone, atol=1e-5, rtol=0)


def test_compact_edge_cases_without_nans(llava):
    from atp_jax.pruning.prefill import prefill_compact

    nothing = pruned(llava)
    set_thresholds(nothing, 1 - 1e-6, 1 - 1e-6)  # every visual token dropped at the first module
    ids, pixels = batch(2)
    prefill_compact(nothing, ids, pixels)  # plans the capacities
    out = prefill_compact(nothing, ids, pixels)
    np.testing.assert_array_equal(out.counts, 0)
    assert np.isfinite(np.asarray(out.logits)).all() and out.lengths[-1] < ids.shape[1]
    text_only = jnp.asarray([[1, 5, 6, 7, 8]])
    plain = prefill_compact(pruned(llava), text_only, None)
    np.testing.assert_allclose(plain.logits, forward(llava, text_only).logits, atol=1e-5)
    image_last = ids[:, : 1 + CFG.num_image_tokens]
    assert np.isfinite(np.asarray(prefill_compact(pruned(llava), image_last, pixels).logits)).all()


# ---- the side paths read the prompt only --------------------------------------------------------------------


def with_answer(ids, answer):
    """Prompt rows with `answer` tokens appended, their labels (only the answer supervised) and prompt mask."""
    from atp_jax.pruning.decisions import prompt_mask

    full = jnp.concatenate([ids, jnp.asarray(answer, jnp.int32)], axis=1)
    labels = jnp.where(jnp.arange(full.shape[1]) >= ids.shape[1], full, -100)
    return full, labels, prompt_mask(labels)


@pytest.mark.parametrize("method,mode", [("atp", "soft"), ("atp", "masked"), ("fastv", "soft"), ("pdrop", "masked"),
                                         ("random", "soft")])
def test_answer_tokens_choose_no_mask(llava, method, mode):
    """In training the masks hide visual keys from the positions that predict the answer: no answer token may
    take part in choosing them (soft weights, hard decisions, counts and thresholds all unchanged)."""
    model = pruned(llava, method=method, pdrop_layers=(1, 2, 3))
    ids, pixels = batch(3, seed=12)
    rng = np.random.default_rng(0)
    one, labels, prompt = with_answer(ids, rng.integers(3, 60, (3, 6)))
    other, _, _ = with_answer(ids, rng.integers(60, 120, (3, 6)))
    a, b = model(one, pixels, prompt=prompt, mode=mode), model(other, pixels, prompt=prompt, mode=mode)
    for field in ("keep", "counts", "thresholds", "scores"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-6, rtol=0, err_msg=field)
    if method == "atp":  # the check can fail: reading the answer as queries moves the scores
        leaky = model(other, pixels, mode=mode)
        assert not np.allclose(leaky.scores, b.scores, atol=1e-3)


@pytest.mark.parametrize("method", ["atp", "fastv", "random"])
def test_training_scores_what_inference_scores(llava, method):
    """One prompt: masked mode with an answer appended (training's view) and the inference paths on the prompt
    alone (masked and compact) give the same scores, thresholds and kept sets at every module."""
    from atp_jax.pruning.prefill import prefill_compact

    model = pruned(llava, method=method)
    ids, pixels = batch(2, seed=13)
    full, _, prompt = with_answer(ids, np.random.default_rng(1).integers(3, 120, (2, 5)))
    train = model(full, pixels, prompt=prompt)
    infer = model(ids, pixels)
    compact = prefill_compact(model, ids, pixels)
    np.testing.assert_allclose(train.scores, infer.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(train.thresholds, infer.thresholds, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(train.keep, infer.keep)
    np.testing.assert_array_equal(compact.keep, infer.keep)
    assert 0 < float(infer.counts[:, -1].min()) < CFG.num_image_tokens  # something kept, something dropped


def test_prompt_mask_and_token_roles():
    from atp_jax.pruning.decisions import prompt_mask, token_roles

    labels = jnp.array([[-100, -100, -100, 7, 8, -100, -100, 9], [-100] * 8])
    prompt = prompt_mask(labels)
    np.testing.assert_array_equal(prompt, [[1, 1, 1, 0, 0, 0, 0, 0], [1] * 8])
    image = jnp.array([[0, 1, 0, 0, 0, 0, 0, 0]] * 2, bool)
    valid = jnp.array([[1] * 8, [1] * 6 + [0, 0]], bool)
    text, last, _ = token_roles(jnp.arange(16).reshape(2, 8), image, valid, jnp.ones(2, bool), prompt)
    np.testing.assert_array_equal(text, [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(last, [[0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 0, 0]])
