"""`train(config, workdir)`: the whole training run, from one CPU to every host of a TPU pod.

Data -> model (fresh or from a converted checkpoint) placed on the mesh -> optimizer -> resume from the
latest complete checkpoint (parameters, optimizer, step, data iterator) -> jitted, donated train steps ->
metrics, periodic evaluation and checkpoints -> a final checkpoint and the trained model exported to
`WORKDIR/model` (a converted checkpoint with its tokenizer and pruning modules). SIGTERM (TPU preemption)
saves and raises `Preempted`. One run per workdir (`workdir_lock`); a storage failure (a full disk) raises a
one-line `StorageError` and leaves the last complete checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from pathlib import Path

import jax
from flax import nnx

from atp_jax.fileio import storage_error
from atp_jax.pruning.accounting import train_step_flops
from atp_jax.sharding import DEFAULT_RULES, global_batch, make_mesh, use_mesh
from atp_jax.train import checkpointing, data
from atp_jax.train.export import export_model
from atp_jax.train.metrics import MetricWriter, Progress, peak_flops_per_device
from atp_jax.train.optim import describe, learning_rates
from atp_jax.train.program import build_model, model_inputs, teacher_model, train_program
from atp_jax.train.workdir_lock import workdir_lock

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """The run failed (e.g. too many non-finite steps in a row)."""


class SetupError(ValueError):
    """The config cannot be run as given (missing checkpoint or data, a mesh that does not fit the devices...)."""


class Preempted(Exception):
    """SIGTERM stopped the run after it saved its step; rerunning the same command resumes."""


def train(config, workdir: str | Path, start_fresh: bool = False) -> dict:
    """Runs (or resumes) the training described by `config` in `workdir`; returns the last logged metrics.
    When the workdir has checkpoints and none restores, SetupError, unless `start_fresh`: then they are set
    aside (renamed, not deleted) and the run starts from step 0, data order included."""
    workdir = Path(workdir)
    with workdir_lock(workdir):
        return _train(config, workdir, start_fresh)


def _train(config, workdir: Path, start_fresh: bool) -> dict:
    is_main = jax.process_index() == 0
    from atp_jax.convert.readers import CheckpointError
    from atp_jax.data.tokenizer import TokenizerError

    try:
        ds = data.prepare(config)
        model = build_model(config, len(ds.tokenizer), ds.image_token_id)
        teacher = teacher_model(config)
        m = config.mesh
        mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=jax.devices()[:m.devices] if m.devices else None)
    except (ValueError, FileNotFoundError, CheckpointError, TokenizerError) as e:
        raise SetupError(f"{type(e).__name__}: {e}") from e
    cfg = model.llava.config
    program = train_program(config, model, mesh, teacher=teacher)
    state = program.init_state(model)
    teacher_params = program.place_teacher(teacher)
    ocfg = program.optim
    per_process = config.batch_size // jax.process_count()
    if per_process * jax.process_count() != config.batch_size:
        raise TrainingError(f"batch_size {config.batch_size} does not split over {jax.process_count()} processes")
    loader = data.loader(config, ds, ds.sources["train"], cfg, per_process, seed=config.seed)
    iterator = iter(loader)
    manager, restored = restore(config, workdir, state, iterator, start_fresh)
    if restored is not None:
        state, iterator = restored
    else:
        iterator = iter(loader)  # failed restores may have moved it
    start = int(state.step)
    writer = MetricWriter(workdir, is_main, resume_step=start)  # drops lines a killed run wrote after its checkpoint
    writer.write_config(config.to_dict())
    if is_main:
        log.info("model: %s; mesh %s; resuming at step %d", cfg.text, dict(mesh.shape), start)
        log.info("optimizer: %s", describe(ocfg, state.params))

    # The state keeps its shardings from step to step (donated in place); batches come placed by global_batch.
    step_fn, eval_fn = program.step, program.eval
    preempted = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: preempted.update(flag=True))
    progress = Progress(config.total_steps, initial_step=start, is_main=is_main)
    peak = peak_flops_per_device()
    last: dict = {}
    stopped_at = None
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(use_mesh(mesh, DEFAULT_RULES))  # activation sharding constraints while tracing
        window_start, window_steps = time.perf_counter(), 0
        for step in range(start, config.total_steps):
            batch = global_batch(model_inputs(next(iterator)), mesh)
            state, metrics = step_fn(state, batch, teacher_params)
            window_steps += 1
            done = step + 1
            # Checked when metrics are logged, not every step: a per-step host sync would keep the host from
            # loading the next batch while the device computes. Bad steps change nothing, so the checkpoints
            # saved meanwhile hold the last good parameters.
            logged = done % config.log_every == 0 or done == config.total_steps
            if logged and int(state.bad_steps) >= config.max_bad_steps:
                raise TrainingError(f"{config.max_bad_steps} consecutive steps with a non-finite loss or gradient "
                                    f"(step {done}); the last good checkpoint is kept in {workdir / 'checkpoints'}")
            record = {}
            if logged:
                metrics = jax.device_get(metrics)
                elapsed = (time.perf_counter() - window_start) / window_steps
                seq = batch["input_ids"].shape[1]
                flops = train_step_flops(cfg, seq, config.batch_size, remat=config.model.remat,
                                         train_vision=config.optim.vision_lr > 0)
                last = {k: float(v) for k, v in metrics.items()} | {
                    "step_time_s": elapsed, "tokens_per_s": config.batch_size * seq / elapsed,
                    "skipped_steps": int(state.skipped)}
                updates = step // config.optim.accumulation_steps  # the schedule counts optimizer updates
                last |= {f"lr_{k}": v for k, v in learning_rates(ocfg, updates).items()}
                if peak:
                    last["mfu"] = flops / elapsed / (peak * jax.device_count())
                record |= last
                progress.update(done, loss=last["loss"], tokens=last["avg_visual_tokens"])
                window_start, window_steps = time.perf_counter(), 0
            if config.eval_every and done % config.eval_every == 0 and "eval" in ds.sources:
                record |= evaluate(eval_fn, state, config, ds, cfg, mesh)
            if record:
                writer.write(done, record)  # one line per step, before that step's checkpoint
            checkpointing.save(manager, done, state, iterator)
            if preempted["flag"]:
                stopped_at = done
                break
        checkpointing.save(manager, int(state.step), state, iterator, force=True)
        manager.wait_until_finished()  # raises the error of a save that failed
        if stopped_at is None:
            nnx.update(model, state.params, state.rest)
            export_model(workdir / "model", model, ds.tokenizer_dir)
    except Exception as e:
        error = storage_error(e, f"training in {workdir}")
        if error is None:
            raise
        raise error from e
    finally:
        stack.close()
        signal.signal(signal.SIGTERM, previous)
        checkpointing.close(manager, workdir / "checkpoints", is_main)
        writer.close()
        progress.close()
    if stopped_at is not None:
        log.warning("SIGTERM: saved step %d and stopped", stopped_at)
        raise Preempted(f"preempted (SIGTERM) at step {stopped_at}: saved {workdir / 'checkpoints' / str(stopped_at)}; "
                        "rerun the same command to resume")
    return last


def restore(config, workdir: Path, state, iterator, start_fresh: bool):
    """(checkpoint manager, restored (state, iterator) or None). Unfinished saves of an earlier run are
    removed first; when no checkpoint restores, SetupError, or with `start_fresh` the checkpoints are set aside."""
    directory = workdir / "checkpoints"
    if jax.process_index() == 0:
        removed = checkpointing.remove_unfinished(directory)
        if removed:
            log.warning("removed unfinished checkpoint saves of an earlier run: %s", ", ".join(removed))
    manager = checkpointing.manager(directory, config.checkpoint_every, config.keep_checkpoints)
    try:
        return manager, checkpointing.restore_latest(manager, state, iterator)
    except checkpointing.CheckpointsDamaged as e:
        manager.close()
        if not start_fresh:
            raise SetupError(f"{e}; rerun with --start_fresh to set them aside and train from step 0") from None
    if jax.process_index() == 0:
        aside = checkpointing.set_aside(directory)
        log.warning("no checkpoint restores: moved them to %s and starting from step 0", aside)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("damaged checkpoints set aside")
    return checkpointing.manager(directory, config.checkpoint_every, config.keep_checkpoints), None


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

