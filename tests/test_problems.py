import json
import random
from pathlib import Path

import pytest

from stages.problems import (
    MAX_STEPS,
    Problem,
    direct_response,
    draw,
    eval_set,
    is_eval,
    random_problem,
    steps_response,
)

EVAL = Path(__file__).resolve().parents[1] / "data" / "embedded" / "eval.jsonl"


def test_left_to_right():
    p = Problem((7, 1, 3, 2, 1), ("-", "+", "-", "+"))
    assert p.question == "7-1+3-2+1 ="
    assert p.running() == [6, 9, 7, 8]
    assert p.answer == "8"


def test_running_values_stay_single_digits():
    rng = random.Random(0)
    for i in range(2000):
        p = random_problem(rng, 1 + i % MAX_STEPS)
        assert all(0 <= v <= 9 for v in p.running()), p


def test_responses():
    p = Problem((7, 1, 3, 2, 1), ("-", "+", "-", "+"))
    assert steps_response(p) == "7-1=6\n6+3=9\n9-2=7\n7+1=8\n</think>\n\n\\boxed{8}"
    assert direct_response(p) == "</think>\n\n\\boxed{8}"


def test_steps_out_of_range():
    with pytest.raises(ValueError, match=r"steps must be in \[1, 6\], got 7"):
        random_problem(random.Random(0), 7)


def test_training_draws_never_hit_the_eval_share():
    rng = random.Random(3)
    drawn = [draw(rng, 1 + i % MAX_STEPS, held_out=False) for i in range(3000)]
    assert not any(is_eval(p.question) for p in drawn)
    # k=1 has 110 questions, 65 of them held out: training sees all the other 45.
    k1 = {p.question for p in drawn if p.steps == 1}
    assert len(k1) == 45


def test_eval_set_is_held_out_distinct_and_graded():
    problems = eval_set(0, 50)
    assert len(problems) == 300
    assert all(is_eval(p.question) for p in problems)
    assert len({p.question for p in problems}) == 300
    assert [sum(p.steps == k for p in problems) for k in range(1, 7)] == [50] * 6
    assert eval_set(0, 50) == problems


def test_committed_eval_set_matches_the_generator():
    build = json.loads((EVAL.parent / "build.json").read_text())
    rows = [json.loads(line) for line in EVAL.read_text().splitlines()]
    expected = eval_set(build["seed"], build["settings"]["eval_per_steps"])
    assert len(rows) >= 300
    assert rows == [{"question": p.question, "answer": p.answer} for p in expected]
