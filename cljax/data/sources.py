"""Where the benchmark's examples come from: the JSON directory, its TFDS shards, or the
built-in synthetic benchmark (``cljax.data.synthetic``).

The JSON layout is the O-LoRA one: ``<root>/<Type>/<Dataset>/{train,dev,test,labels}.json``,
each split a JSON list of ``{"sentence": str, "label": str}`` and ``labels.json`` the option
list. The root comes from ``SourceConfig.data_dir``, else the ``CLJAX_DATA_DIR`` variable, else
``../shared/cl_benchmark`` beside the checkout.

Every example that is not used is counted and reported in ``TaskData.metadata`` (and warned
about once per file): nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from cljax.data.tasks import DatasetSpec, get_dataset, get_order
from cljax.errors import DataError

DATA_DIR_ENV = "CLJAX_DATA_DIR"
SPLIT_FILES = ("train", "dev", "test")
_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "cl_benchmark"
_FIRST_INDICES = 10  # how many excluded item indices the metadata lists per file


class Example(NamedTuple):
    """One labelled example: the laid-out sentence, the gold label string, and its index in
    the source file (for tracing a prediction back to the data)."""

    sentence: str
    label: str
    source_index: int


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The train and test examples of one task, and what was done to get them.

    ``metadata`` is JSON-serialisable: source files, counts read / kept, exclusions (with
    reasons and the first indices), a derived held-out split, per-class subsampling.
    A run stores it with its results.
    """

    spec: DatasetSpec
    train: tuple[Example, ...]
    test: tuple[Example, ...]
    metadata: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """How to read benchmark tasks.

    Attributes:
      source: ``"json"`` reads ``data_dir`` directly; ``"tfds"`` reads TFDS shards from
        ``tfds_data_dir``, building them from ``data_dir`` (as ``manual_dir``) if absent
        (``data_dir`` is then not needed once the shards exist).
      data_dir: the benchmark root; None: ``$CLJAX_DATA_DIR``, else ``../shared/cl_benchmark``.
      tfds_data_dir: where TFDS shards are written/read (``source="tfds"`` only).
      test_split: the file evaluated on (``"test"``; ``"dev"`` is identical in the release).
      train_per_class / test_per_class: keep at most n examples per gold label, chosen with
        ``seed`` (None: keep all).
      holdout_fraction: only for a dataset with exactly one of train/test missing: carve the
        missing split from the other, stratified by label, this fraction going to test
        (None: a missing split is an error).
      validation_per_class: carve this many training examples per gold label (seeded, before
        per-class subsampling) into a validation split that replaces the test split, which
        is then not read at all: settings are chosen on it, never on test (None: off).
      invalid_labels: an item whose label is not an option (MNLI's test file has 131 "-"):
        ``"exclude"`` it from the split (counted, warned once, reported), ``"error"``, or
        ``"keep"`` it (it then scores as wrong, as in the reference evaluation).
      empty_sentences: an item with an empty or whitespace-only sentence: ``"error"`` or
        ``"exclude"`` (counted, warned, reported).
    """

    source: Literal["json", "tfds"] = "json"
    data_dir: str | None = None
    tfds_data_dir: str | None = None
    test_split: Literal["test", "dev"] = "test"
    train_per_class: int | None = None
    test_per_class: int | None = None
    seed: int = 42
    holdout_fraction: float | None = None
    validation_per_class: int | None = None
    invalid_labels: Literal["exclude", "error", "keep"] = "exclude"
    empty_sentences: Literal["error", "exclude"] = "error"

    def __post_init__(self) -> None:
        _check_choice("source", self.source, ("json", "tfds"))
        _check_choice("test_split", self.test_split, ("test", "dev"))
        _check_choice("invalid_labels", self.invalid_labels, ("exclude", "error", "keep"))
        _check_choice("empty_sentences", self.empty_sentences, ("error", "exclude"))
        for name in ("train_per_class", "test_per_class", "validation_per_class"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"SourceConfig.{name} must be a positive int or None, got {value}")
        if self.holdout_fraction is not None and not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(
                f"SourceConfig.holdout_fraction must be in (0, 1) or None, "
                f"got {self.holdout_fraction}"
            )
        if self.source == "tfds" and self.tfds_data_dir is None:
            raise ValueError("SourceConfig.tfds_data_dir is required when source='tfds'")


def _check_choice(field: str, value: object, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"SourceConfig.{field} must be one of {list(valid)}, got {value!r}")


