"""Convert LLaVA checkpoints between Hugging Face / PyTorch and atp_jax.

  python launch/convert.py hf-to-jax --src HF_DIR --dst OUT_DIR [--dtype float32|bfloat16] [--vision-src CLIP_DIR]
  python launch/convert.py jax-to-hf --src OUT_DIR --dst HF_DIR
  python launch/convert.py assemble --src VICUNA_DIR --vision-src CLIP_DIR --dst OUT_DIR   # stage-1 start
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atp_jax.convert.checkpoint import read_converted, save_converted  # noqa: E402
from atp_jax.convert.exporter import write_hf  # noqa: E402
from atp_jax.convert.importer import assemble, convert_hf  # noqa: E402
from atp_jax.convert.readers import CheckpointError  # noqa: E402
from atp_jax.fileio import storage_error  # noqa: E402
from atp_jax.models.config import ConfigError  # noqa: E402
from atp_jax.nested import flatten, unflatten  # noqa: E402


def hf_to_jax(args) -> str:
    cfg, flat, summary = convert_hf(args.src, args.dtype, args.vision_src, progress=not args.quiet)
    save_converted(args.dst, cfg, unflatten(flat), sidecars_from=Path(args.src), overwrite=args.overwrite)
    return str(summary)


def assemble_llava(args) -> str:
    cfg, flat, summary = assemble(args.src, args.vision_src, args.projector, args.dtype, args.seed,
                                  progress=not args.quiet)
    save_converted(args.dst, cfg, unflatten(flat), sidecars_from=Path(args.src), overwrite=args.overwrite)
    return f"{summary}; projector {args.projector} initialised (seed {args.seed})"


def jax_to_hf(args) -> str:
    cfg, params = read_converted(args.src)
    n = write_hf(args.dst, cfg, flatten(params), sidecars_from=Path(args.src), overwrite=args.overwrite,
                 max_shard_bytes=int(args.max_shard_gb * 2**30), progress=not args.quiet)
    return f"{n} tensors written in the llava-hf layout"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-jax", help="HF (llava-hf or original liuhaotian) checkpoint -> atp_jax")
    a.add_argument("--src", required=True, help="checkpoint directory with config.json and weights")
    a.add_argument("--dst", required=True, help="output directory (must not exist unless --overwrite)")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a.add_argument("--vision-src", help="CLIP checkpoint directory (original LLaVA layout): its weights when "
                   "the checkpoint has none, its config.json always")
    b = sub.add_parser("jax-to-hf", help="atp_jax checkpoint -> llava-hf safetensors + config.json")
    b.add_argument("--src", required=True)
    b.add_argument("--dst", required=True)
    b.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    c = sub.add_parser("assemble", help="LLaMA/Vicuna + CLIP checkpoints -> atp_jax LLaVA with a fresh projector")
    c.add_argument("--src", required=True, help="LLaMA/Vicuna checkpoint directory (LlamaForCausalLM)")
    c.add_argument("--vision-src", required=True, help="CLIP checkpoint directory (CLIPModel or CLIPVisionModel)")
    c.add_argument("--dst", required=True)
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--projector", default="mlp2x_gelu", choices=["mlp2x_gelu", "linear"])
    c.add_argument("--seed", type=int, default=0, help="projector initialisation")
    for p in (a, b, c):
        p.add_argument("--overwrite", action="store_true", help="replace an existing --dst")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    src, dst = Path(args.src).resolve(), Path(args.dst).resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        print(f"error: --dst {args.dst} must lie outside --src {args.src} (and not contain it)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    try:
        message = {"hf-to-jax": hf_to_jax, "jax-to-hf": jax_to_hf, "assemble": assemble_llava}[args.command](args)
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a full disk, a read-only destination: one line, nothing half-written (staged)
        error = storage_error(e, f"writing {args.dst}")
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{message}; wrote {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
