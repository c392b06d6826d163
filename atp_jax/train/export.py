"""The trained model written as a converted atp_jax checkpoint (`WORKDIR/model`): what `load_pretrained`,
`launch/infer.py`, `launch/convert.py jax-to-hf` and the next stage's `model.init_from` read. Every process
takes part (orbax writes sharded arrays from all hosts); process 0 writes the small files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from atp_jax.convert.checkpoint import CONFIG_FILE, PARAMS_DIR, copy_sidecars
from atp_jax.pruning import checkpoint as pruning_checkpoint
from atp_jax.pruning.engine import PrunedLlava


def export_model(directory: str | Path, model: PrunedLlava, tokenizer_dir: str | Path | None = None) -> Path:
    """Writes `model` (LLaVA parameters, config, tokenizer files, pruning config and threshold MLPs) to
    `directory`, replacing an earlier export. The config file is written last, so a directory without it is
    an interrupted export that `load_pretrained` refuses."""
    directory = Path(directory).absolute()
    main = jax.process_index() == 0
    if main and directory.exists():
        shutil.rmtree(directory)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("export: old model removed")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model.llava, nnx.Param)))
        if len(model.thresholds):
            checkpointer.save(directory / pruning_checkpoint.PARAMS_DIR,
                              nnx.to_pure_dict(nnx.state(model.thresholds, nnx.Param)))
        checkpointer.wait_until_finished()
    if main:
        if tokenizer_dir is not None:
            copy_sidecars(Path(tokenizer_dir), directory)
        (directory / pruning_checkpoint.CONFIG_FILE).write_text(
            json.dumps(pruning_checkpoint.config_to_dict(model.pcfg), indent=2))
        model.llava.config.save(directory / CONFIG_FILE)
    return directory
