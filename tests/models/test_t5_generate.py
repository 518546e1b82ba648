"""T5 greedy generation (``cljax.models.generate.generate_t5``): the tokens equal
transformers' greedy ``generate`` on the same random model, the incremental decoder
(self-attention KV cache, cross-attention K/V computed once) equals the teacher-forced
decoder, and a second batch in the same buckets does not recompile."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from cljax.models.convert import load_hf_checkpoint
from cljax.models.generate import _t5_greedy, generate_t5
from cljax.models.t5 import T5
from tests.models.test_t5 import VOCAB, build_hf_t5

MAX_NEW = 12
SOURCE_LENGTHS = (5, 17, 9, 12, 3)


@pytest.fixture(
    scope="module", params=[("gated-gelu", False), ("relu", True)], ids=["v1.1", "v1.0"]
)
def models(request, tmp_path_factory):
    """(hf, cljax model) sharing random weights; equal layer counts (HF generate needs them).
    Seed 2 gives varied greedy tokens for the untied model; a tied model's small logits
    tend to repeat one token, so the cached-decoding test is the stronger check for it."""
    proj, tied = request.param
    directory = tmp_path_factory.mktemp(f"t5-gen-{proj}")
    hf = build_hf_t5(directory, proj=proj, tied=tied, seed=2, decoder_layers=2)
    model, _ = load_hf_checkpoint(directory)
    return hf, model


def sources(seed: int, lengths=SOURCE_LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[*rng.integers(2, VOCAB, n - 1).tolist(), 1] for n in lengths]


def hf_greedy(hf, batch: list[list[int]], eos: int) -> list[list[int]]:
    """transformers' greedy tokens per row, cut after eos (right-padded sources)."""
    width = max(map(len, batch))
    ids = torch.zeros((len(batch), width), dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    with torch.no_grad():
        out = hf.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=MAX_NEW,
            do_sample=False,
            num_beams=1,
            eos_token_id=eos,
        ).numpy()[:, 1:]  # drop the decoder start token
    rows = []
    for row in out:
        row = row.tolist()
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_tokens_equal_transformers_generate(models):
    hf, model = models
    batch = sources(0)
    # Make a token that the model emits early in row 0 the eos, so that rows stop at
    # different steps (greedy tokens before a stop do not depend on the eos id).
    unstopped = hf_greedy(hf, batch, eos=model.cfg.eos_token_id)
    eos = unstopped[0][2]
    expected = hf_greedy(hf, batch, eos=eos)
    out = generate_t5(model, batch, MAX_NEW, eos_token_ids=[eos])
    assert out.as_lists() == expected
    assert out.lengths.tolist() == [len(row) for row in expected]
    for row, n in zip(out.tokens, out.lengths, strict=True):
        assert (row[n:] == model.cfg.pad_token_id).all()
    if not model.cfg.tie_word_embeddings:  # the varied model: a meaningful comparison
        assert min(out.lengths) < MAX_NEW and max(out.lengths) == MAX_NEW
        assert len({t for row in expected for t in row}) > 10


def test_second_batch_in_same_buckets_does_not_recompile(models):
    hf, model = models
    # The buckets of test_tokens_equal_transformers_generate (8 rows, 32 source tokens,
    # 16 new tokens), so with it this test compiles nothing.
    generate_t5(model, sources(1, (20, 14, 2, 9, 8, 30)), MAX_NEW - 3)
    compiled = _t5_greedy._cache_size()
    batch = sources(2, (11, 4, 17, 7, 25))
    out = generate_t5(model, batch, MAX_NEW)
    assert _t5_greedy._cache_size() == compiled
    assert out.as_lists() == hf_greedy(hf, batch, eos=model.cfg.eos_token_id)


@nnx.jit
def _cached_vs_full(model: T5, ids, mask, dec):
    """Teacher-forced logits (B, T, V); the same from T one-token cached steps; the first
    two from one two-token cached step; the cache position after the T steps."""
    encoder_out = model.encode(ids, mask)
    full = model.decode(dec, encoder_out, mask)

    def one_token(cache, token):
        logits, cache = model.decode_step(token[:, None], cache)
        return cache, logits[:, 0]

    cache, stepped = jax.lax.scan(one_token, model.init_cache(encoder_out, mask, 16), dec.T)
    two, _ = model.decode_step(dec[:, :2], model.init_cache(encoder_out, mask, 16))
    return full, jnp.swapaxes(stepped, 0, 1), two, cache.index


def test_cached_decoding_equals_teacher_forcing(models):
    _, model = models
    rng = np.random.default_rng(3)
    ids = rng.integers(2, VOCAB, (2, 10))
    mask = np.ones((2, 10), np.int32)
    mask[1, 6:] = 0
    dec = rng.integers(2, VOCAB, (2, 5))
    full, stepped, two, index = _cached_vs_full(
        model, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec)
    )
    assert int(index) == 5
    np.testing.assert_allclose(np.asarray(stepped), np.asarray(full), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(two), np.asarray(full)[:, :2], atol=1e-5, rtol=0)


def test_bad_arguments(models):
    _, model = models
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate_t5(model, sources(0), 0)
    with pytest.raises(ValueError, match="no sources"):
        generate_t5(model, [], 4)
    with pytest.raises(ValueError, match="sequence 1 has 0 tokens"):
        generate_t5(model, [[5, 1], []], 4)
