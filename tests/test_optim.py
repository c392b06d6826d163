"""The optimizer builder: labels, frozen parameters, per-group schedules, weight-decay mask, clipping, accumulation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from atp_jax import LlavaConfig, LlavaForConditionalGeneration
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.train.optim import (
    FROZEN,
    OptimConfig,
    count_params,
    decay_mask,
    describe,
    learning_rates,
    lr_schedule,
    make_optimizer,
    path_labels,
    path_str,
)

ATP_LR, LLM_LR = 1e-4, 2e-5


@pytest.fixture(scope="module")
def model() -> PrunedLlava:
    llava = LlavaForConditionalGeneration(LlavaConfig.tiny(), rngs=nnx.Rngs(0))
    return PrunedLlava(llava, PruningConfig(atp_layers=(0, 1, 2)), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def params(model) -> nnx.State:
    return nnx.state(model, nnx.Param)


def flat(tree) -> dict[str, np.ndarray]:
    """{'/'-joined path: array (or str label)} for a tree of arrays or nnx.Variables (their `.value` key dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    return {
        path_str(p): x if isinstance(x, str) else np.asarray(x[...] if isinstance(x, nnx.Variable) else x)
        for p, x in leaves
    }


def random_like(tree, seed: int, scale: float = 1.0):
    """Random leaves bounded away from 0 (|g| in [1, 2) before `scale`, random sign), so Adam's g/|g| is clean.

    NumPy draws them: eager jax.random would compile once per leaf shape, which dominates this file's runtime.
    """
    rng = np.random.default_rng(seed)
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(
        [jnp.asarray(scale * (1 + rng.random(x.shape)) * rng.choice([-1.0, 1.0], x.shape), x.dtype) for x in leaves]
    )


def global_norm(tree, keep) -> float:
    return math.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for p, v in flat(tree).items() if keep(p)))


def scale_subset(tree, factor_of_path):
    """Multiply each leaf by factor_of_path(path string)."""
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: factor_of_path(path_str(p)), tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return jax.tree.map(lambda f, v: jax.tree.map(lambda x: x * f, v), labels, tree)


def is_vision(path: str) -> bool:
    return "vision_tower/" in path


def state_bytes(state) -> tuple[int, int]:
    leaves = jax.tree.leaves(state)
    return len(leaves), sum(x.size * x.dtype.itemsize for x in leaves)


def cfg_(**kw) -> OptimConfig:
    """Paper groups; no warm-up, constant lr and no clipping unless asked, so one step is easy to predict."""
    base = dict(total_steps=10, warmup_ratio=0.0, schedule="constant", clip_norm=0.0)
    base.update(kw)
    return OptimConfig(**base)


# ---- labels ----------------------------------------------------------------------------------------------


def test_labels_pruned_llava(params):
    cfg = OptimConfig(total_steps=100)
    labels = flat(path_labels(params, cfg))
    assert set(labels) == set(flat(params))
    for path, label in labels.items():
        if path.startswith("llava/vision_tower/"):
            assert label == FROZEN, path
        elif path.startswith("thresholds/"):
            assert label == "atp", path
        else:
            assert path.startswith(("llava/language_model/", "llava/multi_modal_projector/")), path
            assert label == "llm", path
    sizes = {p: v.size for p, v in flat(params).items()}
    counts = count_params(params, path_labels(params, cfg))
    assert counts[FROZEN] == sum(s for p, s in sizes.items() if is_vision(p))
    assert counts["atp"] == sum(s for p, s in sizes.items() if p.startswith("thresholds/"))
    assert sum(counts.values()) == sum(sizes.values())
    assert "atp" in describe(cfg, params) and "frozen" in describe(cfg, params)


def test_labels_plain_llava_and_pure_dict(model):
    """No 'llava/' prefix on a plain LlavaForConditionalGeneration; a pure dict gets the same labels."""
    cfg = OptimConfig(total_steps=100)
    plain = nnx.state(model.llava, nnx.Param)
    labels = flat(path_labels(plain, cfg))
    assert labels["vision_tower/class_embedding"] == FROZEN
    assert labels["language_model/lm_head/kernel"] == "llm"
    assert labels["multi_modal_projector/linear_1/bias"] == "llm"
    assert "atp" not in set(labels.values())
    assert flat(path_labels(nnx.to_pure_dict(plain), cfg)) == labels


