"""TRACE (Wang et al. 2023), the continual benchmark of the OSF paper's LLaMA results.

The released layout is one directory per task under ``data.data_dir``, each holding
``train.json``, ``eval.json`` and ``test.json``: JSON lists of ``{"prompt": str,
"answer": str}`` (read by :mod:`cljax.data.files`). Prompts carry their own instructions
and are used verbatim.

Each task is scored as TRACE scores it (``cljax.cl.scoring``): C-STANCE, FOMC and
ScienceQA by accuracy on the first character (the option letter), NumGLUE-cm/ds by
accuracy on the number, MeetingBank by ROUGE-L, Py150 by edit similarity and 20Minuten by
SARI against the prompt. ``max_new_tokens`` are cljax's choices, sized to each task's
answers (TRACE generates up to its global answer length for every task).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from cljax.data.files import TextExample, free_text_task, read_task_file
from cljax.data.sources import SourceConfig, TaskData
from cljax.data.tasks import GENERATION, PLAIN_TEXT, DatasetSpec
from cljax.errors import ConfigError, DataError, UnknownNameError

SPLITS = ("train", "eval", "test")


@dataclasses.dataclass(frozen=True)
class TraceTask:
    """How one TRACE task is scored: a metric and an answer extraction of
    ``cljax.cl.scoring`` (applied to predictions and references alike), and the greedy
    generation length."""

    name: str
    metric: str
    extract: str
    max_new_tokens: int


TRACE_TASKS: dict[str, TraceTask] = {
    t.name: t
    for t in (
        TraceTask("C-STANCE", "accuracy", "first_letter", 8),
        TraceTask("FOMC", "accuracy", "first_letter", 8),
        TraceTask("MeetingBank", "rouge_l", "text", 256),
        TraceTask("Py150", "edit_similarity", "text", 64),
        TraceTask("ScienceQA", "accuracy", "first_letter", 128),
        TraceTask("NumGLUE-cm", "accuracy", "first_number", 16),
        TraceTask("NumGLUE-ds", "accuracy", "first_number", 16),
        TraceTask("20Minuten", "sari", "text", 256),
    )
}
TRACE_ORDER: tuple[str, ...] = tuple(TRACE_TASKS)
"""TRACE's task order, the default sequence."""


def get_trace_task(name: str) -> TraceTask:
    if name not in TRACE_TASKS:
        raise UnknownNameError(f"unknown TRACE task {name!r}; valid: {', '.join(TRACE_ORDER)}")
    return TRACE_TASKS[name]


def trace_spec(name: str) -> DatasetSpec:
    """The free-text task spec of TRACE task ``name``."""
    task = get_trace_task(name)
    return DatasetSpec(
        name, GENERATION, (), PLAIN_TEXT, task.metric, task.extract, task.max_new_tokens
    )


def trace_files(data_dir: str | Path, name: str) -> dict[str, Path]:
    """``{split: file}`` of task ``name`` under ``data_dir``, every file checked to exist."""
    get_trace_task(name)
    folder = Path(data_dir) / name
    if not folder.is_dir():
        raise DataError(f"{folder}: no TRACE task directory (data.data_dir={data_dir})")
    missing = [s for s in SPLITS if not (folder / f"{s}.json").is_file()]
    if missing:
        raise DataError(f"{folder}: missing {', '.join(f'{s}.json' for s in missing)}")
    return {split: folder / f"{split}.json" for split in SPLITS}


def load_trace_task(data_dir: str | Path, name: str) -> dict[str, list[TextExample]]:
    """The three splits of task ``name`` under ``data_dir`` (``{split: examples}``)."""
    splits = {split: read_task_file(path) for split, path in trace_files(data_dir, name).items()}
    for split, examples in splits.items():
        chats = [e.line for e in examples if e.chat]
        if chats:
            raise DataError(
                f"{Path(data_dir) / name / f'{split}.json'}:{chats[0]}: TRACE records are"
                " prompt/answer pairs"
            )
    return splits


def trace_task(name: str, config: SourceConfig, render: Callable[[TextExample], str]) -> TaskData:
    """TRACE task ``name`` as a task of the run: trained on ``train.json``, evaluated on
    ``test.json`` (``config.test_split="dev"``: ``eval.json``)."""
    if not config.data_dir:
        raise ConfigError("data.source=trace needs data.data_dir: the TRACE root directory")
    files = trace_files(config.data_dir, name)
    test = files["eval" if config.test_split == "dev" else "test"]
    return free_text_task(trace_spec(name), files["train"], test, render, config)
