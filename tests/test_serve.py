"""The OpenAI-compatible server on a tiny converted checkpoint, called with the official `openai` client.

The server runs in this process (uvicorn on a thread) on 127.0.0.1 and a free port, with an API key; greedy
answers are compared with the inference library's answers to the same question and image.
"""

import base64
import concurrent.futures
import dataclasses
import io
import shutil
import socket
import struct
import threading
import time
import types
import zlib
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from PIL import Image

from atp_jax.infer import runner as rn
from atp_jax.serve.app import ServeOptions, create_app
from tests.cli_helpers import load_main, run_main, tiny_checkpoint

KEY = "test-key"
MODEL = "tiny-llava"
QUESTION = "What is in the picture?"


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def huge_png_header(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (refused before anything is decoded)."""
    data = bytearray(png(Image.new("L", (1, 1))))
    ihdr = bytearray(data[16:29])  # the IHDR chunk's data: width, height, depth, colour type, ...
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 60 - 3 * i, 3), dtype=np.uint8)) for i in range(8)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    texts = ["What is in the picture?", "Describe the image in detail.", "A cat sits on a red mat.",
             "The sky is blue and the grass is green.", "Is there a dog? What colour is it?"] * 20
    ckpt = tiny_checkpoint(d, texts, context=160)
    runner = rn.load(ckpt, prune="atp", mode="compact")
    app = create_app(runner, ServeOptions(model_name=MODEL, api_key=KEY, max_batch=8, batch_window_s=0.2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    assert server.started
    yield {"runner": runner, "app": app, "url": f"http://127.0.0.1:{port}", "checkpoint": ckpt}
    server.should_exit = True
    thread.join(timeout=10)
    app.state.batcher.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def ask(client, image_bytes: bytes, question: str = QUESTION, **kw):
    content = [{"type": "text", "text": question}, {"type": "image_url", "image_url": {"url": data_url(image_bytes)}}]
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          temperature=0, max_tokens=kw.pop("max_tokens", 9), **kw)


def single(server, image: Image.Image, max_tokens: int = 9) -> dict:
    return server["runner"].answer([QUESTION], [image], max_tokens)[0]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}


def test_plain_and_streamed_answers_equal_the_library(server, client, images):
    want = single(server, images[0])
    assert want["answer"]  # something to compare: the random tiny model does not stop at once
    got = ask(client, png(images[0]))
    assert got.choices[0].message.content == want["answer"]
    assert got.usage.prompt_tokens == want["prompt_tokens"]
    assert got.usage.completion_tokens == len(want["token_ids"])
    assert got.choices[0].finish_reason in ("stop", "length")
    atp = got.model_extra["atp"]
    assert atp["visual_tokens_per_layer"] == want["visual_tokens_per_layer"]
    assert atp["visual_tokens_per_layer"][-1] < atp["visual_tokens_per_layer"][0]  # ATP pruned something
    assert 0 < atp["prefill_flops_ratio"] < 1
    stream = ask(client, png(images[0]), stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want["answer"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == got.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == len(want["token_ids"])


def test_concurrent_requests_are_batched_and_equal_their_single_answers(server, client, images):
    stats = server["app"].state.batcher.stats
    stats.reset()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda im: ask(client, png(im)).choices[0].message.content, images))
    assert answers == [single(server, im)["answer"] for im in images]
    assert max(stats.prefills) > 1 and stats.peak_busy > 1  # some arrived together and shared a prefill


def test_a_finished_request_frees_its_row_for_a_waiting_one(server, images):
    """Continuous batching with two rows: a long request keeps decoding while short ones finish and others take
    their row; greedy answers equal the library's single answers; sampled ones equal them for the same seed."""
    from atp_jax.infer.generate import Sampling
    from atp_jax.infer.slots import SlotDecoder
    from atp_jax.serve.batcher import Batcher, Job

    runner = server["runner"]
    sampled = Sampling(temperature=0.9, top_k=20, top_p=0.9)
    asks = [(images[0], 40, Sampling(), 0), (images[1], 3, Sampling(), 0), (images[2], 5, sampled, 7),
            (images[3], 2, Sampling(), 0)]
    for mode in ("compact", "masked"):
        one = dataclasses.replace(runner, mode=mode)
        batcher = Batcher(SlotDecoder(one, max_rows=2), window_s=0.0)
        finished = {}
        jobs = [Job(one.prepare(QUESTION, im, n), n, sampling, seed, (), deadline=time.monotonic() + 120)
                for im, n, sampling, seed in asks]
        for i, job in enumerate(jobs):
            job.done.add_done_callback(lambda _, i=i, f=finished: f.setdefault(i, time.monotonic()))
            batcher.submit(job)
        results = [job.done.result(120) for job in jobs]
        batcher.close()
        want = [one.answer([QUESTION], [im], n, sampling, seed)[0] for im, n, sampling, seed in asks]
        assert [r["token_ids"] for r in results] == [w["token_ids"] for w in want], mode
        assert [r["answer"] for r in results] == [w["answer"] for w in want], mode
        assert results[0]["finish_reason"] == "length" and len(results[0]["token_ids"]) == 40, mode
        assert jobs[3].started < finished[0]  # the last one ran in a freed row while the first still decoded
        assert batcher.stats.peak_busy == 2 and batcher.decoder.busy == 0


def test_bad_requests_get_openai_errors_and_the_server_keeps_answering(server, client, images):
    good = png(images[1])

    def content(*parts):
        return [{"role": "user", "content": list(parts)}]

    text = {"type": "text", "text": QUESTION}

    def image(url):
        return {"type": "image_url", "image_url": {"url": url}}

    cases = [
        (dict(messages=content(text)), 400, "exactly one image"),
        (dict(messages=content(text, image(data_url(good)), image(data_url(good)))), 400, "exactly one image"),
        (dict(messages=content(text, image("data:image/png;base64,@@not base64@@"))), 400, "base64"),
        (dict(messages=content(text, image(data_url(b"these bytes are no image")))), 400, "<bytes>"),
        (dict(messages=content(text, image(data_url(huge_png_header(20000, 20000))))), 400, "pixels"),
        (dict(messages=content(text, image("https://example.com/cat.png"))), 400, "not fetched"),
        (dict(messages=content({"type": "text", "text": "describe the image " * 30}, image(data_url(good)))), 400,
         "context window"),
        (dict(messages=content(text, image(data_url(good))), model="gpt-4o"), 404, "does not exist"),
        (dict(messages=content(text, image(data_url(good))), top_p=0), 400, "top_p"),
    ]
    for kw, status, needle in cases:
        kw = {"model": MODEL, "max_tokens": 4, "temperature": 0} | kw
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**kw)
        assert info.value.status_code == status, (needle, info.value)
        error = info.value.body
        assert needle in error["message"] and error["type"], (needle, error)
    raw = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json",
                     headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert raw.status_code == 400 and "not valid JSON" in raw.json()["error"]["message"]
    wrong = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert ask(client, good).choices[0].message.content == single(server, images[1])["answer"]


