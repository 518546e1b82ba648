"""Accuracy of a model on one task's test split, by greedy generation + normalised exact
match (the protocol) or by rank classification (score each option's log-likelihood and
take the best: faster, and never an invalid label).

Examples are sorted by prompt length before batching so that batches pad little and
fall into few length buckets (each bucket compiles once).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx

from cljax.cl.backbone import Family
from cljax.cl.scoring import exact_match, normalize_answer
from cljax.data.batching import BatchConfig, EncodedSplit, TextTokenizer, train_batches


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """Accuracy (percent) of one task and its predictions (for inspection)."""

    accuracy: float
    correct: int
    total: int
    predictions: tuple[str, ...]


def _length_order(enc: EncodedSplit) -> np.ndarray:
    return np.argsort(-enc.prompt_lengths, kind="stable")


def evaluate_generate(
    family: Family,
    model: nnx.Module,
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    *,
    batch_size: int,
    max_new_tokens: int,
) -> TaskScore:
    """Greedy decoding of every test prompt, scored by exact match with the label."""
    order = _length_order(enc)
    texts = [""] * len(enc)
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        outputs = family.generate(model, [enc.prompts[r] for r in rows], max_new_tokens, tokenizer)
        for r, tokens in zip(rows, outputs, strict=True):
            texts[r] = tokenizer.decode(tokens)
    hits = exact_match(texts, enc.labels)
    return TaskScore(100.0 * sum(hits) / len(hits), sum(hits), len(hits), tuple(texts))


def evaluate_rank(
    score_fn: Callable[[Any], jax.Array],
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    batch_config: BatchConfig,
) -> TaskScore:
    """Rank classification: each option's summed answer log-likelihood (answer tokens
    and eos) given the prompt; the prediction is the best option.

    ``score_fn(batch) -> (B,)`` is the family's ``answer_logprob`` with the model bound
    (jitted by the caller). Rows are batched as training rows whose answer is the option.
    """
    options = enc.spec.options
    scores = np.full((len(enc), len(options)), -np.inf)
    for j, option_ids in enumerate(enc.option_ids):
        as_option = dataclasses.replace(enc, answers=tuple(option_ids for _ in range(len(enc))))
        for batch in train_batches(as_option, tokenizer, batch_config, epoch=0, seed=0):
            rows = batch.example_index
            values = np.asarray(score_fn(batch))
            valid = rows >= 0
            scores[rows[valid], j] = values[valid]
    predicted = [options[k] for k in np.argmax(scores, axis=1)]
    hits = [
        normalize_answer(p) == normalize_answer(g)
        for p, g in zip(predicted, enc.labels, strict=True)
    ]
    return TaskScore(100.0 * sum(hits) / len(hits), sum(hits), len(hits), tuple(predicted))