# --------------------------------------------------------------------------- JSON directory


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The benchmark root: ``data_dir``, else ``$CLJAX_DATA_DIR``, else ``../shared/cl_benchmark``.

    Raises ``FileNotFoundError`` naming every place looked at when none is a directory.
    """
    tried: list[str] = []
    if data_dir is not None:
        candidates = [("config data_dir", Path(data_dir))]
    elif os.environ.get(DATA_DIR_ENV):
        candidates = [(f"${DATA_DIR_ENV}", Path(os.environ[DATA_DIR_ENV]))]
    else:
        candidates = [("default", _DEFAULT_DATA_DIR)]
    for origin, path in candidates:
        if path.is_dir():
            return path
        tried.append(f"{origin}: {path}")
    raise FileNotFoundError(
        "benchmark data directory not found ("
        + "; ".join(tried)
        + f"). Set data.data_dir or ${DATA_DIR_ENV} to a folder laid"
        + " out as "
        "<Type>/<Dataset>/{train,test,labels}.json"
    )


def dataset_dir(spec: DatasetSpec, data_dir: str | os.PathLike[str] | None = None) -> Path:
    """``<root>/<Type>/<Dataset>``, which must exist."""
    root = resolve_data_dir(data_dir)
    path = root / spec.relative_dir
    if not path.is_dir():
        raise FileNotFoundError(
            f"dataset {spec.name!r}: directory {path} not found under the benchmark root {root}"
        )
    return path


def available_splits(directory: Path) -> tuple[str, ...]:
    """The split files (``train``, ``dev``, ``test``) present in a dataset directory."""
    return tuple(s for s in SPLIT_FILES if (directory / f"{s}.json").is_file())


def _load_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}: malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None


def read_labels(path: Path, spec: DatasetSpec) -> tuple[str, ...]:
    """``labels.json``: must equal the registry's option list (same strings, same order)."""
    if not path.is_file():
        raise FileNotFoundError(f"dataset {spec.name!r}: option list {path} not found")
    options = _load_json(path)
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise DataError(f"{path}: expected a JSON list of strings, got {options!r:.200}")
    if tuple(options) != spec.options:
        raise DataError(
            f"{path}: options {options} differ from the registered options of "
            f"{spec.name!r}: {list(spec.options)}"
        )
    return tuple(options)


def parse_items(items: Any, origin: str) -> list[tuple[str, str]]:
    """Validate the structure of one split: a list of objects with string ``sentence`` and
    ``label``. Returns ``(sentence, label)`` pairs; errors name ``origin`` and the item index."""
    if not isinstance(items, list):
        raise DataError(f"{origin}: expected a JSON list of items, got {type(items).__name__}")
    pairs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{origin}: item {index} is {type(item).__name__}, expected an object")
        for key in ("sentence", "label"):
            if key not in item:
                raise DataError(f"{origin}: item {index} has no {key!r} field")
            if not isinstance(item[key], str):
                raise DataError(
                    f"{origin}: item {index} field {key!r} is {type(item[key]).__name__}, "
                    "expected a string"
                )
        pairs.append((item["sentence"], item["label"]))
    return pairs


def read_split_file(path: Path) -> list[tuple[str, str]]:
    """The raw ``(sentence, label)`` pairs of a split file, structure-checked."""
    return parse_items(_load_json(path), str(path))


def screen_examples(
    pairs: Iterable[tuple[str, str]],
    spec: DatasetSpec,
    origin: str,
    config: SourceConfig,
) -> tuple[list[Example], dict[str, Any]]:
    """Apply the label and empty-sentence policies to raw pairs of one split.

    Returns the kept examples and a report ``{"file", "n_read", "n_kept", "excluded": {reason:
    {"count", "first_indices", ["values"]}}, "kept_invalid_labels"}``. Exclusions warn once per
    file (one warning with the counts, not one per item).
    """
    options = set(spec.options)
    kept: list[Example] = []
    excluded: dict[str, dict[str, Any]] = {}
    invalid_kept = 0
    n_read = 0

    def exclude(reason: str, index: int, value: str | None = None) -> None:
        entry = excluded.setdefault(reason, {"count": 0, "first_indices": []})
        entry["count"] += 1
        if len(entry["first_indices"]) < _FIRST_INDICES:
            entry["first_indices"].append(index)
        if value is not None:
            values = entry.setdefault("values", {})
            values[value] = values.get(value, 0) + 1

    for index, (sentence, label) in enumerate(pairs):
        n_read += 1
        if not sentence.strip():
            if config.empty_sentences == "error":
                raise DataError(
                    f"{origin}: item {index} has an empty sentence "
                    "(data.empty_sentences=exclude skips such items)"
                )
            exclude("empty_sentence", index)
            continue
        if label not in options:
            if config.invalid_labels == "error":
                raise DataError(
                    f"{origin}: item {index} has label {label!r}, not one of the options "
                    f"{list(spec.options)} (data.invalid_labels=exclude skips such items)"
                )
            if config.invalid_labels == "exclude":
                exclude("invalid_label", index, label)
                continue
            invalid_kept += 1
        kept.append(Example(sentence, label, index))
    report: dict[str, Any] = {
        "file": origin,
        "n_read": n_read,
        "n_kept": len(kept),
        "excluded": excluded,
    }
    if invalid_kept:
        report["kept_invalid_labels"] = invalid_kept
    if excluded:
        summary = ", ".join(
            f"{e['count']} with {reason.replace('_', ' ')}"
            + (f" {dict(e['values'])}" if "values" in e else "")
            for reason, e in excluded.items()
        )
        warnings.warn(
            f"{origin}: excluded {n_read - len(kept)} of {n_read} items ({summary}); "
            "they are counted in the task metadata",
            stacklevel=2,
        )
    return kept, report


