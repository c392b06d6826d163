"""The training program a config describes: the model, its optimizer and frozen groups, the shardings of the
train state on a mesh, and the jitted, donated step. Built once here for the trainer (which then fills the
state with real arrays) and for ahead-of-time compilation (which lowers the same step on abstract shapes).

    model = build_model(config, vocab_size, image_token_id)            # or abstract=True: shapes only
    program = train_program(config, model, mesh)
    state = program.init_state(model)                                   # trainer
    program.step.lower(program.abstract_state(), program.abstract_batch(...), None).compile()   # AOT
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from atp_jax.models.common import IMPLEMENTATIONS, DtypePolicy
from atp_jax.models.config import LlavaConfig, TextConfig, VisionConfig
from atp_jax.models.llava import LlavaForConditionalGeneration
from atp_jax.pruning.config import fit_to_depth
from atp_jax.pruning.engine import PrunedLlava
from atp_jax.sharding import DEFAULT_RULES, batch_sharding, param_shardings, tree_shardings
from atp_jax.train.optim import FROZEN, PATTERNS, OptimConfig, label_of, make_optimizer, map_paths
from atp_jax.train.step import Distill, TrainState, eval_step, train_step

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "pixel_values")


def model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in MODEL_INPUTS}


def model_config(config, vocab_size: int, image_token_id: int) -> LlavaConfig:
    """The architecture a config trains: read from `model.init_from` (its config file only, no weights), a
    named `model.preset` (e.g. "llava15_7b"), or the config's sizes for a fresh model (the vocabulary rounded up
    to a multiple of 64 from the tokenizer's `vocab_size`)."""
    if config.model.init_from:
        from atp_jax.convert.checkpoint import CONFIG_FILE, is_converted
        from atp_jax.convert.configs import checkpoint_config

        path = Path(config.model.init_from)
        return LlavaConfig.load(path / CONFIG_FILE) if is_converted(path) else checkpoint_config(path)[0]
    if config.model.preset:
        preset = getattr(LlavaConfig, config.model.preset, None)
        if preset is None or config.model.preset.startswith("_"):
            raise ValueError(f"model.preset {config.model.preset!r}: not a LlavaConfig preset")
        return preset()
    vision = VisionConfig(**config.model.vision.to_dict())
    text = TextConfig(vocab_size=math.ceil(vocab_size / 64) * 64, **config.model.text.to_dict())
    return LlavaConfig(vision=vision, text=text, image_token_index=image_token_id,
                       image_seq_length=vision.grid * vision.grid)


def build_model(config, vocab_size: int, image_token_id: int, abstract: bool = False) -> PrunedLlava:
    """The PrunedLlava to train: from `model.init_from` (a converted checkpoint) or fresh at the config's size.
    `abstract=True`: the same model as shapes only (nothing allocated, nothing read but config files), for
    ahead-of-time compilation; a preset is then enough, without a checkpoint."""
    policy = DtypePolicy(param_dtype=jnp.float32, dtype=jnp.dtype(config.model.dtype))  # float32 master weights
    run = dict(policy=policy, remat=bool(config.model.remat), attention=attention_implementation(config))
    if abstract:
        cfg = model_config(config, vocab_size, image_token_id)
        llava = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, **run, rngs=nnx.Rngs(0)))
    elif config.model.init_from:
        from atp_jax.convert.checkpoint import load_pretrained

        stored, cfg = load_pretrained(config.model.init_from, dtype="float32")
        llava = nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, **run, rngs=nnx.Rngs(0)))
        nnx.update(llava, nnx.state(stored))
    elif config.model.preset:
        raise ValueError(f"model.init_from: a converted checkpoint is needed for preset {config.model.preset!r} "
                         "(see README: converting LLaVA-1.5)")
    else:
        cfg = model_config(config, vocab_size, image_token_id)
        llava = LlavaForConditionalGeneration(cfg, **run, rngs=nnx.Rngs(config.seed))
        std = config.model.get("vision_position_std", 0.0)
        if std:
            emb = llava.vision_tower.position_embedding.embedding
            emb[...] = std * jax.random.normal(jax.random.key(config.seed + 2), emb.shape, emb.dtype)
    # Placed for this depth (baselines included), so the exported model runs every method as the report does.
    pcfg = fit_to_depth(config.pruning.to_dict(), llava.config.text.num_hidden_layers)
    if abstract:
        return nnx.eval_shape(lambda: PrunedLlava(llava, pcfg, rngs=nnx.Rngs(config.seed + 1)))
    return PrunedLlava(llava, pcfg, rngs=nnx.Rngs(config.seed + 1))


