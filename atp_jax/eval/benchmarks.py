"""Benchmark question files in LLaVA-1.5's eval layouts read into one record type, the prompts, and the scores.

Kinds: `open` (VQAv2, GQA, TextVQA: a word or phrase, scored against human answers after the VQA
normalisation), `pope` (yes/no object probing), `mme` (yes/no, two questions per image) and `choice`
(ScienceQA-IMG, MMBench: an option letter). Everything here is pure; every problem with a file is an
`EvalError` whose message names the file and line. All metrics are percentages.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from atp_jax.eval.normalize import normalize_answer
from atp_jax.fileio import LineError, json_lines

KINDS = {"vqav2": "open", "gqa": "open", "textvqa": "open", "pope": "pope", "mme": "mme", "scienceqa": "choice",
         "mmbench": "choice"}
BENCHMARKS = tuple(KINDS)
SHORT_ANSWER = "Answer the question using a single word or phrase."
CHOICE_ANSWER = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
                  "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_CATEGORIES = {c.lower(): c for c in MME_PERCEPTION + MME_COGNITION}


class EvalError(ValueError):
    """A problem with the user's files or options; the message is one line, fit to print after `error:`."""


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question, whatever its file looked like."""

    id: str | int  # the file's question_id
    key: str  # unique within the file: str(id), or for MME (whose ids name an image) the id and the text
    image: str | None  # relative to the image folder; None for ScienceQA's text-only questions
    prompt: str  # the user turn as LLaVA's eval asks it (the runner puts <image> in front)
    truth: str | list[str] | None = None  # human answers / "yes"|"no" / option letter; None: not known
    category: str | None = None
    options: tuple[str, ...] = ()
    key_text: str | None = None  # MME: the question text, written with the answer so a restart finds it


def answer_key(question_id, text: str | None = None) -> str:
    """The resume key of a question (or of an answer line): the id, plus the question text when ids repeat."""
    return str(question_id) if text is None else f"{question_id}\n{text}"


# ---- prompts -----------------------------------------------------------------------------------------------


def short_prompt(text: str) -> str:
    """LLaVA's short-answer prompt; LLaVA's own question files already end with the instruction."""
    text = text.strip()
    return text if text.endswith(SHORT_ANSWER) else f"{text}\n{SHORT_ANSWER}"


def choice_prompt(question: str, options: Sequence[str], hint: str | None = None) -> str:
    """LLaVA's multiple-choice prompt.

    Example: ("Which animal?", ["cat", "dog"], "A farm.") ->
        "Context: A farm.\\nWhich animal?\\nA. cat\\nB. dog\\nAnswer with the option's letter from the given ..."
    """
    lines = [f"Context: {hint.strip()}"] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, options, strict=False)]
    return "\n".join(lines) + "\n" + CHOICE_ANSWER


# ---- reading files -----------------------------------------------------------------------------------------


def read_jsonl(path: Path, flag: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line. A line that is not valid UTF-8 is skipped, reported on
    stderr with its number; bad JSON stops the read."""
    try:
        lines = json_lines(path)
    except FileNotFoundError as e:
        raise EvalError(f"{flag} {path}: no such file") from e
    except OSError as e:
        raise EvalError(f"{flag} {path}: cannot read it ({e.strerror})") from e
    items = []
    for number, item in lines:
        if isinstance(item, LineError) and item.undecodable:
            print(f"{path}:{number}: skipped: {item}", file=sys.stderr)
            continue
        if isinstance(item, LineError):
            raise EvalError(f"{path}:{number}: {item}")
        if not isinstance(item, dict):
            raise EvalError(f"{path}:{number}: expected a JSON object, got {type(item).__name__}")
        items.append((number, item))
    if not items:
        raise EvalError(f"{flag} {path}: no questions in it")
    return items


def get(item: dict, name: str, types, where: str, required: bool = True):
    """item[name] checked against `types`; None when absent and not required."""
    if name not in item or item[name] is None:
        if required:
            raise EvalError(f"{where}: missing field {name!r}")
        return None
    value = item[name]
    if not isinstance(value, types) or isinstance(value, bool):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise EvalError(f"{where}: field {name!r} must be {names}, got {type(value).__name__}")
    return value


