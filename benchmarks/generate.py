"""Generation: time to first token, decode tokens/s and KV-cache bytes of unpruned, ATP `compact` and FastV
`compact` (at ATP's average) vs transformers PyTorch `generate`, on the same weights, in one run; then the
programs a steady state of mixed prompts compiles.

  python benchmarks/generate.py [--runs 5] [--batch 1] [--new-tokens 64]

Shared benchmark model (576 visual + 64 text tokens), greedy decoding of a fixed number of tokens (no EOS).
ATP thresholds are set for ~25% average visual tokens, as in benchmarks/prefill.py. PyTorch's figures come
from `generate` with its default dynamic KV cache: TTFT and decode tokens/s from the
timestamps a logits processor records at each step.

Mixed prompts: ATP `generate` over rounds of prompts of several text lengths (each padded to the runner's
multiple: its prompt-length buckets), every round new images and text; XLA compiles counted per round with a
`jax.monitoring` listener, and the prefill programs (capacities) each bucket ran in the last round (target: one
per bucket, nothing compiled once the capacities have settled). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from transformers import LogitsProcessor, LogitsProcessorList  # noqa: E402

from atp_jax import load_pretrained  # noqa: E402
from atp_jax.infer.generate import generate  # noqa: E402
from atp_jax.infer.runner import PAD_MULTIPLE, pad_prompts  # noqa: E402
from atp_jax.pruning.config import PruningConfig  # noqa: E402
from atp_jax.pruning.engine import PrunedLlava  # noqa: E402
from atp_jax.testing.reference import hf_model, random_inputs  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, bench_config, emit, environment, print_table  # noqa: E402
from benchmarks.prefill import calibrate_atp, fastv_at  # noqa: E402

NO_EOS = -1
MIXED_TEXT = (20, 40, 100, 180)  # text tokens of the mixed prompts: 596, 616, 676, 756 tokens -> buckets 640, 704, 768


class Clock(LogitsProcessor):
    """Records when each step's logits are ready: the first after the prefill, then one per decode step."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def torch_generate(ref, ids, pixels, new_tokens: int):
    """(tokens, ttft_s, decode tokens/s per row) of transformers' greedy generate."""
    t_ids, t_px = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(pixels)
    clock = Clock()
    start = time.perf_counter()
    with torch.inference_mode():
        out = ref.generate(input_ids=t_ids, pixel_values=t_px, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0,
                           logits_processor=LogitsProcessorList([clock]))
    end = time.perf_counter()
    return out[:, ids.shape[1]:].numpy(), clock.times[0] - start, (new_tokens - 1) / (end - clock.times[0])


def torch_cache_bytes(cfg, batch: int, length: int) -> int:
    text = cfg.text
    return 2 * text.num_hidden_layers * batch * length * text.num_key_value_heads * text.head_dim * 4


