"""Faults a pod and a shared disk bring, each probed as a user meets it: a second trainer on a busy workdir,
preemption, every checkpoint damaged, a full disk (a small tmpfs when this machine lets a test mount one,
else an injected shortage), a half-written export, config values of the wrong type, a batch or question line
with bad bytes, image paths that leave their root. Each failing run must say what went wrong in one line, exit
with its documented status, leave no traceback, and lose nothing."""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest
from flax import nnx
from PIL import Image

from atp_jax.models.config import ConfigError, LlavaConfig
from tests.cli_helpers import load_main, run_main
from tests.test_train import ROOT, losses, run_cli, small_config, wait_for_checkpoint

PREEMPTED = 143
TRAIN_ARGS = ("--config.total_steps=4", "--config.checkpoint_every=2")  # what `baseline` runs in process


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_clean_error(stderr: str, *needles: str) -> str:
    """The run's stderr holds exactly one `error:` line, containing every needle, and no traceback."""
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def steps(directory: Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def leftovers(workdir: Path) -> list[str]:
    return sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*") if "tmp" in p.name or "partial" in p.name)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def baseline(cache, tmp_path_factory):
    """An uninterrupted 4-step run (checkpoints 2 and 4 kept): its workdir and losses."""
    from atp_jax.train.trainer import train

    workdir = tmp_path_factory.mktemp("baseline")
    train(small_config(cache, total_steps=4, checkpoint_every=2), workdir)
    return workdir, losses(workdir)


# ---- one trainer per workdir; preemption ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_trainer_stops_before_writing_and_sigterm_exits_with_143(cache, tmp_path):
    first = run_cli(tmp_path, cache, "--config.total_steps=1000", "--config.checkpoint_every=2")
    wait_for_checkpoint(tmp_path, first)
    config_written = (tmp_path / "config.json").stat().st_mtime_ns
    second = run_cli(tmp_path, cache, "--config.total_steps=1000", "--config.checkpoint_every=2")
    _, err = second.communicate(timeout=300)
    assert second.returncode == 2
    assert_one_clean_error(err, "in use by another training run", f"pid {first.pid} on host {socket.gethostname()}")
    assert (tmp_path / "config.json").stat().st_mtime_ns == config_written  # the second run wrote nothing

    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=300)
    assert first.returncode == PREEMPTED, err[-3000:]
    assert "Traceback" not in err and not error_lines(err)
    saved = steps(tmp_path / "checkpoints")[-1]
    assert f"preempted (SIGTERM) at step {saved}: saved {tmp_path / 'checkpoints' / str(saved)}" in err
    logged = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, saved + 1))  # each step once, in order, up to the saved one
    assert not (tmp_path / "train.lock").exists() and not leftovers(tmp_path)


def test_the_workdir_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    from atp_jax.train.workdir_lock import LOCK_FILE, WorkdirBusy, workdir_lock

    with workdir_lock(tmp_path):
        owner = json.loads((tmp_path / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(WorkdirBusy, match=f"in use by another training run \\(pid {os.getpid()}"):
            with workdir_lock(tmp_path):  # a second descriptor: flock treats it as another holder
                pass
    assert not (tmp_path / LOCK_FILE).exists()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))  # a run that was killed: its lock file stayed
    with workdir_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert f"taking over the lock of pid {stale['pid']}" in caplog.text

    elsewhere = {"host": "another-host", "pid": 1, "started": "earlier"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(elsewhere))
    with pytest.raises(WorkdirBusy, match=f"another host .*remove {tmp_path / LOCK_FILE}"):
        with workdir_lock(tmp_path):
            pass
    assert json.loads((tmp_path / LOCK_FILE).read_text()) == elsewhere  # left for its owner


# ---- every checkpoint damaged --------------------------------------------------------------------------------


