"""Scoring of generated answers as the protocol defines it: take the text after the
last "Answer:" (decoder-only outputs may repeat the prompt), normalise (lowercase,
strip punctuation, collapse whitespace) and compare for exact match.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
_SPACES = re.compile(r"\s+")


def normalize_answer(text: str) -> str:
    """Lowercase, remove ASCII punctuation, collapse runs of whitespace, strip."""
    return _SPACES.sub(" ", _PUNCTUATION.sub("", text.lower())).strip()


def extract_answer(generated: str, marker: str = "Answer:") -> str:
    """The text after the last ``marker`` (the whole text if it has none)."""
    index = generated.rfind(marker)
    return generated if index < 0 else generated[index + len(marker) :]


def exact_match(predictions: Sequence[str], labels: Sequence[str]) -> list[bool]:
    """Per-item exact match after extraction and normalisation."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions for {len(labels)} labels")
    return [
        normalize_answer(extract_answer(p)) == normalize_answer(label)
        for p, label in zip(predictions, labels, strict=True)
    ]
