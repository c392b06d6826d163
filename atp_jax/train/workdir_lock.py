"""One training run per workdir: an advisory lock file, `WORKDIR/train.lock`, held by process 0 of the run.

The file holds its owner (host, pid, start time) and an exclusive `flock` on it lives as long as the owner's
process: a second run finds the lock held and stops before it writes anything; a lock left by a process that
died (killed, the machine restarted) is taken over with a warning. A lock written on another host cannot be
checked from here (file locks do not reach across every network filesystem), so it stops the run too, naming
the owner and the file to remove once that run is known to be gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_FILE = "train.lock"


class WorkdirBusy(RuntimeError):
    """Another training run holds the workdir."""


def _owner(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {owner.get('started', '?')}"


def _open_locked(path: Path) -> int:
    """A descriptor of `path` with an exclusive flock on it; WorkdirBusy when another process holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise WorkdirBusy(f"{path.parent} is in use by another training run ({_describe(_owner(path))}); "
                              "wait for it to finish or stop it") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed the file between our open and our lock: try the new one


@contextlib.contextmanager
def workdir_lock(workdir: str | os.PathLike) -> Iterator[None]:
    """Holds `workdir`'s lock for the block (creating the directory). Process 0 of a multi-host run takes it;
    every process raises WorkdirBusy when process 0 could not."""
    import jax

    error = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(_held(Path(workdir)))
            except WorkdirBusy as e:
                error = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils

            if not int(multihost_utils.broadcast_one_to_all(np.int32(error is None))) and error is None:
                error = WorkdirBusy(f"{workdir}: process 0 could not lock it (its output says why)")
        if error is not None:
            raise error
        yield


@contextlib.contextmanager
def _held(workdir: Path) -> Iterator[None]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = _open_locked(path)
    try:
        previous, host = _owner(path), socket.gethostname()
        if previous:
            if previous.get("host") != host:
                raise WorkdirBusy(f"{workdir} is locked by a training run on another host ({_describe(previous)}); "
                                  f"if that run is gone, remove {path}")
            log.warning("taking over the lock of %s: that process is gone", _describe(previous))
        me = {"host": host, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: a run that opens the file next creates a new one
        os.close(fd)