def test_metrics_count_what_was_served(server):
    text = httpx.get(server["url"] + "/metrics").text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    answered = values['atp_jax_requests_total{status="200"}']
    assert answered >= 11 and values['atp_jax_requests_total{status="400"}'] >= 8  # the tests above
    assert values['atp_jax_requests_total{status="404"}'] >= 1
    assert values["atp_jax_time_to_first_token_seconds_count"] == answered
    assert values["atp_jax_request_latency_seconds_sum"] >= values["atp_jax_time_to_first_token_seconds_sum"] > 0
    assert values["atp_jax_generated_tokens_total"] > 0
    assert 0 < values["atp_jax_kept_visual_tokens_sum"] / values["atp_jax_kept_visual_tokens_count"] < 16


def test_the_page_streams_an_answer_and_shows_the_kept_patches(server, images, tmp_path):
    """Headless Chromium (Debian's chromium and chromium-driver) on the page at /: upload, ask, read."""
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    path = tmp_path / "asked.png"
    images[2].save(path)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000"):
        options.add_argument(flag)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.get(server["url"] + "/")
        driver.find_element(By.ID, "image").send_keys(str(path))
        driver.find_element(By.ID, "max-tokens").clear()
        driver.find_element(By.ID, "max-tokens").send_keys("9")
        driver.find_element(By.ID, "key").send_keys(KEY)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 120).until(
            lambda d: d.find_element(By.ID, "kept").get_attribute("data-ready") == "1"
            or d.find_element(By.ID, "error").text)
        assert driver.find_element(By.ID, "error").text == ""
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "answer").get_attribute("data-done") == "1")
        want = single(server, images[2])["answer"]
        assert want and driver.find_element(By.ID, "answer").text == want
        width = driver.execute_script("return document.getElementById('kept').naturalWidth")
        assert width > 3 * 100  # three module panels side by side
        assert "visual tokens per decoder layer: 16" in driver.find_element(By.ID, "tokens").text
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 0
    finally:
        driver.quit()