def damage(checkpoint: Path) -> None:
    for f in (checkpoint / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            f.write_bytes(b"\0" * 7)


@pytest.mark.slow
def test_when_no_checkpoint_restores_the_run_stops_unless_asked_to_start_fresh(cache, baseline, tmp_path):
    from atp_jax.train.trainer import train

    workdir = tmp_path / "w"
    shutil.copytree(baseline[0], workdir)
    for step in steps(workdir / "checkpoints"):
        damage(workdir / "checkpoints" / str(step))
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save a killed run never finished
    proc = run_cli(workdir, cache, *TRAIN_ARGS)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert_one_clean_error(err, f"no checkpoint in {workdir / 'checkpoints'} restores", "step 4:", "step 2:",
                           "--start_fresh")
    assert steps(workdir / "checkpoints") == [2, 4]  # nothing deleted
    assert not leftovers(workdir)  # the unfinished save is gone

    train(small_config(cache, total_steps=4, checkpoint_every=2), workdir, start_fresh=True)
    assert losses(workdir) == baseline[1]  # all fresh, the data order included
    aside = list(tmp_path.glob("w/checkpoints.damaged-*"))
    assert len(aside) == 1 and steps(aside[0]) == [2, 4]


# ---- a full disk -----------------------------------------------------------------------------------------------


def can_mount_tmpfs() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


# The launcher run with the free-space check off: the disk then fills half way through a save, as when another
# writer fills it after the check.
WITHOUT_SPACE_CHECK = ("import runpy, sys; import atp_jax.train.checkpointing as c; "
                       "c.check_free_space = lambda *a, **k: None; sys.argv = sys.argv[1:]; "
                       "runpy.run_path(sys.argv[0], run_name='__main__')")


def train_on_a_small_disk(tmp_path: Path, cache: Path, size: str, check_space: bool) -> tuple[int, str, Path]:
    """The CLI trained in a workdir on a tmpfs of `size` in a mount namespace of its own; the workdir is
    copied out afterwards (the tmpfs goes with the namespace). (exit status, stderr, the copy)."""
    mount, out = tmp_path / "mnt", tmp_path / "out"
    mount.mkdir()
    python = [sys.executable] if check_space else [sys.executable, "-c", WITHOUT_SPACE_CHECK]
    command = [*python, str(ROOT / "launch" / "train.py"), f"--workdir={mount / 'w'}",
               f"--config={ROOT / 'tests' / 'train_config.py'}", f"--config.data.cache_dir={cache}", *TRAIN_ARGS]
    script = (f'mount -t tmpfs -o size={size} tmpfs "$1" || exit 99; shift; "$@"; status=$?; '
              f'cp -a "{mount / "w"}" "{out}"; exit $status')
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), *command], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode != 99, proc.stderr
    return proc.returncode, proc.stderr, out


@pytest.mark.slow
@pytest.mark.parametrize("check_space", [True, False], ids=["refused-before", "failing-half-way"])
def test_a_full_disk_stops_training_in_one_line_and_keeps_the_last_checkpoint(cache, baseline, tmp_path,
                                                                               monkeypatch, check_space):
    from atp_jax.fileio import StorageError
    from atp_jax.train.trainer import train

    if can_mount_tmpfs():  # 4.5 MB: the first checkpoint (2.4 MB) fits, the second does not
        status, err, workdir = train_on_a_small_disk(tmp_path, cache, "4500k", check_space)
        assert status == 2
        assert_one_clean_error(err, "saving checkpoint 2" if check_space else "training in", "No space left on device")
    elif not check_space:
        pytest.skip("a save failing half way needs a small filesystem: this machine lets no test mount a tmpfs")
    else:  # no tmpfs here: the filesystem says it is full after the first save
        import atp_jax.fileio

        calls = []
        real = shutil.disk_usage

        def usage(path):
            calls.append(path)
            total, used, free = real(path)
            return type(real(path))(total, used, free if len(calls) == 1 else 1000)

        monkeypatch.setattr(atp_jax.fileio.shutil, "disk_usage", usage)
        workdir = tmp_path / "w"
        with pytest.raises(StorageError, match="saving checkpoint 2 .*No space left on device"):
            train(small_config(cache, total_steps=4, checkpoint_every=2), workdir)
        monkeypatch.undo()
    assert steps(workdir / "checkpoints") == [1] and not leftovers(workdir)
    assert not (workdir / "model").exists() and not (workdir / "train.lock").exists()
    train(small_config(cache, total_steps=4, checkpoint_every=2), workdir)  # room again: it resumes at step 1
    assert losses(workdir) == baseline[1]


