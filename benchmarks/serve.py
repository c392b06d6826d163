"""Load on the OpenAI-compatible server: unpruned against ATP compact, on the shared benchmark model, in one run.

  python benchmarks/serve.py [--clients 4] [--requests 16] [--new-tokens 32] [--max-batch 4] [--time-limit 900]

For each method the app (`atp_jax.serve`) runs on 127.0.0.1 in this process and `--clients` client threads
send `--requests` streamed chat requests between them (an image and a question each; greedy, `--new-tokens`
tokens), each client waiting for its answer before sending the next; a pass stops early at `--time-limit`
seconds. The same pass runs until one compiles nothing (at most 12 times: the batch sizes, prompt-length buckets and
pool shapes the timing happens to combine, and ATP's capacities, need their programs); that pass is the one
measured. Its XLA compiles (0 unless the limit was reached) and the passes run are reported.
Figures: requests/s, p50 and p99 time to first token (as the server measures it from the request's arrival:
the random model's tokens mostly decode to no text, so a client sees its first text late) and latency (the
client's, to the last chunk), completion tokens/s, the server's prefill batch sizes and the most rows decoding
at once (continuous batching: a request joins the running decode between chunks), the largest KV cache the
decode pool held and the largest per row of it (a request's share), the average visual tokens. The model:
random weights and a tiny trained tokenizer (the answers are noise; only their cost matters); ATP's thresholds
set for ~25% average visual tokens as in benchmarks/prefill.py. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402
from flax import nnx  # noqa: E402
from PIL import Image  # noqa: E402

from atp_jax import LlavaForConditionalGeneration  # noqa: E402
from atp_jax.data.conversation import template_text  # noqa: E402
from atp_jax.data.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402
from atp_jax.infer.runner import Runner  # noqa: E402
from atp_jax.pruning.config import PruningConfig  # noqa: E402
from atp_jax.pruning.engine import PrunedLlava  # noqa: E402
from atp_jax.serve.app import ServeOptions, create_app  # noqa: E402
from atp_jax.testing.reference import random_inputs  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, bench_config, emit, environment, print_table  # noqa: E402
from benchmarks.prefill import calibrate_atp  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
MAX_PASSES = 12
QUESTIONS = ("What is in the picture?", "Describe the image in detail.", "What colour is the largest object?",
             "How many objects are there, and where are they?")


def image_url(seed: int, size: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def serve(runner: Runner, max_batch: int):
    app = create_app(runner, ServeOptions(model_name="bench", max_batch=max_batch, batch_window_s=0.02))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return app, server, thread, f"http://127.0.0.1:{port}"


def one_request(client: httpx.Client, url: str, seed: int, new_tokens: int, size: int) -> dict:
    content = [{"type": "text", "text": QUESTIONS[seed % len(QUESTIONS)]},
               {"type": "image_url", "image_url": {"url": image_url(seed, size)}}]
    body = {"model": "bench", "stream": True, "temperature": 0, "max_tokens": new_tokens,
            "messages": [{"role": "user", "content": content}]}
    start = time.perf_counter()
    atp, finish = None, None
    with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            atp = chunk.get("atp", atp)
            finish = chunk["choices"][0]["finish_reason"] if chunk["choices"] else finish
    return {"ttft_s": atp["time_to_first_token_s"], "latency_s": time.perf_counter() - start, "atp": atp,
            "finish": finish}


def load(url: str, clients: int, requests: int, new_tokens: int, size: int, time_limit: float, seed0: int) -> dict:
    results, lock, counter = [], threading.Lock(), iter(range(requests))
    deadline = time.perf_counter() + time_limit

    def client_loop():
        with httpx.Client(timeout=time_limit) as client:
            while time.perf_counter() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                r = one_request(client, url, seed0 + i, new_tokens, size)
                with lock:
                    results.append(r)

    start = time.perf_counter()
    threads = [threading.Thread(target=client_loop) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"wall_s": wall, "results": results}


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds per method at most")
    args = parser.parse_args()
    cfg = bench_config()
    llava = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(SEED))
    ids, pixels = random_inputs(cfg, 1, TEXT_TOKENS, seed=SEED)
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(list(QUESTIONS) * 40 + template_text() * 5, Path(tmp) / "tok", vocab_size=600)
        tokenizer = load_tokenizer(Path(tmp) / "tok")
    models = {"unpruned": PrunedLlava(llava, PruningConfig(method="none"), rngs=nnx.Rngs(SEED)),
              "atp_compact": calibrate_atp(llava, ids, pixels)}
    print(f"{environment()}; shared benchmark model, {args.clients} clients, {args.requests} streamed requests, "
          f"{args.new_tokens} new tokens each, max batch {args.max_batch}")
    figures = {"env": environment(), "clients": args.clients, "requests": args.requests,
               "new_tokens": args.new_tokens, "max_batch": args.max_batch}
    rows, compiles = [], []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(event) if event == COMPILE_EVENT else None)
    for name, model in models.items():
        runner = Runner(pruned=model, tokenizer=tokenizer, mode="compact", trained=True, checkpoint=Path("bench"))
        app, server, thread, url = serve(runner, args.max_batch)
        try:
            stats, passes, before = app.state.batcher.stats, 0, -1
            while passes < MAX_PASSES and len(compiles) != before:  # the first pass that compiles nothing is measured
                stats.reset()
                passes, before = passes + 1, len(compiles)
                run = load(url, args.clients, args.requests, args.new_tokens, cfg.vision.image_size, args.time_limit, 0)
        finally:
            server.should_exit = True
            thread.join(timeout=30)
            app.state.batcher.close()
        done = run["results"]
        ttft, latency = [r["ttft_s"] for r in done], [r["latency_s"] for r in done]
        tokens = len(done) * args.new_tokens if all(r["finish"] == "length" for r in done) else None
        f = {"answered": len(done), "wall_s": run["wall_s"], "requests_per_s": len(done) / run["wall_s"],
             "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
             "latency_p50_s": percentile(latency, 50), "latency_p99_s": percentile(latency, 99),
             "tokens_per_s": tokens / run["wall_s"] if tokens else None,
             "all_ran_to_length": tokens is not None, "compiles": len(compiles) - before, "passes": passes,
             "prefill_batches": dict(sorted(stats.prefills.items())), "decode_chunks": stats.chunks,
             "peak_rows_busy": stats.peak_busy, "peak_kv_cache_bytes": stats.peak_kv_bytes,
             "peak_kv_cache_bytes_per_request": stats.peak_kv_bytes_per_row,
             "avg_visual_tokens": statistics.mean(r["atp"]["avg_visual_tokens"] for r in done)}
        figures[name] = f
        rows.append([name, f"{f['avg_visual_tokens']:.0f}", str(f["answered"]), f"{f['requests_per_s']:.2f}",
                     f"{1e3 * f['ttft_p50_s']:.0f} / {1e3 * f['ttft_p99_s']:.0f}",
                     f"{1e3 * f['latency_p50_s']:.0f} / {1e3 * f['latency_p99_s']:.0f}",
                     f"{f['tokens_per_s']:.1f}" if f["tokens_per_s"] else "-",
                     f"{f['peak_kv_cache_bytes'] / 2**20:.1f} / {f['peak_kv_cache_bytes_per_request'] / 2**20:.1f}",
                     " ".join(f"{n}x{size}" for size, n in f["prefill_batches"].items()), str(f["peak_rows_busy"]),
                     str(f["compiles"])])
    print_table("load", ["method", "avg visual", "answered", "req/s", "TTFT p50 / p99 ms", "latency p50 / p99 ms",
                         "tokens/s", "peak KV MiB: pool / row", "prefills (count x size)", "rows busy", "compiles"],
                rows)
    a, u = figures["atp_compact"], figures["unpruned"]
    figures["atp_over_unpruned"] = {
        "requests_per_s": a["requests_per_s"] / u["requests_per_s"], "ttft_p50": a["ttft_p50_s"] / u["ttft_p50_s"],
        "kv_cache_per_request": a["peak_kv_cache_bytes_per_request"] / u["peak_kv_cache_bytes_per_request"]}
    print("ATP / unpruned: requests/s {requests_per_s:.2f}, TTFT p50 {ttft_p50:.2f}, KV cache per request "
          "{kv_cache_per_request:.2f}".format(**figures["atp_over_unpruned"]))
    emit(figures)


if __name__ == "__main__":
    main()
