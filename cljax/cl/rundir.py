"""A run directory and what keeps it consistent through faults: the lock that lets one
process write it, the claim that refuses to resume another config's run, the step log
(``metrics.jsonl`` and TensorBoard) that is cut back to the restored checkpoint, and the
progress display. Shared by continual runs (``cljax.cl.loop``) and pretraining
(``cljax.pretrain.run``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from cljax.config import RESUME_EXEMPT, Config, resume_diff
from cljax.errors import ConfigChangedError, NonFiniteLossError, RunLockedError

_WRITER_COUNT = itertools.count()


def sync(name: str) -> None:
    """Wait for every process of a multi-host run (no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


class RunLock:
    """``<run dir>/.lock``: one process at a time writes a run directory. The file names
    its holder (host, PID); a lock whose process is gone (same host, dead PID) is taken
    over with a warning. Taken by the first process of a multi-host run only."""

    def __init__(self, run_dir: Path, log: Callable[[str], None]):
        self.path = run_dir / ".lock"
        self.log = log
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid()}
        # The lock appears with its content at once (written aside, then hard-linked: the
        # link fails if a lock exists), so no process ever reads a half-written lock and
        # takes it over as stale.
        staging = self.path.with_name(f".lock-{me['host']}-{me['pid']}")
        staging.write_text(json.dumps(me))
        try:
            for _ in range(2):
                try:
                    os.link(staging, self.path)
                except FileExistsError:
                    holder = self._holder()
                    if holder is not None and not self._stale(holder, me["host"]):
                        raise RunLockedError(
                            f"{self.path.parent} is being written by process {holder['pid']}"
                            f" on {holder['host']} (lock {self.path}); wait for it to end, or"
                            " delete the lock file if that process is gone"
                        ) from None
                    self.log(f"warning: taking over the stale lock {self.path} ({holder})")
                    self.path.unlink(missing_ok=True)
                    continue
                self.held = True
                return
        finally:
            staging.unlink(missing_ok=True)
        raise RunLockedError(f"could not take the lock {self.path}")

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
            return holder if {"host", "pid"} <= set(holder) else None
        except (OSError, ValueError):
            return None  # unreadable: left by a process killed while writing it

    @staticmethod
    def _stale(holder: dict[str, Any], host: str) -> bool:
        if holder["host"] != host:
            return False  # cannot tell whether a process on another host lives
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def claim_run_dir(
    run_dir: Path, cfg: Config, *, restart: bool, main_process: bool, log: Callable[[str], None]
) -> None:
    """Make ``run_dir`` the run directory of ``cfg``: one holding a checkpoint of another
    config is refused with the changed keys (``config.resume_diff``), unless ``restart``
    clears it first; one without a checkpoint starts afresh (its stale log dropped)."""
    saved_config = run_dir / "config.json"
    checkpoints = run_dir / "checkpoints"
    if restart and run_dir.exists():
        if main_process:
            log(f"--restart: clearing {run_dir}")
            for entry in run_dir.iterdir():
                if entry.name == ".lock":
                    continue
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        sync("cljax_restart")
    has_checkpoint = checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir())
    if has_checkpoint and saved_config.is_file():
        changed = resume_diff(json.loads(saved_config.read_text()), cfg)
        if changed:
            raise ConfigChangedError(
                f"{run_dir} holds a run of another config; changed: "
                + "; ".join(changed)
                + ". Start it over with --restart (restart=True), or name a new run"
                f" (run.name=...). Keys that may change on resume: {', '.join(RESUME_EXEMPT)}"
            )
    elif main_process:
        # nothing to resume: the logs of an attempt that never checkpointed are stale
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def drop_log_after(run_dir: Path, global_step: int) -> None:
    """Keep the ``metrics.jsonl`` entries up to the restored checkpoint's step: the steps
    after it are trained (and logged) again, so the log has neither gaps nor duplicates.
    (TensorBoard's are hidden by the next writer's ``purge_step = global_step + 1``.)"""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut by the kill
            continue
        if entry.get("global_step", 0) <= global_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class StepLog:
    """Per-step entries of a training phase into ``metrics.jsonl`` and TensorBoard
    (process 0 only; other processes get a no-op log). ``checkpointed()`` makes both
    durable up to now: call it right before saving a checkpoint."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.run_dir = run_dir
        self.file = open(run_dir / "metrics.jsonl" if enabled else os.devnull, "a")
        self.writer = tensorboard_writer(run_dir, purge_step) if enabled else None

    def write(self, entry: dict[str, Any], scalars: dict[str, float], step: int) -> None:
        self.file.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, step)

    def step(
        self,
        stats: dict[str, Any],
        *,
        where: str,
        checkpoints: Path,
        last_checkpoint: int | None,
        step: int,
        global_step: int,
        learning_rate: float,
        tokens_per_s: float,
        seconds: float,
        loss_tag: str,
        **fields: Any,
    ) -> float:
        """Log one optimizer step of the train step's ``stats`` (``loss``, ``total``,
        ``grad_norm``, ``finite``); returns the loss. A non-finite loss or update raises
        ``NonFiniteLossError`` naming ``where`` (the task), the step and the last good
        checkpoint (``last_checkpoint``, a global step, in ``checkpoints``)."""
        loss, total = float(stats["loss"]), float(stats["total"])
        finite = bool(stats["finite"])
        if not (math.isfinite(loss) and math.isfinite(total) and finite):
            what = f"loss {total}" if finite else "parameters after the update"
            if last_checkpoint is None:
                kept = f"no checkpoint was saved yet in {checkpoints} (run.checkpoint_every_steps)"
            else:
                kept = f"the last good checkpoint (global step {last_checkpoint}) is kept in"
                kept += f" {checkpoints}"
            raise NonFiniteLossError(
                f"non-finite {what} in {where} at step {step} (global step {global_step}); {kept}"
            )
        entry = {
            **fields,
            "step": step,
            "global_step": global_step,
            "loss": loss,
            "total_loss": total,
            # the last micro-batch's gradient norm, before clipping
            "grad_norm": float(stats["grad_norm"]),
            "learning_rate": learning_rate,
            "tokens_per_s": round(tokens_per_s, 1),
            "seconds": round(seconds, 3),
        }
        scalars = {loss_tag: loss}
        for name in ("grad_norm", "learning_rate", "tokens_per_s"):
            scalars[f"train/{name}"] = entry[name]
        self.write(entry, scalars, global_step)
        return loss

    def checkpointed(self) -> None:
        self.file.flush()
        if self.writer is not None:
            # tensorboardX's flush() leaves events in its writer thread's queue; close()
            # drains it. Go on in a new event file (without a purge).
            self.writer.close()
            self.writer = tensorboard_writer(self.run_dir)

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()


class Progress:
    """Progress of a task: a tqdm bar (loss, steps/s, ETA) on a terminal; written to a
    file or pipe, a plain line every tenth of the task instead (a bar's carriage returns
    make a log unreadable). Off when ``enabled`` is False."""

    def __init__(self, total: int, done: int, name: str, enabled: bool, log: Callable[[str], None]):
        self.bar = None
        self.total, self.done, self.name, self.log = total, done, name, log
        self.enabled = enabled
        self.every = max(total // 10, 1)
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=done, desc=name, unit="step", leave=False)

    def update(self, loss: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        elif self.enabled and (self.done % self.every == 0 or self.done == self.total):
            percent = 100 * self.done // self.total
            self.log(f"  {self.name}: step {self.done}/{self.total} ({percent}%), loss {loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tensorboard_writer(run_dir: Path, purge_step: int | None = None) -> Any:
    """The run's TensorBoard writer; ``purge_step``: TensorBoard hides the events at
    and after it that an interrupted attempt wrote (a resumed run writes them again)."""
    from tensorboardX import SummaryWriter

    # tensorboardX names an event file by the second it was opened: a second writer in
    # the same second would truncate the first's file. A counter keeps the names apart
    # and in the order written (TensorBoard reads the files in name order).
    suffix = f".{next(_WRITER_COUNT):06d}"
    return SummaryWriter(
        str(run_dir / "tensorboard"), purge_step=purge_step, filename_suffix=suffix
    )
