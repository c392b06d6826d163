"""`train(config, workdir)`: the whole training run, from one CPU to every host of a TPU pod.

Data -> model (fresh or from a converted checkpoint) placed on the mesh -> optimizer -> resume from the
latest complete checkpoint (parameters, optimizer, step, data iterator) -> jitted, donated train steps ->
metrics, periodic evaluation and checkpoints -> a final checkpoint and the trained model exported to
`WORKDIR/model` (a converted checkpoint with its tokenizer and pruning modules). SIGTERM (TPU preemption)
saves and exits.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from atp_jax.models.common import DtypePolicy
from atp_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.pruning.accounting import prefill_flops
from atp_jax.pruning.config import fit_to_depth
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.sharding import DEFAULT_RULES, global_batch, make_mesh, shard_state, tree_shardings, use_mesh
from atp_jax.train import checkpointing, data
from atp_jax.train.export import export_model
from atp_jax.train.metrics import MetricWriter, Progress, peak_flops_per_device
from atp_jax.train.optim import FROZEN, OptimConfig, label_of, learning_rates, make_optimizer, map_paths
from atp_jax.train.step import TrainState, eval_step, train_step

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run failed (e.g. too many non-finite steps in a row)."""


class SetupError(ValueError):
    """The config cannot be run as given (missing checkpoint or data, a mesh that does not fit the devices...)."""


def build_model(config, vocab_size: int, image_token_id: int) -> PrunedLlava:
    """The PrunedLlava to train: from `model.init_from` (a converted checkpoint) or fresh at the config's size."""
    policy = DtypePolicy(param_dtype=jnp.float32, dtype=jnp.dtype(config.model.dtype))  # float32 master weights
    if config.model.init_from:
        from atp_jax.convert.checkpoint import load_pretrained

        stored, cfg = load_pretrained(config.model.init_from, dtype="float32")
        llava = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, policy=policy, rngs=nnx.Rngs(0)))
        nnx.update(llava, nnx.state(stored))
    elif config.model.preset:
        raise ValueError(f"model.init_from: a converted checkpoint is needed for preset {config.model.preset!r} "
                         "(see README: converting LLaVA-1.5)")
    else:
        vision = VisionConfig(**config.model.vision.to_dict())
        text = TextConfig(vocab_size=math.ceil(vocab_size / 64) * 64, **config.model.text.to_dict())
        cfg = LlavaConfig(vision=vision, text=text, image_token_index=image_token_id,
                          image_seq_length=vision.grid * vision.grid)
        llava = LlavaForConditionalGeneration(cfg, policy=policy, rngs=nnx.Rngs(config.seed))
        std = config.model.get("vision_position_std", 0.0)
        if std:
            emb = llava.vision_tower.position_embedding.embedding
            emb[...] = std * jax.random.normal(jax.random.key(config.seed + 2), emb.shape, emb.dtype)
    # Placed for this depth (baselines included), so the exported model runs every method as the report does.
    pcfg = fit_to_depth(config.pruning.to_dict() | {"mode": "soft"}, llava.config.text.num_hidden_layers)
    llava.language_model.remat = bool(config.model.remat)
    return PrunedLlava(llava, pcfg, rngs=nnx.Rngs(config.seed + 1))


def optim_config(config) -> OptimConfig:
    """Parameter groups from the config's learning rates; a rate of 0 freezes its group (no optimizer state)."""
    o = config.optim
    projector_lr = o.lr if o.projector_lr < 0 else o.projector_lr
    rates = [("atp", o.atp_lr, r"^thresholds/"), ("llm", o.lr, r"language_model/"),
             ("projector", projector_lr, r"multi_modal_projector/"), ("vision", o.vision_lr, r"vision_tower/")]
    groups = tuple((name, lr, (pattern,)) for name, lr, pattern in rates if lr > 0)
    frozen = tuple(pattern for _, lr, pattern in rates if lr <= 0)
    return OptimConfig(total_steps=config.total_steps, warmup_ratio=o.warmup_ratio, schedule=o.schedule,
                       weight_decay=o.weight_decay, clip_norm=o.clip_norm, accumulation_steps=o.accumulation_steps,
                       groups=groups, frozen=frozen)


def step_flops(cfg: LlavaConfig, seq_len: int, avg_visual: float, batch: int) -> float:
    """Analytic FLOPs of one training step: 3x the prefill (forward + backward) of each sample."""
    text = seq_len - cfg.num_image_tokens
    per_layer = np.full(cfg.text.num_hidden_layers, avg_visual + text)
    return 3.0 * batch * prefill_flops(cfg, per_layer)["total"]


class Preempted(Exception):
    pass


MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "pixel_values")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS}