def attention_implementation(config) -> str:
    """The config's `model.attention` (configs saved before the field existed: "auto")."""
    name = config.model.get("attention", "auto")
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention {name!r}: expected one of {IMPLEMENTATIONS}")
    return name


def optim_config(config) -> OptimConfig:
    """Parameter groups from the config's learning rates; a rate of 0 freezes its group (no optimizer state).
    With `accumulation_steps` k, the `total_steps` train steps make total_steps / k updates, which the schedule
    spans."""
    o = config.optim
    projector_lr = o.lr if o.projector_lr < 0 else o.projector_lr
    rates = [(name, lr, PATTERNS[name]) for name, lr in
             (("atp", o.atp_lr), ("llm", o.lr), ("projector", projector_lr), ("vision", o.vision_lr))]
    groups = tuple((name, lr, (pattern,)) for name, lr, pattern in rates if lr > 0)
    frozen = tuple(pattern for _, lr, pattern in rates if lr <= 0)
    # The schedule counts optimizer updates; the config's total_steps counts train-step calls (micro-batches).
    updates = math.ceil(config.total_steps / o.accumulation_steps)
    return OptimConfig(total_steps=updates, warmup_ratio=o.warmup_ratio, schedule=o.schedule,
                       weight_decay=o.weight_decay, clip_norm=o.clip_norm, accumulation_steps=o.accumulation_steps,
                       groups=groups, frozen=frozen)


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The jitted train and eval steps of one model on one mesh, with the state's layout."""

    mesh: Mesh
    graphdef: nnx.GraphDef
    tx: optax.GradientTransformation
    optim: OptimConfig
    frozen: object  # a tree of bools over the params: True for parameters the optimizer leaves alone
    shapes: TrainState  # ShapeDtypeStructs of the state (no shardings)
    shardings: TrainState  # NamedShardings of the state
    teacher_shardings: object  # NamedShardings of the distillation teacher's parameters (None without one)
    step: Callable  # (state, batch, teacher_params) -> (state, metrics); donates the state
    eval: Callable  # (state, batch) -> metrics

    def abstract_state(self) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: what `step.lower` takes."""
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), self.shapes,
                            self.shardings)

    def abstract_batch(self, batch_size: int, seq_len: int, image_size: int) -> dict:
        """A global batch as ShapeDtypeStructs split over the mesh's batch axes (the loader's fields)."""
        sharding = batch_sharding(self.mesh)
        tokens = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32, sharding=sharding)
        return {"input_ids": tokens, "labels": tokens,
                "attention_mask": jax.ShapeDtypeStruct((batch_size, seq_len), jnp.bool_, sharding=sharding),
                "pixel_values": jax.ShapeDtypeStruct((batch_size, 3, image_size, image_size), jnp.float32,
                                                     sharding=sharding)}

    def abstract_teacher(self, teacher) -> object:
        """The teacher's parameters as ShapeDtypeStructs with their shardings (None without a teacher)."""
        if teacher is None:
            return None
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            _abstract(nnx.state(teacher)), self.teacher_shardings)

    def place_teacher(self, teacher) -> object:
        """The teacher's parameters on the mesh (None without a teacher); the teacher holds them too."""
        if teacher is None:
            return None
        params = jax.device_put(nnx.state(teacher), self.teacher_shardings)
        nnx.update(teacher, params)
        return params

    def init_state(self, model: PrunedLlava) -> TrainState:
        """The first train state of a concrete model: its variables placed on the mesh, fresh optimizer state."""
        _, params, rest = nnx.split(model, nnx.Param, ...)
        params = jax.device_put(params, self.shardings.params)
        rest = jax.device_put(rest, self.shardings.rest)
        nnx.update(model, params, rest)  # the model holds the placed arrays: no unsharded copy stays alive

        def counter():  # one buffer each, since the step donates them
            return jax.device_put(jnp.zeros((), jnp.int32), self.shardings.step)

        opt_state = jax.jit(self.tx.init, out_shardings=self.shardings.opt_state)(params)
        return TrainState(params=params, rest=rest, opt_state=opt_state, step=counter(), bad_steps=counter(),
                          skipped=counter())