def test_a_full_queue_refuses_at_once_and_a_gone_request_is_dropped():
    """The batcher alone, over a stand-in decoder whose prefill waits until released."""
    from atp_jax.infer.generate import Sampling
    from atp_jax.infer.slots import Admitted
    from atp_jax.serve.batcher import Batcher, Busy, Job

    release, calls = threading.Event(), []

    class Tokenizer:
        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

    class Waiting:  # answers every request with one token
        runner = types.SimpleNamespace(tokenizer=Tokenizer(), eos_id=2)
        max_rows, busy, rows, kv_bytes = 2, 0, 0, 0
        free = 2

        def admit(self, prompts, specs):
            calls.append(len(prompts))
            release.wait(30)
            return [Admitted(len(calls) * 10 + i, 5, np.zeros(3), np.zeros((1, 4)), 0.0) for i in range(len(prompts))]

        def release(self, ticket):
            pass

    batcher = Batcher(Waiting(), max_queue=1, window_s=0.0)

    def job(deadline=60.0):
        return Job(rn.Prompt(np.zeros(3, np.int32), None), 1, Sampling(), 0, (), deadline=time.monotonic() + deadline)

    first = batcher.submit(job())
    for _ in range(100):  # the worker takes it and waits in admit()
        if calls:
            break
        time.sleep(0.01)
    gone = batcher.submit(job())  # fills the queue
    gone.cancelled.set()  # its client left before its turn
    with pytest.raises(Busy):
        batcher.submit(job())
    release.set()
    assert first.done.result(10)["answer"] == "x"
    late = batcher.submit(job())
    assert late.done.result(10)["answer"] == "x"
    assert calls == [1, 1] and gone.done.cancelled() and batcher.stats.dropped == 1  # the gone one never ran
    batcher.close()


def test_the_command_line_refuses_mistakes_in_one_line(server, tmp_path):
    main = load_main(Path(__file__).resolve().parent.parent / "launch" / "serve.py", "serve_cli")
    ckpt = server["checkpoint"]
    cases = [(["--checkpoint", tmp_path / "nothing"], "nothing"),
             (["--checkpoint", ckpt, "--max-batch", "0"], "--max-batch"),
             (["--checkpoint", ckpt, "--prune", "magic"], "--prune"),
             (["--checkpoint", ckpt, "--image-dir", tmp_path / "none"], "--image-dir"),
             (["--checkpoint", ckpt, "--tensor", "0"], "--tensor 0")]
    for args, needle in cases:
        code, out, err = run_main(main, *args)
        assert code == 2 and out == "" and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_model_split_over_devices_answers_as_on_one(server, images):
    """--tensor 2: weights and KV cache split over two (CPU) devices; continuous batching gives the same answers."""
    from atp_jax.infer.slots import SlotDecoder
    from atp_jax.serve.batcher import Batcher, Job

    split = rn.load(server["checkpoint"], prune="atp", mode="compact", tensor=2)
    assert len(split.pruned.llava.language_model.lm_head.kernel[...].sharding.device_set) == 2
    batcher = Batcher(SlotDecoder(split, max_rows=4), window_s=0.0)
    jobs = [batcher.submit(Job(split.prepare(QUESTION, im, 9), 9, rn.GREEDY, 0, (), deadline=time.monotonic() + 60))
            for im in images[:3]]
    assert [job.done.result(60)["answer"] for job in jobs] == [single(server, im)["answer"] for im in images[:3]]
    assert batcher.decoder.pool is None  # every row released
    batcher.close()
    with pytest.raises(rn.OptionError, match="tensor 9"):
        rn.load(server["checkpoint"], tensor=9)


