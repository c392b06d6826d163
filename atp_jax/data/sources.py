"""LLaVA annotation files (LLaVA-Instruct and LLaVA-Pretrain schema, JSON or JSONL) and the skip report.

Both schemas are a list of `{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}`; the
image path is relative to an image root, and text-only samples have no `image`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
from pathlib import Path

from atp_jax.data.conversation import SampleError
from atp_jax.fileio import LineError, inside, json_lines

log = logging.getLogger(__name__)


class SkipReport:
    """Samples skipped, counted per reason with a few example ids; `strict=True` raises instead of skipping."""

    def __init__(self, strict: bool = False, examples: int = 5):
        self.strict, self.examples = strict, examples
        self.counts: collections.Counter[str] = collections.Counter()
        self.ids: dict[str, list[str]] = collections.defaultdict(list)

    def skip(self, sample_id: str, error: SampleError) -> None:
        if self.strict:
            raise SampleError(error.reason, f"sample {sample_id!r}: {error.detail}") from error
        self.counts[error.reason] += 1
        if len(self.ids[error.reason]) < self.examples:
            self.ids[error.reason].append(sample_id)
        log.warning("skipped sample %r (%s): %s", sample_id, error.reason, error.detail)

    def merge(self, other: SkipReport) -> None:
        self.counts.update(other.counts)
        for reason, ids in other.ids.items():
            self.ids[reason] = (self.ids[reason] + ids)[:self.examples]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        if not self.counts:
            return "no samples skipped"
        parts = [f"{reason}: {n} (e.g. {', '.join(map(repr, self.ids[reason]))})"
                 for reason, n in self.counts.most_common()]
        return f"{self.total} samples skipped; " + "; ".join(parts)


def read_annotations(path: str | os.PathLike) -> list:
    """The raw entries of a JSON array file or a JSONL file (one object per line). Malformed JSON raises
    ValueError naming the file and line; the entries themselves are checked by `check_entry`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from e
        return entries
    entries = []
    for n, entry in json_lines(path):
        if isinstance(entry, LineError):
            raise ValueError(f"{path}: line {n}: {entry}")
        entries.append(entry)
    return entries


def check_entry(entry, index: int) -> dict:
    """One annotation entry as `{"id": str, "image": str | None, "conversations": list}`; SampleError
    ('bad_schema') when it does not follow the LLaVA schema. Entries without an id get `#<index>`."""
    if not isinstance(entry, dict):
        raise SampleError("bad_schema", f"entry #{index} is a {type(entry).__name__}, not an object")
    sample_id = str(entry.get("id", f"#{index}"))
    image = entry.get("image")
    if image is not None and (not isinstance(image, str) or not image):
        raise SampleError("bad_schema", f"'image' must be a non-empty path string, got {image!r}")
    turns = entry.get("conversations")
    if not isinstance(turns, list):
        raise SampleError("bad_schema", f"'conversations' must be a list, got {type(turns).__name__}")
    return {"id": sample_id, "image": image, "conversations": turns}


def image_path(image_root: str | os.PathLike, image: str) -> Path:
    """An annotation's image path inside its image root; SampleError ('image_outside_root') for a path that
    leaves it (`../`, an absolute path elsewhere, a link out)."""
    try:
        return inside(image_root, image)
    except ValueError as e:
        raise SampleError("image_outside_root", str(e)) from e


def iter_entries(path: str | os.PathLike, report: SkipReport):
    """Checked entries of an annotation file; bad ones go to `report`."""
    for i, entry in enumerate(read_annotations(path)):
        try:
            yield check_entry(entry, i)
        except SampleError as e:
            report.skip(str(entry.get("id", f"#{i}")) if isinstance(entry, dict) else f"#{i}", e)


class AnnotationSource:
    """A random-access source (for grain) over a LLaVA annotation file read directly, images by path:
    records `{"id", "image": path | None, "conversations", "kind": ""}`. Entries with a bad schema or an image
    path outside the image root are left out and counted in `report`; image and conversation problems surface
    when a record is processed."""

    def __init__(self, annotation: str | os.PathLike, image_root: str | os.PathLike, report: SkipReport | None = None):
        self.report = report or SkipReport()
        self.image_root = Path(image_root)
        self.entries = []
        for entry in iter_entries(annotation, self.report):
            try:
                if entry["image"] is not None:
                    entry["image"] = str(image_path(self.image_root, entry["image"]))
            except SampleError as e:
                self.report.skip(entry["id"], e)
                continue
            self.entries.append(entry)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        entry = self.entries[index]
        return {"id": entry["id"], "image": entry["image"], "conversations": entry["conversations"], "kind": ""}
