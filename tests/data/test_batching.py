"""Token batches: formats, masks, truncation, bucketing, deterministic multi-host shuffling,
and the small trained tokenizer."""

import json
from pathlib import Path

import numpy as np
import pytest

from cljax.data import batching
from cljax.data.batching import BatchConfig, encode_split, eval_batches, train_batches
from cljax.data.sources import Example
from cljax.data.synthetic import SyntheticConfig, synthetic_benchmark
from cljax.data.tasks import build_prompt, get_dataset

AGNEWS = get_dataset("agnews")


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer_dir):
    return batching.load_tokenizer(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def agnews_examples(benchmark_dir) -> list[Example]:
    items = json.loads((benchmark_dir / "TC" / "agnews" / "test.json").read_text())[:37]
    return [Example(it["sentence"], it["label"], i) for i, it in enumerate(items)]


@pytest.fixture(scope="module")
def agnews_enc(agnews_examples, gpt2):
    return encode_split(AGNEWS, agnews_examples, gpt2)


def test_gpt2_special_ids(gpt2):
    assert (gpt2.bos_id, gpt2.eos_id, gpt2.pad_id) == (50256, 50256, 50256)
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*nope not found"):
        batching.load_tokenizer("/nope")


def test_decoder_training_rows(agnews_examples, agnews_enc, gpt2):
    config = BatchConfig(format="decoder", batch_size=4)
    batch = next(train_batches(agnews_enc, gpt2, config, epoch=0, seed=0))
    assert batch.input_ids.dtype == np.int32 and batch.loss_mask.dtype == np.float32
    assert batch.input_ids.shape == batch.labels.shape == batch.loss_mask.shape
    assert batch.decoder_input_ids is None
    for r, i in enumerate(batch.example_index):
        ex = agnews_examples[i]
        prompt = gpt2.encode([build_prompt(AGNEWS, ex.sentence)])[0]
        answer = gpt2.encode([ex.label])[0]
        sequence = [gpt2.bos_id, *prompt, *answer, gpt2.eos_id]
        n = len(sequence) - 1
        assert batch.attention_mask[r].tolist() == [1] * n + [0] * (batch.input_ids.shape[1] - n)
        assert batch.input_ids[r, :n].tolist() == sequence[:-1]  # right padded
        assert batch.labels[r, :n].tolist() == sequence[1:]  # next token at each position
        mask = batch.loss_mask[r]
        assert mask.sum() == len(answer) + 1 and mask[n:].sum() == 0
        assert batch.labels[r][mask > 0].tolist() == [*answer, gpt2.eos_id]
        # The first answer token is predicted at the last prompt token, ":" of "Answer:".
        first = int(np.argmax(mask))
        assert gpt2.decode(batch.input_ids[r, : first + 1]).endswith("\nAnswer:")
        assert gpt2.decode(batch.labels[r][mask > 0]) == ex.label


def test_decoder_eval_rows_are_left_padded_prompts(agnews_examples, agnews_enc, gpt2):
    config = BatchConfig(format="decoder", batch_size=8)
    batches = list(eval_batches(agnews_enc, gpt2, config))
    assert len(batches) == 5 and all(b.labels is None for b in batches)
    seen = np.concatenate([b.example_index for b in batches])
    assert sorted(seen[seen >= 0].tolist()) == list(range(37)) and (seen < 0).sum() == 3
    lengths = [int(b.attention_mask.sum(1).max()) for b in batches]
    assert lengths == sorted(lengths, reverse=True)  # longest first
    for batch in batches:
        assert (batch.attention_mask[:, -1] == 1).all()  # every row ends at the right edge
        for r, i in enumerate(batch.example_index):
            n = int(batch.attention_mask[r].sum())
            assert batch.attention_mask[r, -n:].all() and not batch.attention_mask[r, :-n].any()
            if i < 0:
                assert n == 1
                continue
            prompt = gpt2.encode([build_prompt(AGNEWS, agnews_examples[i].sentence)])[0]
            assert batch.input_ids[r, -n:].tolist() == [gpt2.bos_id, *prompt]


def test_seq2seq_rows(agnews_examples, agnews_enc, gpt2):
    config = BatchConfig(format="seq2seq", batch_size=4, decoder_start_id=7)
    batch = next(train_batches(agnews_enc, gpt2, config, epoch=1, seed=0))
    assert batch.labels.shape == batch.decoder_input_ids.shape == batch.loss_mask.shape
    assert batch.labels.shape[1] == 8 and batch.input_ids.shape[1] in (128, 256)
    for r, i in enumerate(batch.example_index):
        ex = agnews_examples[i]
        source = [*gpt2.encode([build_prompt(AGNEWS, ex.sentence)])[0], gpt2.eos_id]
        target = [*gpt2.encode([ex.label])[0], gpt2.eos_id]
        assert batch.input_ids[r, : len(source)].tolist() == source
        assert batch.attention_mask[r].sum() == len(source)
        t = len(target)
        assert batch.labels[r, :t].tolist() == target
        assert batch.loss_mask[r].tolist() == [1.0] * t + [0.0] * (8 - t)  # padded labels off
        assert batch.decoder_input_ids[r, :t].tolist() == [7, *target[:-1]]
        assert batch.decoder_attention_mask[r].sum() == t
    evaluation = next(eval_batches(agnews_enc, gpt2, config))
    assert evaluation.labels is None and evaluation.decoder_input_ids is None
    assert evaluation.attention_mask[:, 0].all()  # right padded


def _long_example(words: int) -> Example:
    return Example("Title: t\nText: " + "word " * words + "\n", "World", 0)


def test_truncation_keeps_the_answer_suffix(gpt2):
    examples = [_long_example(400), _long_example(3)]
    head = gpt2.encode([build_prompt(AGNEWS, "")])[0][:-3]  # prompt minus "\nAnswer:"
    tail = gpt2.encode(["\nAnswer:"])[0]
    kept = encode_split(AGNEWS, examples, gpt2, max_source_tokens=64)
    assert kept.n_truncated_prompts == 1
    cut = kept.prompts[0].tolist()
    assert len(cut) == 63 and cut[-len(tail) :] == tail and cut[: len(head)] == head
    assert gpt2.decode(cut).endswith("word word word\nAnswer:")
    assert kept.prompts[1].tolist() == gpt2.encode([build_prompt(AGNEWS, examples[1].sentence)])[0]
    release = encode_split(AGNEWS, examples, gpt2, max_source_tokens=64, truncation="release")
    assert len(release.prompts[0]) == 63 and not gpt2.decode(release.prompts[0]).endswith("Answer:")
    assert release.prompts[0].tolist()[:60] == cut[:60]
    with pytest.raises(ValueError, match="leaves no room for the sentence"):
        encode_split(AGNEWS, examples, gpt2, max_source_tokens=20)
    with pytest.raises(ValueError, match="truncation must be"):
        encode_split(AGNEWS, examples, gpt2, truncation="left")
    short_target = encode_split(
        AGNEWS, [Example("x", "Science or Technology", 0)], gpt2, max_target_tokens=3
    )
    assert len(short_target.answers[0]) == 2 and short_target.n_truncated_answers == 1


def test_buckets():
    assert batching.default_buckets(512) == (16, 32, 64, 128, 256, 512)
    assert batching.default_buckets(561) == (16, 32, 64, 128, 256, 512, 561)
    assert batching.bucket_length(65, (16, 64, 128)) == 128
    with pytest.raises(ValueError, match="exceeds the largest bucket 128"):
        batching.bucket_length(129, (16, 64, 128))


def _epoch(enc, tok, config, epoch=0, seed=0, **kw):
    return list(train_batches(enc, tok, config, epoch=epoch, seed=seed, **kw))


def test_shuffling_is_deterministic_and_covers_every_example(agnews_enc, gpt2):
    config = BatchConfig(batch_size=4, sort_window=4)
    first = _epoch(agnews_enc, gpt2, config)
    order = np.concatenate([b.example_index for b in first])
    assert sorted(order[order >= 0].tolist()) == list(range(37)) and (order < 0).sum() == 3
    assert len(first) == batching.num_batches(37, config) == 10
    again = np.concatenate([b.example_index for b in _epoch(agnews_enc, gpt2, config)])
    assert (order == again).all()
    next_epoch = np.concatenate([b.example_index for b in _epoch(agnews_enc, gpt2, config, 1)])
    assert (order != next_epoch).any()
    # Padding rows: one attended token, no loss.
    pad_rows = [(b, r) for b in first for r in np.flatnonzero(b.example_index < 0)]
    assert all(b.attention_mask[r].sum() == 1 and b.loss_mask[r].sum() == 0 for b, r in pad_rows)
    # Resuming mid-epoch gives the remaining batches.
    resumed = _epoch(agnews_enc, gpt2, config, start_step=6)
    assert all((a.input_ids == b.input_ids).all() for a, b in zip(resumed, first[6:], strict=True))


def test_length_bucketing_limits_padding(agnews_enc, gpt2):
    def padding(sort_window: int) -> int:
        """Padded positions in the rows that hold an example."""
        config = BatchConfig(batch_size=4, sort_window=sort_window, buckets=tuple(range(8, 600, 8)))
        return sum(
            int(b.attention_mask[r].size - b.attention_mask[r].sum())
            for b in _epoch(agnews_enc, gpt2, config)
            for r in np.flatnonzero(b.example_index >= 0)
        )

    assert padding(sort_window=8) < 0.7 * padding(sort_window=1)
    config = BatchConfig(batch_size=4)
    default_shapes = {b.input_ids.shape[1] for b in _epoch(agnews_enc, gpt2, config)}
    assert default_shapes <= set(batching.default_buckets(561))


def test_hosts_split_each_global_batch_with_equal_shapes(agnews_enc, gpt2):
    single = _epoch(agnews_enc, gpt2, BatchConfig(batch_size=6), seed=3)
    hosts = [
        _epoch(
            agnews_enc, gpt2, BatchConfig(batch_size=3, process_index=p, process_count=2), seed=3
        )
        for p in range(2)
    ]
    assert len(hosts[0]) == len(hosts[1]) == len(single) == 7
    for whole, h0, h1 in zip(single, *hosts, strict=True):
        assert h0.input_ids.shape == h1.input_ids.shape == (3, whole.input_ids.shape[1])
        assert np.concatenate([h0.example_index, h1.example_index]).tolist() == (
            whole.example_index.tolist()
        )
    with pytest.raises(ValueError, match="process_index=2 not in"):
        BatchConfig(process_index=2, process_count=2)


def test_trained_tokenizer_is_deterministic_cached_and_byte_level(tmp_path: Path):
    tasks = synthetic_benchmark(SyntheticConfig(train_per_class=30, test_per_class=2))
    tok = batching.task_tokenizer(tasks, vocab_size=1024, cache_dir=tmp_path / "a")
    batching.task_tokenizer(tasks, vocab_size=1024, cache_dir=tmp_path / "b")
    saved = sorted((tmp_path / "a" / "tokenizers").glob("bpe1024-*/tokenizer.json"))
    assert len(saved) == 1
    twin_saved = next((tmp_path / "b" / "tokenizers").glob("bpe1024-*/tokenizer.json"))
    assert saved[0].read_text() == twin_saved.read_text()  # deterministic training
    stamp = saved[0].stat().st_mtime_ns
    cached = batching.task_tokenizer(tasks, vocab_size=1024, cache_dir=tmp_path / "a")
    assert saved[0].stat().st_mtime_ns == stamp and cached.path == tok.path  # reused
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2) and 259 < tok.vocab_size <= 1024
    prompt = build_prompt(tasks[0].spec, tasks[0].test[0].sentence)
    ids = tok.encode([prompt])[0]
    assert tok.decode(ids) == prompt
    gpt2_like = len(prompt.encode()) // 2
    assert len(ids) < gpt2_like  # the instruction and pseudo-words are merged
    unseen = "naïve ☃ {0}\n"
    assert tok.decode(tok.encode([unseen])[0]) == unseen  # bytes: never unknown
    enc = encode_split(tasks[0].spec, tasks[0].train, tok)
    batch = next(train_batches(enc, tok, BatchConfig(batch_size=8), epoch=0, seed=0))
    assert batch.input_ids[0, 0] == 1 and batch.input_ids.shape == (8, 64)  # short sequences
    with pytest.raises(ValueError, match="vocab_size must be >= 259"):
        batching.train_tokenizer(["x"], 100, tmp_path)


def test_concatenated_splits_form_one_training_stream(tmp_path: Path):
    tasks = synthetic_benchmark(SyntheticConfig(train_per_class=3, test_per_class=1))
    tok = batching.task_tokenizer(tasks, vocab_size=300, cache_dir=tmp_path)
    parts = [encode_split(t.spec, t.train, tok) for t in tasks[:2]]
    mixed = batching.concatenate_splits(parts)
    assert len(mixed) == 12 + 9
    rows = np.concatenate(
        [
            b.example_index
            for b in train_batches(mixed, tok, BatchConfig(batch_size=4), epoch=0, seed=1)
        ]
    )
    assert sorted(rows[rows >= 0].tolist()) == list(range(21))
    assert mixed.prompts[12].tolist() == parts[1].prompts[0].tolist()
    assert mixed.labels[12] == tasks[1].train[0].label