def test_unmatched_parameter_raises_with_path(params):
    cfg = OptimConfig(total_steps=10, groups=(("llm", LLM_LR, (r"language_model/",)),))
    with pytest.raises(ValueError, match="match no optimizer group") as err:
        path_labels(params, cfg)
    assert "thresholds/0/head/bias" in str(err.value)
    assert "more" in str(err.value)  # 12 threshold + 4 projector params unmatched; only a few listed
    with pytest.raises(ValueError, match="thresholds/"):
        make_optimizer(cfg, params)
    # a catch-all group takes the rest
    cfg = OptimConfig(total_steps=10, groups=(("llm", LLM_LR, (r"language_model/",)), ("rest", 1e-3, (".*",))))
    labels = flat(path_labels(params, cfg))
    assert labels["thresholds/0/head/bias"] == "rest" and labels["llava/vision_tower/class_embedding"] == FROZEN


def test_config_validation():
    with pytest.raises(ValueError, match="schedule"):
        OptimConfig(total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="reserved"):
        OptimConfig(total_steps=10, groups=(("frozen", 1e-3, (".*",)),))
    with pytest.raises(ValueError, match="tuple of regexes"):
        OptimConfig(total_steps=10, groups=(("all", 1e-3, ".*"),))
    with pytest.raises(ValueError, match="warm-up"):
        OptimConfig(total_steps=10, warmup_steps=11)
    assert OptimConfig(total_steps=100).num_warmup_steps == 3
    assert OptimConfig(total_steps=10).num_warmup_steps == 1  # ceil(0.3), as the HF Trainer rounds
    assert OptimConfig(total_steps=100, warmup_steps=7).num_warmup_steps == 7


# ---- frozen parameters -----------------------------------------------------------------------------------


def test_frozen_params_have_no_state_and_do_not_move(params):
    cfg = cfg_()
    tx = make_optimizer(cfg, params)
    state = tx.init(params)
    assert not [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0] if "vision_tower" in path_str(p)]

    # Same parameters, nothing frozen: the vision tower joins the llm group.
    unfrozen = cfg_(frozen=(), groups=(cfg.groups[0], ("llm", LLM_LR, (r"language_model/", "projector/", "vision"))))
    state_all = make_optimizer(unfrozen, params).init(params)
    vision = [v for p, v in flat(params).items() if is_vision(p)]
    n, nbytes = state_bytes(state)
    n_all, nbytes_all = state_bytes(state_all)
    assert n_all - n == 2 * len(vision)  # mu and nu per vision parameter
    assert nbytes_all - nbytes == 2 * sum(v.nbytes for v in vision)
    trainable_bytes = sum(v.nbytes for p, v in flat(params).items() if not is_vision(p))
    counts = [x for x in jax.tree.leaves(state) if x.ndim == 0]  # per-group step counts
    assert nbytes - sum(x.nbytes for x in counts) == 2 * trainable_bytes

    update = jax.jit(tx.update)
    p = params
    for i in range(3):
        updates, state = update(random_like(params, seed=i), state, p)
        p = optax.apply_updates(p, updates)
    before, after = flat(params), flat(p)
    for path in before:
        if is_vision(path):
            assert np.array_equal(before[path], after[path]), path  # bitwise
        else:
            assert not np.allclose(before[path], after[path]), path


def test_nnx_optimizer_integration(model):
    """nnx.Optimizer (wrt=nnx.Param) passes pure trees to tx.update; labels must still resolve."""
    model = nnx.clone(model)
    before_state = nnx.state(model, nnx.Param)
    before = flat(before_state)
    opt = nnx.Optimizer(model, make_optimizer(cfg_(), nnx.state(model, nnx.Param)), wrt=nnx.Param)
    nnx.jit(lambda opt, model, grads: opt.update(model, grads))(opt, model, random_like(before_state, seed=0))
    after = flat(nnx.state(model, nnx.Param))
    for path in before:
        assert np.array_equal(before[path], after[path]) == is_vision(path), path


# ---- learning rates --------------------------------------------------------------------------------------


