import pytest

from cljax.cl.scoring import exact_match, extract_answer, normalize_answer


def test_normalize_answer_matches_the_protocol():
    assert normalize_answer("  Very   Positive.\n") == "very positive"
    assert normalize_answer("Science or Technology!") == "science or technology"
    assert normalize_answer("Society & Culture") == "society culture"


def test_extract_answer_takes_text_after_the_last_marker():
    assert extract_answer("Task:TC\n...\nAnswer: Sports") == " Sports"
    assert extract_answer("Answer: x\nAnswer: World") == " World"
    assert extract_answer("World") == "World"


def test_exact_match():
    got = exact_match(
        ["Answer: World", "sports.", "Business news"], ["World", "Sports", "Business"]
    )
    assert got == [True, True, False]
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        exact_match(["a", "b"], ["a"])