def train(config, workdir: str | Path) -> dict:
    """Runs (or resumes) the training described by `config` in `workdir`; returns the last logged metrics."""
    workdir = Path(workdir)
    is_main = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    from atp_jax.convert.readers import CheckpointError
    from atp_jax.data.tokenizer import TokenizerError

    try:
        ds = data.prepare(config)
        model = build_model(config, len(ds.tokenizer), ds.image_token_id)
        m = config.mesh
        mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:m.devices] if m.devices else None)
    except (ValueError, FileNotFoundError, CheckpointError, TokenizerError) as e:
        raise SetupError(f"{type(e).__name__}: {e}") from e
    cfg = model.llava.config
    shard_state(model, mesh, DEFAULT_RULES)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ocfg = optim_config(config)
    tx = make_optimizer(ocfg, params)

    def counter():  # on the mesh like the rest; one buffer each, since the step donates them
        return jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(mesh, P()))

    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh, DEFAULT_RULES)  # moments like params
    state = TrainState(params=params, rest=rest, opt_state=jax.jit(tx.init, out_shardings=opt_shardings)(params),
                       step=counter(), bad_steps=counter(), skipped=counter())
    per_process = config.batch_size // jax.process_count()
    if per_process * jax.process_count() != config.batch_size:
        raise TrainingError(f"batch_size {config.batch_size} does not split over {jax.process_count()} processes")
    loader = data.loader(config, ds, ds.sources["train"], cfg, per_process, seed=config.seed)
    iterator = iter(loader)
    manager = checkpointing.manager(workdir / "checkpoints", config.checkpoint_every, config.keep_checkpoints)
    restored = checkpointing.restore_latest(manager, state, iterator)
    if restored is not None:
        state, iterator = restored
    start = int(state.step)
    writer = MetricWriter(workdir, is_main, resume_step=start)  # drops lines a killed run wrote after its checkpoint
    writer.write_config(config.to_dict())
    if is_main:
        log.info("model: %s; mesh %s; resuming at step %d", cfg.text, dict(mesh.shape), start)

    # The state keeps its shardings from step to step (donated in place); batches come placed by global_batch.
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    frozen = map_paths(lambda path: label_of(path, ocfg) == FROZEN, params)
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx, frozen=frozen), donate_argnums=0,
                      in_shardings=(state_shardings, None), out_shardings=(state_shardings, None))
    eval_fn = jax.jit(functools.partial(eval_step, graphdef))
    preempted = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    progress = Progress(config.total_steps, initial_step=start, is_main=is_main)
    peak = peak_flops_per_device()
    last: dict = {}
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(use_mesh(mesh, DEFAULT_RULES))  # activation sharding constraints while tracing
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, config.total_steps):
            batch = global_batch(model_inputs(next(iterator)), mesh)
            state, metrics = step_fn(state, batch)
            window_steps += 1
            done = step + 1
            # Checked when metrics are logged, not every step: a per-step host sync would keep the host from
            # loading the next batch while the device computes. Bad steps change nothing, so the checkpoints
            # saved meanwhile hold the last good parameters.
            logged = done % config.log_every == 0 or done == config.total_steps
            if logged and int(state.bad_steps) >= config.max_bad_steps:
                raise TrainingError(f"{config.max_bad_steps} consecutive steps with a non-finite loss or gradient "
                                    f"(step {done}); the last good checkpoint is kept in {workdir / 'checkpoints'}")
            if logged:
                metrics = jax.device_get(metrics)
                elapsed = (time.perf_counter() - window_start) / window_steps
                seq = batch["input_ids"].shape[1]
                flops = step_flops(cfg, seq, float(metrics["avg_visual_tokens"]), config.batch_size)
                last = {k: float(v) for k, v in metrics.items()} | {
                    "step_time_s": elapsed, "tokens_per_s": config.batch_size * seq / elapsed,
                    "skipped_steps": int(state.skipped)}
                updates = step // config.optim.accumulation_steps  # the schedule counts optimizer updates
                last |= {f"lr_{k}": v for k, v in learning_rates(ocfg, updates).items()}
                if peak:
                    last["mfu"] = flops / elapsed / (peak * jax.device_count())
                writer.write(done, last)
                progress.update(done, loss=last["loss"], tokens=last["avg_visual_tokens"])
                window_start, window_steps = time.perf_counter(), 0
            if config.eval_every and done % config.eval_every == 0 and "eval" in ds.sources:
                writer.write(done, evaluate(eval_fn, state, config, ds, cfg, mesh))
            manager.save(done, args=checkpointing.save_args(state, iterator))
            if preempted["flag"]:
                raise Preempted
        checkpointing.save_now(manager, int(state.step), state, iterator)
        nnx.update(model, state.params, state.rest)
        export_model(workdir / "model", model, ds.tokenizer_dir)
    except Preempted:
        checkpointing.save_now(manager, int(state.step), state, iterator)
        log.warning("SIGTERM: saved step %d and stopped", int(state.step))
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)
        manager.wait_until_finished()
        manager.close()
        writer.close()
        progress.close()
    return last


def evaluate(eval_fn, state, config, ds: data.Data, cfg, mesh) -> dict:
    """Mean loss and kept tokens over the first `eval_batches` batches of the eval split."""
    loader = data.loader(config, ds, ds.sources["eval"], cfg, config.batch_size // jax.process_count(), seed=0,
                         shuffle=False, num_epochs=1)
    totals: dict[str, float] = {}
    n = 0
    for n, local in enumerate(loader, 1):
        metrics = jax.device_get(eval_fn(state, global_batch(model_inputs(local), mesh)))
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v)
        if n == config.eval_batches:
            break
    return {f"eval_{k}": v / max(n, 1) for k, v in totals.items()}

