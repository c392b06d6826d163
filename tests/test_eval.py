"""Benchmark evaluation: normalisation, parsing and scores on hand-made cases, and launch/eval.py end to end on a
tiny converted checkpoint (the untrained model's scores mean nothing; the wiring is what is tested).

Three CLI runs pay JAX start-up and compilation: POPE with ATP and MMBench with FastV start in the background
as soon as the first test needs them; a resume after a crash mid-line follows the POPE run.
"""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from atp_jax.eval import benchmarks as bm
from atp_jax.eval import runner as er
from atp_jax.eval.normalize import normalize_answer
from tests.cli_helpers import finished, load_main, read_jsonl, run_main, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "eval.py"
LAYERS = 4  # LlavaConfig.tiny's decoder depth
POPE = [  # (question_id, image, text, label, category); the missing image is reported and skipped
    (1, "a.png", "Is there a cat in the image?", "yes", "random"),
    (2, "b.png", "Is there a dog in the image?", "no", "random"),
    (3, "gone.png", "Is there a car in the image?", "no", "popular"),
    (4, "c.png", "Is there a bird in the image?", "yes", "popular"),
    (5, "a.png", "Is there a tree in the image?", "no", "adversarial"),
]
MMBENCH = [
    {"question_id": "m1", "image": "a.png", "question": "Which animal is shown?", "options": ["cat", "dog"],
     "answer": "A", "hint": "A photo of a farm.", "category": "animals"},
    {"question_id": "m2", "image": "b.png", "question": "What colour is the sky?", "options": ["red", "blue", "green"],
     "answer": 1, "category": "colour"},
    {"question_id": "m3", "image": "c.png", "question": "Is there a dog?", "options": ["yes", "no"], "answer": "B"},
]


# ---- fixtures: a tiny checkpoint, images, question files, the CLI runs ---------------------------------------


def build_checkpoint(d: Path) -> Path:
    """A tiny checkpoint whose tokenizer knows the prompts."""
    texts = [bm.SHORT_ANSWER, bm.CHOICE_ANSWER, "Context: A photo of a farm.", "yes no cat dog bird red blue green"]
    texts += [q[2] for q in POPE] + [q["question"] for q in MMBENCH]
    return tiny_checkpoint(d, texts * 20, 256)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("eval")
    build_checkpoint(d)
    (d / "images").mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(d / "images" / name)
    write_jsonl(d / "pope.jsonl", [{"question_id": i, "image": im, "text": t, "label": lb, "category": c}
                                   for i, im, t, lb, c in POPE])
    write_jsonl(d / "mmbench.jsonl", MMBENCH)
    return d


def cli(*args) -> subprocess.CompletedProcess:
    # XLA's backend optimisations take most of a tiny model's compile time and change nothing tested here.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "XLA_FLAGS": flags})


def pope_args(work: Path, output: Path) -> list:
    return ["--benchmark", "pope", "--questions", work / "pope.jsonl", "--image-folder", work / "images",
            "--checkpoint", work / "ckpt", "--output", output, "--max-new-tokens", 4, "--batch-size", 4,
            "--compilation-cache", work / "xla-cache"]


@pytest.fixture(scope="module")
def runs(work):
    """The CLI runs, two at a time; each value is a future of its CompletedProcess."""
    mmbench = ["--benchmark", "mmbench", "--questions", work / "mmbench.jsonl", "--image-folder", work / "images",
               "--checkpoint", work / "ckpt", "--output", work / "out-mmbench", "--max-new-tokens", 4,
               "--batch-size", 4, "--prune", "fastv", "--mode", "masked"]
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {"pope": pool.submit(cli, *pope_args(work, work / "out-pope")), "mmbench": pool.submit(cli, *mmbench)}
    yield futures
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def eval_main(runs):
    """launch/eval.py's main, imported (it needs `runs` only to start the CLI runs before the other tests)."""
    return load_main(SCRIPT, "eval_cli")


# ---- user errors (no model is loaded for any of them) ----------------------------------------------------------


