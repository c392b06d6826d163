"""Prefill time of our jitted forward vs transformers PyTorch on the same weights, and converter peak memory.

  python benchmarks/forward.py [--runs 7] [--batches 1 4] [--convert-gb 1.0] [--skip-convert]

Targets: ours <= 0.8x PyTorch's prefill time; converting a ~1 GB checkpoint peaks at <= 1.5x its size.
The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from atp_jax import load_pretrained  # noqa: E402
from atp_jax.models.config import LlavaConfig, TextConfig  # noqa: E402
from atp_jax.testing.reference import hf_model, random_inputs  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, bench_config, emit, environment, interleaved, print_table  # noqa: E402


@jax.jit
def prefill(graphdef, state, input_ids, pixel_values):
    return nnx.merge(graphdef, state)(input_ids, pixel_values).logits


def bench_prefill(cfg: LlavaConfig, batches: list[int], runs: int, workdir: Path) -> list[dict]:
    ref = hf_model(cfg, SEED)
    ref.save_pretrained(workdir / "hf")
    model, _ = load_pretrained(workdir / "hf")
    graphdef, state = nnx.split(model)
    rows = []
    for batch in batches:
        ids, pixels = random_inputs(cfg, batch, TEXT_TOKENS, seed=batch)
        j_ids, j_px = jnp.asarray(ids), jnp.asarray(pixels)
        t_ids, t_px = torch.as_tensor(ids, dtype=torch.long), torch.as_tensor(pixels)

        def run_jax(j_ids=j_ids, j_px=j_px):
            return prefill(graphdef, state, j_ids, j_px).block_until_ready()

        def run_torch(t_ids=t_ids, t_px=t_px):
            with torch.inference_mode():
                return ref(input_ids=t_ids, pixel_values=t_px).logits

        start = time.perf_counter()
        ours = np.asarray(run_jax())
        first_call = time.perf_counter() - start
        theirs = run_torch().numpy()
        medians = interleaved({"jax": run_jax, "torch": run_torch}, runs)
        rows.append({"batch": batch, "seq_len": ids.shape[1], "jax_s": medians["jax"], "torch_s": medians["torch"],
                     "ratio": medians["jax"] / medians["torch"], "jax_compile_s": first_call - medians["jax"],
                     "max_abs_logit_diff": float(np.abs(ours - theirs).max()),
                     "max_abs_logit": float(np.abs(theirs).max())})
    return rows


def convert_memory(target_gb: float, workdir: Path) -> dict:
    """Peak RSS of `launch/convert.py hf-to-jax` on a random fp32 checkpoint of about `target_gb` GB."""
    from atp_jax.testing.reference import save_hf_model

    base = bench_config()
    per_layer = 4 * 1024 * 1024 + 3 * 1024 * 2816
    layers = max(1, int((target_gb * 2**30 / 4 - 2 * 32064 * 1024) / per_layer))
    text = TextConfig(vocab_size=32064, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=16)
    cfg = LlavaConfig(vision=base.vision, text=text, image_seq_length=576)
    save_hf_model(cfg, workdir / "big", SEED)
    size = sum(f.stat().st_size for f in (workdir / "big").glob("*.safetensors"))
    # VmHWM (not ru_maxrss, which survives exec and would count this process's memory at fork time).
    probe = ("import re, runpy, sys\n"
             "def hwm():\n    return int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
             "import atp_jax.convert.importer, orbax.checkpoint\n"
             "base = hwm()\n"
             f"sys.argv = {['convert.py', 'hf-to-jax', '--src', str(workdir / 'big'), '--dst', str(workdir / 'big_jax'), '--quiet']!r}\n"  # noqa: E501
             f"try:\n    runpy.run_path({str(ROOT / 'launch' / 'convert.py')!r}, run_name='__main__')\n"
             "except SystemExit as e:\n    assert not e.code, e.code\n"
             "print('RSS', base, hwm())\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(out.stderr)
    _, base_kb, peak_kb = out.stdout.strip().splitlines()[-1].split()
    base_b, peak_b = int(base_kb) * 1024, int(peak_kb) * 1024
    return {"checkpoint_bytes": size, "layers": layers, "peak_rss_bytes": peak_b, "baseline_rss_bytes": base_b,
            "peak_over_size": peak_b / size, "peak_minus_baseline_over_size": (peak_b - base_b) / size,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--gqa", action="store_true", help="2 kv heads instead of 8")
    parser.add_argument("--convert-gb", type=float, default=1.0)
    parser.add_argument("--skip-convert", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    env = environment()
    print(f"cpu_count={env['cpu_count']} torch_threads={env['torch_threads']} (XLA CPU uses all cores) "
          f"backend={env['jax_backend']} jax={env['jax']} torch={env['torch']}")
    figures = {"env": env}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        rows = bench_prefill(bench_config(args.gqa), args.batches, args.runs, workdir)
        figures["prefill"] = rows
        print_table(f"prefill, 576 visual + {TEXT_TOKENS} text tokens, median of {args.runs} (target ratio <= 0.8)",
                    ["batch", "seq", "jax ms", "torch ms", "jax/torch", "compile s", "max|dlogit|", "max|logit|"],
                    [[r["batch"], r["seq_len"], f"{r['jax_s'] * 1e3:.1f}", f"{r['torch_s'] * 1e3:.1f}",
                      f"{r['ratio']:.3f}", f"{r['jax_compile_s']:.2f}", f"{r['max_abs_logit_diff']:.1e}",
                      f"{r['max_abs_logit']:.1f}"]
                     for r in rows])
        if not args.skip_convert:
            mem = convert_memory(args.convert_gb, workdir)
            figures["convert"] = mem
            print_table("hf-to-jax conversion peak host memory (target peak <= 1.5x checkpoint size)",
                        ["checkpoint MiB", "peak RSS MiB", "baseline MiB", "peak/size", "(peak-base)/size", "s"],
                        [[f"{mem['checkpoint_bytes'] / 2**20:.0f}", f"{mem['peak_rss_bytes'] / 2**20:.0f}",
                          f"{mem['baseline_rss_bytes'] / 2**20:.0f}", f"{mem['peak_over_size']:.2f}",
                          f"{mem['peak_minus_baseline_over_size']:.2f}", f"{mem['seconds']:.1f}"]])
    emit(figures)


if __name__ == "__main__":
    main()
