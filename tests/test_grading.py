"""Answer extraction and verdicts on real reasoning-model shaped responses."""

import pytest
from math_verify import parse, verify

from stages.grading import (
    GradingError,
    boxed_answers,
    extract_answer,
    grade,
    is_equivalent,
    parse_gold,
)


def test_boxed_answers_balances_nested_braces() -> None:
    text = r"so \boxed{\frac{1}{2}} and \boxed{\sqrt{\frac{a}{b}}}"
    assert boxed_answers(text) == [r"\frac{1}{2}", r"\sqrt{\frac{a}{b}}"]


def test_boxed_answers_ignores_escaped_braces() -> None:
    assert boxed_answers(r"\boxed{\{1, 2\}}") == [r"\{1, 2\}"]


def test_boxed_answers_skips_an_unclosed_box_but_keeps_one_inside_it() -> None:
    assert boxed_answers(r"\boxed{3 and then \boxed{4}") == ["4"]
    assert boxed_answers(r"\boxed{12") == []


def test_boxed_answers_counts_a_box_in_a_box_once() -> None:
    assert boxed_answers(r"\boxed{\boxed{7}}") == [r"\boxed{7}"]


def test_last_box_after_think_is_the_answer() -> None:
    response = (
        "Let me try 3+4.\n\nMaybe \\boxed{6}? No, 7.\n</think>\n\n"
        "First \\boxed{8}, corrected: the answer is \\boxed{7}."
    )
    assert extract_answer(response) == ("7", True, "formatted")
    assert grade(response, "7").correct


def test_box_inside_think_does_not_count() -> None:
    response = "The sum is \\boxed{5}.\n</think>\nThe answer is 5."
    answer, formatted, reason = extract_answer(response)
    assert (answer, formatted) == (None, False)
    assert "after </think>" in reason
    assert not grade(response, "5").correct


def test_cut_off_inside_think_is_not_graded_from_reasoning() -> None:
    response = "2 + 3 = 5, so \\boxed{5}. Wait, let me double-check the"
    verdict = grade(response, "5")
    assert verdict.extracted is None
    assert not verdict.correct and not verdict.formatted
    assert "cut off" in verdict.reason


def test_two_think_ends_is_unformatted_and_graded_after_the_last() -> None:
    response = "a </think> \\boxed{4} b </think> so \\boxed{5}"
    verdict = grade(response, "5")
    assert (verdict.extracted, verdict.formatted, verdict.correct) == ("5", False, True)
    assert verdict.reason == "2 </think> tags"


def test_empty_box_is_no_answer() -> None:
    verdict = grade("x</think>\\boxed{ }", "1")
    assert (verdict.extracted, verdict.formatted) == (None, False)


def test_unclosed_final_box_falls_back_to_the_last_closed_one() -> None:
    response = "x</think>\\boxed{3} and finally \\boxed{4"
    assert extract_answer(response) == ("3", True, "formatted")


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("0.5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", "0.5"),
        (r"\frac12", r"\frac{1}{2}"),
        ("x = 3", "3"),
        ("1{,}000", "1000"),
        (r"\{1,2\}", r"\{2,1\}"),
        (r"2\sqrt{2}", r"\sqrt{8}"),
        (r"\text{Evelyn}", r"\text{Evelyn}"),
        (r"(1, 2)", "(1,2)"),
    ],
)
def test_equivalent_answers(answer: str, gold: str) -> None:
    assert is_equivalent(answer, gold)


@pytest.mark.parametrize(
    ("answer", "gold"),
    [("0.51", r"\frac{1}{2}"), ("6", "7"), (r"\sqrt{2}", "2"), ("(1,2)", "[1,2]")],
)
def test_different_answers(answer: str, gold: str) -> None:
    assert not is_equivalent(answer, gold)


@pytest.mark.parametrize(
    ("answer", "gold"),
    [
        ("7", "7"),
        ("007", "7"),
        ("-0", "0"),
        ("-12", "12"),
        ("123456789012", "123456789012"),
        ("10", "1"),
        ("3", "-3"),
        ("0", "00"),
    ],
)
def test_integer_shortcut_agrees_with_math_verify(answer: str, gold: str) -> None:
    assert is_equivalent(answer, gold) == verify(
        parse(f"${gold}$"), parse(f"\\boxed{{{answer}}}")
    )


def test_formatted_but_wrong_says_so() -> None:
    verdict = grade("x</think>\\boxed{6}", "7")
    assert verdict.formatted and not verdict.correct
    assert verdict.reason == "not equivalent to the gold answer"


def test_unparseable_gold_is_an_error_naming_it() -> None:
    with pytest.raises(GradingError, match="'' cannot be parsed"):
        parse_gold("")