def test_user_errors_exit_2_with_one_line(work, eval_main, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"question_id": 1, "image": "a.png", "text": "Is it?"}])
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"question_id": 1, "image": "a.png", "text": "ok"}\n{"question_id": 2,\n')
    no_text = write_jsonl(tmp_path / "no_text.jsonl", [{"question_id": 1, "image": "a.png"}])
    dup = write_jsonl(tmp_path / "dup.jsonl", [{"question_id": 7, "image": "a.png", "text": "x"}] * 2)
    mme_bad = write_jsonl(tmp_path / "mme.jsonl", [{"question_id": "x.png", "image": "x.png", "text": "Is it?",
                                                    "category": "smell", "answer": "Yes"}])
    images, ckpt = work / "images", work / "ckpt"

    def args(questions, benchmark="pope", output=tmp_path / "out", **extra):
        flags = ["--benchmark", benchmark, "--questions", questions, "--image-folder", images, "--checkpoint", ckpt,
                 "--output", output]
        return flags + [x for k, v in extra.items() for x in (f"--{k.replace('_', '-')}", v)]

    cases = [
        (args(tmp_path / "none.jsonl"), "none.jsonl: no such file"),
        (args(bad_json), "bad.jsonl:2: not valid JSON"),
        (args(no_text), "no_text.jsonl:1: missing field 'text'"),
        (args(dup), "dup.jsonl:2: duplicate question_id 7 (first on line 1)"),
        (args(mme_bad, "mme"), "unknown MME category 'smell'"),
        (args(good, "chartqa"), "--benchmark"),
        (args(good, image_folder=tmp_path / "nope"), "--image-folder"),
        (args(good, checkpoint=tmp_path / "nothing"), "nothing"),
        (args(good, batch_size=0), "--batch-size 0"),
        (args(good, "mmbench"), "good.jsonl:1: missing field 'options'"),
        (args(good, annotations=tmp_path / "gone.json"), "gone.json: no such file"),
        (args(good, output=good), "is a file"),
    ]
    for argv, needle in cases:
        code, out, err = run_main(eval_main, *argv)
        assert code == 2 and out == "", (argv, code, out, err)
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, (argv, err)


# ---- pure pieces ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, expected", [
    ("Yes.", "yes"), ("yes", "yes"), ("2.5", "2.5"), ("Two", "2"), ("none", "0"), ("ten dogs", "10 dogs"),
    ("The dog", "dog"), ("an apple", "apple"), ("A cat and the dog", "cat and dog"), ("dont", "don't"),
    ("isnt it", "isn't it"), ("red, white", "red white"), ("red/white", "red white"), ("1,000", "1000"),
    ("what?!", "what"), ("  Big\tRed\nBus ", "big red bus"), ("cat's toy", "cat's toy"), ("3.", "3"),
    ("a.m.", "am"),
])
def test_vqa_normalisation(raw, expected):
    assert normalize_answer(raw) == expected


def test_vqa_accuracy_over_ten_human_answers():
    three = ["yes"] * 3 + ["no"] * 7
    assert bm.vqa_accuracy("yes", three) == pytest.approx(0.9)  # (3 * 2/3 + 7 * 1) / 10
    assert bm.vqa_accuracy("No.", three) == 1.0
    assert bm.vqa_accuracy("maybe", three) == 0.0
    two = ["2", "2"] + ["3"] * 8  # "two" normalises to "2"
    assert bm.vqa_accuracy("Two", two) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert bm.vqa_accuracy("a dog", ["dog"] + ["cat"] * 9) == pytest.approx(9 * (1 / 3) / 10)
    assert bm.open_score("The Bus.", "bus") == 1.0 and bm.open_score("bus", "car") == 0.0  # one answer: exact


def test_pope_metrics_on_a_hand_made_list():
    rows = [  # (category, model answer, label)
        ("random", "Yes, there is a cat.", "yes"),  # TP
        ("random", "No.", "yes"),  # FN
        ("random", "There is not a dog.", "no"),  # TN
        ("popular", "yes", "no"),  # FP
        ("popular", "Yes", "yes"),  # TP
        ("popular", "No, there is no car", "no"),  # TN
    ]
    m = bm.pope_metrics(rows)
    tp, fp, fn, tn = 2, 1, 1, 2
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    assert m["accuracy"] == pytest.approx(100 * (tp + tn) / 6)
    assert m["precision"] == pytest.approx(100 * precision) and m["recall"] == pytest.approx(100 * recall)
    assert m["f1"] == pytest.approx(100 * 2 * precision * recall / (precision + recall))
    assert m["yes_ratio"] == pytest.approx(100 * 3 / 6)
    random = m["categories"]["random"]  # TP, FN, TN: precision 1, recall 1/2
    assert random["precision"] == 100 and random["recall"] == 50 and random["f1"] == pytest.approx(100 * 2 / 3)
    assert bm.pope_answer("No. Yes.") == "no" and bm.pope_answer("Nothing") == "yes"  # first sentence; words only


