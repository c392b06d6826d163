"""Continuous batching of requests on one worker thread that owns the model.

A request waits in a bounded queue (full: `Busy`, the server's 503). Between decode chunks the worker admits
the waiting requests into the free rows of a `SlotDecoder` (those that arrived together share one prefill;
when nothing is running it waits `window_s` for company), then decodes every running row one chunk. A row
whose request is done (EOS, its token budget, a stop string) or gone (client left, deadline passed) is freed at
once for the next request. Each row's text streams to its request as it is decoded; every row has its own
settings, so a request's answer does not depend on what it ran beside.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import numpy as np

from atp_jax.infer.generate import Sampling
from atp_jax.infer.runner import Prompt, answer_result
from atp_jax.infer.slots import Admitted, RowSpec, SlotDecoder
from atp_jax.infer.text import STOP_STRINGS, StopWatcher


class Busy(Exception):
    """The queue is full: try again later."""


class Closed(RuntimeError):
    """The server stopped before the request was answered."""


@dataclasses.dataclass(eq=False)
class Job:
    prompt: Prompt
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stops: tuple[str, ...]
    deadline: float  # time.monotonic() after which nobody waits for the answer
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None  # when its prefill started
    on_text: Callable[[str], None] | None = None  # called on the worker thread with each new piece of text
    done: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    def gone(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


@dataclasses.dataclass
class Stats:
    """What the worker did since the last `reset()`: the prefill batch sizes (size -> count), the most rows busy
    at once, the largest KV cache the pool held and the largest per row of it, the decode chunks run and the
    requests dropped because nobody waited for them any more (before or while they ran)."""

    prefills: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    peak_busy: int = 0
    peak_kv_bytes: int = 0
    peak_kv_bytes_per_row: int = 0
    chunks: int = 0
    dropped: int = 0

    def reset(self) -> None:
        self.__init__()


class Running:
    """A request in a row: its tokens so far, streamed through a StopWatcher."""

    def __init__(self, job: Job, admitted: Admitted, tokenizer, eos_id: int):
        self.job, self.admitted, self.eos_id = job, admitted, eos_id
        self.stops = STOP_STRINGS + tuple(job.stops)
        self.tokens: list[int] = []
        on_text = None if job.on_text is None else (lambda _, text: job.on_text(text) if not job.gone() else None)
        self.watcher = StopWatcher(tokenizer, eos_id, 1, on_text, self.stops)
        self.first_at = time.monotonic()

    def add(self, tokens: list[int]) -> bool:
        """Takes the row's new tokens; True once the answer is complete."""
        self.tokens += tokens
        n = len(self.tokens)
        stopped = self.watcher(np.array([self.tokens]), n)[0]
        return bool(stopped or self.eos_id in tokens or n >= self.job.max_new_tokens)

    def result(self, tokenizer) -> dict:
        row = self.tokens[:self.tokens.index(self.eos_id)] if self.eos_id in self.tokens else self.tokens
        decode_s = time.monotonic() - self.first_at
        a = self.admitted
        result = answer_result(row, tokenizer, self.stops, self.job.max_new_tokens, a.visual_per_layer, a.keep,
                               len(self.job.prompt.input_ids), a.ttft_s,
                               (len(self.tokens) - 1) / decode_s if len(self.tokens) > 1 and decode_s > 0 else 0.0)
        self.watcher.finish(0, result["answer"])
        return result


class Batcher:
    def __init__(self, decoder: SlotDecoder, max_queue: int = 64, window_s: float = 0.01):
        if max_queue < 1:
            raise ValueError("max_queue must be at least 1")
        self.decoder, self.window_s = decoder, window_s
        self.tokenizer, self.eos_id = decoder.runner.tokenizer, decoder.runner.eos_id
        self.queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self.running: dict[int, Running] = {}  # ticket -> request
        self.stats = Stats()
        self.closing = False
        self.thread = threading.Thread(target=self._loop, name="atp_jax-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job

    def close(self) -> None:
        """Stops the worker; requests not answered yet get `Closed`."""
        self.queue.put(None)
        self.thread.join()

    def _take(self, n: int, block: bool) -> list[Job]:
        """Up to `n` waiting requests. `block` (nothing runs): waits for the first one, then `window_s` for
        company; otherwise takes only what is there."""
        jobs: list[Job] = []
        try:
            job = self.queue.get() if block else self.queue.get_nowait()
        except queue.Empty:
            return jobs
        end = time.monotonic() + (self.window_s if block else 0.0)
        while True:
            if job is None:
                self.closing = True
                break
            if job.gone():  # nobody waits for it any more
                job.done.cancel()
                self.stats.dropped += 1
            else:
                jobs.append(job)
            if len(jobs) == n:
                break
            try:
                left = end - time.monotonic()
                job = self.queue.get(timeout=left) if left > 0 else self.queue.get_nowait()
            except queue.Empty:
                break
        return jobs

    def _loop(self) -> None:
        while not self.closing:
            free = self.decoder.free
            jobs = self._take(free, block=not self.running) if free else []
            if jobs:
                self._admit(jobs)
            if self.running:
                self._step()
        for running in self.running.values():
            running.job.done.set_exception(Closed("the server stopped"))
        while True:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.done.set_exception(Closed("the server stopped"))

    def _fail(self, jobs: list[Job], error: Exception) -> None:
        for job in jobs:
            if not job.done.done():
                job.done.set_exception(error)

    def _admit(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.started = time.monotonic()
        try:
            admitted = self.decoder.admit([j.prompt for j in jobs],
                                          [RowSpec(j.max_new_tokens, j.sampling, j.seed) for j in jobs])
        except Exception as e:  # every waiting request hears of it
            self._fail(jobs, e)
            return
        self.stats.prefills[len(jobs)] += 1
        for job, a in zip(jobs, admitted, strict=True):
            self.running[a.ticket] = Running(job, a, self.tokenizer, self.eos_id)
            if self.running[a.ticket].add([a.first_token]):
                self._finish(a.ticket)

    def _step(self) -> None:
        for ticket in [t for t, r in self.running.items() if r.job.gone()]:
            self.running.pop(ticket).job.done.cancel()
            self.decoder.release(ticket)
            self.stats.dropped += 1
        if not self.running:
            return
        s = self.stats
        s.chunks += 1
        s.peak_busy = max(s.peak_busy, self.decoder.busy)
        s.peak_kv_bytes = max(s.peak_kv_bytes, self.decoder.kv_bytes)
        s.peak_kv_bytes_per_row = max(s.peak_kv_bytes_per_row, self.decoder.kv_bytes // self.decoder.rows)
        try:
            new = self.decoder.step()
        except Exception as e:
            self._fail([r.job for r in self.running.values()], e)
            self.running.clear()
            self.decoder.reset()
            return
        for ticket, tokens in new.items():
            if self.running[ticket].add(tokens):
                self._finish(ticket)

    def _finish(self, ticket: int) -> None:
        running = self.running.pop(ticket)
        self.decoder.release(ticket)
        if running.job.done.done():
            return
        try:
            result = running.result(self.tokenizer)
        except Exception as e:
            running.job.done.set_exception(e)
            return
        running.job.done.set_result(result)