def _per_task_rng(seed: int, *keys: str) -> np.random.Generator:
    # crc32, not hash(): Python's str hash is salted per process.
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def _indices_by_label(examples: Sequence[Example], free_text: bool = False) -> dict[str, list[int]]:
    """{gold label: indices of its examples, in file order}; free-text answers are no
    classes: one group of all examples."""
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        by_label.setdefault(_group(ex, free_text), []).append(i)
    return by_label


def _group(example: Example, free_text: bool) -> str:
    return "" if free_text else example.label


def _split_off(
    examples: Sequence[Example], held: set[int]
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """(examples not in ``held``, examples in ``held``), both in file order."""
    rest = tuple(ex for i, ex in enumerate(examples) if i not in held)
    return rest, tuple(ex for i, ex in enumerate(examples) if i in held)


def subsample_per_class(
    examples: Sequence[Example], n: int, seed: int, *keys: str, free_text: bool = False
) -> tuple[tuple[Example, ...], dict[str, Any]]:
    """At most ``n`` examples per gold label (``free_text``: in all), chosen uniformly with a
    generator seeded by ``(seed, *keys)``; the kept ones stay in file order. Returns them and
    a report with the per-class counts before and after (classes with fewer than ``n`` keep
    all of theirs)."""
    rng = _per_task_rng(seed, "subsample", *keys)
    by_label = _indices_by_label(examples, free_text)
    chosen: list[int] = []
    for label in sorted(by_label):
        indices = by_label[label]
        if len(indices) > n:
            indices = sorted(rng.choice(indices, size=n, replace=False).tolist())
        chosen.extend(indices)
    chosen.sort()
    report = {
        "per_class": n,
        "seed": seed,
        "before": {k: len(v) for k, v in sorted(by_label.items())},
        "after": dict(sorted(Counter(_group(examples[i], free_text) for i in chosen).items())),
    }
    return tuple(examples[i] for i in chosen), report


def stratified_split(
    examples: Sequence[Example], fraction: float, seed: int, *keys: str
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Split into (rest, held_out): per gold label, ``round(fraction * count)`` examples
    (at least one when the class has two or more) chosen with a generator seeded by
    ``(seed, *keys)`` go to held_out. Both parts keep file order."""
    rng = _per_task_rng(seed, "holdout", *keys)
    held: set[int] = set()
    for _, indices in sorted(_indices_by_label(examples).items()):
        k = int(round(fraction * len(indices)))
        if len(indices) >= 2:
            k = min(max(k, 1), len(indices) - 1)
        held.update(rng.choice(indices, size=k, replace=False).tolist())
    return _split_off(examples, held)


def carve_validation(
    examples: Sequence[Example], n: int, seed: int, *keys: str, free_text: bool = False
) -> tuple[tuple[Example, ...], tuple[Example, ...]]:
    """Split training examples into (rest, validation): ``n`` per gold label (``free_text``:
    in all), chosen with a generator seeded by ``(seed, *keys)``, go to validation, but every
    class keeps at least one training example. Both parts keep file order and share no
    item."""
    rng = _per_task_rng(seed, "validation", *keys)
    held: set[int] = set()
    for _, indices in sorted(_indices_by_label(examples, free_text).items()):
        k = max(min(n, len(indices) - 1), 0)
        held.update(rng.choice(indices, size=k, replace=False).tolist())
    return _split_off(examples, held)


# --------------------------------------------------------------------------- loading tasks


def _read_raw_splits(spec: DatasetSpec, config: SourceConfig) -> dict[str, tuple[str, list | None]]:
    """{split: (origin, raw pairs)} for the splits present, from JSON files or TFDS shards."""
    if config.source == "tfds":
        from cljax.data.tfds_builder import read_tfds_splits  # optional dependency

        return read_tfds_splits(spec, config.data_dir, config.tfds_data_dir)
    directory = dataset_dir(spec, config.data_dir)
    read_labels(directory / "labels.json", spec)
    splits = available_splits(directory)
    if not splits:
        raise FileNotFoundError(
            f"dataset {spec.name!r}: no split files ({', '.join(f'{s}.json' for s in SPLIT_FILES)})"
            f" in {directory} (data.missing=skip leaves it out of the order)"
        )
    # A validation run never reads an evaluated split that has its own file (None: unread).
    unread = {config.test_split} if config.validation_per_class is not None else set()
    return {
        s: (
            str(directory / f"{s}.json"),
            None if s in unread and "train" in splits else read_split_file(directory / f"{s}.json"),
        )
        for s in splits
    }


def load_task(name: str, config: SourceConfig | None = None) -> TaskData:
    """Train and test examples of the benchmark dataset ``name``, with its metadata.

    A missing train or test split is an error naming the files found, unless
    ``config.holdout_fraction`` is set: then the missing split is carved (stratified, seeded)
    from the present one and the metadata says so. ``config.validation_per_class`` then
    carves a validation split from the training examples that replaces the test split
    (whose own file is not read). Per-class subsampling comes after.
    """
    config = config or SourceConfig()
    spec = get_dataset(name)
    raw = _read_raw_splits(spec, config)
    wanted = {"train": "train", "test": config.test_split}
    screened: dict[str, tuple[Example, ...]] = {}
    reports: dict[str, Any] = {}
    for role, split in wanted.items():
        if split in raw and raw[split][1] is not None:  # None: a validation run's unread test
            origin, pairs = raw[split]
            examples, reports[role] = screen_examples(pairs, spec, origin, config)
            screened[role] = tuple(examples)
    metadata: dict[str, Any] = {
        "dataset": spec.name,
        "task_type": spec.task_type,
        "source": config.source,
        "splits": reports,
    }
    missing = [role for role in wanted if wanted[role] not in raw]
    if len(missing) == 2:
        raise FileNotFoundError(
            f"dataset {spec.name!r}: neither {wanted['train']!r} nor {wanted['test']!r} split "
            f"exists (found: {sorted(raw) or 'no split files'}); it cannot be used offline"
            " (data.missing=skip leaves it out of the order)"
        )
    if missing:
        role = missing[0]
        present = "test" if role == "train" else "train"
        if config.holdout_fraction is None:
            raise FileNotFoundError(
                f"dataset {spec.name!r}: split {wanted[role]!r} is missing (found: {sorted(raw)});"
                " set data.holdout_fraction (e.g. data.holdout_fraction=0.1) to carve a"
                f" stratified held-out split from {wanted[present]!r}, or data.missing=skip to"
                " leave the dataset out"
            )
        rest, held = stratified_split(
            screened[present], config.holdout_fraction, config.seed, spec.name
        )
        screened["train"], screened["test"] = rest, held
        metadata["derived_split"] = {
            "missing": role,
            "carved_from": reports[present]["file"],
            "test_fraction": config.holdout_fraction,
            "seed": config.seed,
            "n_train": len(rest),
            "n_test": len(held),
        }
    validation = config.validation_per_class
    if validation is not None:
        # after the held-out carving, so validation never overlaps what a test run scores
        screened["train"], screened["test"] = carve_validation(
            screened["train"], validation, config.seed, spec.name
        )
        metadata["validation"] = {
            "per_class": validation,
            "seed": config.seed,
            "n": len(screened["test"]),
        }
    for role in ("train", "test"):
        n = config.train_per_class if role == "train" else config.test_per_class
        if role == "test" and validation is not None:
            n = None  # the validation split is used whole
        if n is not None:
            screened[role], metadata.setdefault("subsampled", {})[role] = subsample_per_class(
                screened[role], n, config.seed, spec.name, role
            )
    metadata["n_train"] = len(screened["train"])
    metadata["n_test"] = len(screened["test"])
    return TaskData(spec, screened["train"], screened["test"], metadata)


def load_benchmark(
    order: int | str | Sequence[str], config: SourceConfig | None = None
) -> tuple[TaskData, ...]:
    """The tasks of a published order (``1`` .. ``6``, ``"order3"``) or of a list of dataset
    names, in that order. All names are checked before any file is read."""
    names = get_order(order) if isinstance(order, int | str) else tuple(order)
    for name in names:
        get_dataset(name)
    return tuple(load_task(name, config) for name in names)
