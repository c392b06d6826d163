"""Sharding layer: a (data, fsdp, tensor) device mesh, logical-axis rules, parameter and batch placement.

Every model parameter carries its logical axis names as NNX metadata `logical_axes`, e.g. a q_proj kernel
("embed", "heads"). `DEFAULT_RULES` maps logical names to mesh axes; `logical_to_spec` turns one array's names
into a `PartitionSpec`:

    rules  embed -> "fsdp", heads -> "tensor", layers -> None
    axes   ("embed", "heads") on a stacked kernel of shape [L, D, N*H]
    spec   P(None, "fsdp", "tensor")

Conventions:
- Stacked layers (`nnx.vmap` in `models.common.stack_layers`) have one leading layer axis that is not in their
  `logical_axes`: an array with `ndim == len(axes) + 1` gets "layers" prepended.
- A dimension whose size is not divisible by the product of its mesh axes' sizes is replicated (None), so tiny
  test models, odd vocabularies (32064 on 3 devices) and small batches still place; nothing is ever padded.
- A mesh axis is used at most once per spec: a later dimension that maps to an axis already taken drops it
  (the projector's ("embed", "embed") kernel becomes P("fsdp", None)).
- Rules naming a mesh axis the mesh does not have drop that axis, so the same rules work on smaller meshes.
- Parameters without `logical_axes` (the pruning modules' plain `nnx.Linear`) and every non-Param variable are
  replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from functools import partial

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: FSDP is data parallelism with sharded weights

MeshAxes = str | tuple[str, ...] | None
LogicalRules = tuple[tuple[str, MeshAxes], ...]

DEFAULT_RULES: LogicalRules = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("sequence", None),
)


# ---- mesh ------------------------------------------------------------------------------------------------


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all). One size may be -1: the rest of the devices.

    Axes are `AxisType.Auto` (jax.make_mesh defaults to Explicit) so that XLA propagates shardings from the
    parameters, inputs and `with_sharding_constraint` hints, as this module assumes.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ValueError(f"at most one mesh size may be -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh sizes must be positive or -1, got data={data}, fsdp={fsdp}, tensor={tensor}")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n % known:
            raise ValueError(f"{n} devices do not split into data={data}, fsdp={fsdp}, tensor={tensor}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
                         f"devices, but {n} devices are given")
    # jax.make_mesh orders devices by the physical topology (TPU ICI rings) where it knows it.
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# ---- logical axes -> PartitionSpec ---------------------------------------------------------------------------


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], rules: LogicalRules = DEFAULT_RULES,
                    mesh: Mesh | None = None) -> P:
    """The PartitionSpec of an array of `shape` whose dimensions are named `axes` (one per dim; None = replicated).

    `len(axes) == len(shape) - 1` means a stacked array: its leading dimension is "layers". The first rule
    naming a logical axis wins; unknown names are replicated. With a `mesh`, mesh axes it lacks, axes already
    used by an earlier dimension, and shardings that do not divide the dimension are dropped (see the module
    docstring); without one, only the rules and the once-per-spec rule apply.
    """
    axes, shape = tuple(axes), tuple(shape)
    if len(axes) == len(shape) - 1:
        axes = ("layers", *axes)
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match shape {shape}")
    table = {}
    for name, target in rules:
        table.setdefault(name, target)  # first rule wins, as in flax's logical rules
    used: set[str] = set()
    out: list[MeshAxes] = []
    for name, size in zip(axes, shape, strict=True):
        mesh_axes = tuple(a for a in _as_tuple(table.get(name)) if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if a in mesh.shape)
            if size % math.prod(mesh.shape[a] for a in mesh_axes):
                mesh_axes = ()  # uneven shards: replicate this dimension rather than pad it
        used.update(mesh_axes)
        out.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*out)


def _variable_spec(v: nnx.Variable, rules: LogicalRules, mesh: Mesh) -> P:
    shape = getattr(v.get_value(), "shape", ())
    axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Param) else None
    if axes is None:
        return P()  # no metadata (pruning MLPs) or not a parameter: replicated
    return logical_to_spec(axes, shape, rules, mesh)


def param_specs(state: nnx.State, rules: LogicalRules = DEFAULT_RULES, mesh: Mesh | None = None) -> nnx.State:
    """The state with each Variable's value replaced by its PartitionSpec (same tree structure, metadata kept).

    Works on concrete and abstract (`nnx.eval_shape`) states. Params map their `logical_axes` through `rules`;
    everything else is replicated, P().
    """
    return jax.tree.map(lambda v: v.replace(_variable_spec(v, rules, mesh)), state,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(state: nnx.State, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.State:
    """`param_specs` as NamedShardings on `mesh`: usable as `jax.device_put` target or jit in/out_shardings."""
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def tree_shardings(tree, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES):
    """NamedShardings for any pytree holding Variables and plain arrays (e.g. an optimizer state whose moments are
    Params with `logical_axes`): Variables as in `param_shardings`, plain leaves replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(NamedSharding(mesh, _variable_spec(x, rules, mesh)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


# ---- placing models --------------------------------------------------------------------------------------------


def shard_state(model: nnx.Module, mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> nnx.State:
    """Moves every variable of `model` onto `mesh` with its sharding, in place; returns the sharding tree of
    `nnx.state(model)` (e.g. for jit in/out_shardings or a checkpoint restore target)."""
    state = nnx.state(model)
    shardings = param_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return shardings


def sharded_init(make_model: Callable[[], nnx.Module], mesh: Mesh, rules: LogicalRules = DEFAULT_RULES
                 ) -> nnx.Module:
    """Builds `make_model()` with its variables created directly in their shards (no full copy on one device).

    `nnx.eval_shape` gives the abstract state (shapes + metadata) without allocating; the shardings derived from
    it become the out_shardings of a jitted init, so XLA materialises each device's shard only. The values equal
    an eager `make_model()` (same RNG stream).
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    shardings = param_shardings(abstract, mesh, rules)

    @partial(jax.jit, out_shardings=shardings)
    def init():
        return nnx.split(make_model())[1]

    return nnx.merge(graphdef, init())


# ---- batches ----------------------------------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over data x fsdp, the rest replicated (also over tensor)."""
    return NamedSharding(mesh, P(tuple(a for a in BATCH_AXES if a in mesh.shape)))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-host numpy arrays [B_local, ...] -> global jax Arrays [B_local * processes, ...] split on the batch.

    Each process passes the rows it loaded (its slice of the global batch, in process order); single-process,
    local is global. The global batch must divide over data x fsdp.
    """
    sharding = batch_sharding(mesh)
    ways = math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.shape)
    out = {}
    for key, x in local.items():
        x = np.asarray(x)
        rows = x.shape[0] * jax.process_count()
        if rows % ways:
            raise ValueError(f"batch {key!r}: {rows} global rows do not split over data x fsdp = {ways}")
        out[key] = jax.make_array_from_process_local_data(sharding, x, (rows, *x.shape[1:]))
    return out


# ---- activation constraints -----------------------------------------------------------------------------------

# (mesh, rules) that `shard` constrains to; None: `shard` does nothing (single device, tests, inference).
_ACTIVE: contextvars.ContextVar[tuple[Mesh, LogicalRules] | None] = contextvars.ContextVar("atp_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: LogicalRules = DEFAULT_RULES) -> Iterator[Mesh]:
    """Activates `shard` constraints on `mesh` with `rules`; also `jax.set_mesh(mesh)`.

    Use it outside jit, around tracing (the first call of a jitted function): `shard` reads it at trace time.
    Entering `jax.set_mesh` puts the mesh in jax's trace context, so a function traced without a mesh is retraced
    under one instead of reusing a constraint-free trace. Changing only the rules does not retrace.
    """
    token = _ACTIVE.set((mesh, rules))
    try:
        with jax.set_mesh(mesh):
            yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `use_mesh`, or None."""
    active = _ACTIVE.get()
    return None if active is None else active[0]


def shard(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """`with_sharding_constraint(x, logical axes via the rules)` under `use_mesh`; `x` unchanged otherwise.

    Example: `h = shard(h, "batch", "sequence", "embed")` for h [B, T, D]. Same spec rules as parameters
    (non-dividing dimensions replicated).
    """
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    if len(logical_axes) != x.ndim:
        raise ValueError(f"shard: {len(logical_axes)} logical axes {logical_axes} for an array of shape {x.shape}")
    spec = logical_to_spec(logical_axes, x.shape, rules, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
