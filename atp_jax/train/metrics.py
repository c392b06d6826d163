"""Training metrics: a JSON-lines log, TensorBoard and optional wandb; a console progress bar; step timing.

Only process 0 of a multi-host run writes (``is_main``); the other processes get the same objects, which do
nothing, so the trainer needs no ``if`` around each call.

``DIR/metrics.jsonl`` holds one object per logged step, ``{"step": 10, "loss": 2.31, "lr": 0.0002}``.
Integers stay integers, floats are plain JSON numbers. NaN and infinities, which JSON has no numbers for, are
written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``: unlike ``null`` they keep which one it was, the
file stays strict JSON, and ``float(value)`` reads every value back, numbers and these strings alike.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from atp_jax.fileio import atomic_write_text, storage_error

METRICS_FILE = "metrics.jsonl"
# "gs://bucket/run", also after pathlib made it "gs:/bucket/run".
URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+:/")
CONFIG_FILE = "config.json"
TENSORBOARD_DIR = "tensorboard"
# The wandb run id, kept so that a restarted run goes on logging into the same wandb run.
WANDB_ID_FILE = "wandb_run_id"

# Vendor peak dense bf16 matrix throughput per JAX device (FLOP/s), keyed by `device.device_kind`.
# TPU: Google Cloud TPU system-architecture pages (v4 275, v5e 197, v5p 459, v6e 918 TFLOPS per chip; from v4
# on one chip is one JAX device). JAX names v5e "TPU v5 lite", v5p "TPU v5" and v6e "TPU v6 lite".
# GPU: NVIDIA H100 / H200 / A100 datasheets, the dense figures (the headline ones assume 2:4 sparsity, 2x).
PEAK_BF16_FLOPS_PER_DEVICE = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5": 459e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
}

# A progress bar redraws in place on a terminal; in a log file (a pod worker's output) every redraw is a new
# line, so there it is drawn at most once per this many seconds.
LOG_FILE_REFRESH_S = 30.0
TERMINAL_REFRESH_S = 0.1  # tqdm's default


def to_scalar(name: str, value: Any) -> int | float:
    """A Python int or float from a Python, NumPy or JAX scalar (booleans become 0 / 1)."""
    arr = np.asarray(value)  # a JAX array is copied to the host here
    if arr.ndim != 0:
        raise TypeError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "biu":
        return int(arr)
    if arr.dtype.kind in "fV":  # "V": ml_dtypes' bfloat16 and float8, which NumPy sees as opaque
        try:
            return float(arr)
        except (TypeError, ValueError):
            pass
    raise TypeError(f"metric {name!r} must be a real number, got {type(value).__name__} of dtype {arr.dtype}")


def json_number(x: int | float) -> int | float | str:
    """`x` as strict JSON has it: NaN and infinities as the strings "nan", "inf", "-inf" (see module doc)."""
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def resume_metrics_file(path: Path, resume_step: int | None) -> int | None:
    """Make `path` what it was when step `resume_step` was logged: drop later steps and a half-written line.
    Returns the last step kept (None for none).

    The text after the last newline is a line a killed run was still writing, and is dropped. Lines with
    ``step > resume_step`` are dropped too (``resume_step=None`` keeps every complete line). The file is only
    rewritten, atomically, when something is dropped; kept lines keep their exact bytes.
    """
    if not path.exists():
        return None
    text = path.read_text(encoding="utf-8")
    *complete, partial = text.split("\n")
    kept, last = [], None
    for number, line in enumerate(complete, start=1):
        try:
            step = json.loads(line)["step"]
        except (ValueError, TypeError, KeyError) as e:
            # Only the last line can be cut short by a kill, and that one has no newline; this is damage.
            raise ValueError(f"{path} line {number} is not a JSON object with a step ({e}); fix or remove it") from e
        if resume_step is None or step <= resume_step:
            kept.append(line + "\n")
            last = step if last is None else max(last, step)
    if partial or len(kept) < len(complete):
        atomic_write_text(path, "".join(kept))
    return last


class MetricWriter:
    """Logs scalar metrics per step to ``DIR/metrics.jsonl``, TensorBoard (``DIR/tensorboard/``) and wandb.

    ``resume_step``: the step of the checkpoint a restarted run resumed from. Logged steps after it are
    dropped from metrics.jsonl (and hidden in TensorBoard), so that a run killed after its last checkpoint and
    restarted ends with the same metrics.jsonl as one that never stopped. The trainer should therefore log a
    step before it saves that step's checkpoint. In a used workdir without a checkpoint, pass a step below the
    first logged one (e.g. -1) to start the log over; ``None`` appends to whatever is there.

    wandb steps must grow, so on a resume wandb ignores (with a warning) the re-logged steps it already has.
    """

    def __init__(self, workdir: str | os.PathLike, is_main: bool, tensorboard: bool = True,
                 wandb_project: str | None = None, resume_step: int | None = None):
        # These checks run on every process: one host failing alone would leave the others hanging.
        if URL.match(str(workdir)):
            raise ValueError(f"MetricWriter needs a local directory (or a gcsfuse mount), got {workdir}: "
                             "metrics.jsonl is appended to line by line, which object stores cannot do")
        if wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ImportError(f"wandb_project={wandb_project!r} asks for wandb logging, but wandb is not "
                              "installed: `pip install wandb`, or leave wandb_project unset")
        self.workdir = Path(workdir)
        self.is_main = is_main
        self._file = self._tensorboard = self._wandb = None
        self._last_step: int | None = None
        if not is_main:
            return
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / METRICS_FILE
        self._last_step = resume_metrics_file(path, resume_step)
        self._file = path.open("a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # purge_step: TensorBoard hides the events a previous run logged from this step on.
            purge_step = None if resume_step is None else resume_step + 1
            self._tensorboard = SummaryWriter(str(self.workdir / TENSORBOARD_DIR), purge_step=purge_step)
        if wandb_project is not None:
            self._wandb = self._start_wandb(wandb_project)

    def _start_wandb(self, project: str):
        import wandb  # optional: imported only when asked for

        id_path = self.workdir / WANDB_ID_FILE
        if not id_path.exists():
            atomic_write_text(id_path, secrets.token_hex(4))  # 8 lowercase hex digits: a valid wandb run id
        return wandb.init(project=project, dir=str(self.workdir), id=id_path.read_text().strip(), resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Log `metrics` (name -> Python / NumPy / JAX scalar) at `step`; one flushed line in metrics.jsonl.
        Steps must grow: the file holds each step once (log everything of a step in one call)."""
        if not self.is_main:
            return
        if self._file is None:
            raise RuntimeError("MetricWriter.write after close()")
        if "step" in metrics:
            raise ValueError("'step' is the record's key for the step; name the metric otherwise")
        step = int(step)
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step {step} logged after step {self._last_step}: {self.workdir / METRICS_FILE} "
                             "holds each step once, in order")
        values = {name: to_scalar(name, value) for name, value in metrics.items()}
        record = {"step": step, **{name: json_number(v) for name, v in values.items()}}
        try:
            # Flushed per line: a killed run loses at most the line being written (see resume_metrics_file).
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
            if self._tensorboard is not None:
                for name, v in values.items():
                    self._tensorboard.add_scalar(name, float(v), step)
                self._tensorboard.flush()  # likewise, rather than tensorboardX's default of every 2 minutes
        except OSError as e:
            raise storage_error(e, f"writing metrics in {self.workdir}") from e
        self._last_step = step
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def write_config(self, config: Mapping[str, Any]) -> None:
        """Save the run's resolved config as ``DIR/config.json`` (and as the wandb run's config).

        Values JSON has no type for (dtypes, paths, ...) are stored as their ``str``.
        """
        if not self.is_main:
            return
        atomic_write_text(self.workdir / CONFIG_FILE, json.dumps(config, indent=2, default=str) + "\n")
        if self._wandb is not None:
            self._wandb.config.update(dict(config), allow_val_change=True)

    def close(self) -> None:
        """Flush and close everything; safe to call twice."""
        if self._file is not None:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # a write that failed has raised already
                file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Progress:
    """A console progress bar over training steps with rate and ETA (tqdm); silent on non-main processes.

    `file`: where the bar is drawn, default stderr (stdout stays free for the trainer's own output).
    """

    def __init__(self, total_steps: int, initial_step: int = 0, is_main: bool = True, file=None):
        self.enabled = is_main
        if not is_main:
            return
        file = sys.stderr if file is None else file
        interactive = getattr(file, "isatty", lambda: False)()
        # `initial`: a resumed run's rate and ETA count only the steps it runs itself.
        self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", file=file, dynamic_ncols=True,
                         mininterval=TERMINAL_REFRESH_S if interactive else LOG_FILE_REFRESH_S)

    def update(self, step: int, **postfix: Any) -> None:
        """Move the bar to `step` and show `postfix` beside it, e.g. ``update(step, loss=l, lr=lr)``."""
        if not self.enabled:
            return
        shown = {k: v if isinstance(v, str) else f"{to_scalar(k, v):.4g}" for k, v in postfix.items()}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.update(int(step) - self._bar.n)  # the bar counts increments; the trainer knows steps

    def close(self) -> None:
        if self.enabled:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Vendor peak dense bf16 FLOP/s of `device` (default the first), None for kinds not in the table (CPU)."""
    device = jax.devices()[0] if device is None else device
    return PEAK_BF16_FLOPS_PER_DEVICE.get(device.device_kind)
