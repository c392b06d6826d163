"""Evaluate a (pruned) LLaVA checkpoint on a benchmark in LLaVA-1.5's eval layout.

  python launch/eval.py --benchmark pope --questions llava_pope_test.jsonl --image-folder val2014 \\
      --checkpoint DIR --output runs/pope-atp [--prune atp|fastv|pdrop|random|none] [--limit 100]

Benchmarks: vqav2, gqa, textvqa (open answers; ground truth inline or from --annotations), pope, mme,
scienceqa (questions with an image only) and mmbench (multiple choice). Greedy decoding. The answers are
appended to OUTPUT/answers.jsonl batch by batch: run the same command again to resume after a crash. The
metrics, the average visual tokens per decoder layer and the prefill FLOPs ratio are printed and written to
OUTPUT/results.json. Mistakes (missing files, bad question lines, an output folder of another run) exit with
status 2 and one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atp_jax.cli import Parser, enable_compilation_cache, user_message  # noqa: E402
from atp_jax.eval.benchmarks import BENCHMARKS, EvalError  # noqa: E402
from atp_jax.eval.runner import RESULTS, evaluate, format_table  # noqa: E402
from atp_jax.infer.runner import DTYPES, MODES, PRUNE_METHODS, InferError  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS)
    p.add_argument("--questions", required=True, help="the benchmark's question file (JSONL)")
    p.add_argument("--image-folder", required=True, help="folder the questions' image paths are relative to")
    p.add_argument("--annotations", help="ground truth by question_id (VQAv2/GQA/TextVQA answers, POPE labels)")
    p.add_argument("--output", required=True, help="folder for answers.jsonl, results.json and run.json")
    p.add_argument("--checkpoint", required=True, help="converted atp_jax directory or HF llava directory")
    p.add_argument("--tokenizer", help="tokenizer directory, when the checkpoint has none (or to override it)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default="atp", help="visual-token pruning method")
    p.add_argument("--mode", choices=MODES, default="compact",
                   help="compact: pruned tokens leave compute and cache; masked: they are hidden")
    p.add_argument("--batch-size", type=int, default=8, help="questions per forward pass")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answers are a word, a phrase or a letter")
    p.add_argument("--limit", type=int, help="evaluate only the first N questions")
    p.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: as stored)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="JAX persistent compilation cache: later runs reuse the compiled prefill and decode programs")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    try:
        results = evaluate(args.benchmark, args.questions, args.image_folder, args.output, args.checkpoint,
                           annotations=args.annotations, tokenizer_dir=args.tokenizer, prune=args.prune,
                           mode=args.mode, dtype=args.dtype, batch_size=args.batch_size,
                           max_new_tokens=args.max_new_tokens, limit=args.limit)
    except (EvalError, InferError) as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; run the same command again to resume from {Path(args.output) / 'answers.jsonl'}",
              file=sys.stderr)
        return 130
    print(format_table(results))
    print(f"wrote {Path(args.output) / RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
