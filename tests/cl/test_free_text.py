"""Free-text tasks end to end: a tiny LLaMA runs the TRACE fixture and a user's own files
(all three record shapes, mixed with a benchmark task), scored with each task's metric."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cljax.cl import loop
from cljax.config import Config, apply_overrides
from cljax.data import batching
from cljax.errors import ConfigError, DataError, UnknownNameError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def free_text_config(out_dir: Path, *overrides: str) -> Config:
    cfg = Config()
    cfg.model.family = "llama"
    cfg.data.source = "trace"
    cfg.data.data_dir = str(FIXTURES / "trace")
    cfg.data.order = "trace"
    cfg.data.tokenizer_vocab_size = 400
    cfg.data.max_source_length = 96  # MeetingBank's transcript must be cut
    cfg.data.max_target_length = 24
    cfg.data.length_buckets = [128]
    cfg.train.batch_size = 4
    cfg.train.max_steps_per_task = 1
    cfg.eval.mode = "generate"
    cfg.eval.max_new_tokens = 4
    cfg.eval.batch_size = 4
    cfg.eval.all_tasks = False
    cfg.run.out_dir = str(out_dir)
    cfg.run.name = "free-text"
    cfg.run.progress = False
    cfg.run.checkpoint_every_steps = 0
    cfg.run.mesh = {"data": 1}
    return apply_overrides(cfg, overrides)


def test_the_trace_fixture_runs_end_to_end_with_each_tasks_metric(tmp_path):
    cfg = free_text_config(tmp_path)
    data = loop.load_benchmark_data(cfg)
    assert data.names[0] == "C-STANCE" and len(data.names) == 8
    meeting = data.test[data.names.index("MeetingBank")]
    cut = data.tokenizer.decode(
        meeting.prompts[list(meeting.labels).index("The council approved the consent calendar.")]
    )
    assert meeting.n_truncated_prompts == 1 and cut.endswith("Summary: ")  # the cue is kept
    result = loop.run_experiment(cfg, log=lambda _: None)
    record = json.loads((tmp_path / "free-text" / "accuracy.json").read_text())
    assert record["task_metrics"] == [
        "accuracy",
        "accuracy",
        "rouge_l",
        "edit_similarity",
        "accuracy",
        "accuracy",
        "accuracy",
        "sari",
    ]
    final = np.asarray(record["accuracy"][-1], dtype=float)
    assert np.all((final >= 0) & (final <= 100))
    summary = record["metrics"]
    assert summary["overall_performance"] == pytest.approx(final.mean())
    assert summary["backward_transfer"] is not None
    assert result is not None


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def test_user_files_of_every_shape_mix_with_a_benchmark_task(tmp_path, benchmark_dir):
    qa = [{"prompt": f"Q: {i} plus one?\nA:", "answer": str(i + 1)} for i in range(6)]
    io = [{"input": f"Reverse {w}\nReversed:", "output": w[::-1]} for w in ("abc", "hello", "xyz")]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w},
            ]
        }
        for w in ("yes", "no", "maybe")
    ]
    files = {
        "plus": {
            "train": write_jsonl(tmp_path / "plus.jsonl", qa),
            "test": write_jsonl(tmp_path / "plus_test.jsonl", qa[:2]),
            "extract": "first_number",
        },
        "reverse": {
            "train": write_jsonl(tmp_path / "rev.jsonl", io),
            "test": write_jsonl(tmp_path / "rev_test.jsonl", io[:1]),
            "metric": "edit_similarity",
        },
        "say": {
            "train": write_jsonl(tmp_path / "say.jsonl", chat),
            "test": write_jsonl(tmp_path / "say_test.jsonl", chat[:2]),
            "metric": "rouge_l",
        },
    }
    cfg = free_text_config(
        tmp_path,
        "data.source=json",
        f"data.data_dir={benchmark_dir}",
        "data.order=CB,plus,reverse,say",
        "data.train_per_class=2",
        "data.test_per_class=2",
        "data.length_buckets=[256]",
        "data.max_source_length=256",
    )
    cfg.data.files = files
    data = loop.load_benchmark_data(cfg)
    assert data.names == ("CB", "plus", "reverse", "say")
    say = data.test[3]
    assert data.tokenizer.decode(say.prompts[0]) == "User: Say yes.\nAssistant:"
    loop.run_experiment(cfg, log=lambda _: None)
    record = json.loads((tmp_path / "free-text" / "accuracy.json").read_text())
    assert record["task_metrics"] == ["accuracy", "accuracy", "edit_similarity", "rouge_l"]


def test_bad_free_text_configs_fail_at_start_up(tmp_path):
    cfg = free_text_config(tmp_path, "eval.mode=rank")
    with pytest.raises(ConfigError, match="free-text tasks .* have none: use eval.mode=generate"):
        loop.run_experiment(cfg, log=lambda _: None)
    cfg = free_text_config(tmp_path)
    cfg.data.files = {"mine": {"train": "a.jsonl", "test": "b.jsonl", "metric": "rouge"}}
    with pytest.raises(UnknownNameError, match="data.files.mine.metric='rouge'.*rouge_l"):
        loop.run_experiment(cfg, log=lambda _: None)
    cfg.data.files = {"mine": {"train": "a.jsonl"}}
    with pytest.raises(ConfigError, match="data.files.mine.test: the path"):
        loop.run_experiment(cfg, log=lambda _: None)
    cfg = free_text_config(tmp_path, "data.order=FOMC,Trace")
    with pytest.raises(UnknownNameError, match="unknown TRACE task 'Trace'"):
        loop.run_experiment(cfg, log=lambda _: None)


@pytest.fixture
def chat_tokenizer_dir(tmp_path, gpt2_tokenizer_dir):
    """GPT-2's tokenizer with LLaMA-2-chat's template (tests/fixtures) added."""
    folder = tmp_path / "chat-tokenizer"
    shutil.copytree(gpt2_tokenizer_dir, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (FIXTURES / "llama2_chat_template.jinja").read_text()
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_chat_prompts_render_as_the_tokenizers_own_template(chat_tokenizer_dir, gpt2_tokenizer_dir):
    from transformers import AutoTokenizer

    turns = [
        ("system", "Be brief."),
        ("user", "Capital of France?"),
        ("assistant", "Paris."),
        ("user", "And of Italy?"),
    ]
    tokenizer = batching.load_tokenizer(chat_tokenizer_dir)
    rendered = tokenizer.render_chat(turns)
    bos = "<|endoftext|>"  # GPT-2's bos; the batches add it, so the rendering drops it
    assert rendered == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nCapital of France? [/INST] Paris. "
        f"{bos}{bos}[INST] And of Italy? [/INST]"
    )
    own = AutoTokenizer.from_pretrained(str(chat_tokenizer_dir)).apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
    )
    assert own == bos + rendered
    with pytest.raises(DataError, match="has no chat_template"):
        batching.load_tokenizer(gpt2_tokenizer_dir).render_chat(turns)


def test_a_chat_file_trains_and_generates_through_the_template(tmp_path, chat_tokenizer_dir):
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"Say {w}."},
                {"role": "assistant", "content": w},
            ]
        }
        for w in ("yes", "no")
    ]
    files = {
        "say": {
            "train": write_jsonl(tmp_path / "say.jsonl", chat),
            "test": write_jsonl(tmp_path / "say_test.jsonl", chat),
            "metric": "accuracy",
        }
    }
    cfg = free_text_config(
        tmp_path,
        "data.source=json",
        "data.order=say",
        f"data.tokenizer={chat_tokenizer_dir}",
        "data.chat_template=True",
    )
    cfg.data.files = files
    data = loop.load_benchmark_data(cfg)
    assert data.tokenizer.decode(data.test[0].prompts[0]) == "[INST] Say yes. [/INST]"
    loop.run_experiment(cfg, log=lambda _: None)
    record = json.loads((tmp_path / "free-text" / "accuracy.json").read_text())
    assert record["tasks"] == ["say"] and record["tasks_done"] == 1
    with pytest.raises(ConfigError, match="data.chat_template=True needs data.tokenizer"):
        loop.run_experiment(free_text_config(tmp_path, "data.chat_template=True"), log=print)
