"""Run outputs: the accuracy matrix (JSON + CSV), its plots, the summary table, and the
comparison of several runs (``cljax compare``).

A run directory holds ``accuracy.json`` with the task names, the matrix (row t: after
training task t; column i: task i; each task's own metric, 0-100), the base model's
scores, the test-set sizes and, with ``eval.general``, the general-ability scores along
the sequence. Everything else is derived from it, so ``compare`` reads only that file.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cljax.cl.metrics import ContinualMetrics, summarize
from cljax.errors import DataError

ACCURACY_FILE = "accuracy.json"
METRIC_COLUMNS = (
    ("AA", "average_accuracy"),
    ("AA micro", "average_accuracy_micro"),
    ("BWT", "backward_transfer"),
    ("FWT", "forward_transfer"),
    ("Forgetting", "forgetting"),
)
# shown when a run has eval.general sets: mean change of their scores from the base model
GENERAL_COLUMN = ("General delta", "general_delta")


def completed_rows(accuracy: np.ndarray) -> int:
    """Leading rows whose seen-task entries are all filled in (i <= t for a sequence;
    every task for a joint run's single row)."""
    done = 0
    joint = accuracy.shape[0] != accuracy.shape[1]
    for t in range(accuracy.shape[0]):
        seen = accuracy[t] if joint else accuracy[t, : t + 1]
        if not np.all(np.isfinite(seen)):
            break
        done += 1
    return done


def write_accuracy(
    run_dir: Path,
    *,
    method: str,
    tasks: Sequence[str],
    accuracy: np.ndarray,
    base: Sequence[float] | None = None,
    test_sizes: Sequence[int] | None = None,
    task_metrics: Sequence[str] | None = None,
    general: dict[str, Any] | None = None,
) -> ContinualMetrics | None:
    """Write ``accuracy.json`` and ``accuracy.csv`` for a matrix (T, T) that may be
    partial (rows of tasks not trained yet are NaN). Each entry is the task's own metric
    (``task_metrics``, e.g. ``accuracy``, ``rouge_l``, ``sari``; all accuracy if None),
    0-100. ``general`` is ``{"sets": names, "scores": rows}`` with row 0 the base model's
    and row t + 1 after phase t. Returns the metrics of the completed rows, None if there
    are none."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    done = completed_rows(accuracy)
    metrics = None
    if done:
        # A sequence is summarised over its completed tasks, a joint run over all.
        n = done if accuracy.shape[0] == accuracy.shape[1] else accuracy.shape[1]
        metrics = summarize(
            accuracy[:done, :n],
            base=None if base is None else list(base)[:n],
            test_sizes=None if test_sizes is None else list(test_sizes)[:n],
        )
    record: dict[str, Any] = {
        "method": method,
        "tasks": list(tasks),
        "accuracy": [[float(v) if math.isfinite(v) else None for v in row] for row in accuracy],
        "base": None if base is None else [float(b) for b in base],
        "test_sizes": None if test_sizes is None else [int(n) for n in test_sizes],
        "task_metrics": list(task_metrics or ["accuracy"] * len(tasks)),
        "tasks_done": done,
        "metrics": None if metrics is None else metrics.as_dict(),
    }
    if general is not None:
        scores = np.asarray(general["scores"], dtype=np.float64)
        record["general"] = {
            "sets": list(general["sets"]),
            "after": ["base", *_phase_names(tasks, accuracy)[: len(scores) - 1]],
            "scores": scores.tolist(),
        }
        if record["metrics"] is not None and len(scores) > 1:
            record["metrics"]["general_delta"] = float((scores[-1] - scores[0]).mean())
    (run_dir / ACCURACY_FILE).write_text(json.dumps(record, indent=2))
    with open(run_dir / "accuracy.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["after_task", *tasks])
        for t in range(done):
            cells = [f"{v:.2f}" if math.isfinite(v) else "" for v in accuracy[t]]
            writer.writerow([_phase_names(tasks, accuracy)[t], *cells])
    return metrics


def _phase_names(tasks: Sequence[str], accuracy: np.ndarray) -> list[str]:
    """Row labels: the task trained in each phase, or "all tasks" for a joint run."""
    return list(tasks) if accuracy.shape[0] == accuracy.shape[1] else ["all tasks"]


def read_accuracy(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / ACCURACY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a finished cljax run directory?")
    record = json.loads(path.read_text())
    record["accuracy"] = np.array(
        [[np.nan if v is None else v for v in row] for row in record["accuracy"]], dtype=np.float64
    )
    return record


def in_words(record: dict[str, Any]) -> str:
    """One sentence on a finished run, from its numbers: whether it learned each task
    (the accuracy right after training on it, against the untrained model's when that
    was measured) and how much of each earlier task it kept at the end."""
    acc, tasks = record["accuracy"], record["tasks"]
    if acc.shape[0] != acc.shape[1]:
        return f"trained on all tasks at once: {np.nanmean(acc[0]):.0f}% on average"
    done = record["tasks_done"]
    diag = np.diag(acc)[:done]
    base = record.get("base")
    if base is not None:
        gains = diag - np.asarray(base[:done], np.float64)
        missed = [
            f"{tasks[i]} ({diag[i]:.0f}% vs {base[i]:.0f}% untrained)"
            for i in range(done)
            if gains[i] < 5
        ]
        learned = (
            f"did not learn {', '.join(missed)}"
            if missed
            else f"learned every task (+{gains.mean():.0f} points over the untrained model)"
        )
    else:
        learned = f"reached {diag.mean():.0f}% on each task right after training on it"
    if done < 2:
        return learned
    final = acc[done - 1]
    kept = [
        f"{100 * max(final[i], 0.0) / diag[i]:.0f}% of {tasks[i]}"
        if diag[i] > 0
        else f"{tasks[i]}: -"
        for i in range(done - 1)
    ]
    return f"{learned}; kept {', '.join(kept)} at the end"


def versus(record: dict[str, Any], reference: dict[str, Any]) -> str:
    """A run against a reference run (SeqFT) on the same tasks: task 1 learned to what
    share of the reference's accuracy, and whether it forgot less (BWT closer to 0)."""
    first = record["accuracy"][0, 0] / max(reference["accuracy"][0, 0], 1e-9) * 100
    words = [f"task 1 at {first:.0f}% of {reference['method']}'s accuracy"]
    mine = (record.get("metrics") or {}).get("backward_transfer")
    theirs = (reference.get("metrics") or {}).get("backward_transfer")
    if mine is not None and theirs is not None:
        if abs(mine) < abs(theirs):
            words.append(f"forgot less than {reference['method']} (BWT {mine:.1f} vs {theirs:.1f})")
        else:
            words.append(
                f"did NOT forget less than {reference['method']} on this run"
                f" (BWT {mine:.1f} vs {theirs:.1f})"
            )
    return "; ".join(words)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _columns(metrics: Sequence[dict]) -> tuple[tuple[str, str], ...]:
    """The metric columns, with the general-ability one when a run has it."""
    general = any(m.get(GENERAL_COLUMN[1]) is not None for m in metrics)
    return METRIC_COLUMNS + ((GENERAL_COLUMN,) if general else ())


def metrics_table(rows: Sequence[tuple[str, ContinualMetrics | dict | None]]) -> str:
    """A fixed-width text table: one row per (name, metrics)."""
    values = [m.as_dict() if isinstance(m, ContinualMetrics) else (m or {}) for _, m in rows]
    columns = _columns(values)
    header = ["method", *(label for label, _ in columns)]
    body = []
    for (name, _), value in zip(rows, values, strict=True):
        body.append([name, *(_fmt(value.get(key)) for _, key in columns)])
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *body]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_run(run_dir: Path) -> list[Path]:
    """``accuracy_matrix.png`` (heatmap) and ``accuracy_curves.png`` (each task's
    accuracy along the sequence) for a run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = read_accuracy(run_dir)
    acc, tasks = record["accuracy"], record["tasks"]
    paths = [Path(run_dir) / "accuracy_matrix.png", Path(run_dir) / "accuracy_curves.png"]

    size = (max(5.0, 2.0 + 0.8 * len(tasks)), max(4.0, 2.0 + 0.6 * acc.shape[0]))
    fig, ax = plt.subplots(figsize=size)
    image = ax.imshow(np.ma.masked_invalid(acc), vmin=0, vmax=100, cmap="viridis")
    for (t, i), value in np.ndenumerate(acc):
        if math.isfinite(value):
            ax.text(i, t, f"{value:.0f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right")
    ax.set_yticks(range(acc.shape[0]), _phase_names(tasks, acc))
    ax.set_xlabel("evaluated on")
    ax.set_ylabel("after training on")
    ax.set_title(f"{record['method']}: accuracy (%)", fontsize=10)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    done = record["tasks_done"]
    _line_plot(
        paths[1],
        _phase_names(tasks, acc)[:done],
        [(task, acc[:done, i]) for i, task in enumerate(tasks)],
        f"{record['method']}: accuracy along the sequence",
        "accuracy (%)",
    )
    if "general" in record:
        general = record["general"]
        scores = np.asarray(general["scores"], dtype=np.float64)
        paths.append(Path(run_dir) / "general_ability.png")
        _line_plot(
            paths[-1],
            general["after"],
            [(name, scores[:, k]) for k, name in enumerate(general["sets"])],
            f"{record['method']}: general ability along the sequence",
            "score (%)",
        )
    return paths


def _line_plot(
    path: Path,
    after: Sequence[str],
    series: Sequence[tuple[str, np.ndarray]],
    title: str,
    ylabel: str,
) -> None:
    """One line per ``(name, values)``, values after each phase named in ``after``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, values in series:
        ax.plot(range(len(after)), values, marker="o", label=name)
    ax.set_xticks(range(len(after)), after, rotation=45, ha="right")
    ax.set_xlabel("after training on")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def final_accuracies(
    records: Sequence[tuple[Path, dict[str, Any]]],
) -> tuple[list[str], np.ndarray]:
    """The tasks (the first run's order) and each run's final accuracy per task,
    ``(runs, tasks)``, aligned by task name. Runs on different sets of tasks cannot be
    compared: the error lists each run's tasks."""
    tasks = list(records[0][1]["tasks"])
    if any(sorted(rec["tasks"]) != sorted(tasks) for _, rec in records):
        listing = "; ".join(f"{d.name}: {', '.join(rec['tasks'])}" for d, rec in records)
        raise DataError(f"cannot compare runs on different tasks ({listing})")
    final = np.full((len(records), len(tasks)), np.nan)
    for k, (_, rec) in enumerate(records):
        if rec["tasks_done"]:
            row = np.asarray(rec["accuracy"][rec["tasks_done"] - 1], np.float64)
            column = {name: i for i, name in enumerate(rec["tasks"])}
            final[k] = [row[column[name]] for name in tasks]
    return tasks, final