def test_the_space_check_counts_the_save_still_being_written(tmp_path, monkeypatch):
    """Saves are asynchronous: the check before a save waits for the one before it, whose bytes would otherwise
    not be on the disk yet and the check would pass a save that cannot fit."""
    import atp_jax.train.checkpointing as checkpointing

    class Manager:  # orbax's CheckpointManager as `save` uses it; a save stays in flight until waited for
        directory, writing = tmp_path, False

        def latest_step(self):
            return None

        def should_save(self, step):
            return True

        def wait_until_finished(self):
            self.writing = False

        def save(self, step, args, force=False):
            self.writing = True

    mgr, seen = Manager(), []
    monkeypatch.setattr(checkpointing, "check_free_space", lambda *args: seen.append(mgr.writing))
    monkeypatch.setattr(checkpointing, "save_args", lambda state, iterator: None)
    for step in (1, 2):
        checkpointing.save(mgr, step, {"w": jnp.zeros(4)}, iterator=None)
    assert seen == [False, False]


def tiny_model():
    from atp_jax.models.common import DtypePolicy
    from atp_jax.models.llava import LlavaForConditionalGeneration
    from atp_jax.pruning.config import fit_to_depth
    from atp_jax.pruning.engine import PrunedLlava

    llava = LlavaForConditionalGeneration(LlavaConfig.tiny(), policy=DtypePolicy(jnp.float32, jnp.float32),
                                          rngs=nnx.Rngs(0))
    return PrunedLlava(llava, fit_to_depth({}, 4), rngs=nnx.Rngs(1))


def test_an_export_that_fails_leaves_the_old_model_and_infer_names_an_incomplete_one(tmp_path, monkeypatch):
    import atp_jax.train.export as export

    model = tiny_model()
    export.export_model(tmp_path / "model", model)
    before = sorted(p.name for p in (tmp_path / "model").iterdir())

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(export.pruning_checkpoint, "config_to_dict", full)  # fails after the parameters
    with pytest.raises(OSError, match="No space left"):
        export.export_model(tmp_path / "model", model)
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == before  # the complete old export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging directory left

    (tmp_path / "model" / "atp_config.json").unlink()  # as an export that stopped before its last file
    Image.new("RGB", (8, 8)).save(tmp_path / "image.png")
    code, _, err = run_main(load_main(ROOT / "launch" / "infer.py", "infer"), "--checkpoint", tmp_path / "model",
                            "--image", tmp_path / "image.png", "--prompt", "hi")
    assert code == 2
    assert_one_clean_error(err, "an incomplete checkpoint", "stopped before the end")