def mixed_prompts(atp: PrunedLlava, cfg, batch: int, text_lengths: tuple[int, ...], rounds: int,
                  new_tokens: int) -> dict:
    """Rounds of ATP generations over prompts of `text_lengths` text tokens (padded like the runner's, so each
    length is a bucket), new inputs every round: XLA compiles per round, and the prefill programs (capacities)
    each bucket used in the last round."""
    compiled = []

    def listener(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(duration)

    per_round, used = [], collections.defaultdict(set)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for r in range(rounds):
            before = len(compiled)
            for i, text in enumerate(text_lengths):
                ids, pixels = random_inputs(cfg, batch, text, seed=SEED + 1 + r * len(text_lengths) + i)
                ids, mask = pad_prompts(list(ids), 0, PAD_MULTIPLE)
                gen = generate(atp, ids, pixels, mask, max_new_tokens=new_tokens, eos_id=NO_EOS, mode="compact")
                if r == rounds - 1:
                    used[ids.shape[1]].add(gen.prefill_lengths)
            per_round.append(len(compiled) - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    return {"compiles_per_round": per_round,
            "programs_per_bucket_last_round": {str(k): len(v) for k, v in sorted(used.items())}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--mixed-rounds", type=int, default=4, help="rounds of the mixed-prompt programs count")
    args = parser.parse_args()
    cfg = bench_config()
    ref = hf_model(cfg, SEED)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        llava, _ = load_pretrained(tmp)
    ids, pixels = random_inputs(cfg, args.batch, TEXT_TOKENS, seed=SEED)
    atp = calibrate_atp(llava, jax.numpy.asarray(ids), jax.numpy.asarray(pixels))
    unpruned = PrunedLlava(llava, PruningConfig(method="none"), rngs=nnx.Rngs(SEED))
    atp_average = float(np.asarray(atp(jax.numpy.asarray(ids), jax.numpy.asarray(pixels)).visual_per_layer).mean())
    fastv = fastv_at(llava, atp_average)  # FastV at ATP's average visual tokens
    n = args.new_tokens
    results, tokens = {}, {}
    for name, model in (("unpruned", unpruned), ("atp_compact", atp), ("fastv_compact", fastv)):
        for _ in range(2):  # compile (ATP: the first plans its capacities, the second compiles the planned program)
            generate(model, ids, pixels, max_new_tokens=n, eos_id=NO_EOS, mode="compact")
        runs = [generate(model, ids, pixels, max_new_tokens=n, eos_id=NO_EOS, mode="compact") for _ in range(args.runs)]
        tokens[name] = runs[0].tokens
        results[name] = {"ttft_s": statistics.median(r.ttft_s for r in runs),
                         "decode_tokens_per_s": statistics.median(args.batch * (n - 1) / r.decode_s for r in runs),
                         "kv_cache_bytes": runs[0].cache_bytes,
                         "avg_visual_tokens": float(runs[0].visual_per_layer.mean())}
    torch.set_num_threads(os.cpu_count())
    torch_generate(ref, ids, pixels, 2)  # warm-up
    runs = [torch_generate(ref, ids, pixels, n) for _ in range(args.runs)]
    tokens["torch"] = runs[0][0]
    results["torch_generate"] = {"ttft_s": statistics.median(r[1] for r in runs),
                                 "decode_tokens_per_s": args.batch * statistics.median(r[2] for r in runs),
                                 "kv_cache_bytes": torch_cache_bytes(cfg, args.batch, ids.shape[1] + n - 1),
                                 "avg_visual_tokens": float(cfg.num_image_tokens)}
    same = bool((tokens["torch"] == tokens["unpruned"]).all())
    print(f"{environment()}; prompt {ids.shape[1]} tokens, batch {args.batch}, {n} new tokens, median of {args.runs}")
    print_table("generation", ["method", "avg visual", "TTFT ms", "decode tok/s", "KV cache MB"],
                [[k, f"{v['avg_visual_tokens']:.0f}", f"{v['ttft_s'] * 1e3:.1f}", f"{v['decode_tokens_per_s']:.1f}",
                  f"{v['kv_cache_bytes'] / 2**20:.2f}"] for k, v in results.items()])
    print(f"\nunpruned greedy tokens equal transformers' generate: {same}")
    mixed = mixed_prompts(atp, cfg, args.batch, MIXED_TEXT, args.mixed_rounds, 8)
    print(f"\nATP, mixed prompts (text {MIXED_TEXT} tokens, padded to multiples of {PAD_MULTIPLE}; new inputs "
          f"each round): XLA compiles per round {mixed['compiles_per_round']}; prefill programs each bucket ran in "
          f"the last round {mixed['programs_per_bucket_last_round']} (target: 1 per bucket, 0 compiles once settled)")
    emit({"batch": args.batch, "new_tokens": n, "prompt_tokens": int(ids.shape[1]), "same_tokens_as_torch": same,
          **results, "mixed_prompts": mixed})


if __name__ == "__main__":
    main()