def test_mme_acc_acc_plus_and_the_perception_cognition_sums(tmp_path):
    rows = [  # (image, category, answer, model answer); two questions per image share the image as id
        ("e1.jpg", "existence", "Yes", "Yes"), ("e1.jpg", "existence", "No", "no."),  # both right
        ("e2.jpg", "existence", "Yes", "yes"), ("e2.jpg", "existence", "No", "Yes"),  # one right
        ("c1.jpg", "count", "Yes", "maybe"), ("c1.jpg", "count", "No", "No, none"),  # "other" is wrong
        ("k1.png", "code_reasoning", "Yes", "Yes it is"), ("k1.png", "code_reasoning", "No", "No"),
    ]
    lines = [{"question_id": im, "image": im, "text": f"Question {i}? Please answer yes or no.", "category": c,
              "answer": a} for i, (im, c, a, _) in enumerate(rows)]
    questions, _ = bm.read_questions("mme", write_jsonl(tmp_path / "mme.jsonl", lines))
    assert len({q.key for q in questions}) == 8 and questions[0].id == "e1.jpg"
    answers = {q.key: {"answer": r[3]} for q, r in zip(questions, rows, strict=True)}
    m = bm.score("mme", questions, answers)
    existence = m["categories"]["existence"]
    assert existence["acc"] == 75 and existence["acc_plus"] == 50 and existence["score"] == 125
    assert m["categories"]["count"] == {"acc": 50, "acc_plus": 0, "score": 50, "questions": 2}
    assert m["perception"] == 125 + 50 and m["cognition"] == 200
    assert [bm.mme_answer(a) for a in ("YES.", "No, it is not", "It is yes")] == ["yes", "no", "other"]


@pytest.mark.parametrize("answer, expected", [
    ("B", "B"), ("b", "B"), ("B.", "B"), ("(B)", "B"), ("(C) bird", "C"), ("C: bird", "C"), ("The answer is A.", "A"),
    ("Answer: C", "C"), ("The correct option is (B)", "B"), ("dog", "B"), ("A dog.", "B"), ("It is a Bird", "C"),
    ("E", None), ("The answer is E", None), ("Apple", None), ("I am not sure", None), ("cat or dog", None),
])
def test_option_extraction(answer, expected):
    assert bm.choice_answer(answer, ["cat", "dog", "bird"]) == expected


def test_prompts_as_llava_builds_them():
    assert bm.choice_prompt("Which animal?", ["cat", "dog"], "A farm.") == (
        "Context: A farm.\nWhich animal?\nA. cat\nB. dog\nAnswer with the option's letter from the given choices "
        "directly.")
    assert bm.choice_prompt("Which?", ["x", "y", "z"], hint="  ").startswith("Which?\nA. x\nB. y\nC. z\n")
    short = "What is it?\nAnswer the question using a single word or phrase."
    assert bm.short_prompt("What is it?") == short and bm.short_prompt(short) == short  # LLaVA's files have it


def test_scienceqa_keeps_image_questions_and_open_answers_come_from_annotations(tmp_path):
    sqa = [{"question_id": i, "image": im, "question": "Which?", "options": ["a", "b", "c"], "answer": i % 3}
           for i, im in enumerate(["1.png", None, "", "4.png"])]
    questions, without = bm.read_questions("scienceqa", write_jsonl(tmp_path / "sqa.jsonl", sqa))
    assert [q.id for q in questions] == [0, 3] and without == 2 and [q.truth for q in questions] == ["A", "A"]
    with pytest.raises(bm.EvalError, match="missing field 'image'"):
        bm.read_questions("mmbench", tmp_path / "sqa.jsonl")
    vqa = write_jsonl(tmp_path / "vqa.jsonl", [{"question_id": q, "image": "x.jpg", "text": "What?"} for q in (5, 6)])
    questions, _ = bm.read_questions("vqav2", vqa)
    official = {"annotations": [{"question_id": 5, "answers": [{"answer": "yes", "answer_id": 1}] * 10},
                                {"question_id": 6, "answers": [{"answer": "2", "answer_id": 1}] * 10}]}
    (tmp_path / "ann.json").write_text(json.dumps(official))
    scored = bm.attach_truth("vqav2", questions, bm.read_annotations(tmp_path / "ann.json"), "ann.json")
    assert bm.score("vqav2", scored, {"5": {"answer": "Yes"}, "6": {"answer": "three"}}) == {"accuracy": 50.0,
                                                                                          "questions": 2}
    gqa = write_jsonl(tmp_path / "gqa.jsonl", [{"question_id": "5", "answer": "left"}])
    with pytest.raises(bm.EvalError, match="question_id 6: no annotation"):
        bm.attach_truth("gqa", questions, bm.read_annotations(gqa), "gqa.jsonl")


