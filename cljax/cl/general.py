"""General-ability retention, the OSF paper's second claim: held-out general benchmarks
(``eval.general``) scored on the base model before the sequence and after every task.

A set is a JSON list (``.json``) or JSONL file whose records all have one of two shapes:

- multiple choice (MMLU, PIQA, BoolQ style): ``{"question": str, "choices": [str, ...],
  "answer": int}``. The prompt lists the lettered choices and ends in ``Answer:``; each
  choice's text is scored by its summed log-likelihood after the prompt, the likeliest
  is the prediction;
- numeric generation (GSM8K style): ``{"question": str, "answer": str}``. Greedy
  generation after ``Question: ...\\nAnswer:``; the last number of the output is compared
  with the last number of the answer (GSM8K's ``#### 42`` included).

The set's name is its file's stem. An entry of ``eval.general`` may instead name a
benchmark dataset (e.g. ``SST-2``): its test items (``data.test_per_class`` per class,
seeded) in the benchmark's prompt format, multiple choice over its options. With a base
pretrained by ``cljax pretrain``, the tasks left out of the order are its general
abilities.
"""

from __future__ import annotations

import dataclasses
import string
from pathlib import Path

import numpy as np

from cljax.data.batching import EncodedSplit, TextTokenizer, encode_split
from cljax.data.files import read_records
from cljax.data.sources import Example, TaskData
from cljax.data.tasks import GENERATION, PLAIN_TEXT, DatasetSpec
from cljax.errors import DataError

CHOICE, NUMBER = "choice", "number"


@dataclasses.dataclass(frozen=True)
class GeneralSet:
    """One general benchmark, encoded.

    Attributes:
      name: the file's stem.
      kind: ``"choice"`` or ``"number"``.
      split: the prompts (and for numbers the answers), a free-text split: numeric sets
        are scored like any free-text task (``last_number`` accuracy).
      choices: per item, the int32 token ids of each choice (multiple choice only).
      answers: per item, the index of the right choice (multiple choice only).
    """

    name: str
    kind: str
    split: EncodedSplit
    choices: tuple[tuple[np.ndarray, ...], ...] = ()
    answers: tuple[int, ...] = ()

    def choice_rows(self) -> tuple[EncodedSplit, list[tuple[int, int]]]:
        """Multiple choice: one row per (item, choice), the choice as the answer, and the
        ``(item, choice)`` pair of each row."""
        pairs = [(i, j) for i, item in enumerate(self.choices) for j in range(len(item))]
        enc = self.split
        rows = dataclasses.replace(
            enc,
            prompts=tuple(enc.prompts[i] for i, _ in pairs),
            answers=tuple(self.choices[i][j] for i, j in pairs),
            labels=tuple(enc.labels[i] for i, _ in pairs),
            sources=tuple(enc.sources[i] for i, _ in pairs),
        )
        return rows, pairs


def _prompt(record: dict, kind: str) -> str:
    text = f"Question: {record['question']}\n"
    if kind == CHOICE:
        letters = string.ascii_uppercase
        text += "".join(f"{letters[i]}. {c}\n" for i, c in enumerate(record["choices"]))
    return text + "Answer:"


def _check(record: object, where: str) -> str:
    """The record's kind; a malformed record is an error naming ``where``."""
    if not isinstance(record, dict) or not isinstance(record.get("question"), str):
        raise DataError(f"{where}: a general-ability record needs a 'question' string")
    if "choices" in record:
        choices, answer = record["choices"], record.get("answer")
        if not isinstance(choices, list) or len(choices) < 2 or len(choices) > 26:
            raise DataError(f"{where}: 'choices' must be a list of 2 to 26 strings")
        if not all(isinstance(c, str) and c.strip() for c in choices):
            raise DataError(f"{where}: every choice must be a non-empty string")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise DataError(f"{where}: 'answer' must be the index of the right choice")
        return CHOICE
    if not isinstance(record.get("answer"), str) or not record["answer"].strip():
        raise DataError(
            f"{where}: a record needs 'choices' and an 'answer' index (multiple choice) or an"
            " 'answer' string (numeric generation)"
        )
    return NUMBER


def load_general_set(
    path: str | Path, tokenizer: TextTokenizer, *, max_source_tokens: int, max_target_tokens: int
) -> GeneralSet:
    """Read and encode one set (module docstring); prompts over budget keep ``Answer:``."""
    path = Path(path)
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    kinds = [_check(record, f"{path}:{line}") for line, record in records]
    kind = kinds[0]
    for (line, _), other in zip(records, kinds, strict=True):
        if other != kind:
            raise DataError(f"{path}:{line}: a {other} record in a set of {kind} records")
    metric_extract = ("accuracy", "last_number") if kind == NUMBER else ("accuracy", "text")
    spec = DatasetSpec(path.stem, GENERATION, (), PLAIN_TEXT, *metric_extract)
    examples = [
        Example(
            _prompt(r, kind), r["answer"] if kind == NUMBER else r["choices"][r["answer"]], line
        )
        for line, r in records
    ]
    split = encode_split(
        spec,
        examples,
        tokenizer,
        max_source_tokens=max_source_tokens,
        max_target_tokens=max_target_tokens,
    )
    if kind == NUMBER:
        return GeneralSet(path.stem, kind, split)
    budget = max_target_tokens - 1
    choices = tuple(
        tuple(
            np.asarray(ids[:budget], np.int32)
            for ids in tokenizer.encode([" " + c for c in r["choices"]])
        )
        for _, r in records
    )
    return GeneralSet(path.stem, kind, split, choices, tuple(r["answer"] for _, r in records))


def benchmark_general_set(
    task: TaskData, tokenizer: TextTokenizer, *, max_source_tokens: int, max_target_tokens: int
) -> GeneralSet:
    """A benchmark task's test items as a multiple-choice set over its options."""
    split = encode_split(
        task.spec,
        task.test,
        tokenizer,
        max_source_tokens=max_source_tokens,
        max_target_tokens=max_target_tokens,
    )
    options = task.spec.options
    answers = tuple(options.index(ex.label) for ex in task.test)
    return GeneralSet(task.spec.name, CHOICE, split, (split.option_ids,) * len(split), answers)
