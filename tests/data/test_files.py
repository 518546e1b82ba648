"""A user's own task files: the three record shapes, JSON and JSONL, and clear errors that
name the file and the line of the first offending record."""

import json

import pytest

from cljax.data.files import read_task_file
from cljax.errors import DataError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_prompt_answer_json_list_keeps_unicode_and_lines(tmp_path):
    records = [
        {"prompt": "Vereinfache: Die Straße ist gesperrt.", "answer": "Die Straße ist zu."},
        {"prompt": "def f(x):\n    return", "answer": " x + 1", "id": 7},
    ]
    path = write(tmp_path, "t.json", json.dumps(records, ensure_ascii=False, indent=2))
    examples = read_task_file(path)
    assert [e.prompt for e in examples] == [r["prompt"] for r in records]
    assert [e.answer for e in examples] == [r["answer"] for r in records]
    assert [e.line for e in examples] == [2, 6]  # where each record starts
    assert not any(e.chat for e in examples)


def test_input_output_jsonl_skips_blank_lines(tmp_path):
    path = write(
        tmp_path, "t.jsonl", '{"input": "2+2=", "output": "4"}\n\n{"input": "a", "output": "b"}\n'
    )
    examples = read_task_file(path)
    assert [(e.prompt, e.answer, e.line) for e in examples] == [("2+2=", "4", 1), ("a", "b", 3)]


def test_a_conversation_gives_one_example_per_assistant_turn(tmp_path):
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Italy?"},
            {"role": "assistant", "content": "Rome."},
        ]
    }
    examples = read_task_file(write(tmp_path, "c.jsonl", json.dumps(chat) + "\n"))
    assert [e.answer for e in examples] == ["Paris.", "Rome."]
    assert examples[0].context == (("system", "Be brief."), ("user", "Capital of France?"))
    assert examples[1].context[-2:] == (("assistant", "Paris."), ("user", "And of Italy?"))
    assert all(e.chat for e in examples)
    with pytest.raises(ValueError, match="no plain prompt"):
        _ = examples[0].prompt


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "a.jsonl",
            '{"prompt": "p", "answer": "a"}\n{"question": "q"}\n',
            r"a.jsonl:2: a record needs the keys",
        ),
        ("b.jsonl", '{"prompt": "p", "answer": "  "}\n', r"b.jsonl:1: empty 'answer'"),
        (
            "c.jsonl",
            '{"prompt": "p", "answer": "a"}\n{"prompt": "p", "answer": 3\n',
            r"c.jsonl:2: not a JSON record",
        ),
        (
            "d.jsonl",
            '{"messages": [{"role": "user", "content": "hi"}]}\n',
            r"d.jsonl:1: the conversation has no assistant turn",
        ),
        (
            "e.jsonl",
            '{"messages": [{"role": "bot", "content": "hi"}]}\n',
            r"e.jsonl:1: turn 0 must be \{'role': one of",
        ),
        (
            "f.json",
            '[\n  {"prompt": "p", "answer": "a"},\n  {"input": "p", "output": "a"}\n]',
            r"f.json:3: a input_output record in a file of prompt_answer records",
        ),
        (
            "g.json",
            '{"prompt": "p", "answer": "a"}',
            r"g.json:1: a .json task file must hold a JSON list",
        ),
        (
            "h.json",
            '[{"prompt": "p", "answer": "a"}\n {"prompt": "q"}]',
            r"h.json:2: expected ',' or '\]'",
        ),
        ("i.json", "[]", r"i.json: no records"),
        ("j.txt", "prompt", r"j.txt: a task file must end in .json"),
    ],
)
def test_bad_files_name_the_file_and_the_line(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message):
        read_task_file(write(tmp_path, name, text))
    with pytest.raises(DataError, match="no such task file"):
        read_task_file(tmp_path / "missing.json")