def teacher_model(config, abstract: bool = False):
    """The frozen distillation teacher when `distill.weight` > 0: the unpruned model the run starts from
    (`model.init_from`), in the compute dtype; None otherwise. `abstract=True`: its shapes only."""
    d = config.get("distill")
    if d is None or d.weight <= 0:
        return None
    dtype = jnp.dtype(config.model.dtype)
    if abstract:
        cfg = model_config(config, 0, 0) if (config.model.init_from or config.model.preset) else None
        if cfg is None:
            raise ValueError("distill.weight > 0 needs model.init_from (or model.preset for shapes only)")
        return nnx.eval_shape(lambda: LlavaForConditionalGeneration(cfg, policy=DtypePolicy(dtype, dtype),
                                                                    rngs=nnx.Rngs(0)))
    if not config.model.init_from:
        raise ValueError("distill.weight > 0 needs model.init_from: the teacher is the model the run starts from")
    from atp_jax.convert.checkpoint import load_pretrained

    return load_pretrained(config.model.init_from, dtype=config.model.dtype)[0]


def train_program(config, model: PrunedLlava, mesh: Mesh, rules=DEFAULT_RULES, teacher=None) -> TrainProgram:
    """The train and eval steps for `model` (concrete or abstract) on `mesh`: parameters and optimizer moments
    sharded by their logical axes, counters replicated, the state donated and kept in its layout step to step.
    `teacher`: the distillation teacher (`teacher_model`), its parameters a step argument laid out the same way."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ocfg = optim_config(config)
    tx = make_optimizer(ocfg, params)
    opt_template = jax.eval_shape(tx.init, params)  # the moments keep their Variables' logical axes
    counter = jax.ShapeDtypeStruct((), jnp.int32)
    shapes = TrainState(params=_abstract(params), rest=_abstract(rest), opt_state=_abstract(opt_template),
                        step=counter, bad_steps=counter, skipped=counter)
    replicated = NamedSharding(mesh, P())
    shardings = TrainState(params=param_shardings(params, mesh, rules), rest=param_shardings(rest, mesh, rules),
                           opt_state=tree_shardings(opt_template, mesh, rules), step=replicated,
                           bad_steps=replicated, skipped=replicated)
    frozen = map_paths(lambda path: label_of(path, ocfg) == FROZEN, params)
    distill, teacher_shardings = None, None
    if teacher is not None:
        teacher_graphdef, teacher_params = nnx.split(teacher)
        distill = Distill(teacher_graphdef, float(config.distill.weight), float(config.distill.temperature))
        teacher_shardings = param_shardings(teacher_params, mesh, rules)
    step = jax.jit(functools.partial(train_step, graphdef, tx, frozen=frozen, distill=distill), donate_argnums=0,
                   in_shardings=(shardings, None, teacher_shardings), out_shardings=(shardings, None))
    evaluate = jax.jit(functools.partial(eval_step, graphdef))
    return TrainProgram(mesh=mesh, graphdef=graphdef, tx=tx, optim=ocfg, frozen=frozen, shapes=shapes,
                        shardings=shardings, teacher_shardings=teacher_shardings, step=step, eval=evaluate)


__all__ = ["MODEL_INPUTS", "TrainProgram", "attention_implementation", "build_model", "model_config", "model_inputs",
           "optim_config", "teacher_model", "train_program"]
