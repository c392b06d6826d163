"""The main job's comparison on the synthetic shapes test split.

Every method answers every test question greedily (masked mode: hard pruning decisions, static shapes) and is
scored by exact match, overall and per question kind. The ranked baselines run at ATP's measured budget, per
instance: random with ATP's own kept counts after each of its modules, FastV and PyramidDrop with the counts
that give each instance ATP's average visual tokens per decoder layer on their own schedules. Prefill time is
measured in compact mode (pruned tokens really removed) on one batch, every method's calls taken in turns: the
median of 10 rounds after a warm-up.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import numpy as np
from flax import nnx

from atp_jax.data import synthetic
from atp_jax.data.conversation import encode_prompt
from atp_jax.data.images import preprocess
from atp_jax.infer.generate import generate
from atp_jax.infer.runner import pad_prompts
from atp_jax.infer.text import cut_at_stop
from atp_jax.pruning.accounting import flops_ratio
from atp_jax.pruning.config import PruningConfig
from atp_jax.pruning.decisions import module_layers
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.pruning.prefill import prefill_compact

MAX_NEW_TOKENS = 4  # every answer is one word: at most 2 pieces, then </s>


@dataclasses.dataclass
class TestSet:
    """The test questions ready for the model, right-padded to one length (one compiled program per method)."""

    input_ids: np.ndarray  # int32[N, T]
    attention_mask: np.ndarray  # bool[N, T]
    pixel_values: np.ndarray  # float32[N, 3, S, S]
    prompt_tokens: np.ndarray  # int[N]
    answers: list[str]
    kinds: list[str]
    indices: list[int]  # sample index in the split (to regenerate an image)

    def __len__(self) -> int:
        return len(self.answers)


def build_test_set(shapes: synthetic.ShapesConfig, tokenizer, image_token_id: int, num_image_tokens: int,
                   image_size: int, limit: int | None = None, split: str = "test") -> TestSet:
    """The first `limit` (default all) samples of `split`, in the generation prompt the runner uses."""
    n = shapes.split_size(split) if limit is None else min(limit, shapes.split_size(split))
    rows, pixels, answers, kinds = [], [], [], []
    for i in range(n):
        s = synthetic.sample(split, i, shapes)
        rows.append(encode_prompt(synthetic.question_of(s), tokenizer, image_token_id, num_image_tokens))
        pixels.append(preprocess(_image(s), image_size, mode="pad"))
        answers.append(s["answer"])
        kinds.append(s["kind"])
    ids, mask = pad_prompts(rows, pad_id=0, multiple=8)
    return TestSet(ids, mask, np.stack(pixels), np.array([len(r) for r in rows]), answers, kinds, list(range(n)))


def _image(sample: dict):
    from PIL import Image

    return Image.fromarray(sample["image"])


@dataclasses.dataclass
class MethodRun:
    """One method's answers on a test set."""

    predictions: list[str]
    visual_per_layer: np.ndarray  # float[N, L] visual tokens entering each decoder layer
    counts: np.ndarray  # float[N, M] visual tokens kept after each module
    kept: list[list[list[int]]]  # per sample, per module: kept visual token indices


def answer_all(pruned: PrunedLlava, test: TestSet, tokenizer, batch_size: int, counts: np.ndarray | None = None
               ) -> MethodRun:
    """Greedy answers (masked mode) for every question; a short last batch is padded with copies of its last
    row so that every call has the same shapes."""
    preds, per_layer, kept_counts, kept = [], [], [], []
    for start in range(0, len(test), batch_size):
        rows = np.arange(start, min(start + batch_size, len(test)))
        padded = np.concatenate([rows, np.full(batch_size - len(rows), rows[-1])])
        gen = generate(pruned, test.input_ids[padded], test.pixel_values[padded], test.attention_mask[padded],
                       max_new_tokens=MAX_NEW_TOKENS, eos_id=tokenizer.eos_token_id, mode="masked",
                       chunk=MAX_NEW_TOKENS, counts=None if counts is None else counts[padded])
        for b in range(len(rows)):
            preds.append(cut_at_stop(gen.row(b), tokenizer)[1])
            kept.append([np.flatnonzero(k > 0.5).tolist() for k in gen.keep[b]])
        per_layer.append(gen.visual_per_layer[:len(rows)])
        kept_counts.append(gen.keep[:len(rows)].sum(-1))
    return MethodRun(preds, np.concatenate(per_layer), np.concatenate(kept_counts), kept)


def correct(test: TestSet, predictions: Sequence[str]) -> np.ndarray:
    """bool[N]: whether each answer matches exactly (case and surrounding space aside)."""
    return np.array([p.strip().lower() == a for p, a in zip(predictions, test.answers, strict=True)])


