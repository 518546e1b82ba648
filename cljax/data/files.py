"""A user's own task files: free-text examples read from JSON or JSONL.

A file is a JSON list of records (``.json``) or one JSON record per line (``.jsonl``;
blank lines are skipped). Every record of a file has the same one of three shapes:

- ``{"prompt": str, "answer": str}``: TRACE's layout;
- ``{"input": str, "output": str}``: the same under other names;
- ``{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}``:
  a conversation. Each assistant turn becomes one example whose context is every turn
  before it, so the loss falls on assistant turns only and each sees what came before.

Other keys of a record are ignored. Errors name the file and the line of the first
offending record.

:func:`free_text_task` turns such examples into a task of the run (TRACE's tasks and
``data.files`` entries): prompts rendered (verbatim, or through the tokenizer's chat
template), a validation split carved from training when asked, seeded subsampling.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cljax.data.sources import (
    Example,
    SourceConfig,
    TaskData,
    carve_validation,
    subsample_per_class,
)
from cljax.data.tasks import GENERATION, PLAIN_TEXT, DatasetSpec
from cljax.errors import DataError

ROLES = ("system", "user", "assistant")
FORMATS = {  # format name -> the keys that identify it
    "prompt_answer": ("prompt", "answer"),
    "input_output": ("input", "output"),
    "messages": ("messages",),
}


@dataclasses.dataclass(frozen=True)
class TextExample:
    """One free-text example.

    Attributes:
      context: the turns before the answer as ``(role, content)`` pairs. A prompt/answer
        record is one ``("user", prompt)`` turn; ``chat`` says whether the record was a
        conversation (rendered through a chat template) or a plain prompt (used verbatim).
      answer: the target text (an assistant turn for conversations).
      chat: the record came from a ``messages`` file.
      line: the record's line in its file (1-based), to trace a prediction back.
    """

    context: tuple[tuple[str, str], ...]
    answer: str
    chat: bool
    line: int

    @property
    def prompt(self) -> str:
        """The plain prompt: a prompt/answer record's prompt (not defined for chats)."""
        if self.chat:
            raise ValueError("a conversation has no plain prompt; render it with a template")
        return self.context[0][1]


def read_records(path: str | Path) -> list[tuple[int, Any]]:
    """``(line, record)`` for each record of a ``.json`` list or ``.jsonl`` file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append((number, json.loads(line)))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not a JSON record ({err.msg})") from None
        return records
    if path.suffix == ".json":
        return list(_json_list_items(text, path))
    raise DataError(f"{path}: a task file must end in .json (a JSON list) or .jsonl")


def _json_list_items(text: str, path: Path) -> Iterator[tuple[int, Any]]:
    """The items of a JSON list with the line each starts on (the stdlib parser gives
    offsets only through ``raw_decode``, item by item)."""
    decoder = json.JSONDecoder()

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\r\n":
            i += 1
        return i

    def fail(i: int, what: str) -> DataError:
        return DataError(f"{path}:{text.count(chr(10), 0, i) + 1}: {what}")

    i = skip(0)
    if i >= len(text) or text[i] != "[":
        raise fail(i, "a .json task file must hold a JSON list of records")
    i = skip(i + 1)
    if i < len(text) and text[i] == "]":
        return
    while True:
        try:
            item, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as err:
            raise fail(err.pos, f"not a JSON record ({err.msg})") from None
        yield text.count("\n", 0, i) + 1, item
        i = skip(end)
        if i < len(text) and text[i] == "]":
            return
        if i >= len(text) or text[i] != ",":
            raise fail(i, "expected ',' or ']' after a record")
        i = skip(i + 1)


def _format_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    for name, keys in FORMATS.items():
        if all(k in record for k in keys):
            return name
    return None


def _text(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: empty {key!r}")
    return value


def _conversation(record: dict, where: str, line: int) -> list[TextExample]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(messages):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise DataError(
                f"{where}: turn {k} must be {{'role': one of {list(ROLES)}, 'content': str}}"
            )
        turns.append((turn["role"], _text(turn, "content", f"{where}: turn {k}")))
    examples = [
        TextExample(tuple(turns[:k]), content, chat=True, line=line)
        for k, (role, content) in enumerate(turns)
        if role == "assistant" and k > 0
    ]
    if not examples:
        raise DataError(f"{where}: the conversation has no assistant turn after a user turn")
    return examples


def read_task_file(path: str | Path) -> list[TextExample]:
    """Every example of a task file (module docstring), in file order."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    first = _format_of(records[0][1])
    examples: list[TextExample] = []
    for line, record in records:
        where = f"{path}:{line}"
        found = _format_of(record)
        if found is None:
            keys = " or ".join(str(list(k)) for k in FORMATS.values())
            got = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: a record needs the keys {keys}; got {got}")
        if found != first:
            raise DataError(f"{where}: a {found} record in a file of {first} records")
        if found == "messages":
            examples.extend(_conversation(record, where, line))
        else:
            prompt_key, answer_key = FORMATS[found]
            prompt = _text(record, prompt_key, where)
            answer = _text(record, answer_key, where)
            examples.append(TextExample((("user", prompt),), answer, chat=False, line=line))
    return examples


