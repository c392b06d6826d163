"""Inference for people: load a checkpoint with its tokenizer and pruning modules, answer questions about
images, and the two command-line modes (one image, or a JSONL batch file) that `launch/infer.py` calls.

Every problem a user can cause (a missing file, no tokenizer, a bad image, a bad or too long prompt, a bad
option) is an `InferError` with a one-line message; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from atp_jax.fileio import atomic_path, bad_bytes, inside, storage_error, text_lines
from atp_jax.infer.generate import Generation, Sampling, generate
from atp_jax.pruning.engine import PrunedLlava

PRUNE_METHODS = ("atp", "fastv", "pdrop", "random", "none")
MODES = ("masked", "compact")
DTYPES = ("float32", "bfloat16", "float16")
STOP_STRINGS = ("</s>", "USER:")  # the vicuna_v1 turn ends; a model that runs on into a new turn is cut there
PAD_MULTIPLE = 64  # prompts are padded to a multiple of this, so nearby lengths share one compiled program
DECODE_CHUNK = 8  # decode steps per jitted call: how often stop strings are checked and text is streamed
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
GREEDY = Sampling()
RESULT_FIELDS = ("answer", "token_ids", "visual_tokens_per_layer", "avg_visual_tokens", "prompt_tokens", "ttft_s",
                 "decode_tokens_per_s")


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit 2) instead of the usage block (the launch scripts)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


class InferError(ValueError):
    """A problem the user caused; the message is one line, fit to print after `error:`."""


@dataclasses.dataclass
class Prompt:
    """One question ready for the model."""

    input_ids: np.ndarray  # int32[T], the image expanded to num_image_tokens placeholders
    pixels: np.ndarray  # float32[3, S, S]


@dataclasses.dataclass
class Runner:
    """A loaded model ready to answer: the pruned LLaVA, its tokenizer and the generation mode."""

    pruned: PrunedLlava
    tokenizer: object
    mode: str  # "compact" or "masked"
    trained: bool  # whether the ATP thresholds were loaded from the checkpoint (False: untrained initial ones)
    checkpoint: Path

    @property
    def config(self):
        return self.pruned.llava.config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_index

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None and 0 <= pad < self.config.text.vocab_size else 0  # masked out either way

    @property
    def max_positions(self) -> int:
        """The context window: prompt tokens plus new tokens must fit in it."""
        return self.config.text.max_position_embeddings

    @property
    def module_layers(self) -> tuple[int, ...]:
        """The decoder layers after which a pruning module runs (0-indexed)."""
        return tuple(self.pruned.module_layers)

    def prepare(self, question: str, image, max_new_tokens: int) -> Prompt:
        """Tokenizes `question` (an `<image>` is inserted at its start when missing) and pre-processes `image`
        (a path or a PIL image of any mode; LLaVA's pad-to-square). Raises InferError for a bad prompt, a
        prompt that does not fit the context window with `max_new_tokens`, or a bad image."""
        from atp_jax.data.conversation import SampleError, encode_prompt
        from atp_jax.data.images import ImageError, load_image, preprocess

        if not isinstance(question, str):
            raise InferError(f"the question must be a string, got {type(question).__name__}")
        try:
            ids = encode_prompt(question, self.tokenizer, self.image_token_id, self.num_image_tokens)
        except SampleError as e:
            raise InferError(f"bad prompt: {e.detail}") from e
        if len(ids) + max_new_tokens > self.max_positions:
            raise InferError(f"prompt too long: {len(ids)} tokens (the image counts {self.num_image_tokens}) + "
                             f"{max_new_tokens} new tokens exceed the model's context window of "
                             f"{self.max_positions} tokens; shorten the question or lower --max-new-tokens")
        try:
            img = image if isinstance(image, Image.Image) else load_image(image)
            pixels = preprocess(img, self.image_size, mode="pad")
        except ImageError as e:
            raise InferError(str(e)) from e
        return Prompt(ids, pixels)

    def run(self, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
            on_text: Callable[[str], None] | None = None) -> list[dict]:
        """Answers prepared prompts as one batch; `on_text(new_text)` streams the answer of a batch of one."""
        check_options(max_new_tokens, sampling)
        ids, mask = pad_prompts([p.input_ids for p in prompts], self.pad_id, PAD_MULTIPLE)
        pixels = np.stack([p.pixels for p in prompts])
        watcher = StopWatcher(self.tokenizer, self.eos_id, len(prompts), on_text if len(prompts) == 1 else None)
        gen = generate(self.pruned, ids, pixels, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                       eos_id=self.eos_id, seed=seed, mode=self.mode, chunk=DECODE_CHUNK, on_tokens=watcher)
        results = [self._result(gen, b, len(p.input_ids)) for b, p in enumerate(prompts)]
        if watcher.on_text is not None:
            watcher.finish(results[0]["answer"])
        return results

    def answer(self, questions: Sequence[str], images: Sequence, max_new_tokens: int = 128,
               sampling: Sampling = GREEDY, seed: int = 0, on_text: Callable[[str], None] | None = None
               ) -> list[dict]:
        """Answers a batch of questions, one image (path or PIL image) each. Each result holds `answer`,
        `token_ids`, `visual_tokens_per_layer` (one int per decoder layer), `avg_visual_tokens`, `prompt_tokens`,
        `ttft_s`, `decode_tokens_per_s` and `kept` (per pruning module, the kept visual token indices)."""
        if len(questions) != len(images):
            raise InferError(f"{len(questions)} questions for {len(images)} images")
        prompts = [self.prepare(q, im, max_new_tokens) for q, im in zip(questions, images, strict=True)]
        return self.run(prompts, max_new_tokens, sampling, seed, on_text)

    def _result(self, gen: Generation, b: int, prompt_tokens: int) -> dict:
        token_ids, answer = cut_at_stop(gen.row(b), self.tokenizer)
        per_layer = [int(round(x)) for x in gen.visual_per_layer[b]]
        decode_steps = gen.tokens.shape[1] - 1  # every row advances one token per step of the batch
        return {
            "answer": answer,
            "token_ids": token_ids,
            "visual_tokens_per_layer": per_layer,
            "avg_visual_tokens": float(np.mean(gen.visual_per_layer[b])),
            "prompt_tokens": prompt_tokens,
            "ttft_s": gen.ttft_s,
            "decode_tokens_per_s": decode_steps / gen.decode_s if decode_steps and gen.decode_s > 0 else 0.0,
            "kept": [np.flatnonzero(k > 0.5).tolist() for k in gen.keep[b]],
        }


# ---- loading -----------------------------------------------------------------------------------------------


def load(checkpoint: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, prune: str = "atp",
         mode: str = "compact", dtype: str | None = None) -> Runner:
    """The model of `checkpoint` (a converted atp_jax directory or an HF llava directory), its tokenizer (from
    `tokenizer_dir` when given, else from the checkpoint directory) and pruning by `prune`: the checkpoint's
    trained ATP thresholds when it has them, else the default placement for its depth. Raises InferError."""
    from atp_jax.convert.checkpoint import check_complete, load_pretrained
    from atp_jax.convert.readers import CheckpointError
    from atp_jax.models.config import ConfigError
    from atp_jax.pruning.checkpoint import load_pruned

    if prune not in PRUNE_METHODS:
        raise InferError(f"--prune {prune!r}: expected one of {', '.join(PRUNE_METHODS)}")
    if mode not in MODES:
        raise InferError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise InferError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise InferError(f"checkpoint {checkpoint}: no such directory")
    try:
        check_complete(checkpoint)
    except CheckpointError as e:
        raise InferError(str(e)) from e
    tokenizer = find_tokenizer(checkpoint, tokenizer_dir)  # before the weights: the cheap check fails first
    try:
        llava, config = load_pretrained(checkpoint, dtype)
    except (CheckpointError, ConfigError) as e:
        raise InferError(str(e)) from e
    if len(tokenizer) > config.text.vocab_size:
        raise InferError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                         f"{config.text.vocab_size}: wrong tokenizer for {checkpoint}?")
    try:  # the static-shape model runs in masked mode; `mode` only picks how generate() prefills
        pruned, trained = load_pruned(checkpoint, llava, method=prune)
    except ValueError as e:  # a pruning config that does not fit this model
        raise InferError(f"{checkpoint}: cannot set up pruning: {e}") from e
    return Runner(pruned=pruned, tokenizer=tokenizer, mode=mode, trained=trained, checkpoint=checkpoint)


def find_tokenizer(checkpoint: Path, tokenizer_dir: str | os.PathLike | None):
    """The tokenizer of `tokenizer_dir` if given (an explicit flag wins), else the checkpoint's own."""
    from atp_jax.data.tokenizer import TokenizerError, load_tokenizer

    if tokenizer_dir is not None:
        directory = Path(tokenizer_dir)
    elif any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        directory = checkpoint
    else:
        raise InferError(f"checkpoint {checkpoint} has no tokenizer ({' or '.join(TOKENIZER_FILES)}); "
                         "pass --tokenizer DIR")
    try:
        return load_tokenizer(directory)
    except TokenizerError as e:
        raise InferError(str(e)) from e


def check_options(max_new_tokens: int, sampling: Sampling) -> None:
    if max_new_tokens < 1:
        raise InferError(f"--max-new-tokens {max_new_tokens}: must be at least 1")
    if sampling.temperature < 0:
        raise InferError(f"--temperature {sampling.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < sampling.top_p <= 1:
        raise InferError(f"--top-p {sampling.top_p}: must lie in (0, 1]")
    if sampling.top_k < 0:
        raise InferError(f"--top-k {sampling.top_k}: must be >= 0 (0 is no cut)")


# ---- batching, stop strings, streaming -----------------------------------------------------------------


def pad_prompts(rows: Sequence[np.ndarray], pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads int32[T_i] rows to one length, rounded up to `multiple`: (ids int32[B, T], mask bool[B, T])."""
    t = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def stop_index(text: str) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in STOP_STRINGS) if i >= 0]
    return min(found) if found else None


def cut_at_stop(tokens: list[int], tokenizer) -> tuple[list[int], str]:
    """(the answer's tokens, the answer's stripped text): the text up to the first stop string, and the longest
    prefix of `tokens` whose text ends before it (a token that reaches into the stop string is dropped)."""
    text = decode(tokenizer, tokens)
    cut = stop_index(text)
    if cut is None:
        return list(tokens), text.strip()
    n = len(tokens)
    while n > 0 and len(decode(tokenizer, tokens[:n])) > cut:
        n -= 1
    return list(tokens[:n]), text[:cut].strip()


def streamable(text: str) -> str:
    """The part of a growing answer that is safe to print: without trailing whitespace (the final answer is
    stripped), an unfinished UTF-8 character, or an ending that may become a stop string."""
    text = text.lstrip().rstrip().rstrip("\ufffd")
    longest = max(len(s) for s in STOP_STRINGS) - 1
    for k in range(min(longest, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in STOP_STRINGS):
            return text[:-k].rstrip()
    return text


class StopWatcher:
    """generate()'s `on_tokens` callback: stops a row once its text holds a stop string and streams the text
    of a batch of one through `on_text(new_text)` (the whole row is decoded each time; the new suffix is sent)."""

    def __init__(self, tokenizer, eos_id: int, rows: int, on_text: Callable[[str], None] | None = None):
        self.tokenizer, self.eos_id, self.on_text = tokenizer, eos_id, on_text
        self.stopped = np.zeros(rows, bool)
        self.sent = ""

    def __call__(self, tokens: np.ndarray, n: int) -> np.ndarray:
        """tokens: int32[B, n] generated so far. Returns bool[B]: rows to stop."""
        for b in np.flatnonzero(~self.stopped):
            row = tokens[b].tolist()
            if self.eos_id in row:  # finished by EOS; generate() already stops it
                row = row[:row.index(self.eos_id)]
                self.stopped[b] = True
            text = decode(self.tokenizer, row)
            cut = stop_index(text)
            if cut is not None:
                self.stopped[b], text = True, text[:cut]
            if self.on_text is not None and b == 0:
                self._send(streamable(text))
        return self.stopped.copy()

    def _send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            self.on_text(text[len(self.sent):])
            self.sent = text

    def finish(self, answer: str) -> None:
        """Sends what is left of the final answer."""
        if answer.startswith(self.sent) and len(answer) > len(self.sent):
            self.on_text(answer[len(self.sent):])
        self.sent = answer


# ---- the command-line modes --------------------------------------------------------------------------------


def public_fields(result: dict) -> dict:
    """The fields written as JSON (the kept indices are for pictures, and long)."""
    return {k: result[k] for k in RESULT_FIELDS}


def warn_untrained(runner: Runner, prune: str) -> None:
    if prune == "atp" and not runner.trained:
        print(f"warning: {runner.checkpoint} has no trained ATP thresholds; using the untrained initial ones",
              file=sys.stderr)


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
    warn_untrained(runner, prune)  # after the checks: a user error stays one line

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


def read_batch(path: Path) -> list[tuple[int, str | UnicodeDecodeError]]:
    """(line number, text) of the non-blank lines of a JSONL file; a line that is not UTF-8 comes with its
    decoding error instead, to be reported alone."""
    try:
        return text_lines(path)
    except FileNotFoundError as e:
        raise InferError(f"--batch-file {path}: no such file") from e
    except OSError as e:
        raise InferError(f"--batch-file {path}: cannot read it ({e.strerror})") from e


def parse_line(number: int, text: str | UnicodeDecodeError, root: Path) -> BatchLine:
    """One `{"id", "image", "question"}` line; the image path is taken relative to `root` and must stay in it."""
    if isinstance(text, UnicodeDecodeError):
        raise InferError(bad_bytes(text))
    try:
        item = json.loads(text)
    except json.JSONDecodeError as e:
        raise InferError(f"not valid JSON ({e.msg} at column {e.colno})") from e
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


def prepared_lines(runner: Runner, lines: list[tuple[int, str | UnicodeDecodeError]], root: Path,
                   max_new_tokens: int, report: Callable[[int, str], None]) -> Iterator[tuple[BatchLine, Prompt]]:
    """The lines that parse and prepare; each other one goes to `report(line number, message)`. An id seen on
    an earlier line is reported as a duplicate and its line skipped."""
    first: dict = {}
    for number, text in lines:
        try:
            line = parse_line(number, text, root)
            key = (type(line.id).__name__, line.id)
            if key in first:
                raise InferError(f"duplicate id {line.id!r} (first on line {first[key]})")
            first[key] = number
            prompt = runner.prepare(line.question, line.image, max_new_tokens)
        except InferError as e:
            report(number, str(e))
            continue
        yield line, prompt


def batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


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
    warn_untrained(runner, prune)
    failures = []
    with tqdm(total=len(lines), desc="answering", unit="question", file=sys.stderr, dynamic_ncols=True) as bar:

        def report(number: int, message: str) -> None:
            failures.append(number)
            tqdm.write(f"{batch_file}:{number}: skipped: {message}", file=sys.stderr)
            bar.update(1)

        def answered() -> Iterator[dict]:
            good = prepared_lines(runner, lines, root, max_new_tokens, report)
            for batch in batches(good, batch_size):
                results = runner.run([p for _, p in batch], max_new_tokens, sampling, seed)
                bar.update(len(batch))
                for (line, _), result in zip(batch, results, strict=True):
                    yield {"id": line.id, **public_fields(result)}

        count = write_jsonl_atomic(output, answered(), echo=out if as_json else None)
    summary = f"answered {count} of {len(lines)} lines; {len(failures)} failed"
    if failures:
        summary += f" (lines {', '.join(map(str, failures))})"
    if count == 0:
        raise InferError(f"{summary}: nothing written to {output}")
    print(f"{summary}; wrote {output}", file=sys.stderr)
    return 0


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