def scores(test: TestSet, predictions: Sequence[str]) -> dict:
    """Exact-match accuracy overall and per question kind."""
    right = correct(test, predictions)
    kinds = np.array(test.kinds)
    return {"accuracy": float(right.mean()),
            "per_kind": {k: float(right[kinds == k].mean()) for k in sorted(set(test.kinds))}}


# ---- baselines at another method's budget ---------------------------------------------------------------------


def fastv_counts(target_avg: np.ndarray, layer: int, num_visual: int, num_layers: int) -> np.ndarray:
    """Per instance, the tokens FastV keeps (pruning before decoder layer `layer`) for an average of
    `target_avg` visual tokens per layer: layer * P + (L - layer) * c = L * avg, clipped to [0, P]."""
    c = (num_layers * target_avg - layer * num_visual) / (num_layers - layer)
    return np.clip(np.round(c), 0, num_visual)[:, None]


def pdrop_counts(target_avg: np.ndarray, stage_layers: Sequence[int], num_visual: int, num_layers: int
                 ) -> np.ndarray:
    """Per instance, PyramidDrop's kept tokens after each stage (before decoder layers `stage_layers`), a
    geometric schedule P * r^(i+1) with r found by bisection so that the average per layer is `target_avg`."""
    bounds = list(stage_layers) + [num_layers]
    spans = np.diff(bounds)

    def average(r: float) -> float:
        return (stage_layers[0] * num_visual + sum(num_visual * r ** (i + 1) * n for i, n in enumerate(spans))
                ) / num_layers

    out = []
    for avg in target_avg:
        lo, hi = 0.0, 1.0
        for _ in range(50):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if average(mid) < avg else (lo, mid)
        r = (lo + hi) / 2
        out.append([round(num_visual * r ** (i + 1)) for i in range(len(spans))])
    return np.array(out, np.float32)


def baseline_model(llava, method: str, atp: PruningConfig) -> PrunedLlava:
    """A ranked baseline on `llava` where ATP's saved config places it (what `launch/infer.py --prune METHOD`
    runs): random on ATP's module layers, FastV and PyramidDrop on their own layers."""
    return PrunedLlava(llava, dataclasses.replace(atp, method=method), rngs=nnx.Rngs(0))


def counts_at_budget(model: PrunedLlava, atp_run: MethodRun) -> np.ndarray:
    """Per-instance counts for `model`'s modules that match ATP's per-instance budget."""
    cfg, pcfg = model.llava.config, model.pcfg
    p, n = cfg.num_image_tokens, cfg.text.num_hidden_layers
    target = atp_run.visual_per_layer.mean(axis=1)
    if pcfg.method == "random":
        return np.round(atp_run.counts)
    layers = [layer + 1 for layer in module_layers(pcfg)]  # pruning takes effect before these layers
    if pcfg.method == "fastv":
        return fastv_counts(target, layers[0], p, n)
    return pdrop_counts(target, layers, p, n)


# ---- timing -------------------------------------------------------------------------------------------------


def prefill_seconds(rows: dict[str, tuple[PrunedLlava, np.ndarray | None]], test: TestSet, batch_size: int,
                    rounds: int = 10) -> dict[str, float]:
    """Median wall time per row of a compact-mode prefill of the first `batch_size` questions; `rows` maps a name
    to a model and its per-instance counts (None: its own). Every row is warmed up twice (the first call plans
    ATP's capacities for this prompt length, the second compiles the planned program), then the rows are timed
    in turns, one call each per round with the starting row rotating, so that a slow stretch of the machine
    falls on every row alike instead of on whichever row was timed during it."""
    index = np.arange(min(batch_size, len(test)))
    args = (test.input_ids[index], test.pixel_values[index], test.attention_mask[index])
    calls = {name: functools.partial(prefill_compact, model, *args, last_logits_only=True,
                                     counts=None if counts is None else counts[index])
             for name, (model, counts) in rows.items()}
    for call in calls.values():
        for _ in range(2):
            call().logits.block_until_ready()
    names, times = list(calls), {name: [] for name in calls}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            calls[name]().logits.block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def method_result(name: str, run: MethodRun, test: TestSet, model: PrunedLlava) -> dict:
    cfg = model.llava.config
    text = test.prompt_tokens - cfg.num_image_tokens
    ratios = [flops_ratio(cfg, v, int(t)) for v, t in zip(run.visual_per_layer, text, strict=True)]
    return {"method": name, **scores(test, run.predictions),
            "avg_visual_tokens": float(run.visual_per_layer.mean()),
            "visual_token_fraction": float(run.visual_per_layer.mean() / cfg.num_image_tokens),
            "flops_ratio": float(np.mean(ratios))}
