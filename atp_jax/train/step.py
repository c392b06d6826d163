"""The training step: LLaVA's next-token loss plus the ATP budget losses, one optimizer update, skipped when
the loss or a gradient is not finite.

Functional over (graphdef, params, rest) so that `jax.jit` can take in/out shardings and donate the state.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from atp_jax.data.conversation import IGNORE_INDEX
from atp_jax.pruning.decisions import prompt_mask


def lm_loss(logits: Float[Array, "B T V"], labels: Int[Array, "B T"]) -> tuple[Float[Array, ""], Float[Array, ""]]:
    """Mean cross-entropy of predicting labels[t + 1] from logits[t] over supervised tokens (not IGNORE_INDEX),
    and their number. Example: labels [[-100, 5, 7]] supervise logits[0] -> 5 and logits[1] -> 7."""
    target = labels[:, 1:]
    supervised = target != IGNORE_INDEX
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1].astype(jnp.float32),
                                                         jnp.where(supervised, target, 0))
    n = supervised.sum()
    return jnp.where(supervised, ce, 0.0).sum() / jnp.maximum(n, 1), n.astype(jnp.float32)


def distill_loss(logits: Float[Array, "B T V"], teacher_logits: Float[Array, "B T V"], labels: Int[Array, "B T"],
                 temperature: float = 1.0) -> Float[Array, ""]:
    """Mean KL(teacher || student) of the next-token distributions at the supervised positions (those `lm_loss`
    scores), both softened by `temperature`, times temperature^2 (Hinton et al.'s scale)."""
    supervised = labels[:, 1:] != IGNORE_INDEX
    t = jax.nn.log_softmax(teacher_logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
    kl = (jnp.exp(t) * (t - s)).sum(-1)
    return jnp.where(supervised, kl, 0.0).sum() / jnp.maximum(supervised.sum(), 1) * temperature**2


@dataclasses.dataclass(frozen=True)
class Distill:
    """Distillation from a frozen teacher (the model the stage starts from, unpruned): `weight` * `distill_loss`
    is added to the training loss; the teacher's graph is static, its parameters a step argument."""

    graphdef: nnx.GraphDef
    weight: float
    temperature: float = 1.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State  # trainable and frozen parameters (the optimizer leaves frozen ones alone)
    rest: nnx.State  # everything else in the model (none for LLaVA today; kept so models may carry state)
    opt_state: optax.OptState
    step: Int[Array, ""]
    bad_steps: Int[Array, ""]  # consecutive steps skipped for a non-finite loss or gradient
    skipped: Int[Array, ""]  # all steps skipped so far


def model_loss(model, batch: dict, teacher_logits=None, distill: Distill | None = None
               ) -> tuple[Float[Array, ""], dict]:
    """Loss of a `PrunedLlava` (soft masks) on a batch (input_ids, labels, attention_mask, pixel_values) and its
    parts; with a teacher's logits, plus the distillation term."""
    # The side paths score with the prompt's tokens only: no answer token chooses which keys its own prediction
    # may see, and the thresholds see in training what they see at inference.
    out = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], mode="soft",
                prompt=prompt_mask(batch["labels"], IGNORE_INDEX))
    ce, tokens = lm_loss(out.logits, batch["labels"])
    parts = model.losses(out)
    metrics = {"lm_loss": ce, "supervised_tokens": tokens, "avg_visual_tokens": parts["avg_visual_tokens"]}
    total = ce
    if model.module_layers:
        total = ce + parts["atp"] + parts["target"]
        metrics |= {"atp_loss": parts["atp"], "target_loss": parts["target"]}
        n = jnp.maximum(out.has_image.sum(), 1)
        for m, layer in enumerate(model.module_layers):
            metrics[f"kept_after_layer_{layer}"] = (out.counts[:, m] * out.has_image).sum() / n
    if teacher_logits is not None:
        kd = distill_loss(out.logits, teacher_logits, batch["labels"], distill.temperature)
        total = total + distill.weight * kd
        metrics["distill_loss"] = kd
    metrics["loss"] = total
    return total, metrics


def teacher_logits(distill: Distill | None, teacher_params, batch: dict):
    """The frozen teacher's logits on the batch (unpruned, no gradient), or None without distillation."""
    if distill is None:
        return None
    teacher = nnx.merge(distill.graphdef, teacher_params)
    out = teacher(batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    return jax.lax.stop_gradient(out.logits)


def frozen_loss(graphdef, rest: nnx.State, batch: dict, frozen=None, distill: Distill | None = None,
                teacher_params=None):
    """The loss as a function of the parameters, `(params) -> (loss, metrics)`: frozen parameters (a tree of
    bools, a prefix of params) enter through stop_gradient, so no backward pass runs for them."""
    target = teacher_logits(distill, teacher_params, batch)

    def loss_fn(params):
        if frozen is not None:
            params = jax.tree.map(lambda f, v: jax.tree.map(jax.lax.stop_gradient, v) if f else v, frozen, params)
        return model_loss(nnx.merge(graphdef, params, rest), batch, target, distill)

    return loss_fn


def train_step(graphdef, tx: optax.GradientTransformation, state: TrainState, batch: dict, teacher_params=None,
               frozen=None, distill: Distill | None = None) -> tuple[TrainState, dict]:
    """One update. A non-finite loss or gradient leaves params and optimizer state unchanged and counts the
    step in `bad_steps` (reset by the next good step) and `skipped`.

    `frozen`: a tree of bools, one per parameter (a prefix of `state.params`): frozen parameters enter the
    loss through stop_gradient, so no backward pass runs for them (nor through the frozen vision tower at all).
    `distill`: with the teacher's parameters, adds the distillation term (see `Distill`).
    """

    loss_fn = frozen_loss(graphdef, state.rest, batch, frozen, distill, teacher_params)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    def pick(new, old):
        return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    new_state = TrainState(params=pick(params, state.params), rest=state.rest,
                           opt_state=pick(opt_state, state.opt_state), step=state.step + 1,
                           bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
                           skipped=state.skipped + (~finite).astype(jnp.int32))
    return new_state, metrics | {"grad_norm": grad_norm, "finite": finite}


def eval_step(graphdef, state: TrainState, batch: dict) -> dict:
    return model_loss(nnx.merge(graphdef, state.params, state.rest), batch)[1]
