"""Pretraining objectives as batches of the loop's ``Batch`` layout.

- Causal language modelling (LLaMA): the corpus's documents, each followed by eos, are
  concatenated into one token stream and cut into windows of ``length + 1`` tokens; a
  window gives ``input_ids = w[:-1]``, ``labels = w[1:]``, loss on every position.
- Span corruption (T5, Raffel et al. 2020, section 3.1.4): in a window of raw tokens,
  ``noise_density`` of them, in spans of mean length ``mean_noise_span``, are replaced
  in the input by one sentinel per span (``<extra_id_0>``, ``<extra_id_1>``, ...); the
  target lists each sentinel followed by the tokens it replaced, then eos.

The span layout follows T5's ``random_spans_noise_mask``: the numbers of noise and
non-noise tokens and of spans are fixed by the length, and each count is split into that
many non-empty segments uniformly at random; spans alternate, non-noise first. No
maintained package provides it for NumPy (T5's own lives in TensorFlow ops), hence this
file; ``tests/pretrain/test_objectives.py`` checks it on hand-made examples.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from cljax.data.batching import Batch


def pack_windows(documents: Sequence[Sequence[int]], length: int, eos_id: int) -> np.ndarray:
    """int32 (N, length + 1): the documents' tokens, each document followed by
    ``eos_id``, concatenated and cut into whole windows (the remainder is dropped)."""
    stream = np.fromiter((t for doc in documents for t in (*doc, eos_id)), dtype=np.int32)
    n = len(stream) // (length + 1)
    return stream[: n * (length + 1)].reshape(n, length + 1)


def lm_batch(windows: np.ndarray) -> Batch:
    """Decoder batch of (B, L + 1) windows: every position predicts the next token."""
    windows = np.asarray(windows, np.int32)
    inputs, labels = windows[:, :-1], windows[:, 1:]
    ones = np.ones(inputs.shape, np.int32)
    rows = np.arange(len(windows), dtype=np.int32)
    return Batch(inputs, ones, labels, ones.astype(np.float32), None, None, rows)


def _segments(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """``total`` items split into ``parts`` non-empty consecutive segments, uniformly at
    random over such splits: int (parts,) summing to ``total``."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_span_mask(
    length: int, noise_density: float, mean_noise_span: float, rng: np.random.Generator
) -> np.ndarray:
    """bool (length,): True on the tokens to corrupt (T5's ``random_spans_noise_mask``).

    ``round(length * noise_density)`` noise tokens (at least 1, at most length - 1) in
    ``round(noise / mean_noise_span)`` spans (at least 1); the sequence starts with a
    non-noise segment."""
    noise = int(np.clip(round(length * noise_density), 1, length - 1))
    spans = max(int(round(noise / mean_noise_span)), 1)
    spans = min(spans, noise, length - noise)
    noise_lengths = _segments(noise, spans, rng)
    keep_lengths = _segments(length - noise, spans, rng)
    mask = np.zeros(length, bool)
    start = 0
    for keep, span in zip(keep_lengths, noise_lengths, strict=True):
        start += keep
        mask[start : start + span] = True
        start += span
    return mask


def span_corruption(
    tokens: Sequence[int], mask: np.ndarray, sentinel_ids: Sequence[int]
) -> tuple[list[int], list[int]]:
    """``(inputs, targets)`` without eos: each noise span of ``tokens`` (``mask`` True)
    is one sentinel in the input, and that sentinel followed by the span in the target.
    ``sentinel_ids[k]`` marks the k-th span; a target whose tokens end before the input
    does ends with the next sentinel (T5's paper example: "Thank you <X> me to your
    party <Y> week." -> "<X> for inviting <Y> last <Z>")."""
    inputs: list[int] = []
    targets: list[int] = []
    span = -1
    for i, token in enumerate(tokens):
        if mask[i]:
            if i == 0 or not mask[i - 1]:
                span += 1
                if span >= len(sentinel_ids):
                    raise ValueError(f"{span + 1} noise spans but {len(sentinel_ids)} sentinels")
                inputs.append(sentinel_ids[span])
                targets.append(sentinel_ids[span])
            targets.append(int(token))
        else:
            inputs.append(int(token))
    if len(mask) and not mask[-1]:  # T5 closes a target that ends before the tokens do
        if span + 1 >= len(sentinel_ids):
            raise ValueError(f"{span + 2} sentinels needed but {len(sentinel_ids)} given")
        targets.append(sentinel_ids[span + 1])
    return inputs, targets


def span_lengths(raw_length: int, noise_density: float, mean_noise_span: float) -> tuple[int, int]:
    """``(input, target)`` lengths, eos included, of a corrupted window of ``raw_length``
    tokens (fixed by the length: the same for every window)."""
    noise = int(np.clip(round(raw_length * noise_density), 1, raw_length - 1))
    spans = min(max(int(round(noise / mean_noise_span)), 1), noise, raw_length - noise)
    return raw_length - noise + spans + 1, noise + spans + 1


def raw_length_for(input_length: int, noise_density: float, mean_noise_span: float) -> int:
    """The longest raw window whose corrupted input (with eos) fits ``input_length``."""
    raw = 2
    while span_lengths(raw + 1, noise_density, mean_noise_span)[0] <= input_length:
        raw += 1
    return raw


def span_batch(
    windows: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float,
    mean_noise_span: float,
    sentinel_ids: Sequence[int],
    eos_id: int,
    pad_id: int,
) -> Batch:
    """Seq2seq batch of span-corrupted (B, raw) windows; the decoder starts from
    ``pad_id`` (T5's convention). Input and target lengths follow from the window
    length (``span_lengths``), so every batch has the same shapes."""
    windows = np.asarray(windows)
    b, raw = windows.shape
    source_length, target_length = span_lengths(raw, noise_density, mean_noise_span)
    ids = np.full((b, source_length), pad_id, np.int32)
    labels = np.full((b, target_length), pad_id, np.int32)
    decoder_ids = np.full((b, target_length), pad_id, np.int32)
    for r, window in enumerate(windows):
        mask = noise_span_mask(raw, noise_density, mean_noise_span, rng)
        inputs, targets = span_corruption(window, mask, sentinel_ids)
        inputs, targets = [*inputs, eos_id], [*targets, eos_id]
        ids[r, : len(inputs)] = inputs
        labels[r, : len(targets)] = targets
        decoder_ids[r, : len(targets)] = [pad_id, *targets[:-1]]
    source_mask = np.ones((b, source_length), np.int32)
    target_mask = np.ones((b, target_length), np.int32)
    rows = np.arange(b, dtype=np.int32)
    return Batch(
        ids, source_mask, labels, target_mask.astype(np.float32), decoder_ids, target_mask, rows
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """A seeded permutation of ``n`` windows for ``epoch`` (the same on every process)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def window_batches(
    n_windows: int, batch_size: int, seed: int, start_step: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, rows)`` for steps ``start_step, start_step + 1, ...`` forever: each epoch
    a fresh permutation of the windows, cut into full batches (the last partial one is
    dropped). Resuming at ``start_step`` gives the same rows as an uninterrupted run."""
    per_epoch = n_windows // batch_size
    if per_epoch == 0:
        raise ValueError(f"{n_windows} windows do not fill one batch of {batch_size}")
    step = start_step
    while True:
        epoch, offset = divmod(step, per_epoch)
        order = epoch_order(n_windows, seed, epoch)
        yield step, order[offset * batch_size : (offset + 1) * batch_size]
        step += 1
