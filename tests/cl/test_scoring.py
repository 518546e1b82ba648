"""Scoring of answers: the protocol's exact match, and the free-text metrics against
reference values (a reference implementation's worked example, hand computations)."""

import pytest

from cljax.cl import scoring
from cljax.cl.scoring import extract_answer, normalize_answer
from cljax.errors import UnknownNameError


def test_normalize_answer_matches_the_protocol():
    assert normalize_answer("  Very   Positive.\n") == "very positive"
    assert normalize_answer("Science or Technology!") == "science or technology"
    assert normalize_answer("Society & Culture") == "society culture"


def test_extract_answer_takes_text_after_the_last_marker():
    assert extract_answer("Task:TC\n...\nAnswer: Sports") == " Sports"
    assert extract_answer("Answer: x\nAnswer: World") == " World"
    assert extract_answer("World") == "World"


def test_classification_accuracy_is_exact_match_of_the_normalised_label():
    got = scoring.score(
        "accuracy",
        ["Answer: World", "sports.", "Business news"],
        ["World", "Sports", "Business"],
        extract="label",
    )
    assert got == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        scoring.score("accuracy", ["a", "b"], ["a"], extract="label")


# ------------------------------------------------------------------- free-text metrics


def test_sari_matches_the_reference_implementations_worked_example():
    # The example documented with the `evaluate` library's SARI (three references).
    score = scoring.sari(
        ["About 95 you now get in."],
        [
            [
                "About 95 species are currently known.",
                "About 95 species are now accepted.",
                "95 species are now accepted.",
            ]
        ],
        ["About 95 species are currently accepted."],
    )
    assert score == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_by_hand():
    # Output = reference: keep, delete and add are all perfect at every n-gram order.
    assert scoring.sari(["a c"], ["a c"], ["a b"]) == pytest.approx(100.0)
    # Output = source "a b", reference "a c". Unigrams: keep precision 1/2 ("b" kept
    # wrongly), recall 1 -> F1 2/3; nothing deleted -> 1; "c" not added -> 0. Bigrams:
    # keep F1 0 ("a b" kept, not in the reference), delete 1, add 0. Orders 3 and 4 are
    # empty: 1 each.
    keep, delete, add = (2 / 3 + 0 + 1 + 1) / 4, 1.0, (0 + 0 + 1 + 1) / 4
    assert scoring.sari(["a b"], ["a c"], ["a b"]) == pytest.approx(100 * (keep + delete + add) / 3)
    with pytest.raises(ValueError, match="sari needs the sources"):
        scoring.sari(["a"], ["a"], [])


def test_rouge_l_edit_similarity_bleu_and_accuracy_by_hand():
    # LCS "the cat sat" = 3 tokens: precision 3/3, recall 3/4, F1 6/7.
    assert scoring.rouge_l(["the cat sat"], ["the cat was sat"]) == pytest.approx(600 / 7)
    # kitten / sitting: LCS "ittn" (4), Indel distance 6 + 7 - 8 = 5 of 13 characters.
    assert scoring.edit_similarity(["kitten"], ["sitting"]) == pytest.approx(100 * 8 / 13)
    assert scoring.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(
        100.0
    )
    assert scoring.bleu(["a b c d"], ["w x y z"]) == 0.0
    assert scoring.accuracy([" 7\n", "A"], ["7", "a"]) == 50.0
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        scoring.rouge_l(["a", "b"], ["a"])


def test_an_unknown_metric_names_the_valid_ones():
    assert scoring.get_metric("rouge_l") is scoring.rouge_l
    with pytest.raises(UnknownNameError, match="unknown metric 'rouge'.*rouge_l.*sari"):
        scoring.get_metric("rouge")


def test_answer_extraction_as_trace_scores_choices_and_numbers():
    assert scoring.first_letter("  b\nBecause foxes are mammals.") == "B"
    assert scoring.first_letter("") == ""
    assert scoring.first_number("The answer is 6.50 kg, not 7") == "6.5"
    assert scoring.first_number("1,200.0") == "1200"
    assert scoring.first_number("none") == ""
    # ScienceQA: the option letter decides, the reasoning after it does not
    refs = ["B\nBecause water is a compound.", "A\nBecause iron is magnetic."]
    preds = ["B\nBecause it is wet.", "B"]
    assert scoring.score("accuracy", preds, refs, extract="first_letter") == 50.0
    assert scoring.score("accuracy", ["6.5", "65"], ["6.50", "6.5"], extract="first_number") == 50.0
    with pytest.raises(UnknownNameError, match="unknown answer extraction 'letter'.*first_letter"):
        scoring.score("accuracy", ["a"], ["a"], extract="letter")