def yes_no(value: str, name: str, where: str) -> str:
    if value.strip().lower() not in ("yes", "no"):
        raise EvalError(f"{where}: field {name!r} must be yes or no, got {value!r}")
    return value.strip().lower()


def human_answers(item: dict, where: str) -> str | list[str] | None:
    """The ground truth of an open question: "answers" (strings, or VQAv2's {"answer": ...} dicts) or "answer"."""
    answers = item.get("answers")
    if answers is not None:
        if not isinstance(answers, list) or not answers:
            raise EvalError(f"{where}: field 'answers' must be a non-empty list")
        texts = [a.get("answer") if isinstance(a, dict) else a for a in answers]
        if not all(isinstance(t, str) for t in texts):
            raise EvalError(f"{where}: field 'answers' must hold strings or {{\"answer\": str}} objects")
        return texts
    return get(item, "answer", str, where, required=False)


def parse_question(kind: str, item: dict, where: str) -> Question:
    """One question line as a Question (a multiple-choice question may have no image)."""
    qid = get(item, "question_id", (str, int), where)
    if kind == "choice":
        image = get(item, "image", str, where, required=False) or None
        options = get(item, "options", list, where)
        if not 2 <= len(options) <= len(LETTERS) or not all(isinstance(o, str) for o in options):
            raise EvalError(f"{where}: field 'options' must be a list of 2 to {len(LETTERS)} strings")
        question = get(item, "question", str, where)
        prompt = choice_prompt(question, options, get(item, "hint", str, where, required=False))
        truth = choice_truth(get(item, "answer", (str, int), where), len(options), where)
        category = get(item, "category", str, where, required=False)
        return Question(qid, answer_key(qid), image, prompt, truth, category, tuple(options))
    image = get(item, "image", str, where)
    text = get(item, "text", str, where)
    if kind == "open":
        return Question(qid, answer_key(qid), image, short_prompt(text), human_answers(item, where))
    if kind == "pope":
        label = get(item, "label", str, where, required=False)
        category = get(item, "category", str, where, required=False)
        truth = yes_no(label, "label", where) if label is not None else None
        return Question(qid, answer_key(qid), image, short_prompt(text), truth, category)
    category = get(item, "category", str, where)
    if category.lower() not in MME_CATEGORIES:
        names = ", ".join(MME_CATEGORIES.values())
        raise EvalError(f"{where}: unknown MME category {category!r} (expected one of {names})")
    truth = yes_no(get(item, "answer", str, where), "answer", where)
    return Question(qid, answer_key(qid, text), image, short_prompt(text), truth, MME_CATEGORIES[category.lower()],
                    key_text=text)


def choice_truth(answer: str | int, n: int, where: str) -> str:
    """The right option's letter from a letter ("B") or a 0-based index (1)."""
    letter = LETTERS[answer] if isinstance(answer, int) and 0 <= answer < n else str(answer).strip().upper()
    if letter not in LETTERS[:n]:
        raise EvalError(f"{where}: field 'answer' {answer!r} is not one of the {n} options")
    return letter


