"""Training checkpoints with orbax's CheckpointManager: the train state and the grain iterator, saved
asynchronously every N steps (the last K kept), restored from the latest complete step that reads back,
onto whatever mesh the current state lives on."""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(directory: str | Path, every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=("state", "data"), options=options)


def _key(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def as_nested_dict(tree) -> dict:
    """Any pytree as nested dicts keyed by its path names: a layout orbax stores and restores as is."""
    out: dict = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        node = out
        for k in path[:-1]:
            node = node.setdefault(_key(k), {})
        node[_key(path[-1]) if path else "value"] = leaf
    return out


def from_nested_dict(like, nested: dict):
    """The inverse of `as_nested_dict`, shaped like the pytree `like`."""
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = []
    for path, _ in paths:
        node = nested
        for k in path:
            node = node[_key(k)]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def save_args(state, iterator) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(as_nested_dict(state)),
                              data=grain.checkpoint.CheckpointSave(iterator))


def save_now(mgr: ocp.CheckpointManager, step: int, state, iterator) -> None:
    """Saves `step` whatever the save interval (at the end of a run, on SIGTERM), unless it is saved already."""
    if mgr.latest_step() != step:
        mgr.save(step, args=save_args(state, iterator), force=True)


def restore_latest(mgr: ocp.CheckpointManager, state, iterator):
    """(state, iterator) from the newest checkpoint that restores, laid out like `state` (its shardings: a
    different mesh is fine); a checkpoint that fails to read is skipped with a warning. None when none restores.
    """
    target = as_nested_dict(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        state))
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  data=grain.checkpoint.CheckpointRestore(iterator)))
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            log.warning("checkpoint at step %d does not restore (%s: %s); trying an earlier one", step,
                        type(e).__name__, str(e)[:300])
            continue
        return from_nested_dict(state, restored["state"]), iterator
    return None
