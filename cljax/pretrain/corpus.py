"""The text a base model is pretrained on: benchmark tasks' training sentences and any
text or JSONL files, checked to share no sentence with the test split of a task the base
will be evaluated on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from cljax.data import sources
from cljax.data.tasks import DATASETS, get_dataset, get_order
from cljax.errors import DataError


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Documents and where they come from.

    Attributes:
      documents: the texts, one document each (a benchmark sentence, a paragraph of a
        text file, a JSONL record's ``text``).
      counts: source (dataset name or file path) -> number of documents.
    """

    documents: tuple[str, ...]
    counts: dict[str, int]


def order_tasks(order: str) -> tuple[str, ...]:
    """The dataset names of ``order`` (``order1`` .. ``order6`` or comma-separated
    names), each checked; empty for an empty string."""
    names = tuple(n.strip() for n in order.split(",") if n.strip())
    if len(names) == 1 and names[0].startswith("order"):
        names = get_order(names[0])
    for name in names:
        get_dataset(name)
    return names


def default_corpus_tasks(excluded: Sequence[str], data_dir: str | None) -> tuple[str, ...]:
    """Every benchmark dataset with a file here that is not in ``excluded``."""
    out = []
    for name, spec in DATASETS.items():
        if name in excluded:
            continue
        try:
            directory = sources.dataset_dir(spec, data_dir)
        except FileNotFoundError:
            continue
        if sources.available_splits(directory):
            out.append(name)
    return tuple(out)


def benchmark_corpus(tasks: Sequence[str], config: sources.SourceConfig) -> Corpus:
    """The training sentences of ``tasks`` (``config`` carves a missing training split,
    e.g. ``holdout_fraction``)."""
    documents: list[str] = []
    counts: dict[str, int] = {}
    for name in tasks:
        task = sources.load_task(name, config)
        documents += [ex.sentence for ex in task.train]
        counts[name] = len(task.train)
    return Corpus(tuple(documents), counts)


def file_corpus(paths: Sequence[str | Path]) -> Corpus:
    """Documents of text files (``.txt``: blank-line separated paragraphs), JSON Lines
    (``.jsonl``: one object with a ``text`` string, or a string, per line) or JSON
    (``.json``: a list of such). Errors name the file and line or item."""
    documents: list[str] = []
    counts: dict[str, int] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"pretrain.files: {path} not found")
        if path.suffix == ".txt":
            found = [p.strip() for p in path.read_text(encoding="utf-8").split("\n\n")]
        elif path.suffix == ".jsonl":
            found = []
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    found.append(_text(_json(line, f"{path}:{line_no}"), f"{path}:{line_no}"))
        elif path.suffix == ".json":
            items = _json(path.read_text(encoding="utf-8"), str(path))
            if not isinstance(items, list):
                raise DataError(f"{path}: expected a JSON list of texts")
            found = [_text(item, f"{path} item {i}") for i, item in enumerate(items)]
        else:
            raise DataError(f"pretrain.files: {path}: not .txt, .jsonl or .json")
        found = [doc for doc in found if doc.strip()]
        documents += found
        counts[str(path)] = len(found)
    return Corpus(tuple(documents), counts)


def _json(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: malformed JSON ({err.msg})") from None


def _text(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise DataError(f"{where}: expected a string or an object with a 'text' string")


def merge(corpora: Sequence[Corpus]) -> Corpus:
    documents = tuple(doc for c in corpora for doc in c.documents)
    counts = {k: v for c in corpora for k, v in c.counts.items()}
    return Corpus(documents, counts)


def _fingerprint(text: str) -> bytes:
    """Exact-match key of a sentence: whitespace-normalised, then hashed."""
    return hashlib.sha256(" ".join(text.split()).encode("utf-8")).digest()


def check_disjoint(corpus: Corpus, evaluated: Sequence[str], config: sources.SourceConfig) -> None:
    """Refuse a corpus holding a sentence of the test split of an ``evaluated`` task
    (exact match after whitespace normalisation): the error names each such task and
    how many of its test sentences the corpus holds."""
    if not evaluated:
        return
    keys = {_fingerprint(doc) for doc in corpus.documents}
    # every test item, before any per-class subsampling
    whole = dataclasses.replace(config, train_per_class=None, test_per_class=None)
    leaks = []
    for name in evaluated:
        try:
            task = sources.load_task(name, whole)
        except FileNotFoundError:
            continue  # no test file here: nothing to leak
        shared = sum(_fingerprint(ex.sentence) in keys for ex in task.test)
        if shared:
            leaks.append(f"{name}: {shared} of {len(task.test)}")
    if leaks:
        raise DataError(
            "the pretraining corpus holds test sentences of evaluated tasks ("
            + "; ".join(leaks)
            + "): remove them from pretrain.corpus_tasks / pretrain.files"
        )
