"""The answer's text: where it stops (EOS or a stop string) and what of a growing answer is safe to stream."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

STOP_STRINGS = ("</s>", "USER:")  # the vicuna_v1 turn ends; a model that runs on into a new turn is cut there


def decode(tokenizer, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def stop_index(text: str, stops: Sequence[str] = STOP_STRINGS) -> int | None:
    """Where the first stop string starts in `text`, or None."""
    found = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(found) if found else None


def cut_at_stop(tokens: list[int], tokenizer, stops: Sequence[str] = STOP_STRINGS) -> tuple[list[int], str]:
    """(the answer's tokens, the answer's stripped text): the text up to the first stop string, and the longest
    prefix of `tokens` whose text ends before it (a token that reaches into the stop string is dropped)."""
    text = decode(tokenizer, tokens)
    cut = stop_index(text, stops)
    if cut is None:
        return list(tokens), text.strip()
    n = len(tokens)
    while n > 0 and len(decode(tokenizer, tokens[:n])) > cut:
        n -= 1
    return list(tokens[:n]), text[:cut].strip()


def streamable(text: str, stops: Sequence[str] = STOP_STRINGS) -> str:
    """The part of a growing answer that is safe to print: without trailing whitespace (the final answer is
    stripped), an unfinished UTF-8 character, or an ending that may become a stop string."""
    text = text.lstrip().rstrip().rstrip("\ufffd")
    longest = max(len(s) for s in stops) - 1
    for k in range(min(longest, len(text)), 0, -1):
        if any(s.startswith(text[-k:]) for s in stops):
            return text[:-k].rstrip()
    return text


class StopWatcher:
    """generate()'s `on_tokens` callback: stops a row once its text holds a stop string and streams each row's
    text through `on_text(row, new_text)` (the whole row is decoded each time; the new suffix is sent)."""

    def __init__(self, tokenizer, eos_id: int, rows: int, on_text: Callable[[int, str], None] | None = None,
                 stops: Sequence[str] = STOP_STRINGS):
        self.tokenizer, self.eos_id, self.on_text, self.stops = tokenizer, eos_id, on_text, tuple(stops)
        self.stopped = np.zeros(rows, bool)
        self.sent = [""] * rows

    def __call__(self, tokens: np.ndarray, n: int) -> np.ndarray:
        """tokens: int32[B, n] generated so far. Returns bool[B]: rows to stop."""
        for b in np.flatnonzero(~self.stopped):
            row = tokens[b].tolist()
            if self.eos_id in row:  # finished by EOS; generate() already stops it
                row = row[:row.index(self.eos_id)]
                self.stopped[b] = True
            text = decode(self.tokenizer, row)
            cut = stop_index(text, self.stops)
            if cut is not None:
                self.stopped[b], text = True, text[:cut]
            if self.on_text is not None:
                self._send(b, streamable(text, self.stops))
        return self.stopped.copy()

    def _send(self, b: int, text: str) -> None:
        if len(text) > len(self.sent[b]) and text.startswith(self.sent[b]):
            self.on_text(b, text[len(self.sent[b]):])
            self.sent[b] = text

    def finish(self, b: int, answer: str) -> None:
        """Sends what is left of row `b`'s final answer."""
        if self.on_text is not None and answer.startswith(self.sent[b]) and len(answer) > len(self.sent[b]):
            self.on_text(b, answer[len(self.sent[b]):])
        self.sent[b] = answer
