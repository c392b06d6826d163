"""Answer questions about images with a (pruned) LLaVA checkpoint.

  python launch/infer.py --checkpoint DIR --image PATH --prompt TEXT [--visualize OUT.png] [--json]
  python launch/infer.py --checkpoint DIR --batch-file in.jsonl --output out.jsonl [--batch-size 8] [--image-root D]

One image: the answer streams to the terminal, then the visual tokens per decoder layer, their average, the
time to first token and the decode speed. A batch file holds lines {"id", "image", "question"} (image paths
relative to --image-root, default the file's folder, and inside it); bad lines (bad bytes or JSON, an image
outside the root, a duplicate id) are reported on stderr by line number and skipped, the answers go to
--output as {"id", "answer", "token_ids", ...} lines. Mistakes (missing files, bad flags, a prompt too long
for the model) exit with status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atp_jax.cli import Parser, enable_compilation_cache, user_message  # noqa: E402
from atp_jax.cli.infer import run_batch, run_single  # noqa: E402
from atp_jax.infer.generate import Sampling  # noqa: E402
from atp_jax.infer.runner import DTYPES, MODES, PRUNE_METHODS, InferError  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="converted atp_jax directory or HF llava directory")
    p.add_argument("--tokenizer", help="tokenizer directory, when the checkpoint has none (or to override it)")
    p.add_argument("--image", help="image file (single-image mode)")
    p.add_argument("--prompt", help="question about the image; <image> is put at its start when missing")
    p.add_argument("--batch-file", help="JSONL file of {\"id\", \"image\", \"question\"} lines")
    p.add_argument("--output", help="JSONL file the batch answers are written to")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass (batch mode)")
    p.add_argument("--image-root", help="folder the batch file's image paths are relative to and must stay in "
                   "(default: the batch file's folder)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default="atp", help="visual-token pruning method")
    p.add_argument("--mode", choices=MODES, default="compact",
                   help="compact: pruned tokens leave compute and cache; masked: they are hidden")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 is no cut")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: as stored)")
    p.add_argument("--json", action="store_true", help="print one JSON object per answer")
    p.add_argument("--visualize", metavar="OUT.png", help="draw the kept patches per pruning module (single image)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="JAX persistent compilation cache: later runs reuse the compiled prefill and decode programs")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    given = {name: getattr(args, name) is not None for name in ("image", "prompt", "batch_file", "output")}
    if given["batch_file"] or given["output"]:
        if given["image"] or given["prompt"]:
            parser.error("give either --image and --prompt, or --batch-file and --output, not both")
        if not (given["batch_file"] and given["output"]):
            parser.error("--batch-file and --output go together")
    elif not (given["image"] and given["prompt"]):
        parser.error("give --image and --prompt (or --batch-file and --output)")
    if args.image_root and not args.batch_file:
        parser.error("--image-root goes with --batch-file")
    if args.visualize and args.batch_file:
        parser.error("--visualize works with a single --image")
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    common = dict(tokenizer_dir=args.tokenizer, prune=args.prune, mode=args.mode, dtype=args.dtype,
                  max_new_tokens=args.max_new_tokens, seed=args.seed, as_json=args.json,
                  sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p))
    try:
        if args.batch_file:
            return run_batch(args.checkpoint, args.batch_file, args.output, batch_size=args.batch_size,
                             image_root=args.image_root, **common)
        return run_single(args.checkpoint, args.image, args.prompt, visualize=args.visualize, **common)
    except InferError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
