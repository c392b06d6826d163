"""Where a training step of the main job goes: compute against this machine's matmul peak, and the host's share.

  python benchmarks/profile_step.py [--stage finetune] [--steps 40]

Builds the stage's run exactly as `launch/train.py` does (its config from configs/tiny_synthetic.py, the synthetic
data, the model, the optimizer with its frozen groups, the jitted donated step) and times, per step, median over
`--steps` steps after a warm-up:
  - data: the input pipeline producing one batch (grain, on the same cores as the step);
  - placement: the batch put on the mesh;
  - compute: the jitted step alone, on a batch already placed (dispatch included), and its parts: the forward
    pass (the loss alone), forward + backward (loss and gradients), the rest being the AdamW update;
  - loop: the trainer's loop (data, placement, step) with nothing else, and with its orbax `manager.save` call
    every step (it saves every `checkpoint_every` steps);
and the step's FLOPs (XLA's cost analysis of the compiled step) against a float32 2048^3 matmul timed in the same
run. The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from atp_jax.sharding import global_batch, make_mesh  # noqa: E402
from atp_jax.train import checkpointing, data  # noqa: E402
from atp_jax.train.program import build_model, model_inputs, train_program  # noqa: E402
from atp_jax.train.step import frozen_loss  # noqa: E402
from benchmarks.common import emit, print_table  # noqa: E402
from benchmarks.train_step import matmul_flops_per_s  # noqa: E402


def stage_config(stage: str):
    from atp_jax.train.stages import stage_configs
    from configs.tiny_synthetic import get_config

    configs = dict(stage_configs(get_config(), tempfile.mkdtemp()))
    config = configs[stage]
    config.model.init_from = ""  # a fresh model of the same size: the step costs the same
    return config


def median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="finetune", choices=("pretrain", "finetune", "atp"))
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    config = stage_config(args.stage)
    ds = data.prepare(config)
    model = build_model(config, len(ds.tokenizer), ds.image_token_id)
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    program = train_program(config, model, mesh)  # the trainer's own step
    state = program.init_state(model)
    step, graphdef, frozen = program.step, program.graphdef, program.frozen
    params, rest = jax.tree.map(jnp.copy, (state.params, state.rest))  # the step donates the state's buffers
    iterator = iter(data.loader(config, ds, ds.sources["train"], model.llava.config, config.batch_size, seed=0))
    batch = global_batch(model_inputs(next(iterator)), mesh)
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", 0.0))
    holder = {"state": state}

    def compute():
        holder["state"], metrics = step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def loop(manager=None):
        holder["state"], metrics = step(holder["state"], global_batch(model_inputs(next(iterator)), mesh))
        if manager is not None:
            manager.save(int(holder["state"].step), args=checkpointing.save_args(holder["state"], iterator))
        jax.block_until_ready(metrics["loss"])

    loss_of = frozen_loss(graphdef, rest, batch, frozen)  # the step's own loss, without the update
    forward = jax.jit(lambda p: loss_of(p)[0])
    backward = jax.jit(jax.value_and_grad(loss_of, has_aux=True))
    forward(params).block_until_ready()
    jax.block_until_ready(backward(params))
    compute()  # warm-up
    local = next(iterator)
    n = args.steps
    figures = {"data_ms": median_ms(lambda: next(iterator), n),
               "placement_ms": median_ms(lambda: jax.block_until_ready(global_batch(model_inputs(local), mesh)), n),
               "compute_ms": median_ms(compute, n),
               "forward_ms": median_ms(lambda: forward(params).block_until_ready(), n),
               "forward_backward_ms": median_ms(lambda: jax.block_until_ready(backward(params)), n),
               "loop_ms": median_ms(loop, n)}
    with tempfile.TemporaryDirectory() as d:
        manager = checkpointing.manager(Path(d) / "checkpoints", 10**9, 1)  # save() is called, never saves
        figures["loop_with_checkpoint_call_ms"] = median_ms(lambda: loop(manager), n)
        manager.close()
    peak = matmul_flops_per_s()
    figures |= {"step_gflops": flops / 1e9, "achieved_gflop_per_s": flops / figures["compute_ms"] * 1e3 / 1e9,
                "matmul_gflop_per_s": peak / 1e9, "matmul_bound_ms": 1000 * flops / peak,
                "stage": args.stage, "batch": config.batch_size, "seq_len": int(batch["input_ids"].shape[1]),
                "devices": jax.device_count(), "backend": jax.default_backend(),
                "xla_flags": os.environ.get("XLA_FLAGS", "")}
    rows = [[k, f"{v:.1f}"] for k, v in figures.items() if k.endswith(("_ms", "_s", "gflops"))]
    print_table(f"training step of stage {args.stage} (batch {config.batch_size}, {figures['seq_len']} tokens)",
                ["part", "value"], rows)
    emit(figures)


if __name__ == "__main__":
    main()
