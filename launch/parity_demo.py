"""The conversion + parity demo: transformers -> atp_jax -> transformers on a small random LLaVA-1.5.

  python launch/parity_demo.py [--workdir DIR] [--seed N]

It builds a small random LLaVA-1.5 in transformers (PyTorch), converts it to atp_jax, checks that both give
the same logits on an image + text prompt, exports it back to the llava-hf layout and checks the round trip
is bit-identical. Without --workdir everything is written to a temporary directory and removed.
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

from atp_jax import LlavaConfig, VisionConfig, forward, load_pretrained  # noqa: E402
from atp_jax.convert.checkpoint import read_converted, save_converted  # noqa: E402
from atp_jax.convert.exporter import write_hf  # noqa: E402
from atp_jax.convert.importer import convert_hf  # noqa: E402
from atp_jax.nested import flatten, unflatten  # noqa: E402
from atp_jax.testing.reference import hf_logits, random_inputs, save_hf_model  # noqa: E402

TOLERANCE = 1e-4


def demo_config() -> LlavaConfig:
    """LLaVA-1.5's shape at laptop size: a 12x12 patch grid (144 visual tokens), 4-layer GQA decoder."""
    vision = VisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                          image_size=168, patch_size=14, projection_dim=32)
    return LlavaConfig.tiny(vision=vision, image_seq_length=144)


def same_safetensors(a: Path, b: Path) -> bool:
    from safetensors.numpy import load_file

    def tensors(d):
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(ta[k].dtype == tb[k].dtype and np.array_equal(ta[k], tb[k]) for k in ta)


def run(workdir: Path, seed: int) -> bool:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    cfg = demo_config()
    print(f"jax {jax.__version__} on {jax.default_backend()} ({len(jax.devices())} device(s)); workdir {workdir}")

    start = time.perf_counter()
    reference = save_hf_model(cfg, workdir / "hf", seed=seed)
    print(f"1. random PyTorch LLaVA ({sum(p.numel() for p in reference.parameters()):,} parameters, "
          f"{cfg.num_image_tokens} visual tokens) saved to {workdir / 'hf'}")

    _, flat, summary = convert_hf(workdir / "hf")
    save_converted(workdir / "jax", cfg, unflatten(flat), overwrite=True)
    print(f"2. hf-to-jax: {summary}")

    model, _ = load_pretrained(workdir / "jax")
    ids, pixels = random_inputs(cfg, batch=2, text_len=24, seed=seed)
    ours = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(pixels)).logits)
    theirs = hf_logits(reference, ids, pixels)
    diff = float(np.abs(ours - theirs).max())
    same_tokens = bool((ours.argmax(-1) == theirs.argmax(-1)).all())
    print(f"3. logits on {ids.shape[0]} prompts x {ids.shape[1]} tokens: max |jax - torch| = {diff:.2e} "
          f"(bound {TOLERANCE:.0e}, logits up to {np.abs(theirs).max():.1f}); same argmax everywhere: {same_tokens}")

    _, params = read_converted(workdir / "jax")
    write_hf(workdir / "hf_roundtrip", cfg, flatten(params), overwrite=True)
    identical = same_safetensors(workdir / "hf", workdir / "hf_roundtrip")
    print(f"4. jax-to-hf round trip bit-identical: {identical}")

    ok = diff <= TOLERANCE and same_tokens and identical
    print(f"\n{'PASS' if ok else 'FAIL'} in {time.perf_counter() - start:.1f}s")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, help="keep the checkpoints here (default: a temporary directory)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        return 0 if run(args.workdir, args.seed) else 1
    with tempfile.TemporaryDirectory() as tmp:
        return 0 if run(Path(tmp), args.seed) else 1


if __name__ == "__main__":
    sys.exit(main())
