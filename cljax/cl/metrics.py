"""Continual-learning metrics from an accuracy matrix.

``acc[t, i]`` is the accuracy on task ``i`` (in the order's position) after training
through task ``t``; shape ``(T, T)``, or ``(1, T)`` for a joint (multi-task) run with a
single training phase, where only the average accuracy is defined. Entries for tasks
not yet seen (``i > t``) may be NaN when only seen tasks were evaluated; cljax
evaluates all tasks so that forward transfer is measurable. Units are whatever the
matrix holds (cljax uses percent).

Definitions (protocol.md, rows and columns 0-indexed here):
- AA (macro) = mean_i acc[T-1, i]; micro weights each task by its test-set size.
- BWT = mean_{i < T-1} (acc[T-1, i] - acc[i, i]).
- FWT = mean_{i >= 1} (acc[i-1, i] - base[i]), ``base[i]`` the untrained model's accuracy.
- Forgetting = mean_{i < T-1} (max_{i <= t < T-1} acc[t, i] - acc[T-1, i]): the best
  accuracy task i had once learned, minus its final accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ContinualMetrics:
    """Summary of one run's accuracy matrix. ``None`` where a metric is undefined
    (BWT and forgetting need >= 2 tasks; FWT needs the base accuracies and >= 2 tasks;
    micro AA needs the test-set sizes)."""

    average_accuracy: float
    average_accuracy_micro: float | None
    backward_transfer: float | None
    forward_transfer: float | None
    forgetting: float | None

    def as_dict(self) -> dict[str, float | None]:
        # TRACE reports the same final-row mean as OP ("overall performance")
        return {**dataclasses.asdict(self), "overall_performance": self.average_accuracy}


def _check_matrix(acc: np.ndarray) -> np.ndarray:
    acc = np.asarray(acc, dtype=np.float64)
    if acc.ndim != 2 or acc.shape[0] not in (1, acc.shape[1]) or acc.shape[1] == 0:
        raise ValueError(
            f"accuracy matrix must be square (T, T) or one joint row (1, T), got {acc.shape}"
        )
    seen = np.tril(np.ones(acc.shape, dtype=bool)) if is_sequence(acc) else np.ones_like(acc, bool)
    bad = np.argwhere(seen & ~np.isfinite(acc))
    if bad.size:
        t, i = bad[0]
        raise ValueError(
            f"accuracy matrix entry [{t}, {i}] (task {i} after task {t}) is {acc[t, i]}"
        )
    return acc


def is_sequence(acc: np.ndarray) -> bool:
    """True for a sequential run's (T, T) matrix, False for a joint run's (1, T) row."""
    return acc.shape[0] == acc.shape[1]


def average_accuracy(acc: np.ndarray, test_sizes: Sequence[int] | None = None) -> float:
    """Final-row mean. Macro by default; with ``test_sizes`` (T,) the micro average."""
    final = _check_matrix(acc)[-1]
    if test_sizes is None:
        return float(final.mean())
    sizes = np.asarray(test_sizes, dtype=np.float64)
    if sizes.shape != final.shape or np.any(sizes <= 0):
        raise ValueError(f"test_sizes must be {final.shape[0]} positive counts, got {test_sizes}")
    return float((final * sizes).sum() / sizes.sum())


def _with_earlier_tasks(acc: np.ndarray) -> tuple[np.ndarray, int] | None:
    """``(checked matrix, index of the last task)`` when the run is a sequence of >= 2
    tasks (BWT and forgetting are defined), else None."""
    acc = _check_matrix(acc)
    if not is_sequence(acc) or acc.shape[0] == 1:
        return None
    return acc, acc.shape[0] - 1


def backward_transfer(acc: np.ndarray) -> float | None:
    checked = _with_earlier_tasks(acc)
    if checked is None:
        return None
    acc, last = checked
    return float(np.mean([acc[last, i] - acc[i, i] for i in range(last)]))


def forward_transfer(acc: np.ndarray, base: Sequence[float]) -> float | None:
    """``base`` (T,): each task's accuracy before any training. Needs acc[i-1, i], i.e.
    an evaluation of every task before it is trained on."""
    acc = _check_matrix(acc)
    if not is_sequence(acc):
        return None
    base_arr = np.asarray(base, dtype=np.float64)
    if base_arr.shape != (acc.shape[0],):
        raise ValueError(f"base accuracies must have shape ({acc.shape[0]},), got {base_arr.shape}")
    if acc.shape[0] == 1:
        return None
    gains = [acc[i - 1, i] - base_arr[i] for i in range(1, acc.shape[0])]
    if not all(math.isfinite(g) for g in gains):
        raise ValueError("forward transfer needs every task evaluated before training on it")
    return float(np.mean(gains))


def forgetting(acc: np.ndarray) -> float | None:
    checked = _with_earlier_tasks(acc)
    if checked is None:
        return None
    acc, last = checked
    return float(np.mean([acc[i:last, i].max() - acc[last, i] for i in range(last)]))


def summarize(
    acc: np.ndarray,
    *,
    base: Sequence[float] | None = None,
    test_sizes: Sequence[int] | None = None,
) -> ContinualMetrics:
    """All metrics of one accuracy matrix (T, T)."""
    return ContinualMetrics(
        average_accuracy=average_accuracy(acc),
        average_accuracy_micro=None if test_sizes is None else average_accuracy(acc, test_sizes),
        backward_transfer=backward_transfer(acc),
        forward_transfer=None if base is None else forward_transfer(acc, base),
        forgetting=forgetting(acc),
    )
