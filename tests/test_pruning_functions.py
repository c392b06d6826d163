"""The pure functions of the pruning engine, on small literal examples and numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from atp_jax.models.common import NEG_INF
from atp_jax.models.config import LlavaConfig
from atp_jax.pruning import scoring
from atp_jax.pruning.accounting import (
    budget_losses,
    decoder_layer_flops,
    flops_ratio,
    prefill_flops,
    visual_tokens_per_layer,
)
from atp_jax.pruning.compaction import bucket_length, bucketed_capacities, compaction_index, gather_tokens
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.masks import hard_keep, key_bias, soft_keep
from atp_jax.pruning.scoring import attention_received, minmax_normalise, redundancy_score, sap_scores, visual_positions
from atp_jax.pruning.thresholds import ThresholdMLP, resample_sorted


def test_visual_positions():
    mask = jnp.array([[0, 1, 1, 0], [1, 1, 0, 0]], bool)
    np.testing.assert_array_equal(visual_positions(mask, 2), [[1, 2], [0, 1]])


# On CPU the logits go in pieces of at most CPU_LOGITS_BLOCK floats (a row's are 5 x 4 x 7 = 140 here): the
# whole batch; two rows at a time and then the third; one row at a time with one query per piece.
@pytest.mark.parametrize("block", [None, 300, 40])
def test_attention_received_matches_numpy(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(scoring, "CPU_LOGITS_BLOCK", block)
    rng = np.random.default_rng(0)
    b, nq, p, n, kv, h = 3, 5, 7, 4, 2, 8
    q, k = rng.standard_normal((b, nq, n, h)), rng.standard_normal((b, p, kv, h))
    keep = rng.random((b, p)) > 0.3
    weight = (rng.random((b, nq)) > 0.4).astype(np.float32)
    got = attention_received(jnp.asarray(q), jnp.asarray(k), jnp.where(jnp.asarray(keep), 0.0, NEG_INF),
                             jnp.asarray(weight))
    want = np.zeros((b, p))
    for i in range(b):
        per_head = []
        for head in range(n):
            logits = q[i, :, head] @ k[i, :, head // (n // kv)].T / np.sqrt(h)  # [Q, P]
            logits = np.where(keep[i], logits, -np.inf)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            per_head.append(probs / probs.sum(-1, keepdims=True))
        per_query = np.mean(per_head, axis=0)
        want[i] = (per_query * weight[i][:, None]).sum(0) / weight[i].sum()
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-6)  # a distribution over kept keys
    zero = attention_received(jnp.asarray(q), jnp.asarray(k), jnp.zeros((b, p)), jnp.zeros((b, nq)))
    np.testing.assert_array_equal(zero, 0.0)  # no queries (e.g. no text after the image): zeros, not NaN


def test_minmax_and_redundancy():
    x = jnp.array([[2.0, 4.0, 3.0, 9.0]])
    kept = jnp.array([[1, 1, 1, 0]], bool)
    np.testing.assert_allclose(minmax_normalise(x, kept), [[0, 1, 0.5, 0]])
    np.testing.assert_allclose(minmax_normalise(jnp.array([[3.0, 3.0]]), jnp.array([[1, 1]], bool)), [[1, 1]])
    cross = jnp.array([[4.0, 2.0, 3.0, 0.0]])
    np.testing.assert_allclose(redundancy_score(x, cross, kept, jnp.array([True])), [[0.5, 0.5, 0.5, 0]])
    np.testing.assert_allclose(redundancy_score(x, cross, kept, jnp.array([False])), [[0, 1, 0.5, 0]])


def test_sap_scores_literal():
    s = sap_scores(4, 3.0).reshape(4, 4)
    want = np.full((4, 4), -1.0)
    want[0, 0] = want[0, 2] = want[2, 0] = 0.25
    want[2, 2] = 1 - 3 / 16
    np.testing.assert_allclose(s, want)


def test_sap_skeletons_are_nested_and_even():
    s = sap_scores(24, 3.0).reshape(24, 24)
    counts = [int((s > t).sum()) for t in (0.0, 0.7, 0.9, 0.96, 0.99)]
    assert counts == [192, 48, 24, 4, 1]  # stride 2 or 3 (144 + 64 - 16), 4 or 6, 6 or 8, 12, 24
    assert s[12, 12] == s.max()  # the coarsest grid is the centre patch
    on = np.argwhere(s > 0.9)  # strides 6, 8, 12, 24: an even spread, not a corner
    assert on[:, 0].min() <= 6 and on[:, 0].max() >= 18


def test_soft_mask_approaches_hard_mask():
    rng = np.random.default_rng(1)
    s_red, s_sp = jnp.asarray(rng.random((3, 16))), jnp.broadcast_to(jnp.asarray(sap_scores(4, 3.0)), (3, 16))
    theta_r, theta_s = jnp.array([0.3, 0.6, 0.9]), jnp.array([0.2, 0.5, 0.95])
    hard = hard_keep(s_red, s_sp, theta_r, theta_s)
    soft = soft_keep(s_red, s_sp, theta_r, theta_s, temperature=1e5)
    np.testing.assert_allclose(soft, hard.astype(np.float32), atol=1e-6)
    assert ((soft_keep(s_red, s_sp, theta_r, theta_s, 10.0) > 0.5) == hard).all()


def test_key_bias():
    hard = key_bias(jnp.array([[1.0, 0.0, 1.0]]), None)
    assert hard.shape == (1, 1, 1, 3)  # broadcast over heads and queries
    np.testing.assert_array_equal(hard[0, 0, 0], np.array([0, NEG_INF, 0], np.float32))
    soft = key_bias(jnp.array([[1.0, 0.5]]), 1e-6)[0, 0, 0]
    np.testing.assert_allclose(soft, [np.log(1 + 1e-6), np.log(0.5 + 1e-6)], atol=1e-6)


def test_compaction():
    assert bucket_length(170, 640, (0.25, 0.5, 1.0)) == 320
    assert bucket_length(0, 640, (0.25, 1.0)) == 160
    with pytest.raises(ValueError):
        bucket_length(700, 640, (0.5, 1.0))
    # capacities never grow from one run to the next, and never exceed the prompt
    assert bucketed_capacities([170, 400, 90], 640, (0.25, 0.5, 1.0)) == (320, 320, 160)
    assert bucketed_capacities([900], 640, (0.25, 0.5, 1.0)) == (640,)
    keep = jnp.array([[1, 0, 1, 1], [0, 1, 0, 0]], bool)
    index, valid = compaction_index(keep, 3)
    np.testing.assert_array_equal(index, [[0, 2, 3], [1, 0, 2]])
    np.testing.assert_array_equal(valid, [[1, 1, 1], [1, 0, 0]])
    x = jnp.arange(8.0).reshape(2, 4)[..., None] * jnp.ones(3)
    np.testing.assert_array_equal(gather_tokens(x, index)[..., 0], [[0, 2, 3], [5, 4, 6]])


def test_visual_tokens_per_layer_and_losses():
    per_layer = visual_tokens_per_layer(jnp.array([[100.0, 50.0]]), (1, 2), 4, jnp.array([200.0]))
    np.testing.assert_array_equal(per_layer, [[200, 200, 100, 50]])
    counts = jnp.array([[100.0, 50.0], [20.0, 10.0], [0.0, 0.0]])  # the third row has no image
    has_image = jnp.array([1.0, 1.0, 0.0])
    l_atp, l_target, avg = budget_losses(counts, (1, 2), 4, 200, has_image, target_ratio=0.25)
    # per-layer tokens [200, 200, 100, 50] and [200, 200, 20, 10]: averages 137.5 and 107.5
    assert float(l_atp) == pytest.approx((100 / 200 * 2 / 4 + 50 / 200 * 3 / 4 + 20 / 200 * 2 / 4 + 10 / 200 * 3 / 4)
                                         / 2)
    assert float(avg) == pytest.approx(122.5)
    assert float(l_target) == pytest.approx(abs(122.5 / 200 - 0.25))
    _, l_inst, _ = budget_losses(counts, (1, 2), 4, 200, has_image, target_ratio=0.25, scope="instance")
    assert float(l_inst) == pytest.approx((abs(137.5 / 200 - 0.25) + abs(107.5 / 200 - 0.25)) / 2)


def test_the_batch_target_leaves_instances_free_and_no_module_weighs_zero():
    """At the batch's budget one instance may keep twice what another keeps at no target cost; the per-instance
    target charges both. The module after layer 0 still costs tokens."""
    has_image = jnp.ones(2)
    spread = jnp.array([[40.0], [10.0]])  # one module after layer 0 of 2: averages (200 + 40) / 2, (200 + 10) / 2
    _, batch, _ = budget_losses(spread, (0,), 2, 200, has_image, target_ratio=(120 + 105) / 2 / 200)
    _, inst, _ = budget_losses(spread, (0,), 2, 200, has_image, target_ratio=(120 + 105) / 2 / 200,
                               scope="instance")
    assert float(batch) == pytest.approx(0.0, abs=1e-7) and float(inst) == pytest.approx(7.5 / 200)
    grad = jax.grad(lambda c: budget_losses(c, (0,), 2, 200, has_image, 0.5)[0])(spread)
    np.testing.assert_allclose(grad, 1 / 200 * 1 / 2 / 2)  # d/dN of mean_i (N_i / 200) * (0 + 1) / 2
    with pytest.raises(ValueError, match="scope"):
        budget_losses(spread, (0,), 2, 200, has_image, 0.5, scope="every")


def test_flops():
    cfg = LlavaConfig.tiny()
    t = cfg.text  # d 64, heads 4 (kv 2) of 16, F 128
    assert decoder_layer_flops(t, 10) == 2 * 10 * 64 * 16 * (8 + 4) + 4 * 100 * 4 * 16 + 6 * 10 * 64 * 128
    n = cfg.num_image_tokens + 8
    assert flops_ratio(cfg, [cfg.num_image_tokens] * 4, 8) == 1.0
    assert flops_ratio(cfg, [16, 16, 4, 4], 8) < 1.0
    parts = prefill_flops(cfg, [n] * 4)
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))


def test_resample_sorted_literal():
    out = resample_sorted(jnp.array([[0.2, 0.9, 0.5, 0.7]]), jnp.array([[1, 1, 1, 0]], bool), 5)
    np.testing.assert_allclose(out, [[0.9, 0.7, 0.5, 0.35, 0.2]], atol=1e-6)
    np.testing.assert_array_equal(resample_sorted(jnp.ones((1, 3)), jnp.zeros((1, 3), bool), 4), 0.0)


def test_threshold_mlp_starts_at_its_initial_thresholds_and_has_gradients():
    mlp = ThresholdMLP(8, 16, init_theta_r=0.7, init_theta_s=0.9, rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (3, 8))
    theta_r, theta_s = mlp(x, x[::-1])
    np.testing.assert_allclose(theta_r, 0.7, atol=1e-2)
    np.testing.assert_allclose(theta_s, 0.9, atol=1e-2)

    def loss(m):
        r, s = m(x, x)
        return (r * s).sum()

    grads = nnx.grad(loss)(mlp)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.isfinite(g).all()) for g in leaves)
    assert all(float(jnp.abs(g).sum()) > 0 for g in leaves)  # every parameter gets a gradient


def test_pruning_config():
    assert PruningConfig().scaled_to(8).atp_layers == (1, 3, 6)
    assert PruningConfig().scaled_to(32).atp_layers == (4, 14, 24)
    with pytest.raises(ValueError, match="method"):
        PruningConfig(method="magic")


def test_keep_top_literal():
    from atp_jax.pruning.masks import keep_top

    out = keep_top(jnp.array([[0.1, 0.7, 0.3, 0.9]]), jnp.array([[1, 1, 1, 0]], bool), 2)
    np.testing.assert_array_equal(out, [[0, 1, 1, 0]])
    np.testing.assert_array_equal(keep_top(jnp.ones((1, 3)), jnp.array([[1, 0, 1]], bool), 5), [[1, 0, 1]])
    per_row = keep_top(jnp.array([[0.1, 0.7, 0.3], [0.5, 0.2, 0.9]]), jnp.ones((2, 3), bool), jnp.array([1, 2]))
    np.testing.assert_array_equal(per_row, [[0, 1, 0], [1, 0, 1]])
