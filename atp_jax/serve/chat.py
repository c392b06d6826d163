"""The OpenAI chat-completions request as atp_jax reads it, and the response objects it answers with.

One user message with its text and one image (`image_url` part: a base64 `data:` URL, or a local path under
the directory the operator allows); the settings `max_tokens` (or `max_completion_tokens`), `temperature`,
`top_p`, `seed`, `stop`, `stream`. Every problem is an `ApiError` carrying the HTTP status and an OpenAI-style
error body.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import time
import uuid
from pathlib import Path

from atp_jax.fileio import inside
from atp_jax.infer.generate import Sampling

DEFAULT_MAX_TOKENS = 256
MAX_STOPS = 4  # as the OpenAI API


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclasses.dataclass
class ChatRequest:
    question: str
    image: object  # encoded bytes (a data URL) or a path under the allowed directory
    max_tokens: int
    sampling: Sampling
    seed: int
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    picture: bool  # `atp_picture: true`: the answer's `atp` object carries the kept-patches picture


def _number(body: dict, name: str, kind, default, lo=None, hi=None, lo_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ApiError(400, f"'{name}' must be a number" if kind is not int else f"'{name}' must be an integer",
                       name)
    if lo is not None and (value <= lo if lo_open else value < lo) or hi is not None and value > hi:
        bounds = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ApiError(400, f"'{name}' {value} is out of range {bounds}", name)
    return value


def _image(url: str, image_dir: Path | None):
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise ApiError(400, "image data URLs must be base64 (data:image/...;base64,...)", "messages")
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the image data URL is not valid base64", "messages") from None
    if url.startswith(("http://", "https://")):
        raise ApiError(400, "image URLs are not fetched by this server: send the image as a base64 data URL",
                       "messages")
    if image_dir is None:
        raise ApiError(400, "local image paths are not allowed on this server: send a base64 data URL", "messages")
    path = url[len("file://"):] if url.startswith("file://") else url
    try:
        return inside(image_dir, os.path.relpath(path, image_dir) if os.path.isabs(path) else path)
    except ValueError:
        raise ApiError(400, f"image path {path}: outside the allowed image directory", "messages") from None


def parse(body, model_names: tuple[str, ...], image_dir: Path | None) -> ChatRequest:
    """A chat-completions body (the parsed JSON) as a ChatRequest; ApiError for what atp_jax cannot answer."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", "model")
    if model not in model_names:
        raise ApiError(404, f"the model '{model}' does not exist; this server has {', '.join(model_names)}",
                       "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", "n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        raise ApiError(400, "one user message is supported (a question about one image)", "messages")
    content = messages[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ApiError(400, "a message's 'content' must be a string or a list of parts", "messages")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and isinstance(part.get("image_url"), dict | str):
            url = part["image_url"]["url"] if isinstance(part["image_url"], dict) else part["image_url"]
            if not isinstance(url, str):
                raise ApiError(400, "an image_url part needs a 'url' string", "messages")
            images.append(url)
        else:
            raise ApiError(400, "message parts must be {'type': 'text', 'text': ...} or "
                                "{'type': 'image_url', 'image_url': {'url': ...}}", "messages")
    if len(images) != 1:
        raise ApiError(400, f"the message must hold exactly one image, got {len(images)}", "messages")
    question = "\n".join(texts).strip()
    if not question:
        raise ApiError(400, "the message has no text: ask a question about the image", "messages")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", int, DEFAULT_MAX_TOKENS, lo=1)
    temperature = _number(body, "temperature", int | float, 1.0, lo=0, hi=2)
    top_p = _number(body, "top_p", int | float, 1.0, lo=0, hi=1, lo_open=True)
    seed = _number(body, "seed", int, 0)
    stop = body.get("stop") or ()
    stops = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stops, list | tuple) or not all(isinstance(s, str) and s for s in stops) \
            or len(stops) > MAX_STOPS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOPS} of them", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    picture = body.get("atp_picture", False)
    if not isinstance(picture, bool):
        raise ApiError(400, "'atp_picture' must be true or false", "atp_picture")
    return ChatRequest(question, _image(images[0], image_dir), max_tokens,
                       Sampling(temperature=float(temperature), top_p=float(top_p)), seed, tuple(stops), stream,
                       bool(isinstance(options, dict) and options.get("include_usage")), picture)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def extension(result: dict, flops_ratio: float, ttft_s: float, picture: str | None = None) -> dict:
    """What ATP did for this request: visual tokens per decoder layer, their average, the prefill FLOPs ratio,
    the time to first token as the server measured it (from the request's arrival, queue included); with
    `picture` (a PNG data URL) the patches kept after each pruning module."""
    out = {"visual_tokens_per_layer": result["visual_tokens_per_layer"],
           "avg_visual_tokens": result["avg_visual_tokens"], "prefill_flops_ratio": flops_ratio,
           "time_to_first_token_s": ttft_s}
    return out if picture is None else out | {"kept_picture": picture}


def usage(result: dict) -> dict:
    prompt, completion = result["prompt_tokens"], len(result["token_ids"])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(cid: str, model: str, result: dict, atp: dict) -> dict:
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result["answer"]},
                         "finish_reason": result["finish_reason"], "logprobs": None}],
            "usage": usage(result), "atp": atp}


def chunk(cid: str, model: str, delta: dict, finish_reason: str | None = None, **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}
