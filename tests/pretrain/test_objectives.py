"""Pretraining objectives: causal-LM windows and T5 span corruption on hand-made cases."""

import itertools

import numpy as np
import pytest

from cljax.pretrain import objectives

X, Y, Z = 900, 901, 902  # sentinel ids


def test_span_corruption_reproduces_the_t5_paper_example():
    words = "Thank you for inviting me to your party last week .".split()
    ids = list(range(len(words)))
    mask = np.array([w in ("for", "inviting", "last") for w in words])
    inputs, targets = objectives.span_corruption(ids, mask, [X, Y, Z])
    vocab = {**dict(enumerate(words)), X: "<X>", Y: "<Y>", Z: "<Z>"}
    assert " ".join(vocab[i] for i in inputs) == "Thank you <X> me to your party <Y> week ."
    assert " ".join(vocab[i] for i in targets) == "<X> for inviting <Y> last <Z>"


def test_span_corruption_ending_in_noise_has_no_closing_sentinel():
    inputs, targets = objectives.span_corruption([1, 2, 3, 4], np.array([0, 1, 0, 1], bool), [X, Y])
    assert inputs == [1, X, 3, Y] and targets == [X, 2, Y, 4]


@pytest.mark.parametrize(
    "length,density,mean_span", [(20, 0.15, 3.0), (114, 0.15, 3.0), (8, 0.5, 2.0)]
)
def test_noise_mask_has_t5s_counts_and_layout(length, density, mean_span):
    noise = round(length * density)
    spans = max(round(noise / mean_span), 1)
    for seed in range(20):
        mask = objectives.noise_span_mask(length, density, mean_span, np.random.default_rng(seed))
        assert mask.sum() == noise
        starts = np.flatnonzero(mask & ~np.concatenate([[False], mask[:-1]]))
        assert len(starts) == spans
        assert not mask[0] and mask[-1]  # non-noise first, noise last: T5's interleaving


def test_span_batch_shapes_and_the_windows_come_back():
    rng = np.random.default_rng(0)
    windows = rng.integers(10, 500, size=(3, 40))
    batch = objectives.span_batch(
        windows,
        np.random.default_rng(1),
        noise_density=0.15,
        mean_noise_span=3.0,
        sentinel_ids=list(range(900, 920)),
        eos_id=2,
        pad_id=0,
    )
    source, target = objectives.span_lengths(40, 0.15, 3.0)
    assert batch.input_ids.shape == (3, source) and batch.labels.shape == (3, target)
    assert (batch.input_ids[:, -1] == 2).all() and (batch.labels[:, -1] == 2).all()
    np.testing.assert_array_equal(batch.decoder_input_ids[:, 1:], batch.labels[:, :-1])
    assert (batch.decoder_input_ids[:, 0] == 0).all()
    for r in range(3):  # every sentinel in the input filled from the target: the window
        spans, current = {}, None
        for token in batch.labels[r, :-1]:
            if token >= 900:
                current = spans.setdefault(int(token), [])
            else:
                current.append(int(token))
        rebuilt = [t for tok in batch.input_ids[r, :-1] for t in spans.get(int(tok), [tok])]
        np.testing.assert_array_equal(rebuilt, windows[r])


def test_raw_length_is_the_longest_that_fits():
    raw = objectives.raw_length_for(128, 0.15, 3.0)
    assert objectives.span_lengths(raw, 0.15, 3.0)[0] <= 128
    assert objectives.span_lengths(raw + 1, 0.15, 3.0)[0] > 128


def test_pack_windows_and_lm_batch():
    windows = objectives.pack_windows([[5, 6, 7], [8]], length=2, eos_id=2)
    np.testing.assert_array_equal(windows, [[5, 6, 7], [2, 8, 2]])
    batch = objectives.lm_batch(windows)
    np.testing.assert_array_equal(batch.input_ids, [[5, 6], [2, 8]])
    np.testing.assert_array_equal(batch.labels, [[6, 7], [8, 2]])
    assert batch.loss_mask.sum() == 4 and batch.decoder_input_ids is None


def test_window_batches_resume_where_they_stopped():
    whole = list(itertools.islice(objectives.window_batches(10, 3, seed=4), 7))
    resumed = list(itertools.islice(objectives.window_batches(10, 3, seed=4, start_step=4), 3))
    assert [s for s, _ in resumed] == [4, 5, 6]
    for (_, a), (_, b) in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    epoch = np.concatenate([rows for _, rows in whole[:3]])
    assert len(set(epoch.tolist())) == 9  # one epoch: 3 full batches of distinct windows
