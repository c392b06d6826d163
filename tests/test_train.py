"""Training end to end on CPU: meshes give the 1-device losses, resume after SIGKILL, a damaged checkpoint, two
processes (SIGTERM and the other faults: tests/test_faults.py)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
STEPS = 3


def small_config(cache: Path, **overrides):
    """tests/train_config.py (tiny_synthetic shrunk) with the cache directory and dotted-key overrides."""
    from tests.train_config import get_config

    c = get_config()
    c.data.cache_dir = str(cache)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def losses(workdir: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single_device(cache, tmp_path_factory):
    from atp_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("one")
    train(small_config(cache, **{"mesh.data": 1, "mesh.devices": 1}), workdir)
    return losses(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_meshes_give_the_single_device_losses(cache, single_device, tmp_path, mesh):
    from atp_jax.train.trainer import train

    data, fsdp, tensor = mesh
    train(small_config(cache, **{"mesh.data": data, "mesh.fsdp": fsdp, "mesh.tensor": tensor}), tmp_path)
    got = losses(tmp_path)
    assert sorted(got) == sorted(single_device) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [single_device[s] for s in sorted(got)], rtol=1e-5)
    assert single_device[STEPS] < single_device[1]  # it learns


def test_a_damaged_latest_checkpoint_is_skipped_for_the_previous_one(cache, tmp_path, caplog):
    from atp_jax.train.trainer import train

    train(small_config(cache, total_steps=4, checkpoint_every=2), tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [2, 4]
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)  # every data file of the latest state unreadable
    before = losses(tmp_path)
    train(small_config(cache, total_steps=4, checkpoint_every=2), tmp_path)
    assert "does not restore" in caplog.text
    np.testing.assert_allclose([losses(tmp_path)[s] for s in (3, 4)], [before[s] for s in (3, 4)], rtol=1e-6)


def run_cli(workdir: Path, cache: Path, *extra: str, env: dict | None = None) -> subprocess.Popen:
    args = [sys.executable, str(ROOT / "launch" / "train.py"), f"--workdir={workdir}",
            f"--config={ROOT / 'tests' / 'train_config.py'}", f"--config.data.cache_dir={cache}", *extra]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def wait_for_checkpoint(workdir: Path, proc: subprocess.Popen, timeout: float = 240) -> int:
    """Waits until a finished checkpoint (orbax renames its temporary directory at the end) is on disk."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [int(p.name) for p in (workdir / "checkpoints").glob("*") if p.name.isdigit()]
        if done:
            return max(done)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.2)
    raise TimeoutError("no checkpoint appeared")


@pytest.mark.slow
def test_killed_and_restarted_run_logs_the_losses_of_an_uninterrupted_one(cache, tmp_path):
    steps = ["--config.total_steps=8", "--config.checkpoint_every=3"]
    whole = run_cli(tmp_path / "whole", cache, *steps)
    broken = run_cli(tmp_path / "broken", cache, *steps)
    wait_for_checkpoint(tmp_path / "broken", broken)
    broken.send_signal(signal.SIGKILL)
    broken.wait()
    resumed = run_cli(tmp_path / "broken", cache, *steps)
    for proc in (whole, resumed):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    assert losses(tmp_path / "broken") == losses(tmp_path / "whole")
    assert sorted(losses(tmp_path / "whole")) == list(range(1, 9))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_single_process_losses(cache, single_device, tmp_path):
    port = free_port()
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    flags = [f"--config.total_steps={STEPS}", f"--config.distributed.coordinator=127.0.0.1:{port}",
             "--config.distributed.num_processes=2"]
    procs = [run_cli(tmp_path, cache, *flags, f"--config.distributed.process_id={i}", env=env) for i in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    got = losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [single_device[s] for s in sorted(got)], rtol=1e-5)


