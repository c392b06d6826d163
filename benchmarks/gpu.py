"""The GPU check: parity with transformers in float32 and bfloat16, then a 7B-shaped LLaVA with random bfloat16
weights: prefill and generation unpruned vs ATP `compact` vs FastV at the same visual-token budget (TTFT, prefill
time, decode tokens/s, KV-cache bytes), and fused attention at the prefill's shape through
`jax.nn.dot_product_attention` with `implementation="cudnn"` against XLA's.

  python benchmarks/gpu.py                      # on a GPU: --size 7b
  python benchmarks/gpu.py --size tiny          # anywhere (the tests run this on CPU)

Parity builds a tiny random model with transformers, converts it and compares logits (float32: max |diff|,
which the parity tests bound by 1e-4; bfloat16 weights and compute against the float32 reference: max |diff| and
the share of positions whose argmax agrees) and greedy tokens. The speed part has untrained ATP thresholds set
for about 25% of the visual tokens on average, as benchmarks/prefill.py does; FastV prunes after layer 1 or 2 to
the same average. cuDNN's kernel needs a CUDA GPU and 16-bit inputs; elsewhere its row says why it did not run.
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from atp_jax import load_pretrained  # noqa: E402
from atp_jax.infer.generate import generate  # noqa: E402
from atp_jax.models.common import DtypePolicy  # noqa: E402
from atp_jax.models.config import LlavaConfig  # noqa: E402
from atp_jax.models.llava import LlavaForConditionalGeneration, forward  # noqa: E402
from atp_jax.pruning.accounting import flops_ratio  # noqa: E402
from atp_jax.pruning.config import PruningConfig  # noqa: E402
from atp_jax.pruning.engine import PrunedLlava  # noqa: E402
from atp_jax.pruning.prefill import prefill_compact  # noqa: E402
from atp_jax.sharding import make_mesh, sharded_init  # noqa: E402
from atp_jax.testing.reference import hf_logits, random_inputs, save_hf_model  # noqa: E402
from benchmarks.common import SEED, TEXT_TOKENS, emit, environment, interleaved, print_table  # noqa: E402
from benchmarks.generate import NO_EOS, torch_generate  # noqa: E402
from benchmarks.prefill import calibrate_atp, fastv_at  # noqa: E402

SIZES = {"7b": LlavaConfig.llava15_7b, "tiny": LlavaConfig.tiny}


def parity(new_tokens: int) -> dict:
    """Our model against transformers' on the same tiny random weights, in float32 and in bfloat16."""
    cfg = LlavaConfig.tiny()
    ids, pixels = random_inputs(cfg, batch=2, text_len=9, seed=SEED + 2)
    with tempfile.TemporaryDirectory() as directory:
        ref = save_hf_model(cfg, directory, seed=SEED + 1)
        theirs = hf_logits(ref, ids, pixels)
        their_tokens = torch_generate(ref, ids, pixels, new_tokens)[0]
        out = {}
        for dtype in ("float32", "bfloat16"):
            model, _ = load_pretrained(directory, dtype=dtype)
            ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits, np.float32)
            pruned = PrunedLlava(model, PruningConfig(method="none"), rngs=nnx.Rngs(SEED))
            tokens = generate(pruned, ids, pixels, max_new_tokens=new_tokens, eos_id=NO_EOS).tokens
            out[dtype] = {"max_abs_diff": float(np.abs(ours - theirs).max()),
                          "argmax_agree": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
                          "greedy_tokens_equal": bool((tokens == their_tokens).all())}
    return out


def random_model(cfg: LlavaConfig) -> LlavaForConditionalGeneration:
    """Random bfloat16 weights made on the device (a 7B model never passes through host memory)."""
    bf16 = jnp.bfloat16
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    return sharded_init(lambda: LlavaForConditionalGeneration(cfg, policy=DtypePolicy(bf16, bf16),
                                                              rngs=nnx.Rngs(SEED)), mesh)