def plain_render(example: TextExample) -> str:
    """A prompt without a chat template: a prompt/answer record's prompt verbatim; a
    conversation as ``Role: content`` lines ending in the cue ``Assistant:``."""
    if not example.chat:
        return example.prompt
    lines = [f"{role.capitalize()}: {content}\n" for role, content in example.context]
    return "".join(lines) + "Assistant:"


def free_text_task(
    spec: DatasetSpec,
    train_file: Path,
    test_file: Path,
    render: Callable[[TextExample], str],
    config: SourceConfig,
) -> TaskData:
    """A free-text task from its training and test files. ``config.validation_per_class``
    carves that many training examples as the evaluated split (the test file is then not
    read); ``train_per_class`` / ``test_per_class`` cap each split (seeded)."""

    def examples(path: Path) -> tuple[Example, ...]:
        return tuple(Example(render(e), e.answer, e.line) for e in read_task_file(path))

    split = {"train": examples(train_file)}
    metadata: dict[str, Any] = {
        "dataset": spec.name,
        "task_type": spec.task_type,
        "metric": spec.metric,
        "files": {"train": str(train_file)},
    }
    validation = config.validation_per_class
    if validation is not None:
        split["train"], split["test"] = carve_validation(
            split["train"], validation, config.seed, spec.name, free_text=True
        )
        metadata["validation"] = {"n": len(split["test"]), "seed": config.seed}
    else:
        split["test"] = examples(test_file)
        metadata["files"]["test"] = str(test_file)
    for role, n in (("train", config.train_per_class), ("test", config.test_per_class)):
        if n is not None and not (role == "test" and validation is not None):
            split[role], metadata.setdefault("subsampled", {})[role] = subsample_per_class(
                split[role], n, config.seed, spec.name, role, free_text=True
            )
    metadata["n_train"], metadata["n_test"] = len(split["train"]), len(split["test"])
    return TaskData(spec, split["train"], split["test"], metadata)


def file_task(
    name: str, entry: dict[str, Any], config: SourceConfig, render: Callable[[TextExample], str]
) -> TaskData:
    """A ``data.files`` task: ``entry`` holds its ``train`` and ``test`` files, ``metric``,
    ``extract`` and ``max_new_tokens`` (checked by ``cljax.config.check_file_task``)."""
    spec = DatasetSpec(
        name,
        GENERATION,
        (),
        PLAIN_TEXT,
        entry["metric"],
        entry["extract"],
        entry["max_new_tokens"] or None,
    )
    return free_text_task(spec, Path(entry["train"]), Path(entry["test"]), render, config)