def test_group_learning_rates_first_adam_step(params):
    # No warm-up: Adam's first step is lr * g / (|g| + eps) ~ lr * sign(g), per group.
    cfg = cfg_()
    tx = make_optimizer(cfg, params)
    grads = random_like(params, seed=0)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    g, u = flat(grads), flat(updates)
    for path in u:
        lr = 0.0 if is_vision(path) else (ATP_LR if path.startswith("thresholds/") else LLM_LR)
        np.testing.assert_allclose(u[path], -lr * np.sign(g[path]), rtol=1e-4, err_msg=path)

    # With a warm-up (zero gradients during it, so nothing moves), the first real step after it keeps the ratio.
    cfg = cfg_(warmup_steps=3, schedule="cosine", total_steps=20)
    tx = make_optimizer(cfg, params)
    update = jax.jit(tx.update)
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for _ in range(3):
        updates, state = update(zeros, state, params)
        assert all(not v.any() for v in flat(updates).values())
    updates, _ = update(grads, state, params)
    u = flat(updates)
    atp = np.mean([np.abs(v).mean() for p, v in u.items() if p.startswith("thresholds/")])
    llm = np.mean([np.abs(v).mean() for p, v in u.items() if "language_model/" in p or "projector/" in p])
    np.testing.assert_allclose(atp / llm, ATP_LR / LLM_LR, rtol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_formula(schedule):
    total, warm, ratio = 40, 4, 0.1
    cfg = OptimConfig(total_steps=total, warmup_steps=warm, schedule=schedule, final_lr_ratio=ratio)
    final = {"cosine": ratio, "linear": ratio, "constant": 1.0}[schedule]
    mid = {"cosine": (1 + ratio) / 2, "linear": (1 + ratio) / 2, "constant": 1.0}[schedule]
    expect = {0: 0.0, warm // 2: 0.5, warm: 1.0, warm + (total - warm) // 2: mid, total: final, total + 5: final}
    for step, frac in expect.items():
        lrs = learning_rates(cfg, step)
        assert lrs.keys() == {"atp", "llm"}
        np.testing.assert_allclose(lrs["atp"], ATP_LR * frac, rtol=1e-6, atol=1e-12, err_msg=str(step))
        np.testing.assert_allclose(lrs["llm"], LLM_LR * frac, rtol=1e-6, atol=1e-12, err_msg=str(step))
    if schedule == "cosine":  # a quarter of the way into the decay: cos(pi/4)
        s = warm + (total - warm) // 4
        want = ATP_LR * (ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi / 4)))
        np.testing.assert_allclose(float(lr_schedule(cfg, ATP_LR)(s)), want, rtol=1e-6)


def test_applied_lr_follows_schedule():
    """Constant unit gradients make every Adam step exactly lr(t) in size: the lr the optimizer applies."""
    params = {
        "thresholds": {"0": {"kernel": jnp.zeros((3, 2))}},
        "language_model": {"kernel": jnp.zeros((4,))},
        "vision_tower": {"kernel": jnp.zeros((2,))},
    }
    cfg = OptimConfig(total_steps=12, warmup_steps=3, final_lr_ratio=0.2, clip_norm=0.0)
    tx = make_optimizer(cfg, params)
    update = jax.jit(tx.update)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for t in range(14):
        updates, state = update(grads, state, params)
        lrs = learning_rates(cfg, t)
        np.testing.assert_allclose(-updates["thresholds"]["0"]["kernel"], lrs["atp"], rtol=1e-4, atol=1e-12)
        np.testing.assert_allclose(-updates["language_model"]["kernel"], lrs["llm"], rtol=1e-4, atol=1e-12)
        assert not updates["vision_tower"]["kernel"].any()


# ---- weight decay ----------------------------------------------------------------------------------------


def test_weight_decay_mask(params):
    wd = 0.1
    cfg = cfg_(weight_decay=wd)
    mask = flat(decay_mask(params, cfg))
    no_decay = {p for p, m in mask.items() if not m}
    for p in no_decay:
        assert p.endswith("/bias") or "norm" in p or "embedding" in p, p
    for p in [
        "llava/language_model/embed_tokens/embedding",
        "llava/language_model/norm/weight",
        "llava/language_model/layers/input_layernorm/weight",
        "llava/vision_tower/pre_layrnorm/scale",
        "llava/vision_tower/layers/layer_norm1/bias",
        "llava/vision_tower/class_embedding",
        "llava/vision_tower/position_embedding/embedding",
        "thresholds/0/head/bias",
    ]:
        assert p in no_decay, p
    assert all(mask[p] for p in mask if p.endswith("/kernel"))  # incl. lm_head and the patch conv

    # Every parameter at 1 so each would visibly shrink; zero gradients so Adam contributes nothing.
    ones = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(cfg, ones)
    updates, _ = jax.jit(tx.update)(jax.tree.map(jnp.zeros_like, ones), tx.init(ones), ones)
    after = flat(optax.apply_updates(ones, updates))
    for path, v in after.items():
        lr = ATP_LR if path.startswith("thresholds/") else LLM_LR
        if is_vision(path) or path in no_decay:
            assert np.array_equal(v, np.ones_like(v)), path
        else:
            np.testing.assert_allclose(v, 1.0 - lr * wd, rtol=1e-7, err_msg=path)