def test_a_half_written_last_answer_line_is_dropped(tmp_path):
    path = tmp_path / "answers.jsonl"
    path.write_text('{"question_id": 1, "answer": "yes"}\n{"question_id": 2, "answer": "n')
    assert list(er.load_answers(path)) == ["1"]
    assert path.read_text() == '{"question_id": 1, "answer": "yes"}\n'  # cut from the file too


# ---- through the command line ------------------------------------------------------------------------------


def test_pope_run_writes_answers_and_results(work, runs):
    proc = finished(runs, "pope")
    assert "question_id 3: skipped" in proc.stderr and "gone.png" in proc.stderr
    rows = read_jsonl(work / "out-pope" / "answers.jsonl")
    assert [r["question_id"] for r in rows] == [1, 2, 4, 5]
    for r in rows:
        assert isinstance(r["answer"], str) and r["prompt_tokens"] > 16
        assert len(r["visual_tokens_per_layer"]) == LAYERS and r["visual_tokens_per_layer"][0] == 16
        assert r["avg_visual_tokens"] == pytest.approx(np.mean(r["visual_tokens_per_layer"]))
        assert 0 < r["flops_ratio"] <= 1
    results = json.loads((work / "out-pope" / "results.json").read_text())
    assert results["benchmark"] == "pope" and results["prune"] == "atp" and results["mode"] == "compact"
    assert results["questions"] == 5 and results["answered"] == 4 and results["skipped"] == [3]
    assert set(results["metrics"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio", "questions",
                                       "categories"}
    assert set(results["metrics"]["categories"]) == {"random", "popular", "adversarial"}
    assert results["avg_visual_tokens"] == pytest.approx(np.mean([r["avg_visual_tokens"] for r in rows]))
    assert results["flops_ratio"] == pytest.approx(np.mean([r["flops_ratio"] for r in rows]))
    assert "f1" in proc.stdout and "flops_ratio" in proc.stdout
    assert json.loads((work / "out-pope" / "run.json").read_text())["prune"] == "atp"


def test_mmbench_with_fastv_prunes_half_after_the_first_layer(work, runs):
    finished(runs, "mmbench")
    rows = read_jsonl(work / "out-mmbench" / "answers.jsonl")  # three questions in one padded batch of four
    assert [r["question_id"] for r in rows] == ["m1", "m2", "m3"]
    assert all(r["visual_tokens_per_layer"] == [16, 8, 8, 8] and r["flops_ratio"] < 1 for r in rows)
    results = json.loads((work / "out-mmbench" / "results.json").read_text())
    assert results["prune"] == "fastv" and results["avg_visual_tokens"] == 10.0 and results["answered"] == 3
    assert set(results["metrics"]) == {"accuracy", "unanswerable", "questions", "categories"}
    assert set(results["metrics"]["categories"]) == {"animals", "colour"}


def test_a_second_run_scores_the_answers_without_loading_the_model(work, runs, eval_main, monkeypatch):
    finished(runs, "pope")
    out = work / "out-pope"
    before = (out / "answers.jsonl").read_text()
    results = json.loads((out / "results.json").read_text())

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded although every question was answered")

    monkeypatch.setattr(er, "load", no_model)
    code, stdout, err = run_main(eval_main, *pope_args(work, out))
    assert code == 0, err
    assert "4 of 5 questions already answered" in err and "question_id 3: skipped" in err  # its image is missing
    assert (out / "answers.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text()) == results and "f1" in stdout
    code, _, err = run_main(eval_main, *pope_args(work, out), "--limit", 2)
    assert code == 0, err
    again = json.loads((out / "results.json").read_text())
    assert again["questions"] == 2 and again["answered"] == 2 and again["metrics"]["questions"] == 2
    code, _, err = run_main(eval_main, *pope_args(work, out), "--prune", "fastv")
    assert code == 2 and "--prune atp there, fastv here" in err and len(err.strip().splitlines()) == 1
    (out / "results.json").write_text(json.dumps(results))


def test_a_crash_mid_line_is_resumed(work, runs):
    finished(runs, "pope")
    out = work / "out-resume"
    shutil.copytree(work / "out-pope", out)
    lines = (out / "answers.jsonl").read_text().splitlines(keepends=True)
    (out / "answers.jsonl").write_text("".join(lines[:-1]) + lines[-1][:20])  # question 5's line cut short
    proc = cli(*pope_args(work, out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dropped a half-written last line" in proc.stderr and "3 of 5 questions already answered" in proc.stderr
    rows = read_jsonl(out / "answers.jsonl")
    assert [r["question_id"] for r in rows] == [1, 2, 4, 5]
    assert rows[-1] == read_jsonl(work / "out-pope" / "answers.jsonl")[-1]  # answered again, the same greedily
    assert json.loads((out / "results.json").read_text())["answered"] == 4