def test_warm_up_compiles_the_prefill_and_decode_programs_requests_then_run(server):
    from PIL import Image

    from atp_jax.infer.generate import Sampling
    from atp_jax.infer.slots import SlotDecoder, decode_chunk
    from atp_jax.pruning.prefill import prefill_program
    from atp_jax.serve.batcher import Batcher, Job

    runner = server["runner"]
    prompt = runner.prepare(QUESTION, Image.new("RGB", (30, 20), (90, 140, 30)), 16)
    decoder = SlotDecoder(runner, max_rows=2)
    assert decoder.warm_up(prompt, 16) == [1, 2]
    compiled = prefill_program._cache_size(), decode_chunk._cache_size()
    batcher = Batcher(decoder, window_s=0.0)
    jobs = [batcher.submit(Job(prompt, n, Sampling(), 0, (), deadline=time.monotonic() + 60)) for n in (7, 16, 3)]
    assert all(job.done.result(60)["token_ids"] is not None for job in jobs)
    batcher.close()
    assert (prefill_program._cache_size(), decode_chunk._cache_size()) == compiled
    app = create_app(runner, ServeOptions(model_name=MODEL, max_batch=2, warmup=True))  # --warmup: it fits the
    assert app.state.batcher.decoder.lengths is not None  # context window (160 tokens here, not 256 new ones)
    app.state.batcher.close()


def test_a_client_that_leaves_stops_its_decoding(server, client, images, monkeypatch):
    """Streamed and plain: the client goes after the first text (or a short timeout); its row is freed long
    before its budget is spent (decode chunks slowed down so that leaving comes first)."""
    batcher = server["app"].state.batcher
    step = batcher.decoder.step

    def slow_step():
        time.sleep(0.2)
        return step()

    budget = server["runner"].max_positions - single(server, images[4], 1)["prompt_tokens"]
    image = next(im for im in images if single(server, im, budget)["finish_reason"] == "length")  # no early end
    monkeypatch.setattr(batcher.decoder, "step", slow_step)
    body = {"model": MODEL, "max_tokens": budget, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "text", "text": QUESTION},
                                                       {"type": "image_url",
                                                        "image_url": {"url": data_url(png(image))}}]}]}
    headers = {"Authorization": f"Bearer {KEY}"}
    for stream in (True, False):
        batcher.stats.reset()
        started = time.monotonic()
        if stream:
            with httpx.stream("POST", server["url"] + "/v1/chat/completions", json=body | {"stream": True},
                              headers=headers, timeout=60) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first event, then the client hangs up
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(server["url"] + "/v1/chat/completions", json=body, headers=headers, timeout=0.6)
        while batcher.stats.dropped == 0 and time.monotonic() < started + 30:
            time.sleep(0.05)
        assert batcher.stats.dropped == 1, stream
        assert batcher.stats.chunks < budget // 8 - 1  # its row was freed before its budget ran out
        while batcher.decoder.busy and time.monotonic() < started + 30:
            time.sleep(0.05)
        assert batcher.decoder.busy == 0
    monkeypatch.undo()
    assert ask(client, png(images[1])).choices[0].message.content == single(server, images[1])["answer"]
