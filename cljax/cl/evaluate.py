"""A model's score on one task's test split: by greedy generation, scored with the task's
metric (the protocol's normalised exact match for classification, ROUGE-L, SARI, ... for
free text), or by rank classification (score each option's log-likelihood and take the
best: faster, and never an invalid label).

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

from cljax.cl import scoring
from cljax.cl.backbone import Family
from cljax.cl.general import GeneralSet
from cljax.data.batching import BatchConfig, EncodedSplit, TextTokenizer, train_batches


@dataclasses.dataclass(frozen=True)
class TaskScore:
    """One task's score (0-100) under its metric, and its predictions (for inspection)."""

    score: float
    metric: str
    total: int
    predictions: tuple[str, ...]

    def __str__(self) -> str:
        if self.metric == "accuracy":
            return f"{self.score:.2f} ({round(self.score * self.total / 100)}/{self.total})"
        return f"{self.score:.2f} {self.metric} ({self.total} items)"


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
    """Greedy decoding of every test prompt, scored with the task's metric against the
    labels: the task's own length (``enc.spec.max_new_tokens``), at most ``max_new_tokens``."""
    spec = enc.spec
    new_tokens = min(spec.max_new_tokens or max_new_tokens, max_new_tokens)
    order = _length_order(enc)
    texts = [""] * len(enc)
    for lo in range(0, len(order), batch_size):
        rows = order[lo : lo + batch_size]
        outputs = family.generate(model, [enc.prompts[r] for r in rows], new_tokens, tokenizer)
        for r, tokens in zip(rows, outputs, strict=True):
            texts[r] = tokenizer.decode(tokens)
    value = scoring.score(spec.metric, texts, enc.labels, enc.sources, extract=spec.extract)
    return TaskScore(value, spec.metric, len(texts), tuple(texts))


def _row_scores(
    score_fn: Callable[[Any], jax.Array],
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    batch_config: BatchConfig,
) -> np.ndarray:
    """(len(enc),) each row's summed answer log-likelihood (answer tokens and eos) given
    its prompt. ``score_fn(batch) -> (B,)`` is the family's ``answer_logprob`` with the
    model bound (jitted by the caller); rows are batched as training rows."""
    scores = np.full(len(enc), -np.inf)
    for batch in train_batches(enc, tokenizer, batch_config, epoch=0, seed=0):
        rows = batch.example_index
        values = np.asarray(score_fn(batch))
        valid = rows >= 0
        scores[rows[valid]] = values[valid]
    return scores


def evaluate_rank(
    score_fn: Callable[[Any], jax.Array],
    enc: EncodedSplit,
    tokenizer: TextTokenizer,
    batch_config: BatchConfig,
) -> TaskScore:
    """Rank classification: each option scored as the answer of every item
    (:func:`_row_scores`); the prediction is the best option."""
    options = enc.spec.options
    scores = np.stack(
        [
            _row_scores(
                score_fn,
                dataclasses.replace(enc, answers=tuple(ids for _ in range(len(enc)))),
                tokenizer,
                batch_config,
            )
            for ids in enc.option_ids
        ],
        axis=1,
    )
    predicted = [options[k] for k in np.argmax(scores, axis=1)]
    value = scoring.score("accuracy", predicted, enc.labels, extract="label")
    return TaskScore(value, "accuracy", len(predicted), tuple(predicted))


def evaluate_choices(
    score_fn: Callable[[Any], jax.Array],
    general: GeneralSet,
    tokenizer: TextTokenizer,
    batch_config: BatchConfig,
) -> TaskScore:
    """Multiple choice with each item's own choices: every (item, choice) row scored
    (:func:`_row_scores`), the likeliest choice is the prediction, accuracy against the
    set's answer indices."""
    rows, pairs = general.choice_rows()
    flat = _row_scores(score_fn, rows, tokenizer, batch_config)
    best = np.full(len(general.choices), -1)
    best_score = np.full(len(general.choices), -np.inf)
    for (i, j), value in zip(pairs, flat, strict=True):
        if value > best_score[i]:
            best[i], best_score[i] = j, value
    hits = [int(b) == a for b, a in zip(best, general.answers, strict=True)]
    letters = tuple(chr(ord("A") + int(b)) for b in best)
    return TaskScore(100.0 * sum(hits) / len(hits), "accuracy", len(hits), letters)
