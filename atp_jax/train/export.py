"""The trained model written as a converted atp_jax checkpoint (`WORKDIR/model`): what `load_pretrained`,
`launch/infer.py`, `launch/convert.py jax-to-hf` and the next stage's `model.init_from` read. Every process
takes part (orbax writes sharded arrays from all hosts); process 0 writes the small files."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from atp_jax.convert.checkpoint import CONFIG_FILE, PARAMS_DIR, copy_sidecars
from atp_jax.fileio import check_free_space, replace_directory, staging_path
from atp_jax.pruning import checkpoint as pruning_checkpoint
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.train import checkpointing


def export_model(directory: str | Path, model: PrunedLlava, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes `model` (LLaVA parameters, config, tokenizer files, pruning config and threshold MLPs) to
    `directory`, replacing an earlier export. Written beside it and renamed into place at the end, so the
    directory is the old export or the complete new one, never half of one."""
    directory = Path(directory).absolute()
    main = jax.process_index() == 0
    staging = staging_path(directory, tag="export")  # the same on every host; the workdir lock keeps it ours
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _sync("export: staging directory made")
    try:
        if jax.process_count() == 1:  # see checkpointing.save
            check_free_space(staging, checkpointing.estimated_bytes(nnx.state(model, nnx.Param)),
                             f"exporting the model to {directory}")
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model.llava, nnx.Param)))
            pruning_checkpoint.save_thresholds(checkpointer, staging, model)
            checkpointer.wait_until_finished()
        _sync("export: parameters written")
        if main:
            if tokenizer_dir is not None:
                copy_sidecars(Path(tokenizer_dir), staging)
            pruning_checkpoint.write_config(staging, model.pcfg)
            model.llava.config.save(staging / CONFIG_FILE)
            replace_directory(staging, directory)
    finally:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
    _sync("export: renamed into place")
    return directory


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
