"""Training checkpoints with orbax's CheckpointManager: the train state and the grain iterator, saved
asynchronously every N steps (the last K kept), restored from the latest complete step that reads back,
onto whatever mesh the current state lives on."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import grain
import jax
import orbax.checkpoint as ocp

from atp_jax.fileio import check_free_space

log = logging.getLogger(__name__)
UNFINISHED = "*.orbax-checkpoint-tmp*"  # orbax writes a step here and renames it when complete


class CheckpointsDamaged(RuntimeError):
    """The workdir has checkpoints and none of them restores."""


def manager(directory: str | Path, every: int, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(Path(directory).absolute(), item_names=("state", "data"), options=options)


def remove_unfinished(directory: str | Path) -> list[str]:
    """Removes the temporary directories of saves that never finished (a killed run, a full disk); returns
    their names. Only while the workdir's lock is held: a running save looks the same."""
    removed = []
    for path in sorted(Path(directory).glob(UNFINISHED)):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def set_aside(directory: str | Path) -> Path:
    """Renames a checkpoint directory out of the way (kept, not deleted) so that a run can start over."""
    directory = Path(directory)
    aside = directory.with_name(f"{directory.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    directory.rename(aside)
    return aside


def _key(k) -> str:
    return jax.tree_util.keystr((k,), simple=True)


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


def save(mgr: ocp.CheckpointManager, step: int, state, iterator, force: bool = False) -> None:
    """Saves `step` when the save interval says so, or always with `force` (the end of a run, SIGTERM) unless
    it is saved already. Asynchronous: a failure surfaces at a later save or at `wait_until_finished`. In a
    one-process run a save that cannot fit on the disk is refused before it starts (StorageError): a save that
    fails half way leaves its writer threads to report it many times over. The check waits for the save before
    (if still writing) so that the space it takes is counted."""
    if (mgr.latest_step() == step) if force else not mgr.should_save(step):
        return
    if jax.process_count() == 1:  # several processes: each host's share differs; a refusal on one would hang
        mgr.wait_until_finished()  # the free space counts the save before this one only once it is written
        check_free_space(mgr.directory, estimated_bytes(state), f"saving checkpoint {step} in {mgr.directory}")
    mgr.save(step, args=save_args(state, iterator), force=force)


def estimated_bytes(tree) -> int:
    """What saving the arrays of `tree` writes, with room for metadata: their bytes plus 5% and 256 KiB."""
    arrays = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))
    return int(arrays * 1.05) + 2**18


def close(mgr: ocp.CheckpointManager, directory: str | Path, is_main: bool) -> None:
    """Closes the manager whatever state it is in (after a failed save it raises that error again, which the
    run has already raised), then removes unfinished saves, so that a failed run leaves only complete
    checkpoints."""
    for finish in (mgr.wait_until_finished, mgr.close):
        try:
            finish()
        except Exception as e:  # already raised by `save` or `wait`
            log.debug("closing the checkpoint manager: %s", e)
    if is_main:
        remove_unfinished(directory)


def restore_latest(mgr: ocp.CheckpointManager, state, iterator):
    """(state, iterator) from the newest checkpoint that restores, laid out like `state` (its shardings: a
    different mesh is fine); a checkpoint that fails to read is skipped with a warning. None when there is no
    checkpoint; CheckpointsDamaged (naming each checkpoint's error) when there are some and none restores, and
    then `iterator` may have been changed by the failed attempts: build a new one to start over.
    """
    target = as_nested_dict(jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding) if isinstance(x, jax.Array) else x,
        state))
    errors = []
    for step in sorted(mgr.all_steps(), reverse=True):
        try:
            restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                                  data=grain.checkpoint.CheckpointRestore(iterator)))
        except Exception as e:  # orbax raises many kinds for a damaged checkpoint
            reason = f"{type(e).__name__}: {' '.join(str(e).split())[:200]}"
            log.warning("checkpoint at step %d does not restore (%s); trying an earlier one", step, reason)
            errors.append(f"step {step}: {reason}")
            continue
        return from_nested_dict(state, restored["state"]), iterator
    if errors:
        raise CheckpointsDamaged(f"no checkpoint in {mgr.directory} restores ({'; '.join(errors)})")
    return None
