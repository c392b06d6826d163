"""Input pipeline throughput vs what a tiny training step consumes.

  python benchmarks/input_pipeline.py [--samples 2048] [--batch 8] [--workers 0 1]

Measures samples/s of the whole grain pipeline (array_record read, PNG decode, pad + CLIP pre-processing,
template, tokenization, labels, batching) on the synthetic shapes set, for each worker count, and the
samples/s of a jitted training step (loss, gradients, AdamW) of a tiny LLaVA with a 12x12 patch grid on the
same batches. The pipeline must not be the bottleneck: ratio = pipeline rate / training rate >= 1.
The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from flax import nnx  # noqa: E402

from atp_jax import LlavaConfig, LlavaForConditionalGeneration  # noqa: E402
from atp_jax.data import synthetic  # noqa: E402
from atp_jax.data.builders import shapes_data  # noqa: E402
from atp_jax.data.conversation import IGNORE_INDEX  # noqa: E402
from atp_jax.data.pipeline import DataConfig, Preprocess, make_loader  # noqa: E402
from atp_jax.data.tokenizer import load_tokenizer  # noqa: E402
from atp_jax.models.config import TextConfig, VisionConfig  # noqa: E402
from benchmarks.common import emit, print_table  # noqa: E402

IMAGE = 168  # 12 x 12 patches of 14


def tiny_model_config(vocab: int, image_token: int) -> LlavaConfig:
    vision = VisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          image_size=IMAGE, patch_size=14, projection_dim=64)
    text = TextConfig(vocab_size=vocab, hidden_size=128, intermediate_size=344, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return LlavaConfig(vision=vision, text=text, image_token_index=image_token, image_seq_length=144)


def pipeline_rate(src, pre, batch: int, workers: int, batches: int) -> float:
    it = iter(make_loader(src, pre, batch, seed=0, worker_count=workers))
    next(it)  # start-up (worker processes, first reads) excluded
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - start)


def train_rate(cfg: LlavaConfig, batch_arrays: dict, steps: int) -> float:
    model = LlavaForConditionalGeneration(cfg, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)
    ids, labels = jnp.asarray(batch_arrays["input_ids"]), jnp.asarray(batch_arrays["labels"])
    mask, pixels = jnp.asarray(batch_arrays["attention_mask"]), jnp.asarray(batch_arrays["pixel_values"])

    @nnx.jit
    def step(model, opt):
        def loss_fn(m):
            logits = m(ids, pixels, mask).logits[:, :-1]
            target = labels[:, 1:]
            ok = target != IGNORE_INDEX
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(ok, target, 0))
            return (ce * ok).sum() / ok.sum()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    step(model, opt).block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        step(model, opt).block_until_ready()
    return steps * ids.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048, help="size of the synthetic train split generated")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per pipeline setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    tfds.disable_progress_bar()
    import absl.flags

    absl.flags.FLAGS.mark_as_parsed()  # grain worker processes outside absl.app need this
    shapes = dataclasses.replace(synthetic.ShapesConfig(), train_size=args.samples, val_size=8, test_size=8)
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        data_dir, tokenizer_dir = shapes_data(cache, shapes)
        prepare_s = time.perf_counter() - start
        tok = load_tokenizer(tokenizer_dir)
        image_token = tok.convert_tokens_to_ids("<image>")
        src = tfds.data_source("shapes_vqa/vqa", data_dir=str(data_dir), split="train")
        pre = Preprocess(str(tokenizer_dir), image_token, 144, DataConfig(image_size=IMAGE, max_length=256))
        rates = {w: pipeline_rate(src, pre, args.batch, w, args.batches) for w in args.workers}
        sample_batch = next(iter(make_loader(src, pre, args.batch, seed=0)))
    consume = train_rate(tiny_model_config(len(tok) + 62, image_token), sample_batch, steps=10)
    best = max(rates.values())
    print(f"cpu_count={os.cpu_count()} backend={jax.default_backend()}; synthetic set of {args.samples} "
          f"({prepare_s:.1f} s to generate), images {shapes.image_size} px -> {IMAGE} px, batch {args.batch}")
    print_table("samples/s", ["what", "samples/s"],
                [*[[f"pipeline, {w} workers", f"{r:.0f}"] for w, r in rates.items()],
                 ["tiny LLaVA train step (12x12 patches, 4 layers)", f"{consume:.0f}"]])
    print(f"\npipeline / training = {best / consume:.1f} (must be >= 1: the pipeline is not the bottleneck)")
    emit({"pipeline_samples_per_s": {str(w): r for w, r in rates.items()}, "train_samples_per_s": consume,
          "ratio": best / consume, "prepare_s": prepare_s, "samples": args.samples, "batch": args.batch})


if __name__ == "__main__":
    main()
