"""General-ability retention: multiple-choice and numeric sets read from files, scored on
the base model and after every task, reported in accuracy.json, the plot and the table."""

import json
from pathlib import Path

import numpy as np
import pytest

from cljax.cl import loop, report
from cljax.cl.evaluate import evaluate_choices
from cljax.cl.general import load_general_set
from cljax.data.batching import BatchConfig, load_tokenizer
from cljax.errors import ConfigError, DataError
from tests.cl.test_loop import tiny_config

CHOICES = [
    {"question": "Which is a fruit?", "choices": ["apple", "a stone wall"], "answer": 0},
    {"question": "Sky colour?", "choices": ["the green grass", "blue", "red"], "answer": 1},
    {"question": "2 + 2?", "choices": ["five or six", "4"], "answer": 0},
]
NUMBERS = [
    {"question": "Tom has 3 apples and eats 1. How many are left?", "answer": "3 - 1 = 2\n#### 2"},
    {"question": "What is 10 times 4?", "answer": "#### 40"},
]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_multiple_choice_picks_each_items_likeliest_choice(tmp_path, gpt2_tokenizer_dir):
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    general = load_general_set(
        write_jsonl(tmp_path / "mc.jsonl", CHOICES),
        tokenizer,
        max_source_tokens=64,
        max_target_tokens=8,
    )
    assert general.kind == "choice" and general.name == "mc"
    assert tokenizer.decode(general.split.prompts[1]) == (
        "Question: Sky colour?\nA. the green grass\nB. blue\nC. red\nAnswer:"
    )

    # A stand-in model that prefers short answers: score = -(answer tokens).
    def score_fn(batch):
        return -np.asarray(batch.loss_mask).sum(axis=1)

    config = BatchConfig(batch_size=4, max_source_tokens=64, max_target_tokens=8)
    result = evaluate_choices(score_fn, general, tokenizer, config)
    # shortest choice per item: "apple" (right), "blue" (right), "4" (wrong: answer 0)
    assert result.predictions == ("A", "B", "B")
    assert result.score == pytest.approx(200 / 3)


def test_bad_general_sets_name_the_file_and_line(tmp_path, gpt2_tokenizer_dir):
    tokenizer = load_tokenizer(gpt2_tokenizer_dir)
    cases = [
        ([{"question": "q", "choices": ["a", "b"], "answer": 2}], "mc.jsonl:1: 'answer' must be"),
        ([{"question": "q", "answer": "1"}, {"q": 1}], "mc.jsonl:2: a general-ability record"),
        ([{"question": "q", "answer": "1"}, CHOICES[0]], "mc.jsonl:2: a choice record in a set"),
    ]
    for records, message in cases:
        with pytest.raises(DataError, match=message):
            load_general_set(
                write_jsonl(tmp_path / "mc.jsonl", records),
                tokenizer,
                max_source_tokens=64,
                max_target_tokens=8,
            )


def test_general_ability_is_scored_before_and_after_every_task(tmp_path):
    sets = [
        str(write_jsonl(tmp_path / "mc.jsonl", CHOICES)),
        str(write_jsonl(tmp_path / "gsm.jsonl", NUMBERS)),
    ]
    cfg = tiny_config(tmp_path, "llama", "seqft", "eval.max_new_tokens=4")
    cfg.eval.general = sets
    loop.run_experiment(cfg, log=lambda _: None)
    run_dir = tmp_path / "llama-seqft"
    record = json.loads((run_dir / "accuracy.json").read_text())
    general = record["general"]
    assert general["sets"] == ["mc", "gsm"]
    assert general["after"] == ["base", "synth_topic", "synth_sentiment"]
    scores = np.asarray(general["scores"])
    assert scores.shape == (3, 2) and np.all((scores >= 0) & (scores <= 100))
    delta = record["metrics"]["general_delta"]
    assert delta == pytest.approx((scores[-1] - scores[0]).mean())
    assert (run_dir / "general_ability.png").is_file()
    table = report.compare_runs([run_dir])
    assert "General delta" in table.splitlines()[0] and f"{delta:.2f}" in table


def test_a_benchmark_dataset_serves_as_a_held_out_general_set(tmp_path, benchmark_dir):
    cfg = tiny_config(
        tmp_path, "llama", "seqft", f"data.data_dir={benchmark_dir}", "eval.general=['SST-2']"
    )
    with pytest.raises(ConfigError, match="'SST-2' has rows of .* tokens; add a bucket"):
        loop.ContinualRun(cfg, log=lambda _: None)
    cfg.data.length_buckets = [384]
    run = loop.ContinualRun(cfg, log=lambda _: None)
    (sst2,) = run.general
    assert sst2.name == "SST-2" and sst2.kind == "choice" and len(sst2.answers) == 4
    assert set(sst2.answers) == {0, 1}  # 2 test items per class of Good / Bad
    assert run.data.tokenizer.decode(sst2.split.prompts[0]).startswith("Task:SC\nDataset:SST-2")
    assert 0 <= run.evaluate_general()[0] <= 100
    cfg = tiny_config(
        tmp_path, "llama", "seqft", f"data.data_dir={benchmark_dir}", "eval.general=['topic']"
    )
    with pytest.raises(ConfigError, match="'topic' is neither a file nor a benchmark dataset"):
        loop.ContinualRun(cfg, log=lambda _: None)
    cfg = tiny_config(
        tmp_path,
        "llama",
        "seqft",
        "data.source=json",
        f"data.data_dir={benchmark_dir}",
        "data.order=CB,SST-2",
        "eval.general=['SST-2']",
    )
    with pytest.raises(ConfigError, match="'SST-2' is a task of data.order"):
        loop.ContinualRun(cfg, log=lambda _: None)
