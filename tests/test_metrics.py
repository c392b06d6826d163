"""Training metrics: metrics.jsonl, resume, TensorBoard event files, wandb wiring, progress bar, timing."""

import importlib.machinery
import io
import json
import math
import struct
import sys
import types
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c

from atp_jax.train import metrics as m


def read_lines(workdir):
    return [json.loads(line) for line in (workdir / m.METRICS_FILE).read_text().splitlines()]


def read_events(logdir):
    """Every Event in the TensorBoard event files under `logdir`, read through the TFRecord framing:
    uint64 length, masked CRC32C of it, the serialized Event, masked CRC32C of that."""
    files = sorted(logdir.glob("events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    events = []
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
            body = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(body)
            events.append(Event.FromString(body))
            pos += 16 + length
    return events


def scalars(events):
    return {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value}


def test_jsonl_lines_and_types(tmp_path):
    with m.MetricWriter(tmp_path, is_main=True, tensorboard=False) as w:
        w.write(1, {"loss": 2.5, "tokens": 4096, "lr": np.float32(0.25), "count": np.int64(7),
                    "jax_f32": jnp.float32(1.5), "jax_bf16": jnp.array(0.5, jnp.bfloat16), "ok": jnp.array(True)})
        w.write(2, {"loss": float("nan"), "up": math.inf, "down": -np.inf})
        # Flushed per line: the line is on disk before close().
        assert read_lines(tmp_path)[-1]["step"] == 2
    raw = (tmp_path / m.METRICS_FILE).read_text()
    assert raw.endswith("\n") and raw.count("\n") == 2
    first, second = read_lines(tmp_path)
    assert first == {"step": 1, "loss": 2.5, "tokens": 4096, "lr": 0.25, "count": 7, "jax_f32": 1.5,
                     "jax_bf16": 0.5, "ok": 1}
    assert type(first["tokens"]) is int and type(first["count"]) is int and type(first["lr"]) is float
    assert second == {"step": 2, "loss": "nan", "up": "inf", "down": "-inf"}
    assert math.isnan(float(second["loss"])) and float(second["down"]) == -math.inf


def test_bad_metrics_are_refused(tmp_path):
    with m.MetricWriter(tmp_path, is_main=True, tensorboard=False) as w:
        with pytest.raises(TypeError, match="scalar"):
            w.write(1, {"loss": np.ones(3)})
        with pytest.raises(TypeError, match="real number"):
            w.write(1, {"name": "abc"})
        with pytest.raises(ValueError, match="'step'"):
            w.write(1, {"step": 3})
    assert (tmp_path / m.METRICS_FILE).read_text() == ""


def test_remote_workdir_is_refused():
    with pytest.raises(ValueError, match="local directory"):
        m.MetricWriter("gs://bucket/run", is_main=False)
    with pytest.raises(ValueError, match="local directory"):
        m.MetricWriter(Path("gs://bucket/run"), is_main=False)  # pathlib makes it gs:/bucket/run


def test_non_main_process_writes_nothing(tmp_path):
    workdir = tmp_path / "run"
    with m.MetricWriter(workdir, is_main=False, resume_step=3) as w:
        w.write(1, {"loss": 1.0})
        w.write_config({"lr": 1e-3})
    assert not workdir.exists()


def uninterrupted(workdir, steps):
    with m.MetricWriter(workdir, is_main=True, tensorboard=False) as w:
        for step in steps:
            w.write(step, {"loss": 1.0 / step, "tokens": 100 * step})


def test_resume_matches_an_uninterrupted_run(tmp_path):
    uninterrupted(tmp_path / "ref", range(1, 9))
    run = tmp_path / "run"
    uninterrupted(run, range(1, 6))  # checkpoint at step 3, killed while writing step 6:
    with open(run / m.METRICS_FILE, "a") as f:
        f.write('{"step": 6, "loss": 0.16')
    with m.MetricWriter(run, is_main=True, tensorboard=False, resume_step=3) as w:
        assert [r["step"] for r in read_lines(run)] == [1, 2, 3]
        for step in range(4, 9):
            w.write(step, {"loss": 1.0 / step, "tokens": 100 * step})
    assert (run / m.METRICS_FILE).read_bytes() == (tmp_path / "ref" / m.METRICS_FILE).read_bytes()
    assert [p.name for p in run.iterdir()] == [m.METRICS_FILE]  # no temporary file left behind


def test_resume_without_step_only_drops_a_partial_line(tmp_path):
    uninterrupted(tmp_path, range(1, 4))
    with open(tmp_path / m.METRICS_FILE, "a") as f:
        f.write('{"step": 4}')  # complete JSON, but no newline: the kill may have come before it
    m.MetricWriter(tmp_path, is_main=True, tensorboard=False).close()
    assert [r["step"] for r in read_lines(tmp_path)] == [1, 2, 3]


def test_damaged_middle_line_is_an_error(tmp_path):
    (tmp_path / m.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2"):
        m.MetricWriter(tmp_path, is_main=True, tensorboard=False, resume_step=1)


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    with m.MetricWriter(tmp_path, is_main=True) as w:
        w.write(1, {"loss": 2.5, "tokens": 64})
        w.write(2, {"loss": 1.25, "tokens": 128})
    first = scalars(read_events(tmp_path / m.TENSORBOARD_DIR))
    assert first == {("loss", 1): 2.5, ("tokens", 1): 64.0, ("loss", 2): 1.25, ("tokens", 2): 128.0}

    # A resumed run asks TensorBoard to hide the old events from the step after the checkpoint on.
    with m.MetricWriter(tmp_path, is_main=True, resume_step=1) as w:
        w.write(2, {"loss": 1.0})
    events = read_events(tmp_path / m.TENSORBOARD_DIR)
    starts = [e.step for e in events if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [2]
    assert scalars(events)[("loss", 2)] in (1.0, 1.25)  # one of each run; TensorBoard shows the newer


def test_write_config(tmp_path):
    with m.MetricWriter(tmp_path, is_main=True, tensorboard=False) as w:
        w.write_config({"lr": 1e-4, "mesh": (1, 8), "dtype": jnp.bfloat16, "name": "run"})
    assert json.loads((tmp_path / m.CONFIG_FILE).read_text()) == {
        "lr": 1e-4, "mesh": [1, 8], "dtype": str(jnp.bfloat16), "name": "run"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [m.CONFIG_FILE, m.METRICS_FILE]


def test_wandb_requested_but_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not importable, whether installed or not
    for is_main in (True, False):  # every process fails alike: none is left waiting for the others
        with pytest.raises(ImportError, match="pip install wandb"):
            m.MetricWriter(tmp_path / "run", is_main=is_main, wandb_project="atp")
    assert not (tmp_path / "run").exists()


class FakeWandbRun:
    def __init__(self, calls):
        self.calls = calls
        self.config = types.SimpleNamespace(update=lambda d, **kw: calls.append(("config", d)))

    def log(self, values, step):
        self.calls.append(("log", step, values))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_is_fed_and_resumes_the_same_run(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeWandbRun(calls)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for resume_step in (None, 1):
        with m.MetricWriter(tmp_path, is_main=True, tensorboard=False, wandb_project="atp",
                            resume_step=resume_step) as w:
            w.write_config({"lr": 0.1})
            w.write(2, {"loss": jnp.float32(0.5)})
    inits = [c[1] for c in calls if c[0] == "init"]
    assert inits[0] == inits[1] == {"project": "atp", "dir": str(tmp_path), "id": inits[0]["id"], "resume": "allow"}
    assert calls[1:4] == [("config", {"lr": 0.1}), ("log", 2, {"loss": 0.5}), ("finish",)]


def test_progress_bar(capsys):
    out = io.StringIO()
    with m.Progress(10, initial_step=2, file=out) as bar:
        bar.update(5, loss=jnp.float32(1.23456), lr=1e-4, phase="warmup")
    text = out.getvalue()
    assert "5/10" in text and "loss=1.235" in text and "lr=0.0001" in text and "phase=warmup" in text

    with m.Progress(10, is_main=False) as bar:
        bar.update(5, loss=1.0)
    assert capsys.readouterr() == ("", "")


def test_peak_flops_per_device():
    assert m.peak_flops_per_device() is None  # the CPU
    kind = types.SimpleNamespace
    assert m.peak_flops_per_device(kind(device_kind="TPU v4")) == 275e12
    assert m.peak_flops_per_device(kind(device_kind="TPU v5 lite")) == 197e12
    assert m.peak_flops_per_device(kind(device_kind="TPU v5")) == 459e12
    assert m.peak_flops_per_device(kind(device_kind="NVIDIA H100 80GB HBM3")) == 989e12
    assert m.peak_flops_per_device(kind(device_kind="NVIDIA A100-SXM4-80GB")) == 312e12