def run_colours(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` distinct colours (up to 20): tab10, then tab20's light shades, so that
    neighbouring bars never share a hue."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"]
    order = [*range(0, 20, 2), *range(1, 20, 2)]
    return [tab20(order[k % 20]) for k in range(n)]


def run_labels(records: Sequence[tuple[Path, dict[str, Any]]]) -> list[str]:
    """``method (run directory)`` per run, from each run's own record; directories of
    the same name are told apart by their parent."""
    names = [d.name for d, _ in records]
    return [
        f"{rec['method']} ({d.parent.name + '/' if names.count(d.name) > 1 else ''}{d.name})"
        for d, rec in records
    ]


def comparison_figure(labels: Sequence[str], tasks: Sequence[str], final: np.ndarray) -> Any:
    """Grouped bars of the final accuracy per task ``(runs, tasks)``, one colour and
    legend entry per run, with a title; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = run_colours(len(labels))
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(2.5 + 1.2 * len(tasks), 4.5))
    for k, name in enumerate(labels):
        x = np.arange(len(tasks)) + k * width
        ax.bar(x, np.nan_to_num(final[k]), width, label=name, color=colours[k])
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2, tasks, rotation=45, ha="right")
    ax.set_ylabel("final accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Final accuracy per task, {len(labels)} runs")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def compare_runs(run_dirs: Sequence[Path], plot_path: Path | None = None) -> str:
    """One table (runs x AA / BWT / FWT / forgetting) over several run directories, and
    optionally a bar plot of the final per-task accuracies, aligned by task name (runs
    on different tasks are refused). Runs are labelled ``method (run directory)``."""
    records = [(Path(d), read_accuracy(Path(d))) for d in run_dirs]
    labels = run_labels(records)
    rows = [(label, rec.get("metrics")) for label, (_, rec) in zip(labels, records, strict=True)]
    tasks, final = final_accuracies(records)
    if plot_path is not None:
        import matplotlib.pyplot as plt

        fig = comparison_figure(labels, tasks, final)
        fig.savefig(plot_path, dpi=100, bbox_inches="tight")  # keeps the outside legend
        plt.close(fig)
    return metrics_table(rows) + "\n\n" + "\n".join(words_for_runs(labels, records))


def mean_over_seeds(run_dirs: Sequence[Path]) -> str:
    """One row per method over several runs (seeds) of the same tasks: ``mean +- std``
    (population std, n = runs of that method) of each metric and of the final accuracy
    per task, as a Markdown table. Methods keep the order of their first run."""
    records = [(Path(d), read_accuracy(Path(d))) for d in run_dirs]
    tasks, final = final_accuracies(records)
    unfinished = [str(d) for d, rec in records if completed_rows(rec["accuracy"]) == 0]
    if unfinished:
        raise DataError(f"runs without a finished task cannot be averaged: {', '.join(unfinished)}")
    groups: dict[str, list[int]] = {}
    for k, (_, rec) in enumerate(records):
        groups.setdefault(rec["method"], []).append(k)

    def cell(values: Sequence[float | None]) -> str:
        kept = [v for v in values if v is not None and math.isfinite(v)]
        if not kept:
            return "-"
        if len(kept) == 1:
            return f"{kept[0]:.1f}"
        return f"{np.mean(kept):.1f} +- {np.std(kept):.1f}"

    columns = _columns([rec.get("metrics") or {} for _, rec in records])
    header = ["method", "runs", *(label for label, _ in columns), *tasks]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, members in groups.items():
        metrics = [records[k][1].get("metrics") or {} for k in members]
        row = [method, str(len(members))]
        row += [cell([m.get(key) for m in metrics]) for _, key in columns]
        row += [cell(list(final[members, i])) for i in range(len(tasks))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def words_for_runs(
    labels: Sequence[str], records: Sequence[tuple[Path, dict[str, Any]]]
) -> list[str]:
    """``label: in words`` per finished run, and, when a SeqFT run is among them, each
    sequential run against it (``versus``)."""
    reference = next((rec for _, rec in records if rec["method"] == "seqft"), None)
    lines = []
    for label, (_, rec) in zip(labels, records, strict=True):
        if not rec["tasks_done"]:
            continue
        line = f"{label}: {in_words(rec)}"
        sequential = rec["accuracy"].shape[0] == rec["accuracy"].shape[1]
        if (
            reference is not None
            and rec is not reference
            and sequential
            and reference["tasks_done"]
        ):
            line += f". Against {reference['method']}: {versus(rec, reference)}"
        lines.append(line)
    return lines
