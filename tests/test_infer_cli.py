"""The inference command line on a tiny converted checkpoint with a tiny trained tokenizer.

Five CLI runs (each pays JAX start-up and compilation) start in the background, two at a time, as soon as
the first test needs them; the cheap in-process tests run meanwhile. Greedy decoding throughout.
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

from atp_jax.infer import runner as rn
from atp_jax.infer import text as tx
from atp_jax.infer.visualize import GAP, PANEL, TITLE, draw_kept
from tests.cli_helpers import finished, load_main, read_jsonl, run_main, tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "infer.py"
NEW = "17"  # max new tokens: the first token, then two decode chunks of 8 (one decode program per run)
QUESTION = "What is in the picture?"
LAYERS = 4  # LlavaConfig.tiny's decoder depth
CONTEXT = 160  # max_position_embeddings: a ~95-token prompt fits, a long question does not
# The batch file: (question, image) per line, or a raw line; `None` marks the good lines' expected ids.
GOOD = {"rgb": ("rgb.jpg", QUESTION), "grey": ("l.png", "Describe the image."),
        "grey-alpha": ("la.png", "<image>\nWhat is this?"), "palette": ("p.png", QUESTION),
        "rgba": ("rgba.png", "Is there a cat?"), "cmyk": ("cmyk.tif", QUESTION),
        "i16-png": ("i16.png", "What colour is the sky?"), "i16-tif": ("ABS:i16.tif", "Is it a cat? <image>")}


def build_checkpoint(d: Path) -> Path:
    texts = ["What is in the picture?", "Describe the image in detail.", "A cat sits on a red mat.",
             "The sky is blue and the grass is green.", "Is there a dog? What colour is it?"] * 20
    return tiny_checkpoint(d, texts, CONTEXT)


def write_images(d: Path) -> None:
    """One image per mode that needs converting, and a truncated PNG."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    rgb.save(d / "rgb.jpg")
    rgb.convert("L").save(d / "l.png")
    rgb.convert("LA").save(d / "la.png")
    rgb.convert("P").save(d / "p.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (40, 60), dtype=np.uint8)))
    rgba.save(d / "rgba.png")
    rgb.convert("CMYK").save(d / "cmyk.tif")
    i16 = Image.fromarray(rng.integers(0, 65536, (50, 30), dtype=np.uint16))
    assert i16.mode == "I;16"
    i16.save(d / "i16.png")
    i16.save(d / "i16.tif")
    whole = (d / "rgba.png").read_bytes()
    (d / "truncated.png").write_bytes(whole[:len(whole) // 2])


def write_batch(d: Path) -> Path:
    """Good lines (GOOD, in order) interleaved with bad ones; returns the file."""
    def good(key):
        image, question = GOOD[key]
        image = str(d / image[4:]) if image.startswith("ABS:") else image
        return json.dumps({"id": key, "image": image, "question": question})

    lines = [good("rgb"), '{"id": "bad-json", "image": ', good("grey"),
             json.dumps({"id": "no-image", "question": QUESTION}), good("grey-alpha"),
             json.dumps({"id": "missing-file", "image": "nope.png", "question": QUESTION}), good("palette"),
             json.dumps({"id": "truncated", "image": "truncated.png", "question": QUESTION}), "", good("rgba"),
             json.dumps({"id": "two-images", "image": "rgb.jpg", "question": "<image> and <image>"}), good("cmyk"),
             json.dumps({"id": "too-long", "image": "rgb.jpg", "question": "describe the image " * 12}),
             good("i16-png"), good("i16-tif"),
             json.dumps({"id": "escapes", "image": "../../../../etc/passwd", "question": QUESTION}),
             good("rgb").replace(QUESTION, "Again?")]
    text = ("\n".join(lines) + "\n").encode()
    bad_bytes = b'{"id": "latin-1", "image": "rgb.jpg", "question": "caf\xe9?"}\n'  # not UTF-8: only it is lost
    (d / "in.jsonl").write_bytes(text + bad_bytes)
    return d / "in.jsonl"


BAD_LINES = {2: "JSON", 4: "'image'", 6: "nope.png", 8: "truncated.png", 11: "<image>", 13: "too long",
             16: "leaves its root", 17: "duplicate id 'rgb' (first on line 1)", 18: "not valid UTF-8 (byte 0xe9"}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("infer")
    build_checkpoint(d)
    write_images(d)
    write_batch(d)
    return d


def cli(*args) -> subprocess.CompletedProcess:
    # XLA's backend optimisations take most of a tiny model's compile time and change nothing tested here.
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300, env={**os.environ, "XLA_FLAGS": flags})


@pytest.fixture(scope="module")
def runs(work):
    """The CLI runs, started two at a time; each value is a future of its CompletedProcess."""
    ckpt, image = work / "ckpt", work / "rgb.jpg"
    single = ["--checkpoint", ckpt, "--image", image, "--prompt", QUESTION, "--max-new-tokens", NEW]
    batch = ["--checkpoint", ckpt, "--batch-file", work / "in.jsonl", "--max-new-tokens", NEW]
    plans = {
        "single": [*single, "--visualize", work / "kept.png"],
        "batch4_compact": [*batch, "--output", work / "out4.jsonl", "--batch-size", 4, "--json"],
        "batch1_masked": [*batch, "--output", work / "out1.jsonl", "--batch-size", 1, "--mode", "masked"],
        "fastv_compact": [*single, "--prune", "fastv", "--json", "--compilation-cache", work / "xla-cache"],
        "fastv_masked": [*single, "--prune", "fastv", "--mode", "masked", "--json"],
    }
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)
    futures = {name: pool.submit(cli, *args) for name, args in plans.items()}
    yield futures
    pool.shutdown(wait=True)


def check_fields(result: dict) -> None:
    assert isinstance(result["answer"], str) and result["answer"] == result["answer"].strip()
    assert all(isinstance(t, int) for t in result["token_ids"]) and len(result["token_ids"]) <= int(NEW)
    per_layer = result["visual_tokens_per_layer"]
    assert len(per_layer) == LAYERS and all(isinstance(n, int) and 0 <= n <= 16 for n in per_layer)
    assert result["avg_visual_tokens"] == pytest.approx(np.mean(per_layer))
    assert result["ttft_s"] > 0 and result["decode_tokens_per_s"] >= 0


# ---- in process: user errors through launch/infer.py's main ------------------------------------------------


@pytest.fixture(scope="module")
def infer_main(runs):
    """launch/infer.py's main, imported (it needs `runs` only to start the CLI runs before these tests)."""
    return load_main(SCRIPT, "infer_cli")


def test_user_errors_exit_2_with_one_line(work, infer_main):
    ckpt, image = work / "ckpt", work / "rgb.jpg"
    bare = work / "bare"  # the weights without a tokenizer
    if not bare.exists():
        bare.mkdir()
        shutil.copytree(ckpt / "params", bare / "params")
        shutil.copy(ckpt / "atp_config.json", bare)
    cases = [
        (["--checkpoint", bare, "--image", image, "--prompt", QUESTION], "--tokenizer"),
        (["--checkpoint", ckpt, "--image", work / "gone.png", "--prompt", QUESTION], "gone.png"),
        (["--checkpoint", work / "nothing", "--image", image, "--prompt", QUESTION], "nothing"),
        (["--checkpoint", ckpt, "--image", image], "--prompt"),
        (["--checkpoint", ckpt, "--image", image, "--prompt", "hi", "--batch-file", "x"], "not both"),
        (["--checkpoint", ckpt, "--image", image, "--prompt", "hi", "--top-p", "0"], "--top-p"),
        (["--checkpoint", ckpt, "--image", image, "--prompt", "hi", "--prune", "magic"], "--prune"),
        (["--checkpoint", ckpt, "--batch-file", work / "none.jsonl", "--output", work / "o.jsonl"], "none.jsonl"),
        (["--checkpoint", ckpt, "--image", image, "--prompt", "describe the image " * 12, "--max-new-tokens", NEW],
         f"context window of {CONTEXT} tokens"),
    ]
    for args, needle in cases:
        code, out, err = run_main(infer_main, *args)
        assert code == 2 and out == "", (args, code, out, err)
        assert len(err.strip().splitlines()) == 1 and needle in err and "Traceback" not in err, (args, err)


# ---- in process: library pieces ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(work):
    from atp_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(work / "ckpt")


def test_stop_strings_cut_the_answer_and_its_tokens(tokenizer):
    ids = tokenizer("A cat sits on a red mat. USER: What is it?", add_special_tokens=False)["input_ids"]
    tokens, answer = tx.cut_at_stop(ids, tokenizer)
    assert answer == "A cat sits on a red mat."
    assert tx.decode(tokenizer, tokens).strip() == answer
    assert tx.cut_at_stop(ids[:5], tokenizer)[0] == ids[:5]  # no stop string: every token


def test_streaming_sends_exactly_the_final_answer(tokenizer):
    ids = tokenizer("The sky is blue.</s>USER: no", add_special_tokens=False)["input_ids"]
    pieces = {0: [], 1: []}
    watcher = tx.StopWatcher(tokenizer, eos_id=tokenizer.eos_token_id, rows=2,
                             on_text=lambda b, text: pieces[b].append(text))
    other = tokenizer("grass grass grass grass grass grass", add_special_tokens=False)["input_ids"]
    n = min(len(ids), len(other))
    stops = [watcher(np.array([ids[:k], other[:k]]), k) for k in range(1, n + 1)]
    assert stops[-1].tolist() == [True, False]  # the stop string ends row 0 only
    for b, row in enumerate((ids, other[:n])):
        _, answer = tx.cut_at_stop(row, tokenizer)
        watcher.finish(b, answer)
        assert len(pieces[b]) > 1 and "".join(pieces[b]) == answer  # each row streams its own answer
    assert "".join(pieces[0]) == "The sky is blue."
    # A stop string of the request's own cuts as the conversation's do, and holds back what may become one.
    assert tx.cut_at_stop(ids, tokenizer, stops=(" is",))[1] == "The sky"
    assert tx.streamable("hello US") == "hello" and tx.streamable(" a </") == "a"


def test_prompts_pad_to_a_multiple_of_64():
    ids, mask = rn.pad_prompts([np.arange(70, dtype=np.int32), np.arange(3, dtype=np.int32)], pad_id=9, multiple=64)
    assert ids.shape == mask.shape == (2, 128) and mask.sum(1).tolist() == [70, 3]
    assert (ids[1, 3:] == 9).all() and ids[0, :70].tolist() == list(range(70))


def test_draw_kept_dims_the_pruned_patches(tmp_path):
    image = Image.new("RGB", (80, 40), (200, 180, 160))  # wide: padded to a square first
    out = draw_kept(image, [[0, 5, 6], [5]], grid=4, layers=[4, 14], out_path=tmp_path / "k.png", panel=64)
    with Image.open(out) as png:
        assert png.size == (2 * (64 + GAP) + GAP, 64 + TITLE + 2 * GAP)
        top = GAP + TITLE
        first = np.asarray(png.convert("RGB"))[top:top + 64, GAP:GAP + 64].astype(int)
    kept, pruned = first[18:30, 18:30], first[34:46, 50:62]  # inside patch 5 (row 1, col 1) and 11 (row 2, col 3)
    assert kept.mean() > 2 * pruned.mean()
    assert [p.name for p in tmp_path.iterdir()] == ["k.png"]  # written atomically, nothing else left
    with pytest.raises(ValueError):
        draw_kept(image, [[0]], grid=4, layers=[1, 2], out_path=tmp_path / "x.png")


def test_requests_are_answered_alone_or_batched_alike_and_bad_ones_get_their_error(work):
    """The library's entry point: per-request settings, per-request errors in library terms (the command line
    names the flag), and batched answers equal to single ones."""
    from atp_jax.cli import user_message

    runner = rn.load(work / "ckpt", prune="atp", mode="compact")
    requests = [rn.Request(QUESTION, work / "rgb.jpg", max_new_tokens=5),
                rn.Request(QUESTION, work / "gone.png", max_new_tokens=5),
                rn.Request("Describe the image.", work / "l.png", max_new_tokens=5),
                rn.Request(QUESTION, work / "rgb.jpg", max_new_tokens=0),
                rn.Request("Is there a cat?", work / "rgba.png", max_new_tokens=3)]
    results = dict(runner.answers(requests, batch_size=2))
    assert sorted(results) == [0, 1, 2, 3, 4]
    assert isinstance(results[1], rn.InferError) and "gone.png" in str(results[1])
    assert isinstance(results[3], rn.OptionError) and str(results[3]) == "max_new_tokens 0: must be at least 1"
    assert user_message(results[3]) == "--max-new-tokens 0: must be at least 1"
    for i in (0, 2, 4):  # 0 and 2 went as one batch, 4 alone (other settings)
        alone = runner.answer([requests[i].question], [requests[i].image], requests[i].max_new_tokens)[0]
        assert results[i]["token_ids"] == alone["token_ids"], i
        assert results[i]["visual_tokens_per_layer"] == alone["visual_tokens_per_layer"], i
    with pytest.raises(rn.OptionError, match="batch_size 0"):
        list(runner.answers(requests, batch_size=0))


# ---- through the command line ------------------------------------------------------------------------------


def test_single_image_streams_the_answer_then_the_statistics_and_draws_the_kept_patches(work, runs):
    out = finished(runs, "single").stdout
    answer, stats = out.split("\n\nvisual tokens per decoder layer", 1)
    per_layer = [int(n) for n in stats.split("):", 1)[1].split("\n", 1)[0].split()]
    assert len(per_layer) == LAYERS and per_layer[0] == 16 and per_layer[-1] < 16  # ATP pruned something
    for text in ("average visual tokens:", "time to first token:", "tokens/s"):
        assert text in stats
    assert "untrained" in runs["single"].result().stderr  # no trained thresholds in this checkpoint
    # The streamed answer is the answer of the same line of the batch run.
    finished(runs, "batch4_compact")
    assert answer == next(r["answer"] for r in read_jsonl(work / "out4.jsonl") if r["id"] == "rgb")
    with Image.open(work / "kept.png") as png:  # three ATP modules on a 4-layer decoder: three panels
        assert png.format == "PNG" and png.width == 3 * (PANEL + GAP) + GAP and png.height > PANEL


def test_batch_file_skips_bad_lines_by_number_and_answers_the_rest_in_order(work, runs):
    proc = finished(runs, "batch4_compact")
    for number, why in BAD_LINES.items():
        line = next((x for x in proc.stderr.splitlines() if f"in.jsonl:{number}: skipped" in x), None)
        assert line is not None and why in line, (number, proc.stderr)
    assert f"answered {len(GOOD)} of {len(GOOD) + len(BAD_LINES)} lines; {len(BAD_LINES)} failed" in proc.stderr
    results = read_jsonl(work / "out4.jsonl")
    assert [r["id"] for r in results] == list(GOOD)  # every good line (all image modes), in input order
    for r in results:
        check_fields(r)
    assert [json.loads(x) for x in proc.stdout.splitlines()] == results  # --json echoes the lines
    assert not list(work.glob(".out4.jsonl*"))  # no temporary file left behind


def test_batches_of_four_compact_equal_one_at_a_time_masked(work, runs):
    """Batched compact (4 + 4) against single masked runs: batching and the mode change nothing."""
    finished(runs, "batch4_compact")
    finished(runs, "batch1_masked")
    four, one = read_jsonl(work / "out4.jsonl"), read_jsonl(work / "out1.jsonl")
    assert [r["id"] for r in one] == [r["id"] for r in four]
    for a, b in zip(four, one, strict=True):
        assert a["token_ids"] == b["token_ids"] and a["answer"] == b["answer"], a["id"]
        assert a["visual_tokens_per_layer"] == b["visual_tokens_per_layer"], a["id"]


def test_the_persistent_compilation_cache_is_written(work, runs):
    finished(runs, "fastv_compact")
    assert any((work / "xla-cache").iterdir())


def test_fastv_masked_and_compact_give_the_same_tokens_as_json(runs):
    compact, masked = (json.loads(finished(runs, name).stdout) for name in ("fastv_compact", "fastv_masked"))
    for result in (compact, masked):
        check_fields(result)
        assert result["visual_tokens_per_layer"] == [16, 8, 8, 8]  # FastV drops half after layer 0
    assert compact["token_ids"] == masked["token_ids"] and compact["answer"] == masked["answer"]
    assert "untrained" not in runs["fastv_compact"].result().stderr
