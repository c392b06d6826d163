"""The shared benchmark model (README, "Benchmarks"), timing helpers and the JSON last line."""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from atp_jax.models.config import LlavaConfig, TextConfig, VisionConfig

SEED = 0
TEXT_TOKENS = 64


def bench_config(gqa: bool = False) -> LlavaConfig:
    """CLIP 336/14 (24x24 patches) width 256 x 4 layers; LLM 8 layers, width 512, 8 heads, SwiGLU 1376."""
    vision = VisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                          image_size=336, patch_size=14, projection_dim=256)
    text = TextConfig(vocab_size=32064, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=2 if gqa else 8, max_position_embeddings=4096)
    return LlavaConfig(vision=vision, text=text, image_token_index=32000, image_seq_length=576)


def median_time(fn, runs: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def interleaved(fns: dict, runs: int) -> dict[str, float]:
    """Median seconds of each function, runs interleaved so that machine noise hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def environment() -> dict:
    import jax
    import torch

    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "jax_backend": jax.default_backend(),
            "jax": jax.__version__, "torch": torch.__version__}


def emit(figures: dict) -> None:
    print(json.dumps(figures, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o) else str(o)))
