"""TRACE's released layout, read from the hand-written fixture in tests/fixtures/trace
(``tests/fixtures/make_trace_fixture.py``), and each task's scoring."""

import json
import shutil
from pathlib import Path

import pytest

from cljax.cl import scoring
from cljax.data.trace import TRACE_ORDER, TRACE_TASKS, get_trace_task, load_trace_task
from cljax.errors import DataError, UnknownNameError

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "trace"


def test_every_task_of_the_fixture_loads_in_trace_order():
    assert TRACE_ORDER[0] == "C-STANCE" and TRACE_ORDER[-1] == "20Minuten"
    for name in TRACE_ORDER:
        splits = load_trace_task(FIXTURE, name)
        assert [len(splits[s]) for s in ("train", "eval", "test")] == [3, 2, 2]
    cstance = load_trace_task(FIXTURE, "C-STANCE")["test"][0]
    assert cstance.prompt.endswith("态度：") and cstance.answer == "C"
    py150 = load_trace_task(FIXTURE, "Py150")["train"][0]
    assert py150.answer.startswith("        return")  # indentation kept


def test_each_task_is_scored_with_its_own_metric_and_extraction():
    assert {t.metric for t in TRACE_TASKS.values()} == {
        "accuracy",
        "rouge_l",
        "edit_similarity",
        "sari",
    }
    for task in TRACE_TASKS.values():
        test = load_trace_task(FIXTURE, task.name)["test"]
        refs = [e.answer for e in test]
        sources = [e.prompt for e in test]
        # the references score 100 against themselves, but for SARI: an n-gram the source
        # holds twice and the output once counts as half a wrong deletion
        perfect = scoring.score(task.metric, refs, refs, sources, extract=task.extract)
        assert perfect == pytest.approx(100.0, abs=1.0 if task.metric == "sari" else 1e-9)
    science = get_trace_task("ScienceQA")
    refs = [e.answer for e in load_trace_task(FIXTURE, "ScienceQA")["test"]]
    preds = [r[0] + " because of something else" for r in refs]
    assert scoring.score(science.metric, preds, refs, extract=science.extract) == 100.0


def test_bad_trace_directories_are_named(tmp_path):
    with pytest.raises(UnknownNameError, match="unknown TRACE task 'FOMCC'.*C-STANCE"):
        load_trace_task(FIXTURE, "FOMCC")
    with pytest.raises(DataError, match="no TRACE task directory"):
        load_trace_task(tmp_path, "FOMC")
    shutil.copytree(FIXTURE / "FOMC", tmp_path / "FOMC")
    (tmp_path / "FOMC" / "eval.json").unlink()
    with pytest.raises(DataError, match=r"FOMC: missing eval.json"):
        load_trace_task(tmp_path, "FOMC")
    chat = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    (tmp_path / "FOMC" / "eval.json").write_text(json.dumps(chat))
    with pytest.raises(DataError, match=r"eval.json:1: TRACE records are prompt/answer pairs"):
        load_trace_task(tmp_path, "FOMC")
