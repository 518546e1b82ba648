"""Greedy decoding with a KV cache against transformers' greedy ``generate`` on the
same random model, eos stopping, and shape bucketing (no recompile per batch)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cljax.models import generate as gen
from cljax.models.convert import load_hf_checkpoint
from tests.models.test_llama import LLAMA3_ROPE, hf_llama

PAD = 0
MAX_NEW = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, cljax model loaded from its saved directory)."""
    hf = hf_llama(seed=4, vocab_size=97, rope_scaling=LLAMA3_ROPE)
    directory = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(directory)
    model, _ = load_hf_checkpoint(directory)
    return hf, model


def prompts_of(lengths, seed=0, vocab=97) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[1, *rng.integers(3, vocab, n - 1).tolist()] for n in lengths]


def hf_greedy(hf, prompts, max_new_tokens, eos) -> list[list[int]]:
    """transformers greedy generate on left-padded prompts; each row cut after its eos."""
    length = max(map(len, prompts))
    ids, mask = gen.left_pad(prompts, length, PAD)
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=PAD,
        )
    rows = []
    for row in out[:, length:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        rows.append(row[:cut])
    return rows


@pytest.fixture(scope="module")
def free_run(models):
    """Prompts of lengths 2..13 and transformers' greedy tokens with eos never produced
    (eos=-1 is not a token id), so every row runs MAX_NEW steps."""
    prompts = prompts_of((5, 13, 2, 9))
    return prompts, hf_greedy(models[0], prompts, MAX_NEW, eos=-1)


def test_greedy_tokens_equal_transformers(models, free_run):
    _, model = models
    prompts, expected = free_run
    out = gen.generate_llama(model, prompts, MAX_NEW, eos_token_ids=(), pad_token_id=PAD)
    assert out.tokens.shape == (4, MAX_NEW)
    assert out.as_lists() == expected
    np.testing.assert_array_equal(out.lengths, [MAX_NEW] * 4)


def test_stops_at_eos_like_transformers(models, free_run):
    """Take as eos a token that row 0 produces mid-way: row 0 must stop there (eos
    kept, padding after) and other rows wherever they produce it, as in transformers."""
    hf, model = models
    prompts, free = free_run
    eos = free[0][4]
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=eos)
    out = gen.generate_llama(model, prompts, MAX_NEW, eos_token_ids=(eos,), pad_token_id=PAD)
    assert out.as_lists() == expected
    assert expected[0][-1] == eos and len(expected[0]) <= 5
    np.testing.assert_array_equal(out.lengths, [len(r) for r in expected])
    for row, n in zip(out.tokens, out.lengths, strict=True):
        assert (row[n:] == PAD).all()


def test_similar_batches_reuse_the_compiled_function(models, free_run):
    _, model = models
    prompts, expected = free_run
    gen.generate_llama(model, prompts, MAX_NEW, eos_token_ids=(), pad_token_id=PAD)
    compiled = gen._llama_greedy._cache_size()
    # Three prompts instead of four, other lengths, 12 new tokens: same buckets.
    other = prompts_of((3, 11, 7), seed=5)
    out = gen.generate_llama(model, other, 12, eos_token_ids=(), pad_token_id=PAD)
    assert gen._llama_greedy._cache_size() == compiled
    assert out.tokens.shape == (3, 12)
    # Bucketing must not change results: a prefix of the earlier batch agrees.
    again = gen.generate_llama(model, prompts[:2], MAX_NEW, eos_token_ids=(), pad_token_id=PAD)
    assert again.as_lists() == expected[:2]


def test_prompts_of_wide_length_spread_are_prefilled_in_groups(models):
    """Six prompts of 2..100 tokens (a bucket of 8 rows, two of them padding): the
    grouped prefill runs, and every row gets transformers' tokens, in its own place,
    stopping at eos as there."""
    hf, model = models
    prompts = prompts_of((60, 3, 100, 5, 40, 2), seed=3)
    assert gen.prefill_groups(sorted(map(len, prompts)), 8) == [
        *[(row, 8) for row in range(5)],
        (5, 64),
        (6, 64),
        (7, 128),
    ]
    compiled = gen._llama_prefill._cache_size()
    free = hf_greedy(hf, prompts, MAX_NEW, eos=-1)
    out = gen.generate_llama(model, prompts, MAX_NEW, eos_token_ids=(), pad_token_id=PAD)
    assert gen._llama_prefill._cache_size() > compiled
    assert out.as_lists() == free
    eos = free[2][3]
    expected = hf_greedy(hf, prompts, MAX_NEW, eos=eos)
    out = gen.generate_llama(model, prompts, MAX_NEW, eos_token_ids=(eos,), pad_token_id=PAD)
    assert out.as_lists() == expected
    np.testing.assert_array_equal(out.lengths, [len(r) for r in expected])


def test_prefill_groups_only_when_they_pay():
    assert gen.prefill_groups([10] * 16, 16) is None  # one length: one prefill
    assert gen.prefill_groups([900], 1) is None  # one row
    assert gen.prefill_groups([5, 900], 2) == [(0, 8), (1, 1024)]  # one group per row
    assert gen.prefill_groups([10, 10, 10, 1000], 4) == [(0, 16), (1, 16), (2, 16), (3, 1024)]
    assert gen.prefill_groups([10, 10, 300, 700], 4) == [(0, 16), (1, 16), (2, 384), (3, 768)]
    assert [gen.group_length(n) for n in (3, 100, 128, 129, 700)] == [8, 128, 128, 256, 768]
    # 3 of 4 rows long: 3/4 of the whole bucket's prefill, not worth a second compile
    assert gen.prefill_groups([10, 1000, 1000, 1000], 4) is None


def test_bucket_and_padding_helpers():
    assert [gen.bucket_size(n) for n in (1, 8, 9, 16, 17, 100)] == [8, 8, 16, 16, 32, 128]
    assert gen.bucket_size(3, minimum=1) == 4
    ids, mask = gen.left_pad([[5, 6], [7]], 4, PAD, rows=3)
    np.testing.assert_array_equal(ids, [[0, 0, 5, 6], [0, 0, 0, 7], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 0]])
    with pytest.raises(ValueError, match="sequence 1 has 0 tokens"):
        gen.left_pad([[5], []], 4, PAD)
    with pytest.raises(ValueError, match="bucket_size needs n >= 1"):
        gen.bucket_size(0)


def test_bad_generation_arguments(models):
    _, model = models
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        gen.generate_llama(model, [[1, 2]], 0)
    with pytest.raises(ValueError, match="= 140 tokens exceeds max_position_embeddings 128"):
        gen.generate_llama(model, [[1] * 100], 40)
