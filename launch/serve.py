"""Serve a (pruned) LLaVA checkpoint over the OpenAI chat-completions API.

  python launch/serve.py --checkpoint DIR [--prune atp|fastv|pdrop|random|none] [--mode compact|masked]
                         [--host 127.0.0.1] [--port 8000] [--max-batch 8] [--api-key KEY] [--image-dir DIR]
                         [--warmup] [--tensor N]

POST /v1/chat/completions takes one user message with a question and one image (a base64 data URL; local paths
only under --image-dir; the server fetches nothing); GET /v1/models, GET /health, GET /metrics (Prometheus), and
a page at / to try it in a browser. Answers carry an `atp` object:
the visual tokens kept per decoder layer, their average and the prefill FLOPs ratio. The server binds to
localhost unless --host says otherwise; with --api-key every /v1/ request must send it as a bearer token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atp_jax.cli import Parser, enable_compilation_cache, user_message  # noqa: E402
from atp_jax.infer.runner import DTYPES, MODES, PRUNE_METHODS, InferError, load, untrained_warning  # noqa: E402


def build_parser() -> Parser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="converted atp_jax directory or HF llava directory")
    p.add_argument("--tokenizer", help="tokenizer directory, when the checkpoint has none (or to override it)")
    p.add_argument("--prune", choices=PRUNE_METHODS, default="atp", help="visual-token pruning method")
    p.add_argument("--mode", choices=MODES, default="compact",
                   help="compact: pruned tokens leave compute and cache; masked: they are hidden")
    p.add_argument("--dtype", choices=DTYPES, help="parameter and compute dtype (default: as stored)")
    p.add_argument("--tensor", type=int, default=1, help="split the weights and the KV cache over this many of "
                   "the host's accelerators (tensor parallel; default %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model-name", help="the model id clients send (default: the checkpoint folder's name)")
    p.add_argument("--api-key", help="required as 'Authorization: Bearer KEY' on every /v1/ request "
                   "(default: the ATP_JAX_API_KEY environment variable, else none)")
    p.add_argument("--image-dir", help="allow local image paths under this directory (default: data URLs only)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most (rows of the "
                   "continuous batch; a finished request frees its row for a waiting one)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more get 503")
    p.add_argument("--batch-window-ms", type=float, default=10.0, help="how long a batch waits for company")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    p.add_argument("--warmup", action="store_true", help="compile the prefill and decode programs of every batch "
                   "size before serving (the first requests then wait for no compiler)")
    p.add_argument("--compilation-cache", metavar="DIR",
                   help="JAX persistent compilation cache: later runs reuse the compiled prefill and decode programs")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for flag, value in (("--max-batch", args.max_batch), ("--max-queue", args.max_queue)):
        if value < 1:
            parser.error(f"{flag} {value}: must be at least 1")
    if args.timeout <= 0 or args.batch_window_ms < 0:
        parser.error("--timeout must be positive and --batch-window-ms not negative")
    if args.image_dir and not Path(args.image_dir).is_dir():
        parser.error(f"--image-dir {args.image_dir}: not a directory")
    if args.compilation_cache:
        enable_compilation_cache(args.compilation_cache)
    try:
        runner = load(args.checkpoint, args.tokenizer, args.prune, args.mode, args.dtype, args.tensor)
    except InferError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        return 2
    warning = untrained_warning(runner)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    import uvicorn

    from atp_jax.serve.app import ServeOptions, create_app

    options = ServeOptions(model_name=args.model_name or Path(args.checkpoint).resolve().name,
                           api_key=args.api_key or os.environ.get("ATP_JAX_API_KEY") or None,
                           image_dir=Path(args.image_dir).resolve() if args.image_dir else None,
                           max_batch=args.max_batch, max_queue=args.max_queue,
                           batch_window_s=args.batch_window_ms / 1000, timeout_s=args.timeout,
                           warmup=args.warmup)
    if args.warmup:
        print("warming up: compiling the programs of every batch size", file=sys.stderr)
    try:
        app = create_app(runner, options)
    except InferError as e:  # a context window too small for the warm-up's question
        print(f"error: --warmup: {user_message(e)}", file=sys.stderr)
        return 2
    print(f"serving {options.model_name} (prune={args.prune}, mode={args.mode}, tensor={args.tensor}) on "
          f"http://{args.host}:{args.port}",
          file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
