"""Synthetic arithmetic problems: gold answers, bounds, splits and determinism."""

import random
import re

import pytest

from stages import problems


def test_answer_and_responses_of_a_known_problem() -> None:
    p = problems.Problem(start=2, deltas=(7, -3, 1))
    assert p.question == "Compute 2+7-3+1."
    assert p.values == (9, 6, 7)
    assert p.answer == 7
    assert p.steps == 3
    assert problems.acc_response(p) == "9-3+1\n6+1\n7\n</think>\n\\boxed{7}"
    assert problems.len_response(p) == "</think>\n\\boxed{7}"


def test_gold_answer_matches_python_evaluation_of_the_question() -> None:
    for p in problems.generate(3, 200, 8, split="train"):
        expression = re.fullmatch(r"Compute ([0-9+-]+)\.", p.question).group(1)
        assert p.answer == eval(expression)  # the question is digits and +/- only


def test_running_values_stay_in_bounds() -> None:
    rng = random.Random(0)
    for steps in range(1, 9):
        for _ in range(200):
            p = problems.random_problem(rng, steps)
            assert p.steps == steps
            assert all(1 <= abs(d) <= 9 for d in p.deltas)
            values = (p.start, *p.values)
            assert all(problems.MIN_VALUE <= v <= problems.MAX_VALUE for v in values)


def test_generate_is_deterministic_and_grades_difficulty() -> None:
    a = list(problems.generate(5, 64, 8, split="eval"))
    b = list(problems.generate(5, 64, 8, split="eval"))
    assert a == b
    assert [p.steps for p in a] == [1 + i % 8 for i in range(64)]
    assert a != list(problems.generate(6, 64, 8, split="eval"))


def test_splits_are_disjoint_and_eval_questions_distinct() -> None:
    eval_qs = [p.question for p in problems.generate(0, 400, 8, split="eval")]
    assert len(set(eval_qs)) == len(eval_qs)
    assert all(problems.in_eval_split(q) for q in eval_qs)
    train_qs = {p.question for p in problems.generate(0, 5000, 8, split="train")}
    assert not train_qs & set(eval_qs)
    assert not any(problems.in_eval_split(q) for q in train_qs)


def test_eval_steps_with_too_few_questions_drop_out() -> None:
    counts = [0] * 9
    for p in problems.generate(0, 320, 8, split="eval"):
        counts[p.steps] += 1
    assert 0 < counts[1] < 40  # there are only about 90 one-step questions in all
    assert min(counts[2:]) >= 40


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):
        problems.random_problem(random.Random(0), 0)
    with pytest.raises(ValueError, match="split must be 'eval' or 'train', got 'test'"):
        next(problems.generate(0, 1, 8, split="test"))
    with pytest.raises(ValueError, match="distinct eval problems exist, asked for 500"):
        list(problems.generate(0, 500, 1, split="eval"))
