"""Where the unpruned prefill's time goes, in our jitted forward and in transformers' PyTorch forward, on the same
weights of the shared benchmark model (576 visual + 64 text tokens, every position's logits), one batch at a time.

  python benchmarks/profile_prefill.py [--runs 5] [--batches 1 4]

Ours: `jax.profiler` traces `--runs` calls; XLA:CPU's thunks (one event per fused op on its worker threads) are
summed per kind: matrix products (YNNPACK `ynn_fusion`s and `dot`s), layout copies (`copy`/`transpose`
fusions), weight slices out of the stacked layers, the rest (element-wise and reductions: softmax, norms, RoPE),
and separately the ops inside `attention` (its named scope). PyTorch: `torch.profiler`'s self CPU time per
aten op, in the same kinds (its attention is one fused kernel, `_scaled_dot_product_flash_attention_for_cpu`).
Per framework: wall time per call and the summed op time per call (above the wall time when two threads run
ops at once). The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402
from jax.profiler import ProfileData  # noqa: E402

from atp_jax import load_pretrained  # noqa: E402
from atp_jax.testing.reference import hf_model, random_inputs  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, bench_config, emit, environment, print_table  # noqa: E402

KINDS = ("matmul", "attention", "layout copies", "weight slices", "element-wise, reductions")


@jax.jit
def prefill(graphdef, state, input_ids, pixel_values):
    return nnx.merge(graphdef, state)(input_ids, pixel_values).logits


def op_scopes(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its JAX op_name (name stack) from a compiled module's text."""
    out = {}
    for m in re.finditer(r"%([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text):
        out[m.group(1)] = m.group(2)
    return out


def xla_kind(name: str, scope: str) -> str:
    if "attention" in scope:
        return "attention"
    if name.startswith(("ynn_fusion", "dot")):
        return "matmul"
    if "copy" in name or "transpose" in name:
        return "layout copies"
    if "slice" in name:
        return "weight slices"
    return "element-wise, reductions"


def profile_ours(graphdef, state, ids, pixels, runs: int) -> dict:
    compiled = prefill.lower(graphdef, state, ids, pixels).compile()
    scopes = op_scopes(compiled.as_text())
    for _ in range(2):
        jax.block_until_ready(prefill(graphdef, state, ids, pixels))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with jax.profiler.trace(tmp):
            for _ in range(runs):
                jax.block_until_ready(prefill(graphdef, state, ids, pixels))
        wall = (time.perf_counter() - start) / runs
        data = ProfileData.from_file(glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)[0])
    kinds, ops = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLAEigen"):  # XLA:CPU's worker threads: one event per thunk
                continue
            for event in line.events:
                name = event.name
                if name.startswith(("ThunkExecutor", "Slinky", "end: ")):
                    continue
                ms = event.duration_ns / 1e6 / runs
                kinds[xla_kind(name, scopes.get(name, ""))] += ms
                ops[re.sub(r"\.\d+$", "", name)] += ms
    return {"wall_ms": wall * 1e3, "op_ms": sum(kinds.values()), "kinds": dict(kinds),
            "top_ops": dict(ops.most_common(8))}


def torch_kind(name: str) -> str:
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention"
    if name in ("aten::addmm", "aten::mm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm",
                "aten::_convolution", "aten::mkldnn_convolution", "aten::convolution"):
        return "matmul"
    if name in ("aten::copy_", "aten::contiguous", "aten::clone", "aten::transpose", "aten::permute"):
        return "layout copies"
    return "element-wise, reductions"


def profile_torch(ref, ids, pixels, runs: int) -> dict:
    t_ids, t_px = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(pixels)
    with torch.inference_mode():
        for _ in range(2):
            ref(input_ids=t_ids, pixel_values=t_px)
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                ref(input_ids=t_ids, pixel_values=t_px)
        wall = (time.perf_counter() - start) / runs
    kinds, ops = collections.Counter(), collections.Counter()
    for avg in prof.key_averages():
        ms = avg.self_cpu_time_total / 1e3 / runs
        kinds[torch_kind(avg.key)] += ms
        ops[avg.key] += ms
    return {"wall_ms": wall * 1e3, "op_ms": sum(kinds.values()), "kinds": dict(kinds),
            "top_ops": dict(ops.most_common(8))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    cfg = bench_config()
    ref = hf_model(cfg, SEED)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        model, _ = load_pretrained(tmp)
    graphdef, state = nnx.split(model)
    print(f"{environment()}; shared benchmark model, 576 visual + {TEXT_TOKENS} text tokens, "
          f"{args.runs} profiled calls")
    figures = {"env": environment()}
    for batch in args.batches:
        ids, pixels = random_inputs(cfg, batch, TEXT_TOKENS, seed=batch)
        ours = profile_ours(graphdef, state, jnp.asarray(ids), jnp.asarray(pixels), args.runs)
        theirs = profile_torch(ref, ids, pixels, args.runs)
        figures[f"batch_{batch}"] = {"atp_jax": ours, "torch": theirs}
        print_table(f"batch {batch}: ms per call (op time summed over threads)", ["", "atp_jax", "torch"],
                    [["wall", f"{ours['wall_ms']:.1f}", f"{theirs['wall_ms']:.1f}"],
                     ["ops", f"{ours['op_ms']:.1f}", f"{theirs['op_ms']:.1f}"],
                     *[[k, f"{ours['kinds'].get(k, 0):.1f}", f"{theirs['kinds'].get(k, 0):.1f}"] for k in KINDS]])
        for name, f in (("atp_jax", ours), ("torch", theirs)):
            print(f"  {name} top ops: " + ", ".join(f"{k} {v:.1f}" for k, v in f["top_ops"].items()))
    emit(figures)


if __name__ == "__main__":
    main()