@pytest.mark.slow
def test_a_checkpoint_restores_onto_another_mesh(cache, single_device, tmp_path):
    from atp_jax.train.trainer import train

    train(small_config(cache, total_steps=2, checkpoint_every=2, **{"mesh.data": 8}), tmp_path)
    train(small_config(cache, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}), tmp_path)  # resumes at 2
    got = losses(tmp_path)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [single_device[s] for s in sorted(got)], rtol=1e-5)


def test_non_finite_steps_are_skipped_and_too_many_stop_the_run(cache, tmp_path):
    from atp_jax.train.trainer import TrainingError, train

    config = small_config(cache, total_steps=12, checkpoint_every=1, max_bad_steps=3, log_every=1,
                          **{"optim.lr": 1e30, "optim.atp_lr": 1e30, "optim.vision_lr": 1e30, "optim.clip_norm": 0.0,
                             "optim.warmup_ratio": 0.0})
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        train(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["finite"] == 1 and lines[-1]["finite"] == 0 and lines[-1]["skipped_steps"] >= 1
    from atp_jax.train import checkpointing

    with checkpointing.manager(tmp_path / "checkpoints", 1, 2) as manager:  # the checkpoints hold finite params
        step = manager.latest_step()
        restored = manager.restore(step, args=checkpointing.ocp.args.Composite(
            state=checkpointing.ocp.args.StandardRestore()))["state"]
    assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(restored["params"]))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_the_trained_model_is_exported_for_inference_and_the_next_stage(cache, tmp_path):
    import jax.numpy as jnp

    from atp_jax import load_pretrained
    from atp_jax.pruning.checkpoint import load_pruned
    from atp_jax.testing.reference import random_inputs
    from atp_jax.train.trainer import train

    train(small_config(cache, total_steps=2), tmp_path / "stage")
    model, cfg = load_pretrained(tmp_path / "stage" / "model")
    pruned, trained = load_pruned(tmp_path / "stage" / "model", model)
    assert trained and pruned.module_layers == (0,)
    assert (tmp_path / "stage" / "model" / "tokenizer.model").is_file()
    ids, pixels = (jnp.asarray(x) for x in random_inputs(cfg, 1, 6))
    assert np.isfinite(np.asarray(pruned(ids, pixels).logits)).all()
    # The next stage starts from it: its first loss is the trained model's, not a fresh one's.
    fresh = small_config(cache, total_steps=1, log_every=1)
    chained = small_config(cache, total_steps=1, log_every=1, **{"model.init_from": str(tmp_path / "stage" / "model")})
    train(fresh, tmp_path / "fresh")
    train(chained, tmp_path / "chained")
    assert losses(tmp_path / "chained")[1] < losses(tmp_path / "fresh")[1]


def test_frozen_parameters_get_no_backward_pass():
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from atp_jax import LlavaConfig, LlavaForConditionalGeneration
    from atp_jax.pruning.config import PruningConfig
    from atp_jax.pruning.engine import PrunedLlava
    from atp_jax.testing.reference import random_inputs
    from atp_jax.train.optim import FROZEN, OptimConfig, label_of, make_optimizer, map_paths
    from atp_jax.train.step import TrainState, train_step

    cfg = LlavaConfig.tiny()
    model = PrunedLlava(LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0)),
                        PruningConfig(atp_layers=(0, 1, 2)), rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ocfg = OptimConfig(total_steps=10, groups=(("all", 1e-3, (r".*",)),), frozen=(r"vision_tower/",))
    tx = make_optimizer(ocfg, params)
    ids, pixels = (jnp.asarray(x) for x in random_inputs(cfg, 2, 6))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": jnp.ones_like(ids, bool), "pixel_values": pixels}
    state = TrainState(params, rest, tx.init(params), jnp.int32(0), jnp.int32(0), jnp.int32(0))
    frozen = map_paths(lambda path: label_of(path, ocfg) == FROZEN, params)

    def flops(mask):
        step = jax.jit(functools.partial(train_step, graphdef, tx, frozen=mask))
        return step.lower(state, batch).compile().cost_analysis()["flops"], step(state, batch)

    (with_mask, (new, m1)), (without, (_, m2)) = flops(frozen), flops(None)
    from atp_jax.pruning.accounting import vision_flops

    # The vision tower's backward is gone: at least one vision forward's worth of FLOPs saved (a backward is ~2x).
    assert without - with_mask > 2 * vision_flops(cfg.vision, max(cfg.feature_layers))
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    before, after = nnx.to_pure_dict(params), nnx.to_pure_dict(new.params)
    np.testing.assert_array_equal(after["llava"]["vision_tower"]["pre_layrnorm"]["scale"],
                                  before["llava"]["vision_tower"]["pre_layrnorm"]["scale"])


