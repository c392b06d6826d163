"""Answering a benchmark with a loaded Runner: batches, a progress bar, a resumable answer file, the results.

An output folder holds `run.json` (the settings that produced its answers; a run with other settings is
refused), `answers.jsonl` (appended and flushed per batch, so a crash loses at most one batch; a restart skips
the questions already answered and drops a last line cut short) and `results.json` (written atomically).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from atp_jax.eval.benchmarks import (
    EvalError,
    Question,
    answer_key,
    attach_truth,
    read_annotations,
    read_questions,
    score,
)
from atp_jax.fileio import atomic_write_text, inside
from atp_jax.infer.runner import InferError, Request, Runner, load, untrained_warning
from atp_jax.nested import flatten
from atp_jax.pruning.accounting import flops_ratio

ANSWERS, RESULTS, RUN = "answers.jsonl", "results.json", "run.json"
# What run.json pins: the flags that change the answers (--mode does not: masked and compact give the same tokens).
SETTINGS = ("benchmark", "checkpoint", "prune", "questions", "dtype")


# ---- the output folder -------------------------------------------------------------------------------------


def write_json_atomic(path: Path, obj) -> None:
    """Writes `obj` as JSON so that a crash leaves the old file or the new one, never half of one."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def prepare_output(output: Path, settings: dict) -> None:
    """Creates the output folder, or checks that the answers already in it come from the same settings."""
    if output.exists() and not output.is_dir():
        raise EvalError(f"--output {output}: is a file, not a folder")
    run = output / RUN
    if run.is_file():
        try:
            before = json.loads(run.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise EvalError(f"{run}: cannot read it ({e}); delete {output} or use another --output") from e
        for name in SETTINGS:
            if before.get(name) != settings[name]:
                raise EvalError(f"--output {output} holds answers of another run (--{name} {before.get(name)} "
                                f"there, {settings[name]} here); use another --output or delete that folder")
        return
    if (output / ANSWERS).exists():
        raise EvalError(f"--output {output} holds an {ANSWERS} without a {RUN}; use another --output")
    try:
        output.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run, settings)
    except OSError as e:
        raise EvalError(f"--output {output}: cannot write there ({e.strerror})") from e


def load_answers(path: Path) -> dict[str, dict]:
    """The answer lines of `path` by resume key. A last line without its newline (a crash while writing) is
    cut from the file, so its question is answered again."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        with open(path, "r+b") as f:
            f.truncate(keep)
        print(f"{path}: dropped a half-written last line", file=sys.stderr)
        data = data[:keep]
    answers = {}
    for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        try:
            row = json.loads(line)
            answers[answer_key(row["question_id"], row.get("question"))] = row
        except (json.JSONDecodeError, TypeError, KeyError) as e:
            raise EvalError(f"{path}:{number}: not an answer line ({e}); delete that line or use another "
                            "--output") from e
    return answers


# ---- answering ---------------------------------------------------------------------------------------------


def answer_row(question: Question, result: dict, runner: Runner) -> dict:
    """The line written for one answered question."""
    row = {"question_id": question.id}
    if question.key_text is not None:  # MME: the id names the image, the text tells its two questions apart
        row["question"] = question.key_text
    text_tokens = result["prompt_tokens"] - runner.num_image_tokens
    return {**row, "answer": result["answer"], "avg_visual_tokens": result["avg_visual_tokens"],
            "visual_tokens_per_layer": result["visual_tokens_per_layer"], "prompt_tokens": result["prompt_tokens"],
            "flops_ratio": flops_ratio(runner.config, result["visual_tokens_per_layer"], text_tokens)}


def unusable_images(questions: Sequence[Question], image_folder: Path) -> list[Question]:
    """The questions whose image lies outside the image folder or does not exist, each reported on stderr."""
    unusable = []
    for q in questions:
        try:
            if inside(image_folder, q.image).is_file():
                continue
            reason = f"image {image_folder / q.image}: no such file"
        except ValueError as e:
            reason = f"image {e}"
        print(f"question_id {q.id!r}: skipped: {reason}", file=sys.stderr)
        unusable.append(q)
    return unusable


def answer_questions(runner: Runner, questions: Sequence[Question], image_folder: Path, answers_path: Path,
                     batch_size: int, max_new_tokens: int, bar) -> tuple[dict[str, dict], list]:
    """Answers `questions` greedily, `batch_size` at a time, appending each answer's line to `answers_path` as it
    comes. Returns (new answer lines by key, ids of the questions skipped for a bad image or prompt)."""
    from tqdm import tqdm

    new, skipped = {}, []

    def report(q: Question, message: str) -> None:
        skipped.append(q.id)
        tqdm.write(f"question_id {q.id!r}: skipped: {message}", file=sys.stderr)
        bar.update(1)

    requests = [Request(q.prompt, image_folder / q.image, max_new_tokens) for q in questions]
    with open(answers_path, "a", encoding="utf-8") as f:
        for index, result in runner.answers(requests, batch_size, fill_batches=True):
            q = questions[index]
            if isinstance(result, InferError):
                report(q, str(result))
                continue
            row = answer_row(q, result, runner)
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a killed run resumes after its last written line
            new[q.key] = row
            bar.update(1)
    return new, skipped


# ---- the whole evaluation ----------------------------------------------------------------------------------


def load_questions(benchmark: str, questions_file, annotations, limit: int | None) -> tuple[list[Question], int]:
    """The questions to evaluate (the first `limit`), with the annotations' ground truth when given."""
    questions, without_image = read_questions(benchmark, questions_file)
    if annotations is not None:
        questions = attach_truth(benchmark, questions, read_annotations(annotations), annotations)
    return questions[:limit] if limit is not None else questions, without_image


