"""The OpenAI-compatible HTTP server: `create_app(runner, ...)` is a FastAPI app over one loaded model.

    POST /v1/chat/completions   a question about one image; `stream: true` answers in server-sent events
    GET  /v1/models             the one model served
    GET  /                      a page: ask about an uploaded image, read the answer as it streams, see what ATP kept
    GET  /health                {"status": "ok"}
    GET  /metrics               Prometheus text: requests by status, TTFT and latency, tokens, kept visual tokens,
                                rows busy, requests waiting, the KV cache held

Requests are answered by a `Batcher` (continuous batching: requests join the running decode between chunks, those
that arrive together share a prefill, and a finished request frees its row at once). Errors come
as OpenAI-style bodies: 400 for a bad request, 401 for a wrong API key, 404 for an unknown model, 503 with
Retry-After when the queue is full, 504 when the answer took longer than the request timeout.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from atp_jax.data.images import load_image
from atp_jax.infer.runner import InferError, Runner
from atp_jax.infer.slots import SlotDecoder
from atp_jax.infer.visualize import kept_picture
from atp_jax.pruning.accounting import flops_ratio
from atp_jax.serve import chat
from atp_jax.serve.batcher import Batcher, Busy, Job
from atp_jax.serve.metrics import ServerMetrics

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there
WARMUP_QUESTION = "What is in this picture? Describe it in a few words."  # a prompt of a usual length


@dataclasses.dataclass(frozen=True)
class ServeOptions:
    model_name: str
    api_key: str | None = None
    image_dir: Path | None = None  # local image paths are allowed under it (None: data URLs only)
    max_batch: int = 8
    max_queue: int = 64
    batch_window_s: float = 0.01
    timeout_s: float = 300.0
    retry_after_s: int = 1
    warmup: bool = False  # compile the prefill and decode programs before serving (`SlotDecoder.warm_up`)


def _error(e: chat.ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


class _KeyAndCount:
    """ASGI middleware: checks the API key on /v1/ requests and counts chat-completion responses by status. (A
    plain ASGI middleware, not `@app.middleware("http")`, whose wrapped receive hides a client's disconnect.)"""

    def __init__(self, app, api_key: str | None, metrics: ServerMetrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key is not None and path.startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
                response = _error(chat.ApiError(401, "incorrect API key", code="invalid_api_key",
                                                kind="authentication_error"))
                return await response(scope, receive, send)
        if path != "/v1/chat/completions":
            return await self.app(scope, receive, send)

        async def counting(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting)


def create_app(runner: Runner, options: ServeOptions) -> FastAPI:
    app = FastAPI(title="atp_jax", docs_url=None, redoc_url=None)
    decoder = SlotDecoder(runner, options.max_batch)
    if options.warmup:
        from PIL import Image

        prompt = runner.prepare(WARMUP_QUESTION, Image.new("RGB", (runner.image_size,) * 2, (128, 128, 128)), 1)
        decoder.warm_up(prompt, max(1, min(chat.DEFAULT_MAX_TOKENS, runner.max_positions - len(prompt.input_ids))))
    batcher = Batcher(decoder, options.max_queue, options.batch_window_s)
    metrics = ServerMetrics()
    metrics.watch(lambda: decoder.busy, batcher.queue.qsize, lambda: decoder.kv_bytes)
    app.state.batcher, app.state.metrics = batcher, metrics
    models = (options.model_name,)

    app.add_middleware(_KeyAndCount, api_key=options.api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.text(), media_type="text/plain; version=0.0.4")

    def ttft(job: Job, result: dict) -> float:
        return job.started - job.arrived + result["ttft_s"]

    def record(job: Job, result: dict) -> None:
        metrics.answered(result, ttft(job, result), time.monotonic() - job.arrived)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "atp_jax"}
                                           for name in models]}

    page = (Path(__file__).parent / "page.html").read_text(encoding="utf-8")
    page = page.replace("{{MODEL}}", json.dumps(options.model_name).replace("</", "<\\/"))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return page

    def extension(req: chat.ChatRequest, job: Job, result: dict) -> dict:
        text = result["prompt_tokens"] - runner.num_image_tokens
        ratio = flops_ratio(runner.config, result["visual_tokens_per_layer"], text)
        picture = None
        if req.picture:
            cfg = runner.config
            sheet = kept_picture(load_image(req.image), result["kept"], cfg.vision.grid, list(runner.module_layers),
                                 cls_first=cfg.vision_feature_select_strategy == "full")
            buf = io.BytesIO()
            sheet.save(buf, format="PNG")
            picture = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        return chat.extension(result, ratio, ttft(job, result), picture)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return _error(chat.ApiError(400, f"the request body is not valid JSON: {e}"))
        try:
            req = chat.parse(body, models, options.image_dir)
            prompt = await run_in_threadpool(runner.prepare, req.question, req.image, req.max_tokens)
        except chat.ApiError as e:
            return _error(e)
        except InferError as e:
            return _error(chat.ApiError(400, str(e), "messages"))
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str] = asyncio.Queue()

        def on_text(text: str) -> None:  # on the batcher's thread
            loop.call_soon_threadsafe(pieces.put_nowait, text)

        job = Job(prompt, req.max_tokens, req.sampling, req.seed, req.stops,
                  deadline=time.monotonic() + options.timeout_s, on_text=on_text if req.stream else None)
        try:
            batcher.submit(job)
        except Busy:
            return _error(chat.ApiError(503, "the server is busy: too many requests waiting; retry later",
                                        code="server_busy", kind="server_error"),
                          headers={"Retry-After": str(options.retry_after_s)})
        cid = chat.completion_id()
        if req.stream:
            return StreamingResponse(_stream(job, pieces, cid, body["model"], req.include_usage,
                                             lambda result: extension(req, job, result), record),
                                     media_type="text/event-stream")
        done = asyncio.wrap_future(job.done)
        end = time.monotonic() + options.timeout_s
        try:
            while not done.done():
                await asyncio.wait({done}, timeout=min(DISCONNECT_POLL_S, max(end - time.monotonic(), 0)))
                if done.done():
                    break
                if time.monotonic() >= end:
                    job.cancelled.set()
                    return _error(chat.ApiError(504, f"no answer within {options.timeout_s:g} s", kind="timeout"))
                if await request.is_disconnected():  # nobody reads the answer: stop decoding it
                    job.cancelled.set()
                    return Response(status_code=499)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        result = done.result()
        record(job, result)
        return chat.completion(cid, body["model"], result, await run_in_threadpool(extension, req, job, result))

    return app


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _stream(job: Job, pieces: asyncio.Queue, cid: str, model: str, include_usage: bool, extension, record):
    """The server-sent events of a streamed answer: the role, the text as it is decoded, the finish reason
    with ATP's extension (and the usage, when asked), then [DONE]."""
    done = asyncio.wrap_future(job.done)
    try:
        yield _sse(chat.chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            getter = asyncio.ensure_future(pieces.get())
            finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
            if getter in finished:
                yield _sse(chat.chunk(cid, model, {"content": getter.result()}))
                continue
            getter.cancel()
            while not pieces.empty():
                yield _sse(chat.chunk(cid, model, {"content": pieces.get_nowait()}))
            break
        result = done.result()
        record(job, result)
        atp = await run_in_threadpool(extension, result)
        yield _sse(chat.chunk(cid, model, {}, result["finish_reason"], atp=atp))
        if include_usage:
            yield _sse({"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                        "choices": [], "usage": chat.usage(result)})
        yield "data: [DONE]\n\n"
    finally:  # a client that disconnects stops its generation
        job.cancelled.set()
