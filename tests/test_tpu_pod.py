"""The TPU pod launcher: the gcloud commands it prints or runs, their shell quoting, and its mistakes.

No real gcloud is ever run: the tests either use --dry-run, hide gcloud (an empty PATH), or put a fake
`gcloud` first on PATH that plays every worker on this machine: `scp` copies into a fake home directory and
`ssh --command C` runs `bash -c C` there.
"""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "tpu_pod.py"
SSH = ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
# A worker command whose arguments need quoting: spaces, both quotes, $ and backticks the shell must not expand.
REPORT = "import json, os, sys; print(json.dumps([os.getcwd(), sys.argv[1:], os.environ.get('MSG')]))"
ECHO = [sys.executable, "-c", REPORT, "a b", "it's \"quoted\"", "$HOME `id`", ""]


def load_launcher():
    spec = importlib.util.spec_from_file_location("tpu_pod", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tp = load_launcher()


def dry_run(capsys, *argv):
    """(comment lines, gcloud calls as argv lists) that --dry-run prints."""
    assert tp.main([*argv[:argv.index("--")], "--dry-run", *argv[argv.index("--"):]]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [x for x in lines if x.startswith("#")], [shlex.split(x) for x in lines if not x.startswith("#")]


def remote_command(call):
    assert call[-2] == "--command"
    return call[-1]


def run_on_fake_worker(command, home):
    """Run a worker command line the way a worker's shell would, in the fake home `home`."""
    out = subprocess.run(["bash", "-c", command], env={**os.environ, "HOME": str(home)}, capture_output=True,
                         text=True, check=True)
    return out.stdout


def test_dry_run_command_survives_quoting(capsys, tmp_path):
    comments, calls = dry_run(capsys, "--tpu", "pod1", "--zone", "us-central2-b", "--env", "MSG=it's a \"msg\"",
                              "--", *ECHO)
    assert comments == [] and len(calls) == 1
    call = calls[0]
    assert call[:-2] == [*SSH, "pod1", "--zone", "us-central2-b", "--worker=all"]  # no --project: gcloud's default
    # The --command string, run by a shell in the worker's home, gives the command its exact arguments.
    (tmp_path / "atp_jax").mkdir()
    cwd, argv, msg = json.loads(run_on_fake_worker(remote_command(call), tmp_path))
    assert (cwd, argv, msg) == (str(tmp_path / "atp_jax"), ECHO[3:], "it's a \"msg\"")


def test_dry_run_every_option(capsys):
    comments, calls = dry_run(capsys, "--tpu", "pod1", "--zone", "z", "--project", "proj", "--repo-dir", "/opt/my repo",
                              "--copy", "--setup", "--env", "A=1", "--env", "B=two words", "--", "python", "x.py")
    assert len(comments) == 1 and "git ls-files" in comments[0]
    scp, unpack, setup, run = calls
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[6:] == ["pod1:" + tp.REMOTE_TARBALL, "--zone", "z", "--project", "proj", "--worker=all"]
    for ssh in (unpack, setup, run):
        assert ssh[:-2] == [*SSH, "pod1", "--zone", "z", "--project", "proj", "--worker=all"]
    assert remote_command(unpack).startswith("mkdir -p '/opt/my repo' && cd '/opt/my repo' && tar -xzf ~/")
    assert remote_command(setup) == f"cd '/opt/my repo' && {tp.SETUP_COMMAND}"
    assert remote_command(run).startswith("cd '/opt/my repo' && export A=1 && export B='two words' && ")
    assert remote_command(run).endswith(" && python x.py")


def test_setup_or_copy_alone_needs_no_command(capsys):
    _, calls = dry_run(capsys, "--tpu", "p", "--zone", "z", "--setup", "--")
    assert len(calls) == 1 and remote_command(calls[0]).endswith(tp.SETUP_COMMAND)


def test_remote_path_keeps_home():
    assert tp.remote_path("~") == "~"
    assert tp.remote_path("~/atp_jax") == "~/atp_jax"
    assert tp.remote_path("~/my repo") == "~/'my repo'"
    assert tp.remote_path("/abs/it's") == "'/abs/it'\"'\"'s'"


@pytest.mark.parametrize("argv, message", [
    (["--tpu", "p", "--zone", "z"], "no command: put it after `--`"),
    (["--tpu", "p", "--zone", "z", "--"], "no command: put it after `--`"),
    (["--tpu", "p", "--zone", "z", "--env", "1A=x", "--", "ls"], "--env wants KEY=VALUE"),
    (["--tpu", "p", "--zone", "z", "--env", "NOVALUE", "--", "ls"], "--env wants KEY=VALUE"),
])
def test_usage_mistakes(capsys, argv, message):
    assert tp.main(argv) == 2
    assert message in capsys.readouterr().err


def test_command_without_separator(capsys):
    with pytest.raises(SystemExit) as exit_:
        tp.main(["--tpu", "p", "--zone", "z", "python", "train.py"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: python train.py (a command goes after `--`)" in capsys.readouterr().err


def test_missing_gcloud(tmp_path):
    env = {**os.environ, "PATH": str(tmp_path)}  # an empty directory: no gcloud
    argv = [sys.executable, str(SCRIPT), "--tpu", "p", "--zone", "z", "--", "python", "train.py"]
    missing = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stdout == ""
    assert missing.stderr == ("error: gcloud is not on PATH: install the Google Cloud CLI (cloud.google.com/sdk) "
                              "or use --dry-run to see the commands\n")
    dry = subprocess.run([*argv[:-3], "--dry-run", *argv[-3:]], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and dry.stdout.startswith("gcloud compute tpus tpu-vm ssh p ")


FAKE_GCLOUD = """#!{python}
import json, os, shutil, subprocess, sys
args, home = sys.argv[1:], os.environ["FAKE_WORKER_HOME"]
with open(os.environ["FAKE_GCLOUD_LOG"], "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[3] == "scp":  # scp LOCAL NAME:REMOTE, REMOTE relative to the home directory
    shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
    sys.exit(0)
command = args[args.index("--command") + 1]
sys.exit(subprocess.run(["bash", "-c", command], env={{**os.environ, "HOME": home}}).returncode)
"""


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """(worker home, gcloud call log): a fake gcloud first on PATH; a small checkout to --copy."""
    bin_dir, home, src = tmp_path / "bin", tmp_path / "home", tmp_path / "src"
    for d in (bin_dir, home, src / "sub dir"):
        d.mkdir(parents=True)
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD.format(python=sys.executable))
    (bin_dir / "gcloud").chmod(0o755)
    (src / "a.py").write_text("A = 1\n")
    (src / "sub dir" / "b.txt").write_text("b\n")
    (src / "ignored.log").write_text("not listed by git\n")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_WORKER_HOME", str(home))
    monkeypatch.setenv("FAKE_GCLOUD_LOG", str(log))
    monkeypatch.setattr(tp, "REPO_ROOT", src)
    monkeypatch.setattr(tp, "checkout_files", lambda root: ["a.py", "sub dir/b.txt"])
    return home, log


def test_copy_then_run_on_fake_workers(fake_gcloud, capfd):
    home, log = fake_gcloud
    assert tp.main(["--tpu", "p", "--zone", "z", "--copy", "--env", "MSG=hi there", "--", *ECHO]) == 0
    assert [call[3] for call in map(json.loads, log.read_text().splitlines())] == ["scp", "ssh", "ssh"]
    repo = home / "atp_jax"
    assert sorted(str(p.relative_to(repo)) for p in repo.rglob("*")) == ["a.py", "sub dir", "sub dir/b.txt"]
    assert list(home.iterdir()) == [repo]  # the tarball was removed after unpacking
    cwd, argv, msg = json.loads(capfd.readouterr().out)
    assert (cwd, argv, msg) == (str(repo), ECHO[3:], "hi there")


def test_exit_status_is_gclouds(fake_gcloud):
    home, log = fake_gcloud
    (home / "atp_jax").mkdir()
    assert tp.main(["--tpu", "p", "--zone", "z", "--", "sh", "-c", "exit 3"]) == 3
    # A failing step stops the launcher: --setup fails here (there is no such directory), the command never runs.
    assert tp.main(["--tpu", "p", "--zone", "z", "--repo-dir", "~/missing", "--setup", "--", "true"]) != 0
    assert len(log.read_text().splitlines()) == 2


def test_checkout_files_are_what_git_lists(tmp_path):
    names = tp.checkout_files(ROOT)
    assert "launch/tpu_pod.py" in names and "pyproject.toml" in names
    assert not [n for n in names if n.startswith((".git/", ".venv/")) or "__pycache__" in n]
    tarball = tmp_path / "c.tar.gz"
    tp.pack(ROOT, ["launch/tpu_pod.py", "pyproject.toml"], str(tarball))
    with tarfile.open(tarball) as tar:
        assert tar.getnames() == ["launch/tpu_pod.py", "pyproject.toml"]
