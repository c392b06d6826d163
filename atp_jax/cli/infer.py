"""The two inference commands of `launch/infer.py`: one image with its question (the answer streams), and a
JSONL batch file answered into another (all or nothing). User mistakes raise `InferError` with a one-line
message in flag terms; the command line prints it and exits with status 2."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from atp_jax.fileio import LineError, atomic_path, inside, json_lines, storage_error
from atp_jax.infer.generate import Sampling
from atp_jax.infer.runner import (
    GREEDY,
    InferError,
    Request,
    Runner,
    check_options,
    load,
    public_fields,
    untrained_warning,
)


def warn_untrained(runner: Runner) -> None:
    warning = untrained_warning(runner)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise InferError(f"{flag} {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise InferError(f"{flag} {path}: is a directory")
    return path


def run_single(checkpoint, image, prompt: str, *, tokenizer_dir=None, prune: str = "atp", mode: str = "compact",
               dtype: str | None = None, max_new_tokens: int = 128, sampling: Sampling = GREEDY, seed: int = 0,
               as_json: bool = False, visualize=None, out=None) -> int:
    """One image and one question: streams the answer to `out` (stdout) then prints the visual tokens per
    decoder layer, their average, time to first token and decode speed (or one JSON object). Returns 0."""
    from atp_jax.data.images import ImageError, load_image

    out = out or sys.stdout
    check_options(max_new_tokens, sampling)
    if visualize is not None:
        visualize = check_writable(visualize, "--visualize")
    try:  # before the model: a wrong path should not wait for the weights
        img = load_image(image)
    except ImageError as e:
        raise InferError(str(e)) from e
    runner = load(checkpoint, tokenizer_dir, prune, mode, dtype)
    prepared = runner.prepare(prompt, img, max_new_tokens)
    warn_untrained(runner)  # after the checks: a user error stays one line

    def stream(text: str) -> None:
        print(text, end="", file=out, flush=True)

    result = runner.run([prepared], max_new_tokens, sampling, seed, on_text=None if as_json else stream)[0]
    if as_json:
        print(json.dumps(public_fields(result)), file=out)
    else:
        print(file=out)
        print_stats(result, runner, out)
    if visualize is not None:
        from atp_jax.infer.visualize import draw_kept

        draw_kept(img, result["kept"], runner.config.vision.grid, list(runner.module_layers), visualize,
                  cls_first=runner.config.vision_feature_select_strategy == "full")
        if not as_json:
            print(f"kept tokens drawn to {visualize}", file=out)
    return 0


def print_stats(result: dict, runner: Runner, out) -> None:
    per_layer = result["visual_tokens_per_layer"]
    print(f"\nvisual tokens per decoder layer ({len(per_layer)} layers, prune={runner.pruned.pcfg.method}, "
          f"mode={runner.mode}): {' '.join(map(str, per_layer))}", file=out)
    print(f"average visual tokens: {result['avg_visual_tokens']:.1f} of {runner.num_image_tokens}", file=out)
    # The first call of a process compiles its programs, and that time is in these numbers.
    print(f"time to first token: {result['ttft_s']:.3f} s (includes compilation on a first run)", file=out)
    print(f"decode: {result['decode_tokens_per_s']:.1f} tokens/s", file=out)


@dataclasses.dataclass
class BatchLine:
    number: int  # 1-based line number in the batch file
    id: object
    image: Path
    question: str


def read_batch(path: Path) -> list[tuple[int, object]]:
    """(line number, JSON value or LineError) of the non-blank lines of a JSONL file."""
    try:
        return json_lines(path)
    except FileNotFoundError as e:
        raise InferError(f"--batch-file {path}: no such file") from e
    except OSError as e:
        raise InferError(f"--batch-file {path}: cannot read it ({e.strerror})") from e


def parse_line(number: int, item: object, root: Path) -> BatchLine:
    """One `{"id", "image", "question"}` line; the image path is taken relative to `root` and must stay in it."""
    if isinstance(item, LineError):
        raise InferError(str(item))
    if not isinstance(item, dict):
        raise InferError(f"expected a JSON object, got {type(item).__name__}")
    missing = [k for k in ("id", "image", "question") if k not in item]
    if missing:
        raise InferError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    for key in ("image", "question"):
        if not isinstance(item[key], str):
            raise InferError(f"field {key!r} must be a string, got {type(item[key]).__name__}")
    if not isinstance(item["id"], (str, int)) or isinstance(item["id"], bool):
        raise InferError(f"field 'id' must be a string or an integer, got {type(item['id']).__name__}")
    try:
        image = inside(root, item["image"])
    except ValueError as e:
        raise InferError(f"image {e}") from e
    return BatchLine(number, item["id"], image, item["question"])


def run_batch(checkpoint, batch_file, output, *, tokenizer_dir=None, prune: str = "atp", mode: str = "compact",
              dtype: str | None = None, max_new_tokens: int = 128, sampling: Sampling = GREEDY, seed: int = 0,
              batch_size: int = 8, as_json: bool = False, out=None, image_root=None) -> int:
    """Answers every line `{"id", "image", "question"}` of a JSONL file, `batch_size` at a time, and writes
    `{"id", answer fields...}` lines in input order to `output` (atomically: all or nothing). Image paths are
    relative to `image_root` (default: the batch file's folder) and must stay inside it. Bad lines (bad bytes,
    bad JSON, an image outside the root, a duplicate id...) are reported on stderr by line number and skipped.
    Returns 0 when at least one line was answered."""
    from tqdm import tqdm

    out = out or sys.stdout
    check_options(max_new_tokens, sampling)
    if batch_size < 1:
        raise InferError(f"--batch-size {batch_size}: must be at least 1")
    batch_file = Path(batch_file)
    output = check_writable(output, "--output")
    if output.resolve() == batch_file.resolve():
        raise InferError("--output must not be the --batch-file")
    root = Path(image_root) if image_root is not None else batch_file.parent
    if not root.is_dir():
        raise InferError(f"--image-root {root}: not a directory")
    lines = read_batch(batch_file)
    if not lines:
        raise InferError(f"--batch-file {batch_file}: no lines to answer")
    runner = load(checkpoint, tokenizer_dir, prune, mode, dtype)
    warn_untrained(runner)
    failures = []
    with tqdm(total=len(lines), desc="answering", unit="question", file=sys.stderr, dynamic_ncols=True) as bar:

        def report(number: int, message: str) -> None:
            failures.append(number)
            tqdm.write(f"{batch_file}:{number}: skipped: {message}", file=sys.stderr)
            bar.update(1)

        def answered() -> Iterator[dict]:
            parsed = list(parse_lines(lines, root, report))
            requests = (Request(line.question, line.image, max_new_tokens, sampling, seed) for line in parsed)
            for index, result in runner.answers(requests, batch_size):
                if isinstance(result, InferError):
                    report(parsed[index].number, str(result))
                    continue
                bar.update(1)
                yield {"id": parsed[index].id, **public_fields(result)}

        count = write_jsonl_atomic(output, answered(), echo=out if as_json else None)
    summary = f"answered {count} of {len(lines)} lines; {len(failures)} failed"
    if failures:
        summary += f" (lines {', '.join(map(str, sorted(failures)))})"
    if count == 0:
        raise InferError(f"{summary}: nothing written to {output}")
    print(f"{summary}; wrote {output}", file=sys.stderr)
    return 0


def parse_lines(lines: list[tuple[int, object]], root: Path, report) -> Iterator[BatchLine]:
    """The lines that parse; each other one goes to `report(line number, message)`. An id seen on an earlier
    line is reported as a duplicate and its line skipped."""
    first: dict = {}
    for number, text in lines:
        try:
            line = parse_line(number, text, root)
            key = (type(line.id).__name__, line.id)
            if key in first:
                raise InferError(f"duplicate id {line.id!r} (first on line {first[key]})")
            first[key] = number
        except InferError as e:
            report(number, str(e))
            continue
        yield line


class _NothingWritten(Exception):
    pass


def write_jsonl_atomic(path: Path, records: Iterator[dict], echo=None) -> int:
    """Writes `records` as JSON lines to a temporary sibling of `path` and renames it into place once all are
    written (a crash leaves no half file; no record at all leaves no file). Returns the number written."""
    count = 0
    try:
        with atomic_path(path) as tmp:
            try:
                f = open(tmp, "w", encoding="utf-8")  # closed by the `with` below
            except OSError as e:  # before any answer is computed: a user error, not a crash
                raise InferError(f"--output {path}: cannot write there ({e.strerror})") from e
            with f:
                for record in records:
                    line = json.dumps(record)
                    f.write(line + "\n")
                    if echo is not None:
                        print(line, file=echo, flush=True)
                    count += 1
            if not count:
                raise _NothingWritten
    except _NothingWritten:
        pass
    except OSError as e:
        raise InferError(str(storage_error(e, f"--output {path}: cannot write it"))) from e
    return count
