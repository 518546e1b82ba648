"""``cljax pretrain`` end to end at tiny sizes: both objectives, the Hugging Face output
(``transformers`` loads it with the same logits), the instruction stage, resume after an
interruption, and the start-up errors."""

import json

import numpy as np
import pytest
import torch

from cljax.cl.checkpoint import RunCheckpointer
from cljax.config import Config, apply_overrides
from cljax.data.batching import load_tokenizer
from cljax.errors import ConfigError, DataError
from cljax.models.convert import load_hf_checkpoint
from cljax.pretrain.run import run_pretrain

TEXT = "\n\n".join(
    f"Document {i}: the quick brown fox {i % 7} jumps over the lazy dog near river {i % 5}."
    for i in range(120)
)


def tiny_pretrain(tmp_path, benchmark_dir, family: str, *overrides: str) -> Config:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "corpus.txt").write_text(TEXT)
    cfg = Config()
    cfg.model.family = family
    cfg.data.data_dir = str(benchmark_dir)
    cfg.data.max_source_length = 192
    cfg.data.length_buckets = [256]
    cfg.pretrain.evaluated_order = "agnews"
    cfg.pretrain.corpus_tasks = "COPA,CB"
    cfg.pretrain.files = [str(tmp_path / "corpus.txt")]
    cfg.pretrain.sequence_length = 32
    cfg.pretrain.steps = 6
    cfg.pretrain.eval_batches = 2
    cfg.pretrain.tokenizer_vocab_size = 320
    cfg.pretrain.sentinels = 20
    cfg.train.batch_size = 8
    cfg.train.learning_rate = 3e-3
    cfg.eval.mode = "rank"
    cfg.eval.batch_size = 8
    cfg.run.out_dir = str(tmp_path / "runs")
    cfg.run.name = f"base-{family}"
    cfg.run.checkpoint_every_steps = 2
    cfg.run.mesh = {"data": 1}
    cfg.run.progress = False
    return apply_overrides(cfg, overrides)


def _quiet(_: str) -> None:
    pass


def test_llama_pretraining_with_an_instruction_stage(tmp_path, benchmark_dir):
    from transformers import AutoModelForCausalLM

    cfg = tiny_pretrain(
        tmp_path,
        benchmark_dir,
        "llama",
        "pretrain.instruction_steps=2",
        "pretrain.instruction_train_per_class=4",
        "pretrain.instruction_test_per_class=2",
    )
    summary = run_pretrain(cfg, log=_quiet)
    run_dir = tmp_path / "runs" / "base-llama"
    assert json.loads((run_dir / "pretrain.json").read_text()) == summary
    lm = summary["language_model"]
    assert lm["heldout_loss_after"] < lm["heldout_loss_before"]
    assert lm["heldout_perplexity_after"] == pytest.approx(np.exp(lm["heldout_loss_after"]))
    assert summary["corpus"]["sources"]["COPA"] > 0 and summary["corpus"]["training_tokens"] > 0
    assert summary["instruction"]["tasks"] == ["COPA", "CB"]
    assert len(summary["instruction"]["after"]) == 2
    # the base: transformers loads it with cljax's logits; it is a tokenizer directory too
    base = run_dir / "model"
    tokenizer = load_tokenizer(base)
    ids = np.array([tokenizer.encode(["the quick brown fox"])[0]], np.int32)
    model, _ = load_hf_checkpoint(base)
    expected = np.asarray(model(ids))
    hf = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        got = hf(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)
    # started again: every stage is done, nothing is trained twice
    assert run_pretrain(cfg, log=_quiet)["language_model"] == lm


def test_t5_span_corruption_base_loads_in_transformers(tmp_path, benchmark_dir):
    from transformers import T5ForConditionalGeneration

    cfg = tiny_pretrain(tmp_path, benchmark_dir, "t5", "pretrain.steps=3")
    summary = run_pretrain(cfg, log=_quiet)
    assert summary["objective"] == "span_corruption"
    assert np.isfinite(summary["language_model"]["heldout_loss_after"])
    base = tmp_path / "runs" / "base-t5" / "model"
    tokenizer = load_tokenizer(base)
    assert tokenizer.backend.token_to_id("<extra_id_19>") is not None
    ids = np.array([tokenizer.encode(["the quick <extra_id_0> fox"])[0]], np.int32)
    decoder = np.array([[tokenizer.pad_id, 5, 9]], np.int32)
    model, _ = load_hf_checkpoint(base)
    expected = np.asarray(model(ids, None, decoder))
    hf = T5ForConditionalGeneration.from_pretrained(base).eval()
    with torch.no_grad():
        got = hf(
            input_ids=torch.from_numpy(ids).long(),
            decoder_input_ids=torch.from_numpy(decoder).long(),
        ).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=2e-4)