def check_options(batch_size: int, max_new_tokens: int, limit: int | None) -> None:
    for flag, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens), ("--limit", limit)):
        if value is not None and value < 1:
            raise EvalError(f"{flag} {value}: must be at least 1")


def evaluate(benchmark: str, questions_file, image_folder, output, checkpoint, *, annotations=None,
             tokenizer_dir=None, prune: str = "atp", mode: str = "compact", dtype: str | None = None,
             batch_size: int = 8, max_new_tokens: int = 16, limit: int | None = None) -> dict:
    """Answers the benchmark's questions not yet in `output`/answers.jsonl, scores every answer there and
    writes `output`/results.json. Returns the results. Raises EvalError or InferError for user errors."""
    from tqdm import tqdm

    check_options(batch_size, max_new_tokens, limit)
    image_folder, output, checkpoint = Path(image_folder), Path(output), Path(checkpoint)
    if not image_folder.is_dir():
        raise EvalError(f"--image-folder {image_folder}: no such folder")
    if not checkpoint.is_dir():
        raise EvalError(f"--checkpoint {checkpoint}: no such directory")
    questions, without_image = load_questions(benchmark, questions_file, annotations, limit)
    settings = {"benchmark": benchmark, "checkpoint": str(checkpoint.resolve()), "prune": prune,
                "questions": str(Path(questions_file).resolve()), "dtype": dtype or "stored"}
    prepare_output(output, settings)
    answers = load_answers(output / ANSWERS)
    pending = [q for q in questions if q.key not in answers]
    if len(pending) < len(questions):
        print(f"{len(questions) - len(pending)} of {len(questions)} questions already answered in {output / ANSWERS}",
              file=sys.stderr)
    missing = {q.key: q.id for q in unusable_images(pending, image_folder)}  # before the model loads
    skipped, pending = list(missing.values()), [q for q in pending if q.key not in missing]
    if pending:
        runner = load(checkpoint, tokenizer_dir, prune, mode, dtype)
        warning = untrained_warning(runner)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        with tqdm(total=len(questions), initial=len(questions) - len(pending), desc=benchmark, unit="question",
                  file=sys.stderr, dynamic_ncols=True) as bar:
            new, failed = answer_questions(runner, pending, image_folder, output / ANSWERS, batch_size,
                                           max_new_tokens, bar)
        answers.update(new)
        skipped += failed
    results = summarize(benchmark, prune, mode, questions, answers, skipped, without_image)
    write_json_atomic(output / RESULTS, results)
    return results


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(benchmark: str, prune: str, mode: str, questions: Sequence[Question], answers: dict[str, dict],
              skipped: list, without_image: int) -> dict:
    """The results of a run: the metrics, counts, average visual tokens and prefill FLOPs ratio."""
    rows = [answers[q.key] for q in questions if q.key in answers]
    results = {"benchmark": benchmark, "prune": prune, "mode": mode, "questions": len(questions),
               "answered": len(rows), "skipped": skipped, "metrics": score(benchmark, questions, answers),
               "avg_visual_tokens": mean([r["avg_visual_tokens"] for r in rows]),
               "flops_ratio": mean([r["flops_ratio"] for r in rows])}
    if benchmark == "scienceqa":
        results["without_image"] = without_image  # text-only questions, not part of ScienceQA-IMG
    if not results["metrics"]:
        results["note"] = "no ground truth for the answered questions: answers written, not scored"
    return results


def format_table(results: dict) -> str:
    """A two-column table of a run's results for the terminal."""
    rows = [("benchmark", results["benchmark"]), ("prune", f"{results['prune']} ({results['mode']})"),
            ("questions", results["questions"]), ("answered", results["answered"]),
            ("skipped", len(results["skipped"]))]
    if "without_image" in results:
        rows.append(("without image (not evaluated)", results["without_image"]))
    rows += list(flatten(results["metrics"], sep="/").items())
    rows += [("avg_visual_tokens", results["avg_visual_tokens"]), ("flops_ratio", results["flops_ratio"])]
    if "note" in results:
        rows.append(("note", results["note"]))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {cell(name, value)}" for name, value in rows)


def cell(name: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):  # metrics are percentages, the FLOPs ratio a fraction
        return f"{value:.4f}" if name == "flops_ratio" else f"{value:.2f}"
    return str(value)
