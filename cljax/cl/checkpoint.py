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

from cljax.errors import CheckpointError, CljaxError

PyTree = Any
# Failures of the machine, not of the files: never a reason to set a checkpoint aside.
_NOT_CORRUPTION = (MemoryError, jax.errors.JaxRuntimeError)


class CorruptCheckpointError(CljaxError, RuntimeError):
    """A checkpoint whose files cannot be read (truncated array file, broken record)."""

    def __init__(self, step: int, path: Path, cause: BaseException):
        # the first line of the cause, without tensorstore's long spec
        reason = (
            str(cause).split(" [tensorstore_spec")[0].splitlines()[0][:300] if str(cause) else ""
        )
        super().__init__(f"checkpoint {path} is unreadable: {type(cause).__name__}: {reason}")
        self.step = step
        self.path = path


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
            # Dotted, not cljax.paths' '/': these are the item names inside checkpoints
            # already written, and renaming them would orphan every existing run's.
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


class _Kept:
    """Orbax preservation policy: the steps saved with ``keep=True`` are never deleted."""

    def __init__(self) -> None:
        self.steps: set[int] = set()

    def should_preserve(self, checkpoints: Any, *, context: Any) -> list[bool]:
        return [info.step in self.steps for info in checkpoints]


class RunCheckpointer:
    """Save and restore ``(state, record)`` pairs under ``directory`` keyed by a global
    step count. ``max_to_keep`` bounds disk use (the newest checkpoints stay); a step
    saved with ``keep=True`` (a task's end, with ``run.keep_task_checkpoints``) stays
    as well, its record marked ``"kept": true``."""

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self._kept = _Kept()
        policies = ocp.checkpoint_managers
        options = ocp.CheckpointManagerOptions(
            create=True,
            preservation_policy=policies.AnyPreservationPolicy(
                [policies.LatestN(n=max_to_keep), self._kept]
            ),
        )
        # Handlers named up front, so that a new manager (a restarted run) can read a
        # step's metadata (saved shapes) before restoring it.
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "record": ocp.JsonCheckpointHandler(),
            },
        )

        # A restarted run keeps what an earlier process marked.
        for step in self.all_steps():
            try:
                if self.read_record(step).get("kept"):
                    self._kept.steps.add(step)
            except CorruptCheckpointError:
                pass  # the run's fallback reports it

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def kept_steps(self) -> list[int]:
        """The steps saved with ``keep=True`` that are on disk."""
        return sorted(self._kept.steps & set(self.all_steps()))

    def save(self, step: int, state: PyTree, record: dict[str, Any], *, keep: bool = False) -> None:
        """Save and wait until the checkpoint is committed to disk (a save reported as
        done must survive a crash right after). ``keep``: never deleted by rotation."""
        if keep:
            self._kept.steps.add(step)
            record = {**record, "kept": True}
        named, _, _ = _flat(state)
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(named), record=ocp.args.JsonSave(record)
        )
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    def read_record(self, step: int | None = None) -> dict[str, Any]:
        """The JSON record of a checkpoint (default: latest), without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
            )
        except _NOT_CORRUPTION:
            raise
        except Exception as err:  # orbax raises many kinds for broken files
            raise CorruptCheckpointError(step, self.step_path(step), err) from err
        return restored["record"]

    def restore(self, like: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
        """Restore the checkpoint at ``step`` (default: latest) into arrays shaped,
        typed and sharded like ``like``. A leaf that the checkpoint lacks or holds in
        another shape is named (``CheckpointError``); unreadable files raise
        ``CorruptCheckpointError``."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        path = self.step_path(step)
        named, leaves, treedef = _flat(like)
        try:
            saved = self._manager.item_metadata(step)["state"].tree
        except _NOT_CORRUPTION:
            raise
        except Exception as err:
            raise CorruptCheckpointError(step, path, err) from err
        for name, leaf in named.items():
            if name not in saved:
                raise CheckpointError(
                    f"checkpoint {path} has no array {name!r} (the run's structure changed?)"
                )
            if tuple(saved[name].shape) != tuple(np.shape(leaf)):
                raise CheckpointError(
                    f"checkpoint {path}: {name!r} was saved with shape {tuple(saved[name].shape)}"
                    f" but the run expects {tuple(np.shape(leaf))}"
                )
        target = {name: _abstract(leaf) for name, leaf in named.items()}
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(target), record=ocp.args.JsonRestore()
        )
        try:
            restored = self._manager.restore(step, args=args)
        except _NOT_CORRUPTION:
            raise
        except Exception as err:
            raise CorruptCheckpointError(step, path, err) from err
        values = iter(restored["state"][name] for name in named)
        rebuilt = [next(values) if np.size(leaf) else leaf for leaf in leaves]
        return jax.tree_util.tree_unflatten(treedef, rebuilt), restored["record"]

    def set_aside(self, step: int) -> Path:
        """Move an unreadable checkpoint out of the run's steps (kept for inspection as
        ``corrupt-<step>``); the previous one becomes the latest."""
        target = self.directory / f"corrupt-{step}"
        n = 1
        while target.exists():  # set aside before, then written again and broken again
            n += 1
            target = self.directory / f"corrupt-{step}-{n}"
        self.step_path(step).rename(target)
        self._manager.reload()
        return target

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> RunCheckpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