def test_an_interrupted_pretraining_resumes_to_the_same_model(tmp_path, benchmark_dir, monkeypatch):
    whole = run_pretrain(tiny_pretrain(tmp_path / "a", benchmark_dir, "llama"), log=_quiet)
    cfg = tiny_pretrain(tmp_path / "b", benchmark_dir, "llama")
    save = RunCheckpointer.save

    def save_then_die(self, step, state, record, **kwargs):
        save(self, step, state, record, **kwargs)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunCheckpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pretrain(cfg, log=_quiet)
    monkeypatch.setattr(RunCheckpointer, "save", save)
    resumed = run_pretrain(cfg, log=_quiet)
    assert (
        resumed["language_model"]["heldout_loss_after"]
        == (whole["language_model"]["heldout_loss_after"])
    )
    log = [
        json.loads(line)
        for line in (tmp_path / "b" / "runs" / "base-llama" / "metrics.jsonl").open()
    ]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate


@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (["pretrain.corpus_tasks=COPA,agnews"], ConfigError, r"evaluated tasks \['agnews'\]"),
        (["pretrain.corpus_tasks=''", "pretrain.files=[]"], DataError, "corpus is empty"),
        (["model.overrides={'vocab_size': 100}"], ConfigError, "vocab_size"),
        (
            ["pretrain.instruction_steps=2", "data.max_source_length=40"],
            ConfigError,
            "data.max_source_length=40 leaves no room",
        ),
    ],
)
def test_bad_pretraining_input_fails_before_training(
    tmp_path, benchmark_dir, overrides, error, message
):
    cfg = tiny_pretrain(tmp_path, benchmark_dir, "llama", *overrides)
    with pytest.raises(error, match=message):
        run_pretrain(cfg, log=_quiet)
    assert not (tmp_path / "runs" / "base-llama" / "checkpoints").exists()


def test_a_corpus_file_holding_test_sentences_of_the_evaluated_order_is_refused(
    tmp_path, benchmark_dir
):
    from cljax.data import sources

    test = sources.load_task("CB", sources.SourceConfig(data_dir=str(benchmark_dir))).test
    leak = tmp_path / "leak.jsonl"
    leak.write_text("".join(json.dumps({"text": ex.sentence}) + "\n" for ex in test[:4]))
    cfg = tiny_pretrain(
        tmp_path,
        benchmark_dir,
        "llama",
        "pretrain.evaluated_order=CB",
        "pretrain.corpus_tasks=COPA",
        f"pretrain.files=['{leak}']",
    )
    with pytest.raises(DataError, match=rf"CB: 4 of {len(test)}"):
        run_pretrain(cfg, log=_quiet)


def test_the_tokenizer_learns_every_benchmark_template(tmp_path, benchmark_dir, monkeypatch):
    # agnews is evaluated, so none of its text is in the corpus; its prompt template and
    # option names are, weighted as in many examples, so a fine-tuning prompt stays short.
    from cljax.data.tasks import build_prompt, get_dataset
    from cljax.pretrain import run as pretrain_run

    cfg = tiny_pretrain(tmp_path, benchmark_dir, "llama", "pretrain.tokenizer_vocab_size=2048")
    head = build_prompt(get_dataset("agnews"), "")
    lengths = {}
    for weight in (0, pretrain_run.TEMPLATE_WEIGHT):
        monkeypatch.setattr(pretrain_run, "TEMPLATE_WEIGHT", weight)
        tokenizer = pretrain_run.plan(cfg, log=_quiet).tokenizer
        lengths[weight] = len(tokenizer.encode([head])[0])
    assert lengths[pretrain_run.TEMPLATE_WEIGHT] < 0.6 * lengths[0], lengths  # 39 vs 75
