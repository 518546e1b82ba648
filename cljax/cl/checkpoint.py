"""Checkpoints of a continual run: one orbax ``CheckpointManager`` holding, per step,
the array state (model, optimizer state, method state: bases, shared spaces, adapters,
Fisher, replay buffers — any pytree of arrays) and a JSON record (task index, step in
the task, data position, the accuracy matrix so far).

Orbax writes each step to a temporary directory and renames it when complete, so a
run killed at any moment (even by SIGKILL) leaves only complete checkpoints behind;
restarting the same command restores the latest one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any


def _flat(tree: PyTree) -> tuple[dict[str, Any], list[Any], Any]:
    """``({name: leaf} of the non-empty leaves, all leaves, treedef)``.

    Checkpoints store a flat dict keyed by the leaves' paths: restoring then needs only
    the live tree's structure, whatever containers (NamedTuples of optax states, NNX
    states) it is made of. Zero-size leaves (e.g. LoRA's empty past pairs on the first
    task) are left out, since orbax cannot write them, and rebuilt from the live tree.
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    named = {}
    for path, leaf in flat:
        if np.size(leaf):
            name = ".".join(
                str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path
            )
            named[name] = leaf
    return named, [leaf for _, leaf in flat], treedef


def _abstract(x: Any) -> Any:
    """Shape, dtype and sharding of a live array, so that the restored array is placed
    exactly where the live one is."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x


class RunCheckpointer:
    """Save and restore ``(state, record)`` pairs under ``directory`` keyed by a global
    step count. ``max_to_keep`` bounds disk use; the newest checkpoint always stays."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "record")
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, record: dict[str, Any]) -> None:
        """Save and wait until the checkpoint is committed to disk (a save reported as
        done must survive a crash right after)."""
        named, _, _ = _flat(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(named), record=ocp.args.JsonSave(record)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def read_record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of a checkpoint (default: latest), without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
        )
        return restored["record"]

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore the checkpoint at ``step`` (default: latest) into arrays shaped,
        typed and sharded like ``like``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        named, leaves, treedef = _flat(like)
        target = {name: _abstract(leaf) for name, leaf in named.items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        values = iter(restored["state"][name] for name in named)
        rebuilt = [next(values) if np.size(leaf) else leaf for leaf in leaves]
        return jax.tree_util.tree_unflatten(treedef, rebuilt), restored["record"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
