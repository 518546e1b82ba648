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
import orbax.checkpoint as ocp

PyTree = Any


def _abstract(tree: PyTree) -> PyTree:
    """Shapes, dtypes and shardings of a pytree of arrays, for a restore that places
    every array exactly where the live state has it."""

    def leaf(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return x

    return jax.tree.map(leaf, tree)


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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), record=ocp.args.JsonSave(record)
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
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(like)), record=ocp.args.JsonRestore()
        )
        restored = self._manager.restore(step, args=args)
        return restored["state"], restored["record"]

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
