"""Run one command on every worker (host) of a Cloud TPU VM slice, through `gcloud compute tpus tpu-vm ssh`.

  python launch/tpu_pod.py --tpu NAME --zone ZONE [--project P] [--copy] [--setup] [--env KEY=VALUE ...] \\
      [--repo-dir ~/atp_jax] [--dry-run] -- python launch/train.py --config configs/llava15_7b_atp.py --workdir DIR

Everything after `--` is the command; it runs in --repo-dir on all workers at once (`--worker=all`), after the
--env exports and, where the checkout has one, activating its .venv. Steps, in this order, each one gcloud call
(stopping at the first that fails):

  --copy   push this checkout to every worker: the files `git ls-files --cached --others --exclude-standard`
           lists (tracked files plus untracked ones git does not ignore, as they are on disk now; so no .venv,
           .git or build outputs) are packed into one tarball, copied with `tpu-vm scp` and unpacked over
           --repo-dir. Files deleted here are not deleted on the workers.
  --setup  create .venv in --repo-dir and install the package into it, with the TPU build of jaxlib.
  the command, when one is given.

--dry-run prints the gcloud commands instead of running them. The exit status is that of the last gcloud call
run; mistakes (bad flags, no command, no gcloud or git) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from atp_jax.cli import Parser  # noqa: E402

# Where --copy puts the tarball on each worker (relative: in the home directory), just long enough to unpack it.
REMOTE_TARBALL = "atp_jax_checkout.tar.gz"
VENV_ACTIVATE = ".venv/bin/activate"
# The README's install command, plus jax[tpu]: plain `pip install -e .` gets the CPU-only jaxlib.
SETUP_COMMAND = f"python3 -m venv .venv && . {VENV_ACTIVATE} && pip install -e . 'jax[tpu]'"
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(Exception):
    """A mistake in how the launcher was called: reported in one line, exit status 2."""


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tpu", required=True, help="name of the TPU VM (slice)")
    p.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    p.add_argument("--project", help="Google Cloud project (default: gcloud's configured one)")
    p.add_argument("--repo-dir", default="~/atp_jax", help="the checkout's path on the workers (default %(default)s)")
    p.add_argument("--copy", action="store_true", help="push this checkout to every worker first")
    p.add_argument("--setup", action="store_true", help=f"run `{SETUP_COMMAND}` on every worker first")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="exported before the command (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    return p


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher options, command): the command is everything after the first `--`."""
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def remote_path(path: str) -> str:
    """`path` quoted for the worker's shell, leaving a leading `~/` unquoted so that it still means home."""
    if path == "~":
        return "~"
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def env_exports(pairs: list[str]) -> list[str]:
    """`export KEY=VALUE` commands (VALUE quoted) for --env KEY=VALUE options."""
    exports = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not ENV_NAME.fullmatch(key):
            raise UsageError(f"--env wants KEY=VALUE with KEY a shell variable name, got {pair!r}")
        exports.append(f"export {key}={shlex.quote(value)}")
    return exports


def ssh(args, remote_command: str) -> list[str]:
    """The gcloud call that runs `remote_command` (a shell command line) on all workers."""
    project = ["--project", args.project] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, "--zone", args.zone, *project,
            "--worker=all", "--command", remote_command]


def scp_to_all(args, local: str, remote: str) -> list[str]:
    """The gcloud call that copies the file `local` to `remote` on all workers."""
    project = ["--project", args.project] if args.project else []
    return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{args.tpu}:{remote}", "--zone", args.zone,
            *project, "--worker=all"]


def in_repo(args, *commands: str) -> str:
    """A worker shell command line: cd into the checkout, then `commands` joined by && (stop at a failure)."""
    return " && ".join([f"cd {remote_path(args.repo_dir)}", *commands])


def plan(args, command: list[str], tarball: str) -> list[list[str]]:
    """The gcloud calls to make, in order. `tarball`: the local path --copy packs the checkout into."""
    calls = []
    if args.copy:
        calls.append(scp_to_all(args, tarball, REMOTE_TARBALL))
        unpack = f"tar -xzf ~/{REMOTE_TARBALL} && rm -f ~/{REMOTE_TARBALL}"
        calls.append(ssh(args, f"mkdir -p {remote_path(args.repo_dir)} && {in_repo(args, unpack)}"))
    if args.setup:
        calls.append(ssh(args, in_repo(args, SETUP_COMMAND)))
    if command:
        # A checkout set up with --setup has a .venv; one installed some other way may not.
        activate = f"if [ -f {VENV_ACTIVATE} ]; then . {VENV_ACTIVATE}; fi"
        calls.append(ssh(args, in_repo(args, *env_exports(args.env), activate, shlex.join(command))))
    return calls


def checkout_files(root: Path) -> list[str]:
    """The checkout's files as git sees them: tracked ones plus untracked ones git does not ignore."""
    if shutil.which("git") is None:
        raise UsageError("--copy needs git on PATH (it copies the files git lists)")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, text=True)
    if listed.returncode != 0:
        raise UsageError(f"--copy needs a git checkout; `git ls-files` in {root} said: {listed.stderr.strip()}")
    # Tracked files deleted from the working tree are still listed: skip them.
    return [name for name in listed.stdout.split("\0") if name and os.path.lexists(root / name)]


def pack(root: Path, names: list[str], tarball: str) -> None:
    """Write `names` (paths relative to `root`) into the gzipped tarball `tarball`."""
    with tarfile.open(tarball, "w:gz") as tar:
        for name in names:
            tar.add(root / name, arcname=name, recursive=False)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    options, command = split_argv(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(options)
    if unknown:  # most likely a command without the `--` before it
        parser.error(f"unrecognized arguments: {shlex.join(unknown)} (a command goes after `--`)")
    try:
        if not (command or args.copy or args.setup):
            raise UsageError("no command: put it after `--`, e.g. -- python launch/train.py --config ...")
        with tempfile.TemporaryDirectory() as tmp:
            tarball = str(Path(tmp) / "checkout.tar.gz")
            calls = plan(args, command, tarball)
            if args.dry_run:
                if args.copy:
                    print(f"# pack {REPO_ROOT} (git ls-files --cached --others --exclude-standard) into {tarball}")
                for call in calls:
                    print(shlex.join(call))
                return 0
            if shutil.which("gcloud") is None:
                raise UsageError("gcloud is not on PATH: install the Google Cloud CLI (cloud.google.com/sdk) "
                                 "or use --dry-run to see the commands")
            if args.copy:
                pack(REPO_ROOT, checkout_files(REPO_ROOT), tarball)
            for call in calls:
                status = subprocess.run(call).returncode
                if status != 0:
                    # A gcloud killed by signal N reads -N here; shells report that as 128 + N.
                    return status if status > 0 else 128 - status
            return 0
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C went to gcloud too; exit as a shell reports SIGINT, without a traceback
        return 130


if __name__ == "__main__":
    sys.exit(main())
