"""Pruning modules on disk, beside a converted LLaVA checkpoint: `pruning_config.json` and `pruning_params/`
(an orbax checkpoint of the threshold MLPs). A checkpoint without them has untrained thresholds."""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path

import jax
from flax import nnx

from atp_jax.pruning.config import PruningConfig, fit_to_depth
from atp_jax.pruning.engine import PrunedLlava

CONFIG_FILE = "pruning_config.json"
PARAMS_DIR = "pruning_params"


def config_to_dict(pcfg: PruningConfig) -> dict:
    return dataclasses.asdict(pcfg)


def config_from_dict(d: dict) -> PruningConfig:
    """A PruningConfig from its saved dict; ValueError naming the field for an unknown one or a value of the
    wrong type."""
    from atp_jax.models.config import check_types

    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(PruningConfig)}
    d = {k: v for k, v in d.items() if k != "mode"}  # saved before the execution mode left the config
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"unknown pruning config fields: {unknown}")
    check_types(PruningConfig, d, "pruning")
    return PruningConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def write_config(directory: Path, pcfg: PruningConfig) -> None:
    """The pruning config file of a checkpoint directory being written."""
    (directory / CONFIG_FILE).write_text(json.dumps(config_to_dict(pcfg), indent=2))


def save_thresholds(checkpointer, directory: Path, model: PrunedLlava) -> None:
    """The threshold MLPs' parameters (if the model has any) through an orbax checkpointer, into a checkpoint
    directory being written."""
    if len(model.thresholds):
        checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model.thresholds, nnx.Param)))


def save_pruning(directory: str | Path, model: PrunedLlava) -> None:
    """Writes the pruning config and threshold-MLP parameters into `directory`, replacing earlier ones only
    once the new ones are complete."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # orbax writes absolute paths only
    staging = Path(tempfile.mkdtemp(prefix=".pruning.", dir=directory))
    try:
        write_config(staging, model.pcfg)
        with ocp.StandardCheckpointer() as checkpointer:
            save_thresholds(checkpointer, staging, model)
            checkpointer.wait_until_finished()
        for name in (PARAMS_DIR, CONFIG_FILE):
            if (directory / name).exists():
                shutil.rmtree(directory / name) if (directory / name).is_dir() else (directory / name).unlink()
            if (staging / name).exists():
                (staging / name).rename(directory / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def has_pruning(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def load_pruned(directory: str | Path, llava, rngs: nnx.Rngs | None = None, **overrides) -> tuple[PrunedLlava, bool]:
    """The pruned model for a checkpoint directory and whether its thresholds were trained: the saved config
    and thresholds when present (fields in `overrides`, e.g. `method`, replace saved ones), otherwise the
    default config placed for this decoder depth, with `overrides`. Every method runs at the placement the
    config holds (`method="fastv"` prunes where the main job's report runs FastV)."""
    import orbax.checkpoint as ocp

    directory = Path(directory).absolute()  # orbax reads absolute paths only
    n_layers = llava.config.text.num_hidden_layers
    if has_pruning(directory):
        try:
            saved = config_from_dict(json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{directory / CONFIG_FILE}: {e}") from e
        pcfg = dataclasses.replace(saved, **overrides)
    else:
        saved, pcfg = None, dataclasses.replace(fit_to_depth({}, n_layers), **overrides)
    model = PrunedLlava(llava, pcfg, rngs=rngs or nnx.Rngs(0))
    trained = (saved is not None and saved.method == pcfg.method == "atp" and saved.atp_layers == pcfg.atp_layers
               and (directory / PARAMS_DIR).is_dir())
    if trained:
        state = nnx.state(model.thresholds)
        one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
                              nnx.to_pure_dict(state))
        restored = ocp.StandardCheckpointer().restore(directory / PARAMS_DIR, target)
        nnx.replace_by_pure_dict(state, restored)
        nnx.update(model.thresholds, state)
    return model, trained
