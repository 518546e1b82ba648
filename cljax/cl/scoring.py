"""Scoring of generated answers.

Classification tasks, as the protocol defines it: take the text after the last
"Answer:" (decoder-only outputs may repeat the prompt), normalise (lowercase, strip
punctuation, collapse whitespace) and compare for exact match.

Free-text tasks (TRACE and a user's own files) name a metric from :data:`METRICS`.
Each maps ``(predictions, references, sources)`` to a score in 0-100, averaged over
items: ``accuracy`` (exact match of the stripped strings), ``rouge_l`` (``rouge-score``'s
ROUGE-L F1), ``edit_similarity`` (``rapidfuzz``'s normalised Indel ratio, the
``fuzz.ratio`` TRACE reports for code), ``bleu`` (``sacrebleu``'s corpus BLEU) and
``sari`` (written here: no maintained package computes it without a model hub).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from cljax.errors import UnknownNameError

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse runs of whitespace, strip."""
    return _SPACES.sub(" ", _PUNCTUATION.sub("", text.lower())).strip()


def extract_answer(generated: str, marker: str = "Answer:") -> str:
    """The text after the last ``marker`` (the whole text if it has none)."""
    index = generated.rfind(marker)
    return generated if index < 0 else generated[index + len(marker) :]


# --------------------------------------------------------------------------- free text

Metric = Callable[[Sequence[str], Sequence[str], Sequence[str]], float]


def _pairs(predictions: Sequence[str], references: Sequence) -> list[tuple]:
    """(prediction, reference) pairs; empty or unequal lists are an error."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    return list(zip(predictions, references, strict=True))


def accuracy(predictions: Sequence[str], references: Sequence[str], sources=()) -> float:
    """Exact match of the stripped strings, in percent (as TRACE compares them; extract
    the answer first, see :func:`score`)."""
    hits = [p.strip() == r.strip() for p, r in _pairs(predictions, references)]
    return 100.0 * sum(hits) / len(hits)


def rouge_l(predictions: Sequence[str], references: Sequence[str], sources=()) -> float:
    """Mean ROUGE-L F1 (``rouge-score``, no stemming), in percent."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in _pairs(predictions, references)]
    return 100.0 * sum(scores) / len(scores)


def edit_similarity(predictions: Sequence[str], references: Sequence[str], sources=()) -> float:
    """Mean normalised Indel similarity of the raw strings (``rapidfuzz.fuzz.ratio``,
    0-100): TRACE's edit similarity for code completion."""
    from rapidfuzz import fuzz

    pairs = _pairs(predictions, references)
    return sum(fuzz.ratio(p, r) for p, r in pairs) / len(pairs)


def bleu(predictions: Sequence[str], references: Sequence[str], sources=()) -> float:
    """Corpus BLEU (``sacrebleu``, its default 13a tokenisation), 0-100."""
    import sacrebleu

    _pairs(predictions, references)
    return sacrebleu.corpus_bleu(list(predictions), [list(references)]).score


def sari(
    predictions: Sequence[str], references: Sequence[str | Sequence[str]], sources: Sequence[str]
) -> float:
    """Mean sentence SARI (Xu et al. 2016), in percent; an item's reference is one text or
    a list of them.

    Texts are lowercased and tokenised as sacrebleu's 13a; each n-gram order 1-4 scores
    keep (F1), delete (precision only) and add (F1), and SARI is the mean of the three
    averaged over the orders. The keep recall is the count-weighted form that the
    ``evaluate`` library (and with it TRACE) uses."""
    pairs = _pairs(predictions, references)
    if len(sources) != len(predictions):
        raise ValueError(f"sari needs the sources: {len(sources)} for {len(predictions)} items")
    scores = [
        _sari_sentence(
            _sari_tokens(s),
            _sari_tokens(p),
            [_sari_tokens(r) for r in ([refs] if isinstance(refs, str) else refs)],
        )
        for s, (p, refs) in zip(sources, pairs, strict=True)
    ]
    return 100.0 * sum(scores) / len(scores)


def _sari_tokens(text: str) -> list[str]:
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()(text.lower()).split()


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def _sari_ngram(source: Counter, output: Counter, refs: Counter, n_refs: int) -> tuple:
    """(keep F1, deletion precision, addition F1) for one n-gram order. Source and output
    counts are scaled by the number of references so that they compare with the
    references' summed counts."""
    source_rep = Counter({g: c * n_refs for g, c in source.items()})
    output_rep = Counter({g: c * n_refs for g, c in output.items()})
    kept = source_rep & output_rep
    kept_good = kept & refs
    keep_all = source_rep & refs
    keep_p = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_r = sum(kept_good.values()) / sum(keep_all.values()) if keep_all else 1.0
    deleted = source_rep - output_rep
    deleted_good = deleted - refs
    del_p = sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0
    added = set(output) - set(source)
    added_good = added & set(refs)
    add_all = set(refs) - set(source)
    add_p = len(added_good) / len(added) if added else 1.0
    add_r = len(added_good) / len(add_all) if add_all else 1.0
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def _sari_sentence(source: list[str], output: list[str], references: list[list[str]]) -> float:
    parts = []
    for n in range(1, 5):
        refs = sum((_ngrams(r, n) for r in references), Counter())
        parts.append(_sari_ngram(_ngrams(source, n), _ngrams(output, n), refs, len(references)))
    keep, delete, add = (sum(p[i] for p in parts) / 4 for i in range(3))
    return (keep + delete + add) / 3


def first_letter(text: str) -> str:
    """The first non-space character, uppercased: the chosen option of "A"/"B"/"C"
    answers (TRACE scores C-STANCE, FOMC and ScienceQA on it)."""
    stripped = text.strip()
    return stripped[:1].upper()


_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def first_number(text: str) -> str:
    """The first number in ``text`` in a canonical form ("6.50" -> "6.5", "7.0" -> "7"),
    or "" if it has none (NumGLUE's answers)."""
    match = _NUMBER.search(text.replace(",", ""))
    if not match:
        return ""
    value = float(match.group())
    return str(int(value)) if value.is_integer() else repr(value)


def last_number(text: str) -> str:
    """The last number in ``text`` in the canonical form of :func:`first_number`: a
    worked answer's result (GSM8K's ``#### 42``)."""
    found = _NUMBER.findall(text.replace(",", ""))
    return first_number(found[-1]) if found else ""


EXTRACTORS: dict[str, Callable[[str], str]] = {
    "label": lambda text: normalize_answer(extract_answer(text)),  # the protocol's
    "text": lambda text: text,
    "first_letter": first_letter,
    "first_number": first_number,
    "last_number": last_number,
}


METRICS: dict[str, Metric] = {
    "accuracy": accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "bleu": bleu,
    "sari": sari,
}


def get_metric(name: str) -> Metric:
    if name not in METRICS:
        raise UnknownNameError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")
    return METRICS[name]


def score(
    metric: str,
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Sequence[str] = (),
    extract: str = "text",
) -> float:
    """A task's score (0-100): ``extract`` (a name of :data:`EXTRACTORS`) applied to
    both predictions and references, then ``metric``."""
    if extract not in EXTRACTORS:
        raise UnknownNameError(
            f"unknown answer extraction {extract!r}; valid: {', '.join(EXTRACTORS)}"
        )
    pick = EXTRACTORS[extract]
    return get_metric(metric)(
        [pick(p) for p in predictions], [pick(r) for r in references], sources
    )
