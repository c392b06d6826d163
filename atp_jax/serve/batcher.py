"""Requests that arrive together answered as one batch, on one worker thread that owns the model.

A request waits in a bounded queue (full: `Busy`, the server's 503). The worker takes the oldest one, gathers
those that come within `window_s` with the same generation settings, up to `max_batch`, and answers them with
one prefill and one decode (per-instance pruning: a row's answer does not depend on its batch). Each row's text
streams to its request as it is decoded; a request whose client is gone or whose deadline passed stops
decoding at the next chunk.
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
from atp_jax.infer.runner import Prompt, Runner


class Busy(Exception):
    """The queue is full: try again later."""


@dataclasses.dataclass(eq=False)
class Job:
    prompt: Prompt
    max_new_tokens: int
    sampling: Sampling
    seed: int
    stops: tuple[str, ...]
    deadline: float  # time.monotonic() after which nobody waits for the answer
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    started: float | None = None  # when its batch started
    on_text: Callable[[str], None] | None = None  # called on the worker thread with each new piece of text
    done: concurrent.futures.Future = dataclasses.field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)

    @property
    def settings(self) -> tuple:
        return self.max_new_tokens, self.sampling, self.seed, self.stops

    def gone(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class Batcher:
    def __init__(self, runner: Runner, max_batch: int = 8, max_queue: int = 64, window_s: float = 0.01):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be at least 1")
        self.runner, self.max_batch, self.window_s = runner, max_batch, window_s
        self.queue: queue.Queue[Job | None] = queue.Queue(max_queue)
        self.held: collections.deque[Job] = collections.deque()  # taken from the queue, for a later batch
        self.batches: list[int] = []  # the size of every batch run, in order
        self.kv_bytes: list[int] = []  # the KV cache each batch held, in order
        self.thread = threading.Thread(target=self._loop, name="atp_jax-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> Job:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise Busy from None
        return job

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _next(self, timeout: float | None) -> Job | None:
        if self.held:
            return self.held.popleft()
        return self.queue.get(timeout=timeout) if timeout is None or timeout > 0 else self.queue.get_nowait()

    def _gather(self, first: Job) -> list[Job]:
        batch, aside = [first], []
        end = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                job = self._next(end - time.monotonic())
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # close() after this batch
                break
            (batch if job.settings == first.settings else aside).append(job)
        self.held.extend(aside)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch = []
            for job in self._gather(first):
                if job.gone():  # nobody waits for it any more
                    job.done.cancel()
                else:
                    batch.append(job)
            if not batch:
                continue
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        max_new_tokens, sampling, seed, stops = batch[0].settings
        for job in batch:
            job.started = time.monotonic()

        def on_row_text(b: int, text: str) -> None:
            if batch[b].on_text is not None and not batch[b].gone():
                batch[b].on_text(text)

        try:
            results = self.runner.run([job.prompt for job in batch], max_new_tokens, sampling, seed,
                                      on_row_text=on_row_text, stops=stops,
                                      cancelled=lambda: np.array([job.gone() for job in batch]))
        except Exception as e:  # every waiting request hears of it
            for job in batch:
                job.done.set_exception(e)
            return
        self.kv_bytes.append(results[0]["batch_kv_cache_bytes"])
        self.batches.append(len(batch))
        for job, result in zip(batch, results, strict=True):
            job.done.set_result(result)