# ---- clipping --------------------------------------------------------------------------------------------


def test_clipping_uses_trainable_norm_only(params):
    # eps = 1 makes Adam's step g / (|g| + 1) depend on the gradient's scale, so clipping is visible.
    clip = 1.0
    cfg = cfg_(clip_norm=clip, eps=1.0)
    tx = make_optimizer(cfg, params)
    state, update = tx.init(params), jax.jit(tx.update)
    g = random_like(params, seed=3)
    norm = global_norm(g, keep=lambda p: not is_vision(p))
    # trainable grads at global norm 100, frozen grads huge: they must not enter the norm
    big = scale_subset(g, lambda p: 1e4 if is_vision(p) else 100.0 / norm)
    small = scale_subset(g, lambda p: 0.0 if is_vision(p) else clip / norm)
    np.testing.assert_allclose(global_norm(big, keep=lambda p: not is_vision(p)), 100.0, rtol=1e-5)
    u_big = flat(update(big, state, params)[0])
    u_small = flat(update(small, state, params)[0])
    for path in u_big:
        np.testing.assert_allclose(u_big[path], u_small[path], rtol=1e-5, atol=1e-12, err_msg=path)

    unclipped = make_optimizer(cfg_(clip_norm=0.0, eps=1.0), params)
    raw_update = jax.jit(unclipped.update)
    u_raw = flat(raw_update(big, unclipped.init(params), params)[0])
    assert not np.allclose(u_raw["thresholds/0/head/kernel"], u_big["thresholds/0/head/kernel"])
    # below the threshold nothing is scaled
    tiny = scale_subset(g, lambda p: 0.0 if is_vision(p) else 0.5 / norm)
    u_tiny = flat(update(tiny, state, params)[0])
    u_tiny_raw = flat(raw_update(tiny, unclipped.init(params), params)[0])
    for path in u_tiny:
        np.testing.assert_allclose(u_tiny[path], u_tiny_raw[path], rtol=1e-6, atol=1e-12, err_msg=path)


# ---- accumulation ----------------------------------------------------------------------------------------


def test_accumulation_applies_mean_once_per_k(params):
    # Linear decay without warm-up over 2 updates: the second update's lr shows the schedule counted updates,
    # not micro-batches. eps = 1 so the mean (not the sum) of the gradients is what matters.
    kw = dict(schedule="linear", total_steps=2, final_lr_ratio=0.5, eps=1.0, clip_norm=1.0)
    tx = make_optimizer(cfg_(accumulation_steps=4, **kw), params)
    ref = make_optimizer(cfg_(**kw), params)
    state, ref_state = tx.init(params), ref.init(params)
    acc_paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    assert any("acc_grads" in p for p in acc_paths) and not any("vision_tower" in p for p in acc_paths)

    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    # Scales such that several micro-batch gradients exceed the clip norm but their mean does not: clipping
    # each micro-batch, or the sum, would give a different update than clipping the mean (which is right).
    grads = [random_like(params, seed=10 + i, scale=8e-4 * (i % 4 + 1)) for i in range(8)]
    trainable = lambda p: not is_vision(p)  # noqa: E731
    assert max(global_norm(g, trainable) for g in grads) > 2 * kw["clip_norm"]
    for k in range(2):
        chunk = grads[4 * k : 4 * k + 4]
        for g in chunk[:3]:
            updates, state = update(g, state, params)
            assert all(not v.any() for v in flat(updates).values())
        updates, state = update(chunk[3], state, params)
        mean = jax.tree.map(lambda *xs: jnp.asarray(sum(np.asarray(x) for x in xs) / 4), *chunk)
        assert 0.5 * kw["clip_norm"] < global_norm(mean, trainable) < kw["clip_norm"]
        ref_updates, ref_state = ref_update(mean, ref_state, params)
        u, r = flat(updates), flat(ref_updates)
        assert any(v.any() for v in u.values())
        for path in u:
            np.testing.assert_allclose(u[path], r[path], rtol=1e-5, atol=1e-10, err_msg=f"update {k}: {path}")
