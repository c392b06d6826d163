"""Multi-stage runs from one config: LLaVA's pretrain -> finetune -> ATP chain, each stage a whole training run
in its own sub-directory of the workdir, each starting from the model the stage before it exported.

A config with ``stages = ("pretrain", "finetune", "atp")`` holds, in ``stage_overrides.<name>``, the fields
that stage changes (any field of the config, nested like the config itself). Rerunning resumes: a finished
stage (its exported model is complete) is skipped, an interrupted one resumes from its latest checkpoint. A finished
stage is only reused under the config it was trained with: any other value of a field that shapes the training is
an error that names the fields (a longer or otherwise changed chain needs its own workdir).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ml_collections import ConfigDict

from atp_jax.convert.checkpoint import CONFIG_FILE
from atp_jax.nested import flatten
from atp_jax.train.metrics import CONFIG_FILE as RUN_CONFIG_FILE

log = logging.getLogger(__name__)
STAGE_FIELDS = ("stages", "stage_overrides", "report")  # fields of the chain itself, not of a stage's run
# How a stage ran rather than what it trained: a finished stage is reused whatever these say now.
RUN_FIELDS = ("mesh", "distributed", "log_every", "eval_every", "eval_batches", "checkpoint_every",
              "keep_checkpoints", "max_bad_steps", "data.cache_dir", "data.worker_count")

# Fields added to the config after runs were saved, with the value that does what atp_jax did before they
# existed: a finished stage saved without one is reused when the field still has that value.
ADDED_FIELDS = {"distill.weight": 0.0, "distill.temperature": 1.0, "model.attention": "auto",
                "model.vision_position_std": 0.0}


class StageConfigError(ValueError):
    """A finished stage in the workdir was trained under another config."""


def merged(base: ConfigDict, overrides: ConfigDict, where: str = "") -> ConfigDict:
    """`base` with the fields of `overrides` replaced, recursively; a field `base` lacks is an error."""
    out = ConfigDict(base.to_dict())
    for key, value in overrides.items():
        if key not in out:
            raise ValueError(f"stage override {where}{key}: the config has no such field")
        if isinstance(value, ConfigDict | dict):
            out[key] = merged(out[key], ConfigDict(value), f"{where}{key}.")
        else:
            out[key] = value
    return out


def stage_configs(config: ConfigDict, workdir: str | Path) -> list[tuple[str, ConfigDict]]:
    """(name, config) for each stage; a stage after the first starts from the previous stage's model. Overrides
    of stages not in `stages` are unused (`--config.stages="('pretrain', 'finetune')"` runs the first two)."""
    workdir = Path(workdir)
    base = ConfigDict({k: v for k, v in config.to_dict().items() if k not in STAGE_FIELDS})
    out = []
    for i, name in enumerate(config.stages):
        overrides = config.stage_overrides.get(name, ConfigDict())
        c = merged(base, overrides, f"stage_overrides.{name}.")
        if i > 0:
            c.model.init_from = str((workdir / config.stages[i - 1] / "model").absolute())
        out.append((name, c))
    return out


def finished(stage_dir: Path) -> bool:
    """Whether the stage exported its model (the config file is written last)."""
    return (stage_dir / "model" / CONFIG_FILE).is_file()


def changed_fields(stage_dir: Path, config: ConfigDict, ignore: tuple[str, ...] = RUN_FIELDS) -> list[str]:
    """'field: saved -> now' for each field outside `ignore` in which `config` differs from the config the run in
    `stage_dir` saved (none when it saved none). A field the saved config lacks compares as its value in
    ADDED_FIELDS (the behaviour of atp_jax before the field existed)."""
    path = stage_dir / RUN_CONFIG_FILE  # the trainer writes it when the run starts
    if not path.is_file():
        return []
    before = flatten(json.loads(path.read_text()))
    now = flatten(json.loads(json.dumps(config.to_dict(), default=str)))  # as the trainer saves it
    before = {**{k: v for k, v in ADDED_FIELDS.items() if k in now}, **before}
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in sorted(before.keys() | now.keys())
            if before.get(k) != now.get(k) and not any(k == f or k.startswith(f + ".") for f in ignore)]


def run_stages(config: ConfigDict, workdir: str | Path, train) -> Path | None:
    """Runs every unfinished stage with `train(config, workdir)`; returns the last stage's exported model, or
    None when a stage stopped early (SIGTERM: it saved a checkpoint, and a rerun resumes it)."""
    workdir = Path(workdir)
    stages = stage_configs(config, workdir)
    for i, (name, c) in enumerate(stages, 1):
        stage_dir = workdir / name
        if finished(stage_dir):
            derived = ("model.init_from",) if i > 1 else ()  # the stage before's model, wherever the workdir is
            changed = changed_fields(stage_dir, c, RUN_FIELDS + derived)
            if changed:
                raise StageConfigError(f"stage {name} in {stage_dir} was trained with another config "
                                       f"({'; '.join(changed)}); use another --workdir, or remove {stage_dir} to "
                                       "train it again")
            log.info("stage %d/%d %s: done earlier (%s); skipped", i, len(stages), name, stage_dir / "model")
            continue
        log.info("stage %d/%d %s: %d steps, pruning %s, data %s -> %s", i, len(stages), name, c.total_steps,
                 c.pruning.method, c.data.source, stage_dir)
        train(c, stage_dir)
        if not finished(stage_dir):
            log.warning("stage %s stopped before its last step; rerun the same command to resume", name)
            return None
    return workdir / stages[-1][0] / "model"
