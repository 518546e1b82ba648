"""The pretraining corpus: files of three formats, benchmark text, and the refusal of
test sentences of an evaluated task."""

import json

import pytest

from cljax.data import sources
from cljax.errors import DataError
from cljax.pretrain import corpus


def test_file_corpus_reads_text_jsonl_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("first paragraph\nstill first\n\nsecond\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "from jsonl"}\n\n"a bare string"\n')
    (tmp_path / "c.json").write_text(json.dumps(["one", {"text": "two"}]))
    got = corpus.file_corpus([tmp_path / "a.txt", tmp_path / "b.jsonl", tmp_path / "c.json"])
    assert got.documents == (
        "first paragraph\nstill first",
        "second",
        "from jsonl",
        "a bare string",
        "one",
        "two",
    )
    assert got.counts == {str(tmp_path / n): 2 for n in ("a.txt", "b.jsonl", "c.json")}


def test_file_corpus_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: expected a string or an object"):
        corpus.file_corpus([bad])
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="x.csv: not .txt, .jsonl or .json"):
        corpus.file_corpus([tmp_path / "x.csv"])
    with pytest.raises(FileNotFoundError, match="pretrain.files: .*missing.txt not found"):
        corpus.file_corpus([tmp_path / "missing.txt"])


def test_default_corpus_leaves_out_the_evaluated_tasks_and_missing_ones(benchmark_dir):
    evaluated = corpus.order_tasks("dbpedia,amazon,yelp,agnews")
    tasks = corpus.default_corpus_tasks(evaluated, str(benchmark_dir))
    assert not set(tasks) & set(evaluated)
    assert "yahoo" not in tasks  # no files here
    assert {"IMDB", "SST-2", "MNLI", "COPA"} <= set(tasks)


def test_test_sentences_of_an_evaluated_task_are_refused(benchmark_dir):
    config = sources.SourceConfig(data_dir=str(benchmark_dir))
    test = sources.load_task("COPA", config).test
    leaky = corpus.merge(
        [
            corpus.Corpus(("unrelated text",), {"file": 1}),
            corpus.Corpus(tuple(ex.sentence for ex in test[:3]), {"copied": 3}),
        ]
    )
    with pytest.raises(DataError, match=rf"COPA: 3 of {len(test)}"):
        corpus.check_disjoint(leaky, ["COPA", "CB"], config)
    corpus.check_disjoint(leaky, ["CB"], config)  # nothing of CB's test split: accepted
