"""The file helpers every reader and writer in atp_jax uses: files and directories written whole or not at all,
storage failures told in one line, text files read line by line, and paths kept inside their root.

    atomic_write_text(path, text)                 # readers see the old file or the new one, never half
    with atomic_path(path) as tmp: image.save(tmp)  # any writer that wants a path
    with staged_directory(dst) as tmp: ...        # a directory that appears complete or not at all
    for number, line in text_lines(path): ...     # a line with bad bytes is an error for that line only
    for number, value in json_lines(path): ...    # the same, each line parsed: a value or its LineError
    inside(root, "a/b.png")                       # the path, or ValueError when it leaves `root`
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path


class StorageError(OSError):
    """A file or directory could not be written or read for a reason of the storage (full, read-only,
    permissions...); the message names the path and the cause in one line (`errno` keeps the code)."""

    def __init__(self, code: int | None, message: str):
        super().__init__(message)
        self.errno = code


def check_free_space(directory: str | os.PathLike, needed: int, what: str) -> None:
    """StorageError (ENOSPC) when the filesystem of `directory` has fewer than `needed` bytes free: a write
    that cannot fit is refused before it starts, rather than failing half way."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise StorageError(errno.ENOSPC, f"{what}: No space left on device ({directory} has {free / 2**20:.1f} MiB "
                           f"free, {needed / 2**20:.1f} MiB needed)")


# tensorstore (orbax's array writer) and safetensors report the system error inside their messages, e.g.
#   ValueError: RESOURCE_EXHAUSTED: Error writing local file "/w/ckpt/_sharding": ... [os_error_code='28']
#   SafetensorError: Error while serializing: I/O error: No space left on device (os error 28)
_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)'?|\(os error (\d+)\)")
_QUOTED_PATH = re.compile(r'"(/[^"]+)"')


def storage_error(error: BaseException, what: str) -> StorageError | None:
    """A one-line StorageError for `error` when it (or an exception it was raised from) is a storage failure:
    an OSError, or a tensorstore error carrying an OS error code; None for anything else. `what` says what was
    being done ("saving checkpoint 20 in /w/checkpoints")."""
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, StorageError):
            return e
        if isinstance(e, OSError):
            where = f" ({e.filename})" if e.filename else ""
            cause = e.strerror or (os.strerror(e.errno) if e.errno else str(e))
            return StorageError(e.errno, f"{what}: {cause}{where}")
        match = _OS_ERROR_CODE.search(str(e))
        if match:
            code = int(match.group(1) or match.group(2))
            path = _QUOTED_PATH.search(str(e))
            where = f" ({path.group(1)})" if path else ""
            return StorageError(code, f"{what}: {os.strerror(code)}{where}")
        e = e.__cause__ or e.__context__
    return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write to; renamed to `path` when the block succeeds, removed
    when it fails. The file is synced to disk before the rename."""
    path = Path(path)
    tmp = staging_path(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes `path` so that readers, and a run killed meanwhile, see the old file or the new one, never half."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_directory(new: Path, dst: Path) -> None:
    """Puts the complete directory `new` at `dst`, replacing what is there; if the final rename fails, the old
    `dst` is put back."""
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    _remove(old)
    if dst.exists():
        os.replace(dst, old)
    try:
        os.replace(new, dst)
    except BaseException:
        if old.exists():
            os.replace(old, dst)
        raise
    _remove(old)


@contextlib.contextmanager
def staged_directory(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of `dst` and renames it to `dst` only if the block succeeds.

    A failed or interrupted write leaves `dst` untouched (absent, or the old one when overwriting) and no
    temporary directory behind.
    """
    dst = Path(dst).absolute()
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; choose another destination or remove it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(dst)
    _remove(tmp)
    tmp.mkdir()
    try:
        yield tmp
        replace_directory(tmp, dst)
    finally:
        _remove(tmp)


def staging_path(dst: Path, tag: str | None = None) -> Path:
    """Where `dst` is written before it is renamed into place: a hidden sibling. `tag` (default: the process
    id) keeps concurrent writers apart; processes of one multi-host job pass the same tag."""
    return dst.with_name(f".{dst.name}.partial-{os.getpid() if tag is None else tag}")


def text_lines(path: str | os.PathLike) -> list[tuple[int, str | UnicodeDecodeError]]:
    """(line number from 1, text) of each non-blank line of a UTF-8 text file; a line that is not valid UTF-8
    comes as (number, the UnicodeDecodeError), so that only that line is lost. OSError when the file cannot be
    read."""
    out: list[tuple[int, str | UnicodeDecodeError]] = []
    for number, raw in enumerate(Path(path).read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((number, e))
            continue
        if line.strip():
            out.append((number, line))
    return out


def bad_bytes(e: UnicodeDecodeError) -> str:
    """A one-line description of an undecodable line."""
    return f"not valid UTF-8 (byte 0x{e.object[e.start]:02x} at column {e.start + 1})"


class LineError(ValueError):
    """What is wrong with one line of a JSONL file, in one line: bytes that are not UTF-8, or text that is not
    JSON. `json_lines` returns it in place of the line's value, so that a reader decides what one bad line
    costs (skip it, or stop)."""

    def __init__(self, message: str, undecodable: bool = False):
        super().__init__(message)
        self.undecodable = undecodable


def json_lines(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number from 1, JSON value or LineError) of each non-blank line of a JSONL file. OSError when the
    file cannot be read."""
    out: list[tuple[int, object]] = []
    for number, line in text_lines(path):
        if isinstance(line, UnicodeDecodeError):
            out.append((number, LineError(bad_bytes(line), undecodable=True)))
            continue
        try:
            out.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            out.append((number, LineError(f"not valid JSON ({e.msg} at column {e.colno})")))
    return out


def inside(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """`root / relative`, resolved (symbolic links and `..` followed); ValueError when the result lies outside
    `root` (an absolute path elsewhere, `../`, or a link out)."""
    root = Path(root).resolve()
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise ValueError(f"{relative}: the path leaves its root {root}")
    return path
