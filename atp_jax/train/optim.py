"""Optimizer builder: AdamW with per-group learning rates, a frozen set, warm-up + decay, clipping, accumulation.

The paper's ATP fine-tuning recipe (LLaVA-1.5-7B) is the default `OptimConfig`: AdamW (b1 0.9, b2 0.999,
eps 1e-8), LLM + projector at 2e-5, the ATP threshold MLPs at 1e-4, the vision tower frozen, 3 % linear warm-up
then cosine to 0, gradient clipping at global norm 1.0 and no weight decay (LLaVA's default). Only
`total_steps` has to be given.

Parameters are addressed by their '/'-joined path in the parameter pytree, e.g.
``thresholds/0/head/kernel`` or ``llava/language_model/layers/mlp/up_proj/kernel`` for a `PrunedLlava` (no
leading ``llava/`` for a plain `LlavaForConditionalGeneration`). Patterns are Python regexes matched with
`re.search`, so they may match anywhere unless anchored.

The transformation works on any pytree of arrays: an `nnx.State` of `nnx.Param` variables (what
``nnx.split(model, nnx.Param, ...)`` or ``nnx.state(model, nnx.Param)`` return, and what `jax.grad` returns
for them), the pure `nnx.State` that `nnx.Optimizer` passes (`nnx.as_pure`), or a plain nested dict
(`nnx.to_pure_dict`). Labels are derived from the tree's key paths at `init`/`update` time (trace time under
`jit`), so the same `tx` serves all of these. Structure of the returned transformation::

    partition({"trainable": [MultiSteps(] chain(clip_by_global_norm, partition({group: adamw(...)})) [)],
               "frozen":    set_to_zero()})

Putting the frozen split outermost means the frozen parameters never reach the clipping (the global norm is
over the trainable parameters only), the Adam moments, nor the accumulation buffers: they hold no optimizer
state at all, which for a 7B LLaVA saves 2-3 fp32 copies of the 300M-parameter vision tower.

Step counting: the schedules count *optimizer* updates. With gradient accumulation, `total_steps` is the number
of updates (micro-batches / `accumulation_steps`), and the schedule only advances when an update is applied.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

FROZEN = "frozen"  # the label of parameters that get no updates and no optimizer state
SCHEDULES = ("cosine", "constant", "linear")

# Parameters exempt from weight decay (when weight_decay > 0), matched against '/'-joined paths. As in the
# HF Trainer that LLaVA uses, norm parameters (LayerNorm scale/bias, RMSNorm weight) and biases are exempt;
# in addition embedding tables (token, CLIP position and class embeddings) are: decaying them pulls rarely
# seen token rows towards zero, which is not the regularization that is wanted.
DEFAULT_NO_DECAY: tuple[str, ...] = (
    r"norm[^/]*/(scale|weight|bias)$",  # input_layernorm/weight, layer_norm1/scale, pre_layrnorm/bias, norm/weight
    r"(^|/)bias$",
    r"(^|/)embedding$",  # nnx.Embed tables: embed_tokens/embedding, position_embedding/embedding
    r"(^|/)class_embedding$",
    r"(^|/)position_embedding(/|$)",
)

# The paper's groups: the ATP threshold MLPs learn 5x faster than the fine-tuned LLM and projector.
# The model's parameter families, by path: the one place a path pattern names them.
PATTERNS = {"atp": r"(^|/)thresholds/", "llm": r"(^|/)language_model/",
            "projector": r"(^|/)multi_modal_projector/", "vision": r"(^|/)vision_tower/"}
DEFAULT_GROUPS: tuple[tuple[str, float, tuple[str, ...]], ...] = (
    ("atp", 1e-4, (PATTERNS["atp"],)),
    ("llm", 2e-5, (PATTERNS["llm"], PATTERNS["projector"])),
)
DEFAULT_FROZEN: tuple[str, ...] = (PATTERNS["vision"],)

_MAX_LISTED = 5  # unmatched paths named in the error message


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Everything the optimizer needs; the defaults are the paper's ATP fine-tuning recipe.

    Attributes:
        total_steps: number of optimizer updates in the run (after gradient accumulation). The decay reaches
            ``final_lr_ratio * lr`` here and stays there afterwards.
        warmup_ratio: fraction of `total_steps` spent warming up, rounded up (the HF Trainer's convention).
        warmup_steps: explicit warm-up length; overrides `warmup_ratio` when > 0.
        schedule: after warm-up, "cosine" or "linear" decay to ``final_lr_ratio * lr``, or "constant" at lr
            (``final_lr_ratio`` is then unused).
        final_lr_ratio: the learning rate at `total_steps` as a fraction of each group's peak.
        b1, b2, eps: Adam's moment decay rates and denominator epsilon.
        weight_decay: decoupled (AdamW) decay coefficient; the step is ``lr * weight_decay * param``.
        no_decay: patterns of paths exempt from weight decay.
        clip_norm: clip the global gradient norm of the trainable parameters to this; 0 disables clipping.
        accumulation_steps: micro-batches whose gradients are averaged into one update (1: no accumulation).
        groups: ``(name, peak_lr, patterns)`` per group; a parameter takes the first group with a pattern that
            matches its path. A group with pattern ".*" catches all the rest.
        frozen: patterns of parameters that get no updates and no optimizer state; checked before `groups`.
    """

    total_steps: int
    warmup_ratio: float = 0.03
    warmup_steps: int = 0
    schedule: str = "cosine"
    final_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    no_decay: tuple[str, ...] = DEFAULT_NO_DECAY
    clip_norm: float = 1.0
    accumulation_steps: int = 1
    groups: tuple[tuple[str, float, tuple[str, ...]], ...] = DEFAULT_GROUPS
    frozen: tuple[str, ...] = DEFAULT_FROZEN

    def __post_init__(self):
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0.0 <= self.warmup_ratio <= 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.num_warmup_steps > self.total_steps:
            raise ValueError(f"{self.num_warmup_steps} warm-up steps exceed total_steps={self.total_steps}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}: expected one of {SCHEDULES}")
        if not 0.0 <= self.final_lr_ratio <= 1.0:
            raise ValueError(f"final_lr_ratio must be in [0, 1], got {self.final_lr_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_norm < 0:
            raise ValueError(f"clip_norm must be >= 0 (0 disables), got {self.clip_norm}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if not self.groups:
            raise ValueError("at least one parameter group is needed")
        names = [g[0] for g in self.groups]
        if len(set(names)) != len(names):
            raise ValueError(f"group names must be unique, got {names}")
        if FROZEN in names:
            raise ValueError(f"{FROZEN!r} is reserved for frozen parameters; rename that group")
        for name, lr, patterns in self.groups:
            if lr < 0:
                raise ValueError(f"group {name!r}: learning rate must be >= 0, got {lr}")
            if isinstance(patterns, str):  # a bare string would be iterated character by character
                raise ValueError(f"group {name!r}: patterns must be a tuple of regexes, got the string {patterns!r}")
        for p in (*self.no_decay, *self.frozen, *(p for g in self.groups for p in g[2])):
            re.compile(p)  # fail at construction on a malformed regex, not at the first step

    @property
    def num_warmup_steps(self) -> int:
        """Warm-up length in optimizer steps: `warmup_steps` if > 0, else ceil(warmup_ratio * total_steps)."""
        if self.warmup_steps > 0:
            return self.warmup_steps
        return math.ceil(self.warmup_ratio * self.total_steps)

    @property
    def group_lrs(self) -> dict[str, float]:
        return {name: lr for name, lr, _ in self.groups}


# ---- paths and labels ------------------------------------------------------------------------------------


def _is_variable(x: Any) -> bool:
    # An nnx.Variable is a pytree node whose single child sits under the key `.value`; treating the variable as
    # the leaf keeps that implementation detail out of the path, so State-of-Variables and pure trees agree.
    return isinstance(x, nnx.Variable)


def path_str(path: tuple) -> str:
    """'/'-joined form of a JAX key path, e.g. ``thresholds/0/head/kernel``."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def map_paths(fn: Callable[[str], Any], tree: Any) -> Any:
    """`tree` with each parameter (array or nnx.Variable) replaced by ``fn(path_string)``.

    Empty nodes such as `optax.MaskedNode` have no leaves and pass through unchanged, which lets the label and
    mask functions run on the partially masked trees that `optax.partition` hands to its inner transforms.
    """
    return jax.tree_util.tree_map_with_path(lambda p, _: fn(path_str(p)), tree, is_leaf=_is_variable)


def _first_match(path: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, path) for p in patterns)


def label_of(path: str, cfg: OptimConfig) -> str | None:
    """The label of one path: "frozen", the first matching group's name, or None when nothing matches."""
    if _first_match(path, cfg.frozen):
        return FROZEN
    for name, _, patterns in cfg.groups:
        if _first_match(path, patterns):
            return name
    return None


def path_labels(params: Any, cfg: OptimConfig) -> Any:
    """A pytree like `params` with a str label per parameter: its group's name, or "frozen".

    Raises:
        ValueError: some parameter is neither frozen nor in a group; a few of their paths are named. Add a
            group (or a ".*" catch-all) or a frozen pattern: a silent default learning rate would hide typos.
    """
    unmatched: list[str] = []

    def one(path: str) -> str:
        label = label_of(path, cfg)
        if label is None:
            unmatched.append(path)
            return ""
        return label

    labels = map_paths(one, params)
    if unmatched:
        listed = ", ".join(unmatched[:_MAX_LISTED])
        more = f" (and {len(unmatched) - _MAX_LISTED} more)" if len(unmatched) > _MAX_LISTED else ""
        raise ValueError(
            f"{len(unmatched)} parameter(s) match no optimizer group and no frozen pattern: {listed}{more}. "
            f"Groups: {[(n, p) for n, _, p in cfg.groups]}; frozen: {cfg.frozen}"
        )
    return labels


def decay_mask(params: Any, cfg: OptimConfig) -> Any:
    """A pytree like `params` of bools: True where weight decay applies (the path matches no `no_decay`)."""
    return map_paths(lambda path: not _first_match(path, cfg.no_decay), params)


def count_params(params: Any, labels: Any) -> dict[str, int]:
    """Number of scalar parameters per label (e.g. ``{"atp": ..., "llm": ..., "frozen": ...}``).

    `labels` is `path_labels(params, cfg)`; it may be a prefix of `params` (a label per nnx.Variable).
    """
    counts: dict[str, int] = {}

    def add(label: str, subtree: Any) -> None:
        counts[label] = counts.get(label, 0) + sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(subtree))

    # `labels` drives the map, so each label meets the whole parameter (the Variable, or the bare array).
    jax.tree.map(add, labels, params)
    return counts


# ---- schedules -------------------------------------------------------------------------------------------


def lr_schedule(cfg: OptimConfig, peak_lr: float) -> optax.Schedule:
    """Learning rate at an optimizer step: linear warm-up from 0, then cosine/linear decay or constant.

    With W warm-up steps and T total steps (HF `get_cosine_schedule_with_warmup` when final_lr_ratio is 0):
        step < W:  peak * step / W
        step >= W: final + (peak - final) * 0.5 * (1 + cos(pi * p))   (cosine)
                   peak + (final - peak) * p                         (linear)
                   peak                                              (constant)
    with p = clip((step - W) / (T - W), 0, 1) and final = final_lr_ratio * peak. The first update (step 0) thus
    has lr 0 when W > 0, as in the HF Trainer.
    """
    warmup = cfg.num_warmup_steps
    decay_steps = max(cfg.total_steps - warmup, 1)
    final = peak_lr * cfg.final_lr_ratio

    def schedule(count: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(count, jnp.float32)
        warm = peak_lr * step / max(warmup, 1)
        progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
        if cfg.schedule == "cosine":
            main = final + (peak_lr - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        elif cfg.schedule == "linear":
            main = peak_lr + (final - peak_lr) * progress
        else:
            main = jnp.full_like(step, peak_lr)
        return jnp.where(step < warmup, warm, main)

    return schedule


def learning_rates(cfg: OptimConfig, step: int) -> dict[str, float]:
    """Each group's learning rate at optimizer step `step` (0-based: the lr the (step+1)-th update uses)."""
    return {name: float(lr_schedule(cfg, lr)(step)) for name, lr, _ in cfg.groups}


# ---- the transformation ----------------------------------------------------------------------------------


def make_optimizer(cfg: OptimConfig, params: Any) -> optax.GradientTransformation:
    """The optax transformation for `cfg`; see the module docstring for its structure.

    `params` is only used to check, now rather than at the first step, that every parameter has a label
    (`path_labels` raises otherwise); the returned transformation recomputes labels from whatever tree it is
    given, so it works on `nnx.State` (with or without Variable nodes) and on plain nested dicts alike.
    """
    path_labels(params, cfg)

    def group_labels(tree: Any) -> Any:
        return path_labels(tree, cfg)

    def coarse_labels(tree: Any) -> Any:
        return map_paths(lambda path: FROZEN if label_of(path, cfg) == FROZEN else "trainable", tree)

    def no_decay_mask(tree: Any) -> Any:
        return decay_mask(tree, cfg)

    per_group = {
        name: optax.adamw(
            learning_rate=lr_schedule(cfg, lr),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=no_decay_mask,
        )
        for name, lr, _ in cfg.groups
    }
    # The frozen parameters never reach this point (see `coarse_labels` below), so a "frozen" label cannot
    # occur here; `group_labels` only sees the trainable ones.
    trainable = optax.partition(per_group, group_labels)
    if cfg.clip_norm > 0:
        # Inside the trainable branch, the global norm is computed over the trainable parameters only.
        trainable = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), trainable)
    if cfg.accumulation_steps > 1:
        # Averages the micro-batch gradients (use_grad_mean) and applies clip + Adam once per k calls; in
        # between, the update is zero and the inner state (moments, schedule count) does not advance.
        trainable = optax.MultiSteps(trainable, every_k_schedule=cfg.accumulation_steps).gradient_transformation()
    return optax.partition({"trainable": trainable, FROZEN: optax.set_to_zero()}, coarse_labels)


def describe(cfg: OptimConfig, params: Any) -> str:
    """A short multi-line summary for the startup log: parameters per group with their peak lr, and the schedule."""
    counts = count_params(params, path_labels(params, cfg))
    lines = []
    for name, lr, _ in cfg.groups:
        lines.append(f"  {name:<10} {counts.get(name, 0):>14,d} params  peak lr {lr:g}")
    lines.append(f"  {FROZEN:<10} {counts.get(FROZEN, 0):>14,d} params")
    head = (
        f"AdamW b=({cfg.b1}, {cfg.b2}) eps={cfg.eps} wd={cfg.weight_decay} clip={cfg.clip_norm or 'off'} "
        f"accum={cfg.accumulation_steps}; {cfg.schedule} over {cfg.total_steps} steps, "
        f"{cfg.num_warmup_steps} warm-up, final {cfg.final_lr_ratio:g} x peak"
    )
    return "\n".join([head, *lines])