def test_jax_to_hf_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import safetensors.numpy

    from atp_jax.convert.checkpoint import save_converted

    model = tiny_model()
    save_converted(tmp_path / "src", model.llava.config, nnx.to_pure_dict(nnx.state(model.llava, nnx.Param)))

    class SafetensorError(Exception):  # what safetensors raises, message and all
        pass

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.numpy, "save_file", full)
    code, _, err = run_main(load_main(ROOT / "launch" / "convert.py", "convert"), "jax-to-hf", "--src",
                            tmp_path / "src", "--dst", tmp_path / "hf", "--quiet")
    assert code == 2
    assert_one_clean_error(err, f"writing {tmp_path / 'hf'}", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ---- configs read from JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize("where,field,value,expected", [
    ("text", "vocab_size", "160", "text.vocab_size = '160': expected an integer >= 1"),
    ("text", "num_hidden_layers", -1, "text.num_hidden_layers = -1: expected an integer >= 1"),
    ("text", "rms_norm_eps", "abc", "text.rms_norm_eps = 'abc': expected a number > 0"),
    ("vision", "patch_size", 0.5, "vision.patch_size = 0.5: expected an integer >= 1"),
    ("text", "tie_word_embeddings", "no", "text.tie_word_embeddings = 'no': expected true or false"),
])
def test_config_values_of_the_wrong_type_or_range_are_refused_in_one_line(tmp_path, where, field, value, expected):
    ours = LlavaConfig.tiny().to_dict()
    ours[where][field] = value
    (tmp_path / "atp_config.json").write_text(json.dumps(ours))
    with pytest.raises(ConfigError) as e:
        LlavaConfig.load(tmp_path / "atp_config.json")
    assert str(e.value) == f"{tmp_path / 'atp_config.json'}: {expected}"

    hf = LlavaConfig.tiny().to_hf_dict()  # transformers' config.json, read by the converter
    hf[f"{where}_config"][field] = value
    with pytest.raises(ConfigError, match=re.escape(expected.replace(where, f"{where}_config", 1))):
        LlavaConfig.from_hf_dict(hf)


def test_a_saved_pruning_config_with_a_wrong_type_names_the_field(tmp_path):
    from atp_jax.pruning.checkpoint import CONFIG_FILE, config_to_dict, load_pruned

    model = tiny_model()
    saved = config_to_dict(model.pcfg) | {"temperature": "hot"}
    (tmp_path / CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="pruning.temperature = 'hot': expected a number > 0"):
        load_pruned(tmp_path, model.llava)


# ---- line files and image paths ---------------------------------------------------------------------------------


def test_a_question_line_with_bad_bytes_is_the_only_one_lost(tmp_path, capsys):
    from atp_jax.eval.benchmarks import read_questions

    good = [json.dumps({"question_id": i, "image": f"{i}.png", "text": "Is there a cat?", "label": "yes"})
            for i in range(3)]
    (tmp_path / "q.jsonl").write_bytes(f"{good[0]}\n".encode() + b'{"question_id": 9, "text": "\xff"}\n'
                                       + f"{good[1]}\n{good[2]}\n".encode())
    questions, _ = read_questions("pope", tmp_path / "q.jsonl")
    assert [q.id for q in questions] == [0, 1, 2]
    assert f"{tmp_path / 'q.jsonl'}:2: skipped: not valid UTF-8 (byte 0xff" in capsys.readouterr().err


def test_benchmark_images_outside_the_image_folder_are_skipped_with_their_own_reason(tmp_path, capsys):
    from atp_jax.eval.benchmarks import Question
    from atp_jax.eval.runner import unusable_images

    (tmp_path / "images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "images" / "ok.png")
    questions = [Question(i, str(i), image, "What?") for i, image in
                 enumerate(["ok.png", "../../../../etc/passwd", "/etc/passwd", "missing.png"])]
    assert [q.id for q in unusable_images(questions, tmp_path / "images")] == [1, 2, 3]
    err = capsys.readouterr().err.splitlines()
    assert "leaves its root" in err[0] and "leaves its root" in err[1] and "no such file" in err[2]


def test_annotation_images_outside_the_image_root_are_skipped_with_their_own_reason(tmp_path):
    from atp_jax.data.sources import AnnotationSource, SkipReport

    (tmp_path / "images").mkdir()
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", tmp_path / "images" / "link.png")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
    entries = [{"id": name, "image": image, "conversations": turns}
               for name, image in [("ok", "a/b.png"), ("up", "../../../../etc/passwd"), ("abs", "/etc/passwd"),
                                   ("link", "link.png")]]
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    report = SkipReport()
    source = AnnotationSource(tmp_path / "ann.json", tmp_path / "images", report)
    assert [source[i]["id"] for i in range(len(source))] == ["ok"]
    assert source[0]["image"] == str((tmp_path / "images" / "a" / "b.png").resolve())
    assert report.counts == {"image_outside_root": 3} and report.ids["image_outside_root"] == ["up", "abs", "link"]


def test_metrics_hold_each_step_once(tmp_path):
    from atp_jax.train.metrics import MetricWriter

    with MetricWriter(tmp_path, True, tensorboard=False) as w:
        w.write(1, {"loss": 1.0})
        with pytest.raises(ValueError, match="step 1 logged after step 1"):
            w.write(1, {"eval_loss": 2.0})
    with MetricWriter(tmp_path, True, tensorboard=False) as w:  # reopened: the file's last step still counts
        with pytest.raises(ValueError, match="step 1 logged after step 1"):
            w.write(1, {"loss": 1.0})
        w.write(2, {"loss": 0.5})
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