def test_a_fresh_vision_tower_draws_its_position_embeddings_at_the_configured_std(cache):
    from atp_jax.train.program import build_model

    def std(value):
        model = build_model(small_config(cache, **{"model.vision_position_std": value}), 100, 99)
        return float(np.std(np.asarray(model.llava.vision_tower.position_embedding.embedding[...])))

    assert 2.7 < std(3.0) < 3.3
    assert 0.9 / 32 ** 0.5 < std(0.0) < 1.1 / 32 ** 0.5  # 0: the module's own init (width 32 here)


def test_distillation_loss_is_the_kl_at_supervised_positions():
    import jax
    import jax.numpy as jnp

    from atp_jax.train.step import distill_loss

    rng = np.random.default_rng(0)
    student, teacher = (jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32) for _ in range(2))
    labels = jnp.asarray([[-100, -100, 3, 4, -100], [-100, 1, -100, -100, -100]])  # predicted from t = 1, 2; 0
    assert float(distill_loss(teacher, teacher, labels)) == pytest.approx(0.0, abs=1e-7)
    p, q = jax.nn.softmax(teacher / 2.0), jax.nn.log_softmax(student / 2.0)
    kl = lambda b, t: float((p[b, t] * (jnp.log(p[b, t]) - q[b, t])).sum())  # noqa: E731
    expected = 4.0 * (kl(0, 1) + kl(0, 2) + kl(1, 0)) / 3
    assert float(distill_loss(student, teacher, labels, temperature=2.0)) == pytest.approx(expected, rel=1e-5)
    # positions that predict no supervised token do not count
    moved = student.at[0, 3:].add(5.0).at[1, 1:].add(5.0)
    assert float(distill_loss(moved, teacher, labels, 2.0)) == pytest.approx(expected, rel=1e-5)


def test_a_stage_distils_from_the_model_it_starts_from(cache, tmp_path):
    from atp_jax.train.trainer import SetupError, train

    with pytest.raises(SetupError, match="distill.weight > 0 needs model.init_from"):
        train(small_config(cache, total_steps=1, **{"distill.weight": 1.0}), tmp_path / "alone")
    train(small_config(cache, total_steps=2, **{"pruning.method": "none"}), tmp_path / "teacher")
    start = {"model.init_from": str(tmp_path / "teacher" / "model"), "total_steps": 2, "log_every": 1,
             "pruning.method": "none"}
    train(small_config(cache, **start, **{"distill.weight": 1.0}), tmp_path / "student")
    lines = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in lines if r.get("step") == 1)
    # unpruned and unchanged at the first step, the student is its teacher: the term is 0, the loss the LM loss
    assert first["distill_loss"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(first["lm_loss"], rel=1e-6)
    second = next(r for r in lines if r.get("step") == 2)
    assert second["distill_loss"] > 0  # one update later it has moved away
    train(small_config(cache, **(start | {"distill.weight": 1.0, "pruning.method": "atp"})), tmp_path / "pruned")
    pruned = next(json.loads(line) for line in (tmp_path / "pruned" / "metrics.jsonl").read_text().splitlines()
                  if json.loads(line).get("step") == 1)
    assert pruned["distill_loss"] > 0  # ATP's soft masks make the student differ from its unpruned teacher
