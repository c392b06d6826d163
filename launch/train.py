"""Train LLaVA / ATP-LLaVA: the same command on a laptop CPU and on every host of a TPU pod.

  python launch/train.py [--config configs/NAME.py] [--workdir DIR] [--config.FIELD=VALUE ...]

Without --config: configs/tiny_synthetic.py, the main job: a tiny LLaVA trained in LLaVA-1.5's stages on the
built-in synthetic set (caption pretraining, instruction tuning, then ATP), then compared on the test split with
the unpruned model, FastV, PyramidDrop and random pruning at ATP's budget, each on the model before ATP tuning
and on the ATP-tuned one, and a text-only guesser (a table,
WORKDIR/eval_results.json, a plot and pictures of the kept patches). A config with `stages` runs each stage in
WORKDIR/<stage>. Rerunning with the same --workdir resumes from the latest checkpoint (finished stages are
skipped); when every checkpoint is damaged the run stops, unless --start_fresh sets them aside. One run per
workdir (WORKDIR/train.lock). Exit status: 0 done, 1 the training failed (non-finite steps), 2 a problem with
the config, the workdir or the storage (one line on stderr), 143 preempted by SIGTERM after saving (rerun to
resume). Multi-host: on a TPU pod slice the processes find each
other by themselves; elsewhere set --config.distributed.coordinator=HOST:PORT, .num_processes and .process_id.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from absl import app, flags  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", str(ROOT / "configs" / "tiny_synthetic.py"),
                                          "a configs/*.py file (get_config())", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics and the resolved config "
                               "(default: workdir/<config name>)")
_START_FRESH = flags.DEFINE_bool("start_fresh", False, "when no checkpoint of the run restores, move them aside "
                                 "(WORKDIR/checkpoints.damaged-<time>) and train from step 0 instead of stopping")
PREEMPTED_STATUS = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended: not success, rerun to resume


def initialize_distributed(config) -> None:
    """jax.distributed before any other JAX call: explicit coordinator settings, or automatic on a TPU pod."""
    import os

    import jax

    d = config.distributed
    if d.coordinator:
        jax.distributed.initialize(coordinator_address=d.coordinator, num_processes=d.num_processes,
                                   process_id=d.process_id)
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:  # a multi-host TPU slice
        jax.distributed.initialize()


def main(argv) -> None:
    del argv
    config = _CONFIG.value
    initialize_distributed(config)
    import jax

    from atp_jax.fileio import StorageError
    from atp_jax.train.stages import StageConfigError, run_stages
    from atp_jax.train.trainer import Preempted, SetupError, TrainingError, train
    from atp_jax.train.workdir_lock import WorkdirBusy, workdir_lock

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # orbax narrates every checkpoint at INFO
    # orbax logs a failed save with its traceback from each of its threads; the failure reaches the run as an
    # exception, which is reported in one line below.
    absl_logging.get_absl_logger().addFilter(lambda r: not (r.levelno >= logging.ERROR and "orbax" in r.pathname))
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)  # likewise its futures' "exception never retrieved"
    sys.unraisablehook = quiet_closed_loops(sys.unraisablehook)
    logging.getLogger("atp_jax").setLevel(logging.INFO)  # our own progress lines (stages, resume) stay visible
    workdir = _WORKDIR.value or str(Path("workdir") / Path(flags.FLAGS["config"].config_filename).stem)
    if jax.process_index() == 0:
        print(f"jax {jax.__version__}, {jax.process_count()} process(es), {jax.device_count()} {jax.default_backend()} "
              f"device(s); workdir {workdir}")
    try:
        if config.get("stages"):
            with workdir_lock(workdir):
                model_dir = run_stages(config, workdir, functools.partial(train, start_fresh=_START_FRESH.value))
                if model_dir is not None and config.report.enabled and jax.process_index() == 0:
                    write_report(config, workdir, model_dir)
            return
        last = train(config, workdir, start_fresh=_START_FRESH.value)
    except (SetupError, StageConfigError, WorkdirBusy, StorageError) as e:  # one line, no traceback, status 2
        exit_with(f"error: {e}", 2)
    except TrainingError as e:  # the run itself failed (e.g. too many non-finite steps)
        exit_with(f"error: {e}", 1)
    except Preempted as e:
        exit_with(str(e), PREEMPTED_STATUS)
    if jax.process_index() == 0 and last:
        print("final: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(last.items())))


def quiet_closed_loops(hook):
    """`hook` without one message: when a checkpoint write fails, orbax closes its event loop while tensorstore
    still completes the other writes, and each completion reports "Event loop is closed" as an unraisable
    error (a traceback apiece, hundreds of them). The failure itself reaches the run and is reported."""

    def filtered(unraisable):
        e = unraisable.exc_value
        if not (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"):
            hook(unraisable)

    return filtered


def exit_with(message: str, status: int) -> None:
    print(message, file=sys.stderr)
    sys.exit(status)


def write_report(config, workdir, model_dir) -> None:
    from atp_jax.eval.report import report
    from atp_jax.pruning.checkpoint import CONFIG_FILE, PARAMS_DIR
    from atp_jax.train.data import shapes_config
    from atp_jax.train.stages import stage_configs

    if not (Path(model_dir) / PARAMS_DIR).is_dir() or not (Path(model_dir) / CONFIG_FILE).is_file():
        print(f"no comparison: the last stage's model {model_dir} has no trained ATP modules", file=sys.stderr)
        return
    reference = stage_configs(config, workdir)[-1][1].model.init_from  # the model the ATP stage started from
    if not reference:
        print("no comparison: the ATP stage started from a fresh model, so there is no model before ATP tuning "
              "to compare with", file=sys.stderr)
        return
    r = config.report
    report(model_dir, reference, workdir, shapes_config(config), r.test_size, r.batch_size, r.timing_batch,
           r.visualizations)


if __name__ == "__main__":
    app.run(main)
