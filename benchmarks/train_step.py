"""Training step: ATP `soft` mode vs the plain model, and achieved FLOP/s vs this machine's matmul FLOP/s.

  python benchmarks/train_step.py [--runs 11] [--batch 2]

Shared benchmark model (576 visual + 64 text tokens), the trainer's own jitted step (loss, gradients, AdamW
with the ATP/LLM/vision groups, non-finite skip), interleaved runs, median. Overhead target: soft <= 10% over
plain. Achieved FLOP/s = analytic step FLOPs (3x the full prefill: soft mode masks tokens, it computes them all) /
step time, against a jitted float32 2048 x 2048 matmul on the same machine. The last line printed is one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from atp_jax import LlavaForConditionalGeneration  # noqa: E402
from atp_jax.pruning.accounting import train_step_flops  # noqa: E402
from atp_jax.pruning.config import PruningConfig  # noqa: E402
from atp_jax.pruning.engine import PrunedLlava  # noqa: E402
from atp_jax.testing.reference import random_inputs  # noqa: E402
from atp_jax.train.optim import OptimConfig, make_optimizer  # noqa: E402
from atp_jax.train.step import TrainState, train_step  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, bench_config, emit, interleaved, print_table  # noqa: E402

GROUPS = (("atp", 1e-4, (r"^thresholds/",)), ("llm", 2e-5, (r"language_model/", r"multi_modal_projector/")),
          ("vision", 2e-5, (r"vision_tower/",)))


def matmul_flops_per_s(n: int = 2048, runs: int = 10) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n))
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(runs):
        f(a).block_until_ready()
    return 2 * n**3 * runs / (time.perf_counter() - start)


def make_step(model: PrunedLlava, batch: dict):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = make_optimizer(OptimConfig(total_steps=1000, warmup_ratio=0.0, groups=GROUPS, frozen=()), params)
    state = TrainState(params=params, rest=rest, opt_state=tx.init(params), step=jnp.int32(0),
                       bad_steps=jnp.int32(0), skipped=jnp.int32(0))
    step = jax.jit(functools.partial(train_step, graphdef, tx), donate_argnums=0)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])
        return metrics

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    cfg = bench_config()
    ids, pixels = (jnp.asarray(x) for x in random_inputs(cfg, args.batch, TEXT_TOKENS, seed=SEED))
    labels = jnp.where(ids == cfg.image_token_index, -100, ids)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": jnp.ones_like(ids, bool), "pixel_values": pixels}
    steps = {}
    for name, method in (("plain", "none"), ("atp_soft", "atp")):  # own weights each: the step donates them
        llava = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(SEED))
        pcfg = PruningConfig(method=method, atp_layers=(1, 3, 5))
        steps[name] = make_step(PrunedLlava(llava, pcfg, rngs=nnx.Rngs(SEED)), batch)
    compile_s = {}
    for name, run in steps.items():
        start = time.perf_counter()
        metrics = run()
        compile_s[name] = time.perf_counter() - start
    avg_visual = float(metrics["avg_visual_tokens"])
    times = interleaved(steps, args.runs)
    peak = matmul_flops_per_s()
    seq = ids.shape[1]
    figures = {}
    for name, t in times.items():
        flops = train_step_flops(cfg, seq, args.batch)
        figures[name] = {"step_s": t, "compile_s": compile_s[name], "step_flops": flops,
                         "achieved_flops_per_s": flops / t, "fraction_of_matmul_peak": flops / t / peak}
    overhead = times["atp_soft"] / times["plain"] - 1
    print(f"cpu_count={os.cpu_count()} backend={jax.default_backend()}; batch {args.batch} x {seq} tokens; "
          f"median of {args.runs} interleaved steps; matmul peak {peak / 1e9:.1f} GFLOP/s")
    print_table("train step", ["model", "step ms", "GFLOP/step", "GFLOP/s", "of matmul peak"],
                [[k, f"{v['step_s'] * 1e3:.0f}", f"{v['step_flops'] / 1e9:.1f}",
                  f"{v['achieved_flops_per_s'] / 1e9:.1f}", f"{v['fraction_of_matmul_peak']:.2f}"]
                 for k, v in figures.items()])
    print(f"\nATP soft overhead over plain: {overhead * 100:.1f}% (target <= 10%); ATP soft kept {avg_visual:.0f} "
          "visual tokens on average (untrained thresholds), but soft mode computes every token")
    emit({"soft_overhead": overhead, "matmul_flops_per_s": peak, "batch": args.batch, **figures})


if __name__ == "__main__":
    main()