def speed(cfg: LlavaConfig, batch: int, new_tokens: int, runs: int) -> dict:
    llava = random_model(cfg)
    ids, pixels = (jnp.asarray(x) for x in random_inputs(cfg, batch, TEXT_TOKENS, seed=SEED))
    atp = calibrate_atp(llava, ids, pixels, atp_layers=PruningConfig().scaled_to(cfg.text.num_hidden_layers)
                        .atp_layers)
    atp_avg = float(np.asarray(atp(ids, pixels).visual_per_layer).mean())
    methods = {"unpruned": PrunedLlava(llava, PruningConfig(method="none"), rngs=nnx.Rngs(SEED)),
               "atp": atp, "fastv": fastv_at(llava, atp_avg)}
    figures, prefills = {}, {}
    for name, model in methods.items():
        prefill_compact(model, ids, pixels, last_logits_only=True)  # compiles (ATP: plans its capacities)
        out = prefill_compact(model, ids, pixels, last_logits_only=True)  # ATP: compiles the planned program
        per_layer = np.asarray(out.visual_per_layer).mean(0)
        gens = [generate(model, ids, pixels, max_new_tokens=new_tokens, eos_id=NO_EOS) for _ in range(runs + 1)][1:]
        figures[name] = {"avg_visual_tokens": float(per_layer.mean()),
                         "flops_ratio": flops_ratio(cfg, per_layer, TEXT_TOKENS), "lengths": out.lengths,
                         "ttft_s": float(np.median([g.ttft_s for g in gens])),
                         "decode_tokens_per_s": float(np.median([batch * (new_tokens - 1) / g.decode_s
                                                                 for g in gens])),
                         "kv_cache_bytes": gens[0].cache_bytes}
        prefills[name] = (lambda model=model: jax.block_until_ready(
            prefill_compact(model, ids, pixels, last_logits_only=True).logits))
    times = interleaved(prefills, runs)
    for name, f in figures.items():
        f["prefill_s"] = times[name]
        f["prefill_ratio"] = times[name] / times["unpruned"]
    return figures


def fused_attention(cfg: LlavaConfig, batch: int, runs: int) -> dict:
    """Causal self-attention at the prefill's shape (576 visual + text tokens, the model's heads), bfloat16:
    XLA's implementation against cuDNN's, where cuDNN applies."""
    text = cfg.text
    t = cfg.num_image_tokens + TEXT_TOKENS + 1
    keys = jax.random.split(jax.random.key(SEED), 3)
    q = jax.random.normal(keys[0], (batch, t, text.num_attention_heads, text.head_dim), jnp.bfloat16)
    k, v = (jax.random.normal(kk, (batch, t, text.num_key_value_heads, text.head_dim), jnp.bfloat16)
            for kk in keys[1:])
    out, fns, results = {}, {}, {}
    for impl in ("xla", "cudnn"):
        fn = jax.jit(lambda q, k, v, impl=impl: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                             implementation=impl))
        try:
            results[impl] = jax.block_until_ready(fn(q, k, v)).astype(jnp.float32)
        except Exception as e:  # noqa: BLE001 - cuDNN is absent on CPU and TPU, and refuses some shapes
            out[impl] = {"why": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            continue
        fns[impl] = lambda fn=fn: jax.block_until_ready(fn(q, k, v))
    times = interleaved(fns, runs)
    for impl, result in results.items():
        out[impl] = {"time_s": times[impl], "max_abs_diff_vs_xla": float(jnp.abs(result - results["xla"]).max())}
    return {"shape": [batch, t, text.num_attention_heads, text.head_dim], **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="7b")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}), {len(jax.devices())} device(s); "
          f"size {args.size}, batch {args.batch}, prompt {SIZES[args.size]().num_image_tokens} visual + {TEXT_TOKENS} "
          f"text tokens, {args.new_tokens} new tokens")
    start = time.perf_counter()
    checks = parity(min(args.new_tokens, 8))
    print_table("parity with transformers (tiny random model; bfloat16 against the float32 reference)",
                ["dtype", "max |diff|", "argmax agrees", "greedy tokens equal"],
                [[d, f"{c['max_abs_diff']:.2e}", f"{c['argmax_agree']:.3f}", c["greedy_tokens_equal"]]
                 for d, c in checks.items()])
    cfg = SIZES[args.size]()
    figures = speed(cfg, args.batch, args.new_tokens, args.runs)
    print_table(f"{args.size}: prefill and generation, median of {args.runs}",
                ["method", "avg visual", "FLOPs ratio", "prefill ms", "prefill ratio", "TTFT ms", "decode tok/s",
                 "KV cache MiB"],
                [[name, f"{f['avg_visual_tokens']:.1f}", f"{f['flops_ratio']:.3f}", f"{f['prefill_s'] * 1e3:.1f}",
                  f"{f['prefill_ratio']:.3f}", f"{f['ttft_s'] * 1e3:.1f}", f"{f['decode_tokens_per_s']:.1f}",
                  f"{f['kv_cache_bytes'] / 2**20:.1f}"] for name, f in figures.items()])
    attention = fused_attention(cfg, args.batch, args.runs)
    print_table(f"causal attention {attention['shape']} (B, T, N, H), bfloat16",
                ["implementation", "ms", "max |diff| vs xla", "note"],
                [[impl, f"{f['time_s'] * 1e3:.2f}" if "time_s" in f else "-",
                  f"{f['max_abs_diff_vs_xla']:.2e}" if "max_abs_diff_vs_xla" in f else "-", f.get("why", "")]
                 for impl, f in attention.items() if impl != "shape"])
    emit({"device": device.device_kind, "backend": jax.default_backend(), "size": args.size, "batch": args.batch,
          "new_tokens": args.new_tokens, "parity": checks, "methods": figures, "attention": attention,
          "wall_s": time.perf_counter() - start, "environment": environment()})


if __name__ == "__main__":
    main()
