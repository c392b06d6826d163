"""The trainer's own step compiled for a TPU slice from abstract shapes: `build_model(abstract=True)` and
`train_program` (atp_jax/train/program.py) on a mesh of the slice's devices; nothing allocated or read."""

from __future__ import annotations

import dataclasses

import jax

from atp_jax.aot.analysis import ProgramCost, compile_cost, unsharded_arguments
from atp_jax.aot.chips import chip_count, topology_devices
from atp_jax.sharding import DEFAULT_RULES, make_mesh, use_mesh
from atp_jax.train.program import build_model, teacher_model, train_program


def on_tpu(attention: str) -> str:
    """The attention implementation a TPU program gets for a `model.attention` setting."""
    return "pallas" if attention == "auto" else attention


@dataclasses.dataclass(frozen=True)
class TrainingCost:
    topology: str
    chips: int
    model_config: object  # the LlavaConfig compiled
    mesh: dict
    batch: int  # global, per step (one micro-batch when accumulating)
    seq_len: int
    remat: bool
    train_vision: bool
    parameters: int
    trainable: int
    cost: ProgramCost
    unsharded: list  # (path, bytes) of large state arguments kept whole on a device
    attention: str = "auto"  # the decoder's attention implementation (model.attention)


def training_cost(config, topology: str, vocab_size: int = 32064, image_token_id: int | None = None,
                  min_unsharded_bytes: int = 2**26) -> TrainingCost:
    """Compiles the train step `config` describes (batch `config.batch_size`, sequence `config.data.max_length`)
    for `topology` (e.g. "v4:2x2x4"). `vocab_size` and `image_token_id` matter only for a fresh model (a preset
    or `model.init_from` brings its own). State arguments of `min_unsharded_bytes` or more that the program
    keeps whole on a chip are listed in `unsharded`."""
    devices = topology_devices(topology)
    m = config.mesh
    mesh = make_mesh(m.data, m.fsdp, m.tensor, devices=devices)
    model = build_model(config, vocab_size, vocab_size - 1 if image_token_id is None else image_token_id,
                        abstract=True)
    teacher = teacher_model(config, abstract=True)
    program = train_program(config, model, mesh, teacher=teacher)
    state = program.abstract_state()
    cfg = model.llava.config
    batch = program.abstract_batch(config.batch_size, config.data.max_length, cfg.vision.image_size)
    large = {jax.tree_util.keystr(p): leaf.shape for p, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
    with use_mesh(mesh, DEFAULT_RULES):
        teacher_params = program.abstract_teacher(teacher)
        cost, compiled = compile_cost("train_step", program.step, state, batch, teacher_params, large_shapes=large)
    sizes = [(leaf.size, frozen) for leaf, frozen in zip(jax.tree.leaves(program.shapes.params),
                                                         jax.tree.leaves(program.frozen), strict=True)]
    return TrainingCost(topology=topology, chips=chip_count(topology), model_config=cfg, mesh=dict(mesh.shape),
                        batch=config.batch_size, seq_len=config.data.max_length, remat=bool(config.model.remat),
                        train_vision=config.optim.vision_lr > 0,
                        parameters=sum(n for n, _ in sizes), trainable=sum(n for n, f in sizes if not f),
                        cost=cost,
                        unsharded=unsharded_arguments(compiled, (state, batch, teacher_params), min_unsharded_bytes),
                        attention=on_tpu(model.llava.language_model.attention))