def read_questions(benchmark: str, path: str | Path) -> tuple[list[Question], int]:
    """(questions, how many were left out for having no image: ScienceQA-IMG keeps only image questions)."""
    if benchmark not in KINDS:
        raise EvalError(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    kind, path = KINDS[benchmark], Path(path)
    questions, lines, no_image = [], {}, 0
    for number, item in read_jsonl(path, "--questions"):
        where = f"{path}:{number}"
        question = parse_question(kind, item, where)
        if question.image is None:
            if benchmark != "scienceqa":
                raise EvalError(f"{where}: missing field 'image'")
            no_image += 1
            continue
        if question.key in lines:
            raise EvalError(f"{where}: duplicate question_id {question.id!r} (first on line {lines[question.key]})")
        lines[question.key] = number
        questions.append(question)
    if not questions:
        raise EvalError(f"--questions {path}: no question with an image")
    return questions, no_image


def read_annotations(path: str | Path) -> dict[str, dict]:
    """Ground truth by str(question_id), from JSONL lines, a JSON list, a JSON object holding the list under
    "annotations" (VQAv2) or "data" (TextVQA), or a JSON object keyed by question id (GQA)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise EvalError(f"--annotations {path}: no such file") from e
    except (OSError, UnicodeDecodeError) as e:
        raise EvalError(f"--annotations {path}: cannot read it ({e})") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return {str(get(item, "question_id", (str, int), f"{path}:{n}")): item
                for n, item in read_jsonl(path, "--annotations")}
    if isinstance(data, dict) and "question_id" in data:  # a JSONL file of one line
        data = [data]
    if isinstance(data, dict):
        listed = next((data[k] for k in ("annotations", "data") if isinstance(data.get(k), list)), None)
        if listed is None:
            if not all(isinstance(v, dict) for v in data.values()):
                raise EvalError(f"--annotations {path}: expected question_id -> {{\"answer\": ...}} objects")
            return {str(k): v for k, v in data.items()}
        data = listed
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        raise EvalError(f"--annotations {path}: expected a list of {{\"question_id\", ...}} objects")
    return {str(get(item, "question_id", (str, int), f"{path}: item {i}")): item for i, item in enumerate(data)}


def attach_truth(benchmark: str, questions: list[Question], annotations: dict[str, dict], path) -> list[Question]:
    """The questions with the ground truth of an annotations file (open answers or POPE labels)."""
    kind = KINDS[benchmark]
    if kind not in ("open", "pope"):
        raise EvalError(f"--annotations: {benchmark} question files hold their answers; drop --annotations")
    out = []
    for q in questions:
        item = annotations.get(q.key)
        where = f"{path}: question_id {q.id!r}"
        if item is None:
            raise EvalError(f"{where}: no annotation for it")
        truth = human_answers(item, where) if kind == "open" else yes_no(get(item, "label", str, where), "label",
                                                                             where)
        if truth is None:
            raise EvalError(f"{where}: missing field 'answers' or 'answer'")
        out.append(dataclasses.replace(q, truth=truth))
    return out


# ---- reading answers ---------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """LLaVA's eval_pope.py: the first sentence, commas dropped; "no", "No" or "not" as a word -> no, else yes."""
    words = text.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in words for w in ("no", "No", "not")) else "yes"


def mme_answer(text: str) -> str:
    """MME's parser: "yes"/"no" (case-insensitive, periods dropped), else by the first four characters, else
    "other" (always wrong)."""
    text = text.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


LEAD_LETTER = re.compile(r"\(?([A-Z])(?:[).:]|$)")  # "B", "B.", "(B)", "(C) dog", "C: dog"; not "A dog"
SAID_LETTER = re.compile(r"(?i:\b(?:answer|option|choice)(?:\s+is)?\s*:?\s*)\(?([A-Z])\b")  # "The answer is B"


def choice_answer(text: str, options: Sequence[str]) -> str | None:
    """The option letter a free-text answer picks: a standalone letter in range (at the start, or after
    "answer is", "Answer:", "option"), else the one option whose text the answer holds (case-insensitive),
    else None (unanswerable, counted wrong).

    Example with options (cat, dog, bird): "B" -> B; "(C) bird" -> C; "The answer is A." -> A; "A dog." -> B;
    "E" -> None.
    """
    letters, text = LETTERS[: len(options)], text.strip()
    if len(text) <= 3 and re.fullmatch(r"\(?[a-zA-Z][).]?", text):  # a lone letter, any case
        return next((c for c in text.upper() if c in letters), None)
    for match in (LEAD_LETTER.match(text), SAID_LETTER.search(text)):
        if match and match.group(1) in letters:
            return match.group(1)
    low = text.lower().rstrip(".").strip()
    found = [i for i, o in enumerate(options) if o.strip() and contains_words(low, o.strip().lower())]
    exact = [i for i in found if options[i].strip().lower() == low]
    # An option inside another found one ("dog" in "hot dog") does not count against it.
    found = exact or [i for i in found if not any(j != i and options[i].lower() in options[j].lower() for j in found)]
    return letters[found[0]] if len(found) == 1 else None


def contains_words(text: str, words: str) -> bool:
    """Whether `words` occurs in `text` as whole words ("dog" in "a dog." but not in "dogma")."""
    return re.search(rf"(?<!\w){re.escape(words)}(?!\w)", text) is not None


