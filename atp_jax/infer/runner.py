"""Inference as a library: load a checkpoint with its tokenizer and pruning modules, and answer questions about
images, one batch of prompts or a list of requests (each with its own sampling settings) at a time.

Every problem a caller can cause (a missing file, no tokenizer, a bad image, a bad or too long prompt, a bad
setting) is an `InferError` with a one-line message; a bad setting is an `OptionError` naming the setting (a
command line maps the name to its flag). Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from atp_jax.infer.generate import Generation, Sampling, generate
from atp_jax.infer.text import STOP_STRINGS, StopWatcher, cut_at_stop
from atp_jax.pruning.engine import PrunedLlava

PRUNE_METHODS = ("atp", "fastv", "pdrop", "random", "none")
MODES = ("masked", "compact")
DTYPES = ("float32", "bfloat16", "float16")
PAD_MULTIPLE = 64  # prompts are padded to a multiple of this, so nearby lengths share one compiled program
DECODE_CHUNK = 8  # decode steps per jitted call: how often stop strings are checked and text is streamed
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
GREEDY = Sampling()
RESULT_FIELDS = ("answer", "token_ids", "visual_tokens_per_layer", "avg_visual_tokens", "prompt_tokens", "ttft_s",
                 "decode_tokens_per_s")


class InferError(ValueError):
    """A problem the caller caused; the message is one line, fit to print after `error:`."""


class OptionError(InferError):
    """A bad setting: `option` is its name here (e.g. "top_p"), `detail` what is wrong with it. The message reads
    "top_p 0.0: must lie in (0, 1]"; `message_for(name)` gives the same with another name for the setting."""

    def __init__(self, option: str, detail: str):
        self.option, self.detail = option, detail
        super().__init__(self.message_for(option))

    def message_for(self, name: str) -> str:
        return f"{name}{'' if self.detail.startswith(':') else ' '}{self.detail}"


@dataclasses.dataclass
class Request:
    """One question about one image (a path or a PIL image), with its own generation settings."""

    question: str
    image: object
    max_new_tokens: int = 128
    sampling: Sampling = GREEDY
    seed: int = 0


@dataclasses.dataclass
class Prompt:
    """One question ready for the model."""

    input_ids: np.ndarray  # int32[T], the image expanded to num_image_tokens placeholders
    pixels: np.ndarray  # float32[3, S, S]


@dataclasses.dataclass
class Runner:
    """A loaded model ready to answer: the pruned LLaVA, its tokenizer and the generation mode."""

    pruned: PrunedLlava
    tokenizer: object
    mode: str  # "compact" or "masked"
    trained: bool  # whether the ATP thresholds were loaded from the checkpoint (False: untrained initial ones)
    checkpoint: Path

    @property
    def config(self):
        return self.pruned.llava.config

    @property
    def image_token_id(self) -> int:
        return self.config.image_token_index

    @property
    def image_size(self) -> int:
        return self.config.vision.image_size

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_image_tokens

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None and 0 <= pad < self.config.text.vocab_size else 0  # masked out either way

    @property
    def max_positions(self) -> int:
        """The context window: prompt tokens plus new tokens must fit in it."""
        return self.config.text.max_position_embeddings

    @property
    def module_layers(self) -> tuple[int, ...]:
        """The decoder layers after which a pruning module runs (0-indexed)."""
        return tuple(self.pruned.module_layers)

    def prepare(self, question: str, image, max_new_tokens: int) -> Prompt:
        """Tokenizes `question` (an `<image>` is inserted at its start when missing) and pre-processes `image`
        (a path or a PIL image of any mode; LLaVA's pad-to-square). Raises InferError for a bad prompt, a
        prompt that does not fit the context window with `max_new_tokens`, or a bad image."""
        from atp_jax.data.conversation import SampleError, encode_prompt
        from atp_jax.data.images import ImageError, load_image, preprocess

        if not isinstance(question, str):
            raise InferError(f"the question must be a string, got {type(question).__name__}")
        try:
            ids = encode_prompt(question, self.tokenizer, self.image_token_id, self.num_image_tokens)
        except SampleError as e:
            raise InferError(f"bad prompt: {e.detail}") from e
        if len(ids) + max_new_tokens > self.max_positions:
            raise InferError(f"prompt too long: {len(ids)} tokens (the image counts {self.num_image_tokens}) + "
                             f"{max_new_tokens} new tokens exceed the model's context window of "
                             f"{self.max_positions} tokens; shorten the question or ask for fewer new tokens")
        try:
            img = image if isinstance(image, Image.Image) else load_image(image)
            pixels = preprocess(img, self.image_size, mode="pad")
        except ImageError as e:
            raise InferError(str(e)) from e
        return Prompt(ids, pixels)

    def run(self, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling = GREEDY, seed: int = 0,
            on_text: Callable[[str], None] | None = None) -> list[dict]:
        """Answers prepared prompts as one batch; `on_text(new_text)` streams the answer of a batch of one."""
        check_options(max_new_tokens, sampling)
        on_row_text = (lambda b, text: on_text(text)) if on_text is not None and len(prompts) == 1 else None
        ids, mask = pad_prompts([p.input_ids for p in prompts], self.pad_id, PAD_MULTIPLE)
        pixels = np.stack([p.pixels for p in prompts])
        watcher = StopWatcher(self.tokenizer, self.eos_id, len(prompts), on_row_text)
        gen = generate(self.pruned, ids, pixels, mask, max_new_tokens=max_new_tokens, sampling=sampling,
                       eos_id=self.eos_id, seed=seed, mode=self.mode, chunk=DECODE_CHUNK, on_tokens=watcher)
        results = [self._result(gen, b, len(p.input_ids), STOP_STRINGS, max_new_tokens)
                   for b, p in enumerate(prompts)]
        for b, result in enumerate(results):
            watcher.finish(b, result["answer"])
        return results

    def answer(self, questions: Sequence[str], images: Sequence, max_new_tokens: int = 128,
               sampling: Sampling = GREEDY, seed: int = 0, on_text: Callable[[str], None] | None = None
               ) -> list[dict]:
        """Answers a batch of questions, one image (path or PIL image) each. Each result holds `answer`,
        `token_ids`, `visual_tokens_per_layer` (one int per decoder layer), `avg_visual_tokens`, `prompt_tokens`,
        `ttft_s`, `decode_tokens_per_s` and `kept` (per pruning module, the kept visual token indices)."""
        if len(questions) != len(images):
            raise InferError(f"{len(questions)} questions for {len(images)} images")
        prompts = [self.prepare(q, im, max_new_tokens) for q, im in zip(questions, images, strict=True)]
        return self.run(prompts, max_new_tokens, sampling, seed, on_text)

    def answers(self, requests: Iterable[Request], batch_size: int = 8, fill_batches: bool = False
                ) -> Iterator[tuple[int, dict | InferError]]:
        """Answers `requests`: yields (index, result or InferError) for each one. A request whose image or prompt
        is bad yields its error at once; the others are answered in batches of up to `batch_size` consecutive
        requests with the same settings, and yielded in their order when their batch is done. `fill_batches`:
        a short batch is filled up with copies of its last prompt, so that every batch runs the programs
        compiled for `batch_size` (answers do not depend on what a prompt is batched with)."""
        if batch_size < 1:
            raise OptionError("batch_size", f"{batch_size}: must be at least 1")
        pending: list[tuple[int, Prompt]] = []
        settings = None

        def flush():
            prompts = [p for _, p in pending]
            if fill_batches:
                prompts += prompts[-1:] * (batch_size - len(prompts))
            results = self.run(prompts, *settings)[:len(pending)]
            done = [(i, r) for (i, _), r in zip(pending, results, strict=True)]
            pending.clear()
            return done

        for index, request in enumerate(requests):
            try:
                check_options(request.max_new_tokens, request.sampling)
                prompt = self.prepare(request.question, request.image, request.max_new_tokens)
            except InferError as e:
                yield index, e
                continue
            key = (request.max_new_tokens, request.sampling, request.seed)
            if pending and key != settings:
                yield from flush()
            settings = key
            pending.append((index, prompt))
            if len(pending) == batch_size:
                yield from flush()
        if pending:
            yield from flush()

    def _result(self, gen: Generation, b: int, prompt_tokens: int, stops: Sequence[str], max_new_tokens: int
                ) -> dict:
        decode_steps = gen.tokens.shape[1] - 1  # every row advances one token per step of the batch
        return answer_result(gen.row(b), self.tokenizer, stops, max_new_tokens, gen.visual_per_layer[b],
                             gen.keep[b], prompt_tokens, gen.ttft_s,
                             decode_steps / gen.decode_s if decode_steps and gen.decode_s > 0 else 0.0)


def answer_result(row: Sequence[int], tokenizer, stops: Sequence[str], max_new_tokens: int,
                  visual_per_layer: np.ndarray, keep: np.ndarray, prompt_tokens: int, ttft_s: float,
                  decode_tokens_per_s: float) -> dict:
    """One answer's result from its generated tokens `row` (EOS cut off) and what its prefill did."""
    token_ids, answer = cut_at_stop(list(row), tokenizer, stops)
    return {
        "answer": answer,
        "token_ids": token_ids,
        "visual_tokens_per_layer": [int(round(x)) for x in visual_per_layer],
        "avg_visual_tokens": float(np.mean(visual_per_layer)),
        "prompt_tokens": prompt_tokens,
        "ttft_s": ttft_s,
        "decode_tokens_per_s": decode_tokens_per_s,
        "kept": [np.flatnonzero(k > 0.5).tolist() for k in keep],
        # "length": the budget ran out before an end of sequence or a stop string
        "finish_reason": "length" if len(row) >= max_new_tokens and len(token_ids) == len(row) else "stop",
    }


# ---- loading -----------------------------------------------------------------------------------------------


def load(checkpoint: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None, prune: str = "atp",
         mode: str = "compact", dtype: str | None = None, tensor: int = 1) -> Runner:
    """The model of `checkpoint` (a converted atp_jax directory or an HF llava directory), its tokenizer (from
    `tokenizer_dir` when given, else from the checkpoint directory) and pruning by `prune`: the checkpoint's
    trained ATP thresholds when it has them, else the default placement for its depth. `tensor`: split the
    weights (and so the KV cache's heads) over this many of the local devices, as training's tensor axis does;
    the programs then run on all of them. Raises InferError."""
    import jax

    from atp_jax.convert.checkpoint import check_complete, load_pretrained
    from atp_jax.convert.readers import CheckpointError
    from atp_jax.models.config import ConfigError
    from atp_jax.pruning.checkpoint import load_pruned

    if prune not in PRUNE_METHODS:
        raise OptionError("prune", f"{prune!r}: expected one of {', '.join(PRUNE_METHODS)}")
    if mode not in MODES:
        raise OptionError("mode", f"{mode!r}: expected one of {', '.join(MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise OptionError("dtype", f"{dtype!r}: expected one of {', '.join(DTYPES)}")
    if not 1 <= tensor <= jax.local_device_count():
        raise OptionError("tensor", f"{tensor}: must lie in [1, {jax.local_device_count()}], the devices here "
                          f"({jax.local_devices()[0].platform})")
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise InferError(f"checkpoint {checkpoint}: no such directory")
    try:
        check_complete(checkpoint)
    except CheckpointError as e:
        raise InferError(str(e)) from e
    tokenizer = find_tokenizer(checkpoint, tokenizer_dir)  # before the weights: the cheap check fails first
    try:
        llava, config = load_pretrained(checkpoint, dtype)
    except (CheckpointError, ConfigError) as e:
        raise InferError(str(e)) from e
    if len(tokenizer) > config.text.vocab_size:
        raise InferError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only "
                         f"{config.text.vocab_size}: wrong tokenizer for {checkpoint}?")
    try:  # the static-shape model runs in masked mode; `mode` only picks how generate() prefills
        pruned, trained = load_pruned(checkpoint, llava, method=prune)
    except ValueError as e:  # a pruning config that does not fit this model
        raise InferError(f"{checkpoint}: cannot set up pruning: {e}") from e
    if tensor > 1:
        from atp_jax.sharding import make_mesh, shard_state

        shard_state(pruned, make_mesh(data=1, fsdp=1, tensor=tensor, devices=jax.local_devices()[:tensor]))
    return Runner(pruned=pruned, tokenizer=tokenizer, mode=mode, trained=trained, checkpoint=checkpoint)


def find_tokenizer(checkpoint: Path, tokenizer_dir: str | os.PathLike | None):
    """The tokenizer of `tokenizer_dir` if given (an explicit flag wins), else the checkpoint's own."""
    from atp_jax.data.tokenizer import TokenizerError, load_tokenizer

    if tokenizer_dir is not None:
        directory = Path(tokenizer_dir)
    elif any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        directory = checkpoint
    else:
        raise OptionError("tokenizer_dir", f": checkpoint {checkpoint} has no tokenizer "
                          f"({' or '.join(TOKENIZER_FILES)}); give a tokenizer directory")
    try:
        return load_tokenizer(directory)
    except TokenizerError as e:
        raise InferError(str(e)) from e


def check_options(max_new_tokens: int, sampling: Sampling) -> None:
    """OptionError for generation settings out of range."""
    if max_new_tokens < 1:
        raise OptionError("max_new_tokens", f"{max_new_tokens}: must be at least 1")
    if sampling.temperature < 0:
        raise OptionError("temperature", f"{sampling.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < sampling.top_p <= 1:
        raise OptionError("top_p", f"{sampling.top_p}: must lie in (0, 1]")
    if sampling.top_k < 0:
        raise OptionError("top_k", f"{sampling.top_k}: must be >= 0 (0 is no cut)")


def untrained_warning(runner: Runner) -> str | None:
    """A warning when the runner prunes with ATP thresholds that were never trained, else None."""
    if runner.pruned.pcfg.method == "atp" and not runner.trained:
        return f"{runner.checkpoint} has no trained ATP thresholds; using the untrained initial ones"
    return None


def public_fields(result: dict) -> dict:
    """The fields of a result that are written out as JSON (the kept indices are for pictures, and long)."""
    return {k: result[k] for k in RESULT_FIELDS}


# ---- batching ----------------------------------------------------------------------------------------------


def pad_prompts(rows: Sequence[np.ndarray], pad_id: int, multiple: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads int32[T_i] rows to one length, rounded up to `multiple`: (ids int32[B, T], mask bool[B, T])."""
    t = -(-max(len(r) for r in rows) // multiple) * multiple
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask
