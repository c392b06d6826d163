"""The GPU benchmark script runs end to end at a tiny size on CPU (on a GPU it runs at 7B: README, Benchmarks)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_gpu_benchmark_runs_tiny_on_cpu():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--size", "tiny", "--runs", "1",
                           "--new-tokens", "4"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    parity = figures["parity"]
    assert parity["float32"]["max_abs_diff"] < 1e-4 and parity["float32"]["greedy_tokens_equal"]
    assert parity["bfloat16"]["argmax_agree"] > 0.9  # bf16 against the float32 reference: close, not equal
    methods = figures["methods"]
    assert set(methods) == {"unpruned", "atp", "fastv"}
    assert methods["atp"]["kv_cache_bytes"] < methods["unpruned"]["kv_cache_bytes"]
    assert methods["atp"]["flops_ratio"] < 1 and methods["unpruned"]["flops_ratio"] == 1
    assert abs(methods["fastv"]["avg_visual_tokens"] - methods["atp"]["avg_visual_tokens"]) < 1.5  # same budget
    assert all(m["decode_tokens_per_s"] > 0 and m["ttft_s"] > 0 for m in methods.values())
    attention = figures["attention"]
    assert attention["xla"]["time_s"] > 0
    assert "time_s" in attention["cudnn"] or "cuDNN" in attention["cudnn"]["why"]  # no cuDNN on a CPU