# ---- scores ------------------------------------------------------------------------------------------------


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """The VQA accuracy: min(1, matching humans / 3), averaged over the leave-one-out subsets of the human
    answers, after normalising both sides. With 10 answers of which 3 match: (3 * 2/3 + 7 * 1) / 10 = 0.9."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    hits = [g == pred for g in gts]
    return sum(min(1.0, (sum(hits) - hit) / 3) for hit in hits) / len(gts)


def open_score(prediction: str, truth: str | list[str]) -> float:
    """VQA accuracy against a list of human answers; exact match after normalisation against one answer."""
    if isinstance(truth, str):
        return float(normalize_answer(prediction) == normalize_answer(truth))
    return vqa_accuracy(prediction, truth)


def percent(num: float, den: float) -> float:
    return 100.0 * num / den if den else 0.0


def binary_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and the share of "yes" answers (percent; "yes" is the positive class)."""
    pairs = list(zip(predictions, labels, strict=True))
    tp = sum(p == "yes" and t == "yes" for p, t in pairs)
    fp = sum(p == "yes" and t == "no" for p, t in pairs)
    fn = sum(p == "no" and t == "yes" for p, t in pairs)
    tn = sum(p == "no" and t == "no" for p, t in pairs)
    precision, recall = percent(tp, tp + fp), percent(tp, tp + fn)
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": percent(tp + tn, len(pairs)), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": percent(tp + fp, len(pairs)), "questions": len(pairs)}


def pope_metrics(rows: Iterable[tuple[str | None, str, str]]) -> dict:
    """rows: (category, answer text, label). Overall binary metrics, and per category when there are any."""
    rows = [(c, pope_answer(a), t) for c, a, t in rows]
    metrics = binary_metrics([p for _, p, _ in rows], [t for _, _, t in rows])
    categories = sorted({c for c, _, _ in rows if c is not None})
    if categories:
        metrics["categories"] = {c: binary_metrics([p for k, p, _ in rows if k == c], [t for k, _, t in rows if k == c])
                                 for c in categories}
    return metrics


def mme_metrics(rows: Iterable[tuple[str, str, str, str]]) -> dict:
    """rows: (category, image, answer text, "yes"|"no"). Per category: acc (per question), acc_plus (images
    whose questions are all right) and score = acc + acc_plus; perception and cognition sum the scores."""
    by_image: dict[str, dict[str, list[bool]]] = {}
    for category, image, answer, truth in rows:
        by_image.setdefault(category, {}).setdefault(image, []).append(mme_answer(answer) == truth)
    categories = {}
    for category in sorted(by_image):
        images = by_image[category].values()
        acc = percent(sum(map(sum, images)), sum(map(len, images)))
        acc_plus = percent(sum(all(r) for r in images), len(images))
        categories[category] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
                                "questions": sum(map(len, images))}
    total = {part: sum(categories[c]["score"] for c in names if c in categories)
             for part, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION))}
    return {**total, "categories": categories}


def choice_metrics(rows: Iterable[tuple[str | None, str | None, str]]) -> dict:
    """rows: (category, picked letter or None, right letter). Accuracy, unanswerable count, per category."""
    rows = list(rows)
    metrics = {"accuracy": percent(sum(p == t for _, p, t in rows), len(rows)),
               "unanswerable": sum(p is None for _, p, _ in rows), "questions": len(rows)}
    categories = sorted({c for c, _, _ in rows if c is not None})
    if categories:
        metrics["categories"] = {
            c: {"accuracy": percent(sum(p == t for k, p, t in rows if k == c), sum(k == c for k, _, _ in rows)),
                "questions": sum(k == c for k, _, _ in rows)} for c in categories}
    return metrics


def score(benchmark: str, questions: Sequence[Question], answers: dict[str, dict]) -> dict:
    """The benchmark's metrics over the questions that have an answer (answers: answer lines by key); {} when
    no answered question has ground truth (e.g. VQAv2 test-dev, scored by the official server)."""
    kind = KINDS[benchmark]
    done = [(q, answers[q.key]["answer"]) for q in questions if q.key in answers and q.truth is not None]
    if not done:
        return {}
    if kind == "open":
        return {"accuracy": percent(sum(open_score(a, q.truth) for q, a in done), len(done)), "questions": len(done)}
    if kind == "pope":
        return pope_metrics((q.category, a, q.truth) for q, a in done)
    if kind == "mme":
        return mme_metrics((q.category, q.image, a, q.truth) for q, a in done)
    return choice_metrics((q.category, choice_answer(a, q.options), q.truth) for q, a in done)
